//! What the origin receives: the upstream request built from the client's,
//! and the hop-by-hop headers that never cross the gateway.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};
use http::Request;
use http_body_util::Full;

use crate::conn::ConnInfo;
use crate::decision::{Permit, SessionKind, ACCESS_TOKEN, PREVIEW_TOKEN};

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
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let id: u128 = rand::random();
    let mut text = [0u8; 32];
    for (i, digit) in text.iter_mut().enumerate() {
        *digit = HEX[((id >> (124 - 4 * i)) & 0xf) as usize];
    }
    let value = HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("0"));
    headers.insert(REQUEST_ID, value.clone());
    value
}

pub fn log_id(parts: &Parts) -> &str {
    parts
        .headers
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The request to send upstream: same method, path (prefix stripped), query
/// and headers, minus hop-by-hop headers and an ignored `preview_token`. Its
/// URI is absolute for the `pooled` client, else in origin form (the HTTP/1.1
/// pool sets `Host` itself).
pub fn upstream_request(
    parts: &Parts,
    permit: &Permit<'_>,
    conn: &ConnInfo,
    body: Bytes,
    pooled: bool,
) -> Option<Request<Full<Bytes>>> {
    let path_and_query = match parts.uri.path_and_query() {
        // No prefix stripped: the client's path and query as they are.
        Some(pq) if std::ptr::eq(pq.path(), permit.path) => pq.clone(),
        _ => {
            let text = match parts.uri.query() {
                Some(query) => format!("{}?{query}", permit.path),
                None => permit.path.to_owned(),
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
    strip_hop_by_hop(&mut headers);
    headers.remove(header::HOST);
    if permit.session == SessionKind::Delivery {
        headers.remove(PREVIEW_TOKEN);
    }
    // Never indexed by HPACK on a shared upstream h2 connection (nor logged
    // by anything that honours the flag).
    // (Each is sent once at most: a second one is refused under row 16.)
    for name in [&ACCESS_TOKEN, &PREVIEW_TOKEN] {
        if let Some(value) = headers.get_mut(name) {
            value.set_sensitive(true);
        }
    }
    let forwarded_for = match headers.get(&X_FORWARDED_FOR) {
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

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names finds which are present; most requests have
    // none, most responses only `connection: keep-alive`.
    let mut present = [false; HOP_BY_HOP.len()];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|hop| hop == name) {
            present[i] = true;
        }
    }
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
    use crate::decision::{decide, Decision};

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
        let Decision::Forward(permit) = decide(&world.router, &world.stacks, &parts, now) else {
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
