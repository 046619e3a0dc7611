//! One reading of each request, over the wire (SPEC §2 and row 16 of §3):
//! hostile variants of allowed requests, over HTTP/1.1 (raw bytes) and h2,
//! are either refused with 400 `bad_request` and never reach the origin, or
//! reach it exactly as the gateway checked them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn world() -> World {
    World::start(standard_tokens(), "").await
}

/// Writes `bytes` on a new connection and reads until the server closes
/// (or 3 s pass).
async fn raw(w: &World, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(w.gateway.http).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// An allowed delivery GET's head, with `extra` header lines.
fn allowed_head(target: &str, extra: &str) -> String {
    format!(
        "GET {target} HTTP/1.1\r\nhost: cdn.test\r\napi_key: {API_KEY}\r\naccess_token: {PROD}\r\n{extra}\r\n"
    )
}

/// Every response on the connection is 400 `bad_request` in Contentstack's
/// shape, there is at least one, and the origin saw nothing.
fn assert_bad(w: &World, what: &str, reply: &str) {
    assert!(reply.starts_with("HTTP/1.1 400"), "{what}: {reply}");
    let heads = reply.matches("HTTP/1.1 ").count();
    assert_eq!(
        reply.matches("HTTP/1.1 400").count(),
        heads,
        "{what}: every answer is 400: {reply}"
    );
    assert!(
        reply.contains("x-stackgate-reason: bad_request"),
        "{what}: {reply}"
    );
    assert!(reply.contains(r#""error_code":400"#), "{what}: {reply}");
    for value in ALL_VALUES {
        assert!(
            !reply.contains(value),
            "{what}: a token value in the answer"
        );
    }
    assert_eq!(w.origin.request_count(), 0, "{what}: reached the origin");
}

#[tokio::test]
async fn ambiguous_http1_requests_are_refused_before_the_origin() {
    let w = world().await;
    // The same request, allowed, reaches the origin: the cases below differ
    // from it by one hostile detail each.
    let ok = raw(
        &w,
        allowed_head("/v3/x", "connection: close\r\n").as_bytes(),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    w.origin.wait_for_requests(1).await;
    let base = w.origin.request_count();
    assert_eq!(base, 1);
    let cases: Vec<(&str, String)> = vec![
        (
            "Connection names branch",
            allowed_head("/v3/x", "branch: development\r\nconnection: branch\r\n"),
        ),
        (
            "Connection names a hyphen spelling",
            allowed_head("/v3/x", "connection: access-token\r\n"),
        ),
        (
            "Connection names x-forwarded-for",
            allowed_head("/v3/x", "x-forwarded-for: 10.0.0.1\r\nconnection: X-Forwarded-For\r\n"),
        ),
        (
            "access-token beside access_token",
            allowed_head("/v3/x", &format!("access-token: {STAGING}\r\n")),
        ),
        ("api-key", allowed_head("/v3/x", "api-key: blt_other\r\n")),
        ("preview-token", allowed_head("/v3/x", "preview-token: x\r\n")),
        (
            "two environment headers",
            allowed_head("/v3/x", "environment: production\r\nenvironment: staging\r\n"),
        ),
        (
            "environment header and query disagree",
            allowed_head("/v3/x?environment=production", "environment: staging\r\n"),
        ),
        ("bracketed environment", allowed_head("/v3/x?environment[]=staging", "")),
        ("indexed environment", allowed_head("/v3/x?environment%5B0%5D=staging", "")),
        (
            "semicolon-separated query",
            allowed_head("/v3/x?locale=en-us;environment=staging", ""),
        ),
        ("bracketed environment in another case", allowed_head("/v3/x?Environment[]=staging", "")),
        ("hyphenated credential in the query", allowed_head("/v3/x?access-token=x", "")),
        ("branch in the query", allowed_head("/v3/x?branch=development", "")),
        ("an encoded slash", allowed_head("/v3/a%2Fb", "")),
        ("climbing above the root", allowed_head("/v3/../../admin", "")),
        ("encoded dot-segments above the root", allowed_head("/%2e%2e/admin", "")),
        ("a backslash", allowed_head("/v3\\..\\x", "")),
        (
            "GET with a body",
            allowed_head("/v3/x", "content-length: 5\r\n") + "hello",
        ),
        (
            "GET with a chunked body",
            allowed_head("/v3/x", "transfer-encoding: chunked\r\n") + "5\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "HEAD with a body",
            allowed_head("/v3/x", "content-length: 2\r\n").replacen("GET", "HEAD", 1) + "hi",
        ),
        (
            "two Host headers",
            allowed_head("/v3/x", "host: preview.test\r\n"),
        ),
        (
            "userinfo in Host",
            format!(
                "GET /v3/x HTTP/1.1\r\nhost: cdn.test:1@preview.test\r\napi_key: {API_KEY}\r\naccess_token: {PROD}\r\n\r\n"
            ),
        ),
        (
            "no Host",
            format!("GET /v3/x HTTP/1.1\r\napi_key: {API_KEY}\r\naccess_token: {PROD}\r\n\r\n"),
        ),
        (
            "absolute-form target naming another host",
            allowed_head("http://preview.test/v3/x", ""),
        ),
        (
            "absolute-form target with userinfo",
            allowed_head("http://cdn.test@preview.test/v3/x", ""),
        ),
        (
            "a route prefix climbed out of",
            format!(
                "GET /cda/../admin HTTP/1.1\r\nhost: prefixed.test\r\napi_key: {API_KEY}\r\naccess_token: {PROD}\r\n\r\n"
            ),
        ),
        (
            "a route prefix climbed out of, encoded",
            format!(
                "GET /cda/%2E%2E/v3/x HTTP/1.1\r\nhost: prefixed.test\r\napi_key: {API_KEY}\r\naccess_token: {PROD}\r\n\r\n"
            ),
        ),
        (
            "a GraphQL key changed by a dot-segment",
            format!(
                "GET /stacks/{API_KEY}/../blt_other?environment=production HTTP/1.1\r\nhost: graphql.test\r\naccess_token: {PROD}\r\n\r\n"
            ),
        ),
        (
            "CL and TE after a leading empty line",
            format!(
                "\r\nPOST /stacks/{API_KEY}?environment=production HTTP/1.1\r\nhost: graphql.test\r\naccess_token: {PROD}\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
            ),
        ),
    ];
    // Each case on a connection of its own; the base request alone reached
    // the origin.
    for (what, bytes) in &cases {
        let reply = raw(&w, bytes.as_bytes()).await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{what}: {reply}");
        assert!(
            reply.contains("x-stackgate-reason: bad_request"),
            "{what}: {reply}"
        );
        assert_eq!(w.origin.request_count(), base, "{what}: reached the origin");
    }
}

#[tokio::test]
async fn a_smuggled_request_pipelined_behind_an_allowed_one_is_refused() {
    let w = world().await;
    let smuggled = format!(
        "POST /stacks/{API_KEY}?environment=production HTTP/1.1\r\nhost: graphql.test\r\naccess_token: {PROD}\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    // Both heads in one segment: the connection is refused as a whole.
    let both = format!("{}{smuggled}", allowed_head("/v3/x", ""));
    let reply = raw(&w, both.as_bytes()).await;
    assert_bad(&w, "pipelined in one segment", &reply);
    // Behind a body: the second head is found after skipping the first body.
    let posted = format!(
        "POST /stacks/{API_KEY}?environment=production HTTP/1.1\r\nhost: graphql.test\r\naccess_token: {PROD}\r\ncontent-length: 2\r\n\r\n{{}}"
    );
    let reply = raw(&w, format!("{posted}{smuggled}").as_bytes()).await;
    assert_bad(&w, "behind a body", &reply);
}

#[tokio::test]
async fn a_smuggled_request_sent_while_another_is_in_flight_is_refused() {
    let w = world().await;
    let mut stream = TcpStream::connect(w.gateway.http).await.unwrap();
    stream
        .write_all(allowed_head("/slow?ms=400", "").as_bytes())
        .await
        .unwrap();
    w.origin.wait_for_requests(1).await;
    let smuggled = format!(
        "GET /v3/x HTTP/1.1\r\nhost: cdn.test\r\napi_key: {API_KEY}\r\naccess_token: {PROD}\r\ncontent-length: 0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    stream.write_all(smuggled.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    let reply = String::from_utf8_lossy(&out);
    let second = reply
        .match_indices("HTTP/1.1 ")
        .nth(1)
        .map(|(at, _)| &reply[at..])
        .unwrap_or_else(|| panic!("two answers expected: {reply}"));
    assert!(second.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(
        second.contains("x-stackgate-reason: bad_request"),
        "{reply}"
    );
    assert_eq!(w.origin.request_count(), 1, "only the first was forwarded");
}

/// An h2 request to the gateway, built by hand.
fn h2_get(
    authority: Option<&str>,
    path: &str,
    headers: &[(&str, &str)],
) -> http::Request<Full<Bytes>> {
    let uri = match authority {
        Some(authority) => format!("http://{authority}{path}"),
        None => path.to_owned(),
    };
    let mut builder = http::Request::get(uri).version(http::Version::HTTP_2);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn ambiguous_h2_requests_are_refused_before_the_origin() {
    let w = world().await;
    let token = [("api_key", API_KEY), ("access_token", PROD)];
    let mut h2 = h2c(w.gateway.http).await;
    let ok = read(
        h2.send_request(h2_get(Some("cdn.test"), "/v3/x", &token))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let base = w.origin.request_count();

    let with = |extra: &[(&'static str, &'static str)]| {
        let mut headers = token.to_vec();
        headers.extend_from_slice(extra);
        headers
    };
    let cases = vec![
        (
            "a host that disagrees with :authority",
            h2_get(
                Some("cdn.test"),
                "/v3/x",
                &with(&[("host", "preview.test")]),
            ),
        ),
        (
            "access-token",
            h2_get(
                Some("cdn.test"),
                "/v3/x",
                &with(&[("access-token", STAGING)]),
            ),
        ),
        (
            "environment header and query disagree",
            h2_get(
                Some("cdn.test"),
                "/v3/x?environment=production",
                &with(&[("environment", "staging")]),
            ),
        ),
        (
            "bracketed environment",
            h2_get(Some("cdn.test"), "/v3/x?environment[]=staging", &token),
        ),
        (
            "a dot-segment above the root",
            h2_get(Some("cdn.test"), "/v3/../../x", &token),
        ),
        (
            "userinfo in :authority",
            h2_get(Some("cdn.test:1@preview.test"), "/v3/x", &token),
        ),
        ("neither :authority nor host", h2_get(None, "/v3/x", &token)),
        ("GET with a body", {
            let mut request = h2_get(Some("cdn.test"), "/v3/x", &token);
            *request.body_mut() = Full::new(Bytes::from_static(b"abc"));
            request
        }),
    ];
    for (what, request) in cases {
        match h2.send_request(request).await {
            Ok(response) => {
                let reply = read(response).await;
                assert_eq!(reply.status, 400, "{what}: {}", reply.text());
                assert_eq!(reply.reason(), "bad_request", "{what}");
            }
            // The h2 layer itself refused the stream: nothing forwarded either.
            Err(err) => eprintln!("{what}: refused by the h2 layer: {err}"),
        }
        assert_eq!(w.origin.request_count(), base, "{what}: reached the origin");
        h2 = h2c(w.gateway.http).await;
    }

    // A GET whose body comes in DATA frames, with no content-length.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(1);
    let body = StreamBody::new(tokio_stream_from(rx));
    let mut builder = http::Request::get("http://cdn.test/v3/x").version(http::Version::HTTP_2);
    for (name, value) in token {
        builder = builder.header(name, value);
    }
    let request = builder.body(body.boxed()).unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(TcpStream::connect(w.gateway.http).await.unwrap()),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let pending = tokio::spawn(async move { sender.send_request(request).await });
    tx.send(Ok(http_body::Frame::data(Bytes::from_static(
        b"access_token=other",
    ))))
    .await
    .unwrap();
    drop(tx);
    let reply = read(pending.await.unwrap().unwrap()).await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(reply.reason(), "bad_request");
    assert_eq!(
        w.origin.request_count(),
        base,
        "a GET body reached the origin"
    );
}

/// A receiver as a stream of body frames.
fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn what_is_allowed_arrives_as_it_was_checked() {
    let w = world().await;
    let token = [("api_key", API_KEY), ("access_token", PROD)];

    // An environment header alone (Contentstack's Java and Android SDKs) is
    // checked like the query parameter and forwarded as checked.
    let reply = send(
        w.gateway.http,
        get(
            "cdn.test",
            "/v3/x",
            &[token[0], token[1], ("environment", "production")],
        ),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = w.origin.last_request().unwrap();
    assert_eq!(seen.header("environment"), Some("production"));
    let reply = send(
        w.gateway.http,
        get(
            "cdn.test",
            "/v3/x",
            &[token[0], token[1], ("environment", "staging")],
        ),
    )
    .await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.reason(), "environment_out_of_scope");
    // In another case, the query parameter is checked all the same (row 13).
    let reply = send(
        w.gateway.http,
        get("cdn.test", "/v3/x?Environment=staging", &token),
    )
    .await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.reason(), "environment_out_of_scope");

    // Dot-segments and empty segments are resolved inside the route.
    let reply = send(
        w.gateway.http,
        get(
            "prefixed.test",
            "/cda//v3/./content_types//blog/../page/entries?include[]=author",
            &token,
        ),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = w.origin.last_request().unwrap();
    assert_eq!(seen.path, "/v3/content_types/page/entries");
    assert_eq!(seen.query.as_deref(), Some("include[]=author"));

    // The query is re-encoded from what was parsed: a `+` that the gateway
    // read as a space reaches the origin as `%20`, which no parser reads
    // another way.
    let reply = send(
        w.gateway.http,
        get(
            "cdn.test",
            "/v3/x?query=a+b&environment=product%69on&&flag",
            &token,
        ),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = w.origin.last_request().unwrap();
    assert_eq!(
        seen.query.as_deref(),
        Some("query=a%20b&environment=production&flag")
    );

    // The checked branch and api_key, one of each; the token value marked
    // sensitive does not change what arrives.
    let reply = send(
        w.gateway.http,
        get(
            "cdn.test",
            "/v3/x",
            &[token[0], token[1], ("branch", "development")],
        ),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = w.origin.last_request().unwrap();
    assert_eq!(seen.headers.get_all("branch").iter().count(), 1);
    assert_eq!(seen.header("branch"), Some("development"));
    assert_eq!(seen.headers.get_all("api_key").iter().count(), 1);
    assert_eq!(seen.header("api_key"), Some(API_KEY));
    assert_eq!(seen.header("access_token"), Some(PROD));
    assert_eq!(
        seen.header("host"),
        Some(w.origin.url().trim_start_matches("http://"))
    );

    // GraphQL: the api_key is the path's; an api_key header, never checked
    // there, is not forwarded.
    let reply = send(
        w.gateway.http,
        get(
            "graphql.test",
            &format!("/stacks/{API_KEY}?environment=production"),
            &[("access_token", PROD), ("api_key", "blt_unchecked")],
        ),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = w.origin.last_request().unwrap();
    assert_eq!(seen.path, format!("/stacks/{API_KEY}"));
    assert_eq!(seen.header("api_key"), None);
}
