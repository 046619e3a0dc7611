//! What the origin receives: the upstream request built from the client's,
//! and the hop-by-hop headers that never cross the gateway.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};
use http::Request;
use http_body_util::Full;

use crate::canonical::canonical_query;
use crate::conn::ConnInfo;
use crate::decision::{Permit, SessionKind, API_KEY, PREVIEW_TOKEN};

/// The request id header, added when absent and returned on every response.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that belong to one connection and are never forwarded.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A request's id: the one the client sent, or a new one.
#[derive(Debug)]
pub struct RequestId {
    pub value: HeaderValue,
    /// Made here: the origin is sent it too (the client's goes as it came).
    pub new: bool,
}

impl RequestId {
    /// The id of a request with these headers.
    pub fn of(headers: &HeaderMap) -> RequestId {
        if let Some(id) = headers
            .get(&REQUEST_ID)
            .filter(|v| !v.is_empty() && v.len() <= 200)
        {
            return RequestId {
                value: id.clone(),
                new: false,
            };
        }
        let value = HeaderValue::from_bytes(&new_request_id())
            .unwrap_or_else(|_| HeaderValue::from_static("0"));
        RequestId { value, new: true }
    }

    /// As the access log writes it (`""` if it is not text).
    pub fn text(&self) -> &str {
        self.value.to_str().unwrap_or("")
    }
}

/// A new request id: 32 lower-case hex digits. The first 16 are drawn at
/// random once per thread, the last 16 are the thread's count of ids passed
/// through a bijection (splitmix64's finalizer), so that no two ids of one
/// thread are equal and ids of different threads or replicas differ in
/// their random half. Cheaper than drawing 128 random bits per request; a
/// request id is a label for logs, not a secret.
fn new_request_id() -> [u8; 32] {
    thread_local! {
        static NEXT: std::cell::Cell<(u64, u64)> =
            std::cell::Cell::new((rand::random(), rand::random()));
    }
    let (prefix, count) = NEXT.with(|next| {
        let (prefix, count) = next.get();
        next.set((prefix, count.wrapping_add(1)));
        (prefix, count)
    });
    let mut text = [0u8; 32];
    hex_into(&mut text[..16], prefix);
    hex_into(&mut text[16..], mix(count));
    text
}

/// splitmix64's finalizer: a bijection on `u64` that scatters neighbours.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `value` as 16 lower-case hex digits, two at a time.
fn hex_into(out: &mut [u8], value: u64) {
    static PAIRS: [[u8; 2]; 256] = {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut table = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            table[i] = [HEX[i >> 4], HEX[i & 0xf]];
            i += 1;
        }
        table
    };
    for (pair, byte) in out.chunks_exact_mut(2).zip(value.to_be_bytes()) {
        pair.copy_from_slice(&PAIRS[usize::from(byte)]);
    }
}

/// What the origin is sent besides the client's method and headers, decided
/// while the request's permit still holds what was read from it: the
/// target, the checked `branch` where the client's header reads otherwise,
/// and where the stack's api_key goes. It borrows nothing of the request,
/// so that the client's head can then move into the upstream request
/// ([`upstream_request`]) instead of being copied.
#[derive(Debug)]
pub struct Target<'r> {
    uri: Uri,
    /// The checked branch, when the client's `branch` header differs from it.
    branch: Option<HeaderValue>,
    /// The stack's api_key: sent in the `api_key` header on REST routes,
    /// `None` on GraphQL routes, whose path carries it.
    api_key: Option<&'r str>,
    /// A delivery request: an ignored `preview_token` is not forwarded.
    delivery: bool,
}

impl<'r> Target<'r> {
    /// The target of a permitted request (SPEC §2): the normalized path
    /// (prefix stripped) and the query re-encoded from its parsed pairs.
    /// Its URI is absolute for the `pooled` client, else in origin form (the
    /// HTTP/1.1 pool sets `Host` itself). `None`: the target cannot be
    /// rebuilt (the request is refused as malformed).
    pub fn of(parts: &Parts, permit: &Permit<'r, '_>, pooled: bool) -> Option<Target<'r>> {
        let query = match parts.uri.query() {
            Some(query) if permit.query_canonical => Some(Cow::Borrowed(query)),
            query => query.map(canonical_query),
        };
        let path_and_query = match (parts.uri.path_and_query(), &permit.path, &query) {
            // Nothing rewritten: the client's path and query as they are.
            (Some(pq), Cow::Borrowed(path), None | Some(Cow::Borrowed(_)))
                if std::ptr::eq(pq.path(), *path) =>
            {
                pq.clone()
            }
            _ => {
                let text = match &query {
                    Some(query) => format!("{}?{query}", permit.path),
                    None => permit.path.clone().into_owned(),
                };
                PathAndQuery::try_from(text).ok()?
            }
        };
        let uri = if pooled {
            let upstream = &permit.route.upstream;
            let mut uri = http::uri::Parts::default();
            uri.scheme = Some(upstream.scheme.clone());
            uri.authority = Some(upstream.authority.clone());
            uri.path_and_query = Some(path_and_query);
            Uri::from_parts(uri).ok()?
        } else {
            Uri::from(path_and_query)
        };
        let branch = if permit.branch_rewritten {
            Some(HeaderValue::from_str(&permit.branch).ok()?)
        } else {
            None
        };
        let stack: &'r crate::registry::StackRegistry = permit.stack;
        Some(Target {
            uri,
            branch,
            api_key: (!permit.route.kind.api_key_in_path()).then_some(&*stack.api_key),
            delivery: permit.session == SessionKind::Delivery,
        })
    }
}

