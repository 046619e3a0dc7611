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

/// The request id the client sent, or a new one.
pub fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers
        .get(&REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 200)
    {
        return id.clone();
    }
    let value = HeaderValue::from_bytes(&new_request_id())
        .unwrap_or_else(|_| HeaderValue::from_static("0"));
    headers.insert(REQUEST_ID, value.clone());
    value
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

pub fn log_id(parts: &Parts) -> &str {
    parts
        .headers
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The request to send upstream, rebuilt from what was checked (SPEC §2):
/// same method; the normalized path (prefix stripped) and the query
/// re-encoded from its parsed pairs; the client's headers minus hop-by-hop
/// ones, `Host` and an ignored `preview_token`, with every credential and
/// scope header carrying the value that was checked (the stack's api_key on
/// REST routes, none on GraphQL where it is in the path; the checked branch)
/// and token values marked sensitive, so that HPACK never indexes them.
/// Its URI is absolute for the `pooled` client, else in origin form (the
/// HTTP/1.1 pool sets `Host` itself).
pub fn upstream_request(
    parts: &Parts,
    permit: &Permit<'_>,
    conn: &ConnInfo,
    body: Bytes,
    pooled: bool,
) -> Option<Request<Full<Bytes>>> {
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

    let mut headers = parts.headers.clone();
    // One pass over the copy: which hop-by-hop and replaced headers are
    // there (so that only those are looked up again), token values marked
    // sensitive, api_key (REST) and branch set to what was checked where the
    // client's differ (blanks the check trimmed).
    let mut hop_by_hop = [false; HOP_BY_HOP.len()];
    let (mut has_host, mut has_preview, mut has_api_key, mut has_forwarded_for) =
        (false, false, false, false);
    for (name, value) in headers.iter_mut() {
        let checked = match name.as_str() {
            "host" => {
                has_host = true;
                continue;
            }
            "access_token" => {
                value.set_sensitive(true);
                continue;
            }
            "preview_token" => {
                has_preview = true;
                value.set_sensitive(true);
                continue;
            }
            "x-forwarded-for" => {
                has_forwarded_for = true;
                continue;
            }
            "api_key" => {
                has_api_key = true;
                &*permit.stack.api_key
            }
            "branch" => &*permit.branch,
            _ => {
                if let Some(i) = hop_by_hop_index(name) {
                    hop_by_hop[i] = true;
                }
                continue;
            }
        };
        if value.as_bytes() != checked.as_bytes() {
            *value = HeaderValue::from_str(checked).ok()?;
        }
    }
    strip_present(&mut headers, hop_by_hop);
    if has_host {
        headers.remove(header::HOST);
    }
    if has_preview && permit.session == SessionKind::Delivery {
        headers.remove(PREVIEW_TOKEN);
    }
    let api_key_in_path = permit.route.kind.api_key_in_path();
    if api_key_in_path && has_api_key {
        headers.remove(API_KEY);
    }
    if !api_key_in_path && !has_api_key {
        headers.insert(API_KEY, HeaderValue::from_str(&permit.stack.api_key).ok()?);
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
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
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

        let mut headers = HeaderMap::new();
        let made = request_id(&mut headers);
        assert_eq!(made.len(), 32);
        assert_eq!(headers.get(&REQUEST_ID), Some(&made));
        let mut given = HeaderMap::new();
        given.insert(REQUEST_ID, HeaderValue::from_static("req-1"));
        assert_eq!(request_id(&mut given), "req-1");
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
        let request = upstream_request(&parts, &permit, &conn, Bytes::new(), true).unwrap();
        let headers = request.headers();
        assert!(headers[&ACCESS_TOKEN].is_sensitive());
        assert!(headers[&PREVIEW_TOKEN].is_sensitive());
        assert!(!headers["x-other"].is_sensitive());
    }
}