/// The upstream request, and the client's `Origin` header.
pub struct Rebuilt {
    /// `None`: a header could not be rebuilt (refused as malformed).
    pub request: Option<Request<Full<Bytes>>>,
    /// For the CORS headers of a refusal answered after this (the client's
    /// head has moved into the request).
    pub origin: Option<HeaderValue>,
}

/// The request to send upstream, rebuilt from what was checked (SPEC §2):
/// same method; the [`Target`]; the client's headers minus hop-by-hop
/// ones, `Host` and an ignored `preview_token`, with every credential and
/// scope header carrying the value that was checked (the stack's api_key on
/// REST routes, none on GraphQL where it is in the path; the checked branch)
/// and token values marked sensitive, so that HPACK never indexes them.
/// A request that came without an id is sent the one made for it.
/// The client's method and header map move from `head` (left empty) into
/// the upstream request: not copied.
pub fn upstream_request(
    head: &mut Parts,
    target: Target<'_>,
    id: &RequestId,
    conn: &ConnInfo,
    body: Bytes,
) -> Rebuilt {
    let mut origin = None;
    let request = rebuild(head, target, id, conn, body, &mut origin);
    Rebuilt { request, origin }
}

fn rebuild(
    head: &mut Parts,
    target: Target<'_>,
    id: &RequestId,
    conn: &ConnInfo,
    body: Bytes,
    origin: &mut Option<HeaderValue>,
) -> Option<Request<Full<Bytes>>> {
    let method = std::mem::take(&mut head.method);
    let mut headers = std::mem::take(&mut head.headers);
    // The headers the gateway adds (`x-forwarded-for`, `-proto`, a new
    // `x-request-id` and the `api_key` a client may lack): room for them at
    // once, not a growth of the map per insert.
    headers.reserve(4);
    // One pass over the map: which hop-by-hop and replaced headers are
    // there (so that only those are looked up again), token values marked
    // sensitive, api_key (REST) and branch set to what was checked where the
    // client's differ (blanks the check trimmed), the client's `Origin`.
    let mut hop_by_hop = [false; HOP_BY_HOP.len()];
    let (mut has_host, mut has_preview, mut has_api_key, mut has_forwarded_for) =
        (false, false, false, false);
    for (name, value) in headers.iter_mut() {
        match name.as_str() {
            "host" => has_host = true,
            "origin" => {
                origin.get_or_insert_with(|| value.clone());
            }
            "access_token" => value.set_sensitive(true),
            "preview_token" => {
                has_preview = true;
                value.set_sensitive(true);
            }
            "x-forwarded-for" => has_forwarded_for = true,
            "api_key" => {
                has_api_key = true;
                if let Some(api_key) = target.api_key {
                    if value.as_bytes() != api_key.as_bytes() {
                        *value = HeaderValue::from_str(api_key).ok()?;
                    }
                }
            }
            "branch" => {
                if let Some(branch) = &target.branch {
                    *value = branch.clone();
                }
            }
            _ => {
                if let Some(i) = hop_by_hop_index(name) {
                    hop_by_hop[i] = true;
                }
            }
        }
    }
    strip_present(&mut headers, hop_by_hop);
    if has_host {
        headers.remove(header::HOST);
    }
    if has_preview && target.delivery {
        headers.remove(PREVIEW_TOKEN);
    }
    match target.api_key {
        None if has_api_key => {
            headers.remove(API_KEY);
        }
        Some(api_key) if !has_api_key => {
            headers.insert(API_KEY, HeaderValue::from_str(api_key).ok()?);
        }
        _ => {}
    }
    let prior = if has_forwarded_for {
        headers.get(&X_FORWARDED_FOR)
    } else {
        None
    };
    let forwarded_for = match prior {
        Some(prior) => {
            let mut value = BytesMut::with_capacity(prior.len() + 2 + conn.client_ip.len());
            value.extend_from_slice(prior.as_bytes());
            value.extend_from_slice(b", ");
            value.extend_from_slice(conn.client_ip.as_bytes());
            HeaderValue::from_maybe_shared(value.freeze()).ok()?
        }
        None => conn.client_ip.clone(),
    };
    headers.insert(X_FORWARDED_FOR, forwarded_for);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(conn.scheme));
    if id.new {
        headers.insert(REQUEST_ID, id.value.clone());
    }
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = target.uri;
    *request.headers_mut() = headers;
    Some(request)
}

/// Where `name` is in [`HOP_BY_HOP`]: one match on the name's text (its
/// length first), cheaper than comparing it with each entry.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "transfer-encoding" => 7,
        "upgrade" => 8,
        _ => return None,
    })
}

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are present; most requests have
    // none, most responses only `connection: keep-alive`.
    let mut present = [false; HOP_BY_HOP.len()];
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present[i] = true;
        }
    }
    strip_present(headers, present);
}

/// Removes the [`HOP_BY_HOP`] headers marked `present`, and the headers a
/// `connection` header names.
fn strip_present(headers: &mut HeaderMap, present: [bool; HOP_BY_HOP.len()]) {
    if !present.contains(&true) {
        return;
    }
    // Other headers that `connection` names are hop-by-hop too.
    let mut listed: Vec<HeaderName> = Vec::new();
    let values = headers.get_all(header::CONNECTION).iter();
    for option in values
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let option = option.trim();
        let known = option.is_empty()
            || option.eq_ignore_ascii_case("close")
            || HOP_BY_HOP
                .iter()
                .any(|hop| hop.as_str().eq_ignore_ascii_case(option));
        if !known {
            if let Ok(name) = HeaderName::from_bytes(option.as_bytes()) {
                listed.push(name);
            }
        }
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
    for name in listed {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::decision::{Decision, ACCESS_TOKEN};

    #[test]
    fn the_hop_by_hop_match_agrees_with_the_table() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop_index(&header::HOST), None);
        assert_eq!(
            hop_by_hop_index(&HeaderName::from_static("x-upgrade")),
            None
        );
    }

    #[test]
    fn request_ids_are_hex_and_never_repeat() {
        let ids: Vec<[u8; 32]> = (0..10_000).map(|_| new_request_id()).collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        for id in &ids {
            assert!(id.iter().all(|b| b"0123456789abcdef".contains(b)), "{id:?}");
        }
        // One thread's ids share their random half, and the other half of
        // neighbours differs in more than the last digit.
        assert!(ids.iter().all(|id| id[..16] == ids[0][..16]));
        assert_ne!(ids[0][16..31], ids[1][16..31]);
        let other = std::thread::spawn(new_request_id).join().unwrap();
        assert_ne!(other[..16], ids[0][..16]);

        let made = RequestId::of(&HeaderMap::new());
        assert!(made.new);
        assert_eq!(made.text().len(), 32);
        let mut given = HeaderMap::new();
        given.insert(REQUEST_ID, HeaderValue::from_static("req-1"));
        let given = RequestId::of(&given);
        assert!(!given.new);
        assert_eq!(given.text(), "req-1");
        let mut blank = HeaderMap::new();
        blank.insert(REQUEST_ID, HeaderValue::from_static(""));
        assert!(RequestId::of(&blank).new);
    }

    #[test]
    fn hex_digits_are_the_value_in_order() {
        let mut out = [0u8; 16];
        hex_into(&mut out, 0x0123_4567_89ab_cdef);
        assert_eq!(&out, b"0123456789abcdef");
        // The mix is a bijection: distinct counts give distinct halves.
        assert_ne!(mix(0), mix(1));
        assert_eq!(mix(0), 0);
    }

    #[test]
    fn forwarded_credentials_are_marked_sensitive() {
        let world = crate::decision::tests::world();
        let (parts, _) = Request::get("/v3/entries")
            .header("host", "preview.test")
            .header("api_key", "blt_site")
            .header("access_token", "cs_prod")
            .header("preview_token", "cs_prod_preview")
            .header("x-other", "plain")
            .header("origin", "https://site.test")
            .header("branch", " main ")
            .body(())
            .unwrap()
            .into_parts();
        let now = tokio::time::Instant::now();
        let Decision::Forward(permit) = world.decide(&parts, now) else {
            panic!("a preview request with both credentials is allowed");
        };
        let metrics = crate::metrics::Metrics::new().unwrap();
        let sessions = crate::sessions::Sessions::new(metrics, vec![]);
        let conn = ConnInfo::new(
            "127.0.0.1:1".parse().unwrap(),
            "http",
            sessions.connection(),
        );
        let id = RequestId::of(&parts.headers);
        let target = Target::of(&parts, &permit, true).unwrap();
        drop(permit);
        // The client's head moves into the upstream request.
        let mut parts = parts;
        let rebuilt = upstream_request(&mut parts, target, &id, &conn, Bytes::new());
        assert!(parts.headers.is_empty());
        assert_eq!(rebuilt.origin.unwrap(), "https://site.test");
        let request = rebuilt.request.unwrap();
        let headers = request.headers();
        assert!(headers[&ACCESS_TOKEN].is_sensitive());
        assert!(headers[&PREVIEW_TOKEN].is_sensitive());
        assert!(!headers["x-other"].is_sensitive());
        // What was checked, not what was sent: the trimmed branch; no
        // `Host`; the id made for a request without one.
        assert_eq!(headers["branch"], "main");
        assert!(!headers.contains_key(header::HOST));
        assert_eq!(headers[&REQUEST_ID], id.value);
        assert_eq!(headers["api_key"], "blt_site");
        assert_eq!(request.uri().path(), "/v3/entries");
    }
}
