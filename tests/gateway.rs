//! Forwarding and the decision table, end to end: a fake CMA, a fake CDA
//! origin and the real gateway on loopback ports (SPEC §2, §3).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn world() -> World {
    World::start(standard_tokens(), "").await
}

async fn world_with(extra: &str) -> World {
    World::start(standard_tokens(), extra).await
}

const SITE: (&str, &str) = ("api_key", API_KEY);

#[tokio::test]
async fn an_allowed_request_arrives_intact() {
    let w = world().await;
    let request = get(
        "cdn.test",
        "/v3/content_types/blog/entries?environment=production&locale=en-us&include[]=author",
        &[
            SITE,
            ("access_token", PROD),
            ("branch", "development"),
            ("x-cs-variant-uid", "cs_variant_1"),
            ("preview_token", PROD_PREVIEW),
            ("x-forwarded-for", "203.0.113.9"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "dropped"),
            ("keep-alive", "timeout=5"),
        ],
    );
    let reply = send(w.gateway.http, request).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.headers["x-origin"], "fake-cda");
    let request_id = reply.headers["x-request-id"].to_str().unwrap().to_owned();
    assert!(!request_id.is_empty());

    let seen = w.origin.requests().pop().unwrap();
    assert_eq!(seen.path, "/v3/content_types/blog/entries");
    assert_eq!(
        seen.query.as_deref(),
        Some("environment=production&locale=en-us&include[]=author")
    );
    assert_eq!(seen.header("api_key"), Some(API_KEY));
    assert_eq!(seen.header("access_token"), Some(PROD));
    assert_eq!(seen.header("branch"), Some("development"));
    assert_eq!(seen.header("x-cs-variant-uid"), Some("cs_variant_1"));
    assert_eq!(
        seen.header("preview_token"),
        None,
        "an ignored preview_token is not forwarded"
    );
    assert_eq!(
        seen.header("x-hop"),
        None,
        "headers named by Connection are hop-by-hop"
    );
    assert_eq!(seen.header("keep-alive"), None);
    assert_eq!(
        seen.header("host"),
        Some(w.origin.url().trim_start_matches("http://"))
    );
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-request-id"), Some(request_id.as_str()));
}

/// A connection remembers the digest of the token it sent last (so that
/// the same token again is not hashed again): every other value on that
/// connection, however close to it, is still decided on its own.
#[tokio::test]
async fn one_connection_changing_tokens_is_decided_on_each() {
    let w = world().await;
    let (mut sender, _connection) = h1(w.gateway.http).await;
    let prefix = &PROD[..PROD.len() - 1];
    let longer = format!("{PROD}x");
    // Host, target, headers, the status, and the token the origin sees or
    // the refusal's reason.
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], u16, &'a str);
    let cases: [Case<'_>; 10] = [
        (
            "cdn.test",
            "/v3/a",
            &[SITE, ("access_token", PROD)],
            200,
            PROD,
        ),
        (
            "cdn.test",
            "/v3/b",
            &[SITE, ("access_token", prefix)],
            401,
            "invalid_token",
        ),
        (
            "cdn.test",
            "/v3/c",
            &[SITE, ("access_token", &longer)],
            401,
            "invalid_token",
        ),
        (
            "cdn.test",
            "/v3/d",
            &[SITE, ("access_token", PROD)],
            200,
            PROD,
        ),
        (
            "cdn.test",
            "/v3/e?environment=staging",
            &[SITE, ("access_token", STAGING)],
            200,
            STAGING,
        ),
        (
            "cdn.test",
            "/v3/f?environment=staging",
            &[SITE, ("access_token", PROD)],
            403,
            "environment_out_of_scope",
        ),
        (
            "cdn.test",
            "/v3/g",
            &[SITE, ("access_token", PROD_PREVIEW)],
            403,
            "preview_token_on_delivery",
        ),
        (
            "preview.test",
            "/v3/h",
            &[
                SITE,
                ("preview_token", PROD_PREVIEW),
                ("access_token", PROD),
            ],
            200,
            PROD,
        ),
        (
            "preview.test",
            "/v3/i",
            &[SITE, ("preview_token", PROD), ("access_token", PROD)],
            401,
            "invalid_preview_token",
        ),
        (
            "preview.test",
            "/v3/j",
            &[
                SITE,
                ("preview_token", PROD_PREVIEW),
                ("access_token", STAGING),
            ],
            401,
            "token_mismatch",
        ),
    ];
    for (host, uri, headers, status, expected) in cases {
        let before = w.origin.request_count();
        let response = sender.send_request(get(host, uri, headers)).await.unwrap();
        let reply = read(response).await;
        assert_eq!(reply.status, status, "{uri}: {}", reply.text());
        if status == 200 {
            let seen = w.origin.requests().pop().unwrap();
            assert_eq!(seen.path, uri.split('?').next().unwrap());
            assert_eq!(seen.header("access_token"), Some(expected), "{uri}");
        } else {
            assert_eq!(reply.reason(), expected, "{uri}");
            assert_eq!(w.origin.request_count(), before, "{uri}: forwarded");
        }
    }
}

#[tokio::test]
async fn a_client_request_id_is_kept_and_returned() {
    let w = world().await;
    let reply = send(
        w.gateway.http,
        get(
            "cdn.test",
            "/v3/x",
            &[SITE, ("access_token", PROD), ("x-request-id", "req-42")],
        ),
    )
    .await;
    assert_eq!(reply.headers["x-request-id"], "req-42");
    assert_eq!(
        w.origin.requests()[0].header("x-request-id"),
        Some("req-42")
    );
    let refused = send(
        w.gateway.http,
        get("cdn.test", "/v3/x", &[SITE, ("x-request-id", "req-43")]),
    )
    .await;
    assert_eq!(refused.headers["x-request-id"], "req-43");
}

#[tokio::test]
async fn preview_requests_keep_their_live_preview_parameters() {
    let w = world().await;
    let reply = send(
        w.gateway.http,
        get(
            "preview.test",
            "/v3/content_types/page/entries/blt1?environment=production",
            &[
                SITE,
                ("access_token", PROD),
                ("preview_token", PROD_PREVIEW),
                ("live_preview", "hash123"),
                ("preview_timestamp", "2024-01-01T00:00:00Z"),
                ("release_id", "rel_1"),
            ],
        ),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = w.origin.requests().pop().unwrap();
    assert_eq!(seen.header("preview_token"), Some(PROD_PREVIEW));
    assert_eq!(seen.header("access_token"), Some(PROD));
    assert_eq!(seen.header("live_preview"), Some("hash123"));
    assert_eq!(
        seen.header("preview_timestamp"),
        Some("2024-01-01T00:00:00Z")
    );
    assert_eq!(seen.header("release_id"), Some("rel_1"));
}

#[tokio::test]
async fn graphql_posts_and_prefixes_are_forwarded() {
    let w = world().await;
    let query = r#"{"query":"{ all_blog { total } }"}"#;
    let request = request(
        "POST",
        "graphql.test",
        "/stacks/blt_test_stack?environment=production",
    )
    .header("access_token", PROD)
    .header("content-type", "application/json")
    .body(Full::new(Bytes::from(query)))
    .unwrap();
    let reply = send(w.gateway.http, request).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = w.origin.requests().pop().unwrap();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.path, "/stacks/blt_test_stack");
    assert_eq!(seen.body, Bytes::from(query));

    let reply = send(
        w.gateway.http,
        get(
            "prefixed.test",
            "/cda/v3/entries?x=1",
            &[SITE, ("access_token", PROD)],
        ),
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = w.origin.requests().pop().unwrap();
    assert_eq!(seen.path, "/v3/entries", "the route prefix is stripped");
    assert_eq!(seen.query.as_deref(), Some("x=1"));
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let w = world().await;
    let mut sender = h2c(w.gateway.http).await;
    let request = http::Request::builder()
        .uri("http://cdn.test/v3/entries")
        .header("api_key", API_KEY)
        .header("access_token", PROD)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = read(sender.send_request(request).await.unwrap()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let refused = http::Request::builder()
        .uri("http://cdn.test/v3/entries")
        .header("api_key", API_KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = read(sender.send_request(refused).await.unwrap()).await;
    assert_eq!(reply.reason(), "invalid_token");
    assert_eq!(w.origin.request_count(), 1);
}

/// One refused request: status, Contentstack body, reason header, and the
/// origin saw nothing.
async fn assert_refused(
    w: &World,
    request: http::Request<Full<Bytes>>,
    status: u16,
    code: u64,
    reason: &str,
) {
    let before = w.origin.request_count();
    let reply = send(w.gateway.http, request).await;
    assert_eq!(reply.status, status, "{reason}: {}", reply.text());
    assert_eq!(reply.reason(), reason);
    assert_eq!(reply.headers["content-type"], "application/json");
    let body = reply.json();
    assert_eq!(body["error_code"], code, "{reason}: {body}");
    assert!(body["error_message"].is_string(), "{body}");
    assert!(body["errors"].is_object(), "{body}");
    for value in ALL_VALUES {
        assert!(
            !reply.text().contains(value),
            "{reason}: a token value in the body"
        );
    }
    assert_eq!(
        w.origin.request_count(),
        before,
        "{reason}: reached the origin"
    );
}

#[tokio::test]
async fn every_rejection_row_over_the_wire() {
    let w = world().await;
    let token = ("access_token", PROD);
    assert_refused(
        &w,
        get("nowhere.test", "/v3/x", &[SITE, token]),
        421,
        421,
        "no_route",
    )
    .await;
    let post = request("POST", "cdn.test", "/v3/x")
        .header("api_key", API_KEY)
        .header("access_token", PROD)
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_refused(&w, post, 405, 405, "method_not_allowed").await;
    assert_refused(
        &w,
        get("cdn.test", "/v3/x?access_token=x", &[SITE, token]),
        400,
        400,
        "credential_in_query",
    )
    .await;
    assert_refused(
        &w,
        get("cdn.test", "/v3/x", &[SITE, token, ("authtoken", "x")]),
        403,
        403,
        "management_credential",
    )
    .await;
    assert_refused(
        &w,
        get("cdn.test", "/v3/x", &[token]),
        412,
        109,
        "unknown_stack",
    )
    .await;
    assert_refused(
        &w,
        get(
            "cdn.test",
            "/v3/x",
            &[SITE, ("preview_token", PROD_PREVIEW)],
        ),
        403,
        403,
        "preview_token_on_delivery",
    )
    .await;
    assert_refused(
        &w,
        get("cdn.test", "/v3/x", &[SITE, ("access_token", PROD_PREVIEW)]),
        403,
        403,
        "preview_token_on_delivery",
    )
    .await;
    assert_refused(
        &w,
        get("cdn.test", "/v3/x", &[SITE, ("access_token", "cs_unknown")]),
        401,
        105,
        "invalid_token",
    )
    .await;
    assert_refused(
        &w,
        get("preview.test", "/v3/x", &[SITE, token]),
        401,
        105,
        "invalid_preview_token",
    )
    .await;
    assert_refused(
        &w,
        get(
            "preview.test",
            "/v3/x",
            &[
                SITE,
                ("access_token", STAGING),
                ("preview_token", PROD_PREVIEW),
            ],
        ),
        401,
        105,
        "token_mismatch",
    )
    .await;
    assert_refused(
        &w,
        get("cdn.test", "/v3/x?environment=staging", &[SITE, token]),
        403,
        403,
        "environment_out_of_scope",
    )
    .await;
    assert_refused(
        &w,
        get("cdn.test", "/v3/x", &[SITE, token, ("branch", "feature")]),
        422,
        901,
        "branch_out_of_scope",
    )
    .await;

    let body = send(
        w.gateway.http,
        get("cdn.test", "/v3/x", &[SITE, ("access_token", "nope")]),
    )
    .await
    .json();
    assert_eq!(
        body["error_message"],
        "You're not allowed in here unless you're logged in."
    );
    assert_eq!(body["errors"]["access_token"][0], "is not valid.");
    let body = send(
        w.gateway.http,
        get("cdn.test", "/v3/x", &[("api_key", "nope"), token]),
    )
    .await
    .json();
    assert_eq!(body["errors"]["api_key"][0], "is not valid.");
    let body = send(
        w.gateway.http,
        get("cdn.test", "/v3/x", &[SITE, token, ("branch", "feature")]),
    )
    .await
    .json();
    assert_eq!(
        body["error_message"],
        "Access denied. You have insufficient permissions to perform operation on this branch 'feature'."
    );
}

#[tokio::test]
async fn revoked_and_unavailable_registries_refuse() {
    let w = world().await;
    let reply = w
        .gateway
        .admin("POST", "/admin/tokens/blt_prod/revoke")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_refused(
        &w,
        get("cdn.test", "/v3/x", &[SITE, ("access_token", PROD)]),
        401,
        105,
        "token_revoked",
    )
    .await;
    assert_refused(
        &w,
        get(
            "preview.test",
            "/v3/x",
            &[SITE, ("preview_token", PROD_PREVIEW)],
        ),
        401,
        105,
        "token_revoked",
    )
    .await;

    // A stack whose CMA never answers: 503 registry_unavailable.
    let origin = origin::spawn_origin().await;
    let dead = cma::spawn_cma().await;
    dead.set_mode(cma::Mode::Status(500));
    let gateway = spawn_gateway(&config(&origin.url(), &cma_registry(&dead.url(), None))).await;
    dead.wait_for_calls(1).await;
    let reply = send(
        gateway.http,
        get("cdn.test", "/v3/x", &[SITE, ("access_token", PROD)]),
    )
    .await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.reason(), "registry_unavailable");
    assert_eq!(reply.json()["error_code"], 503);
    assert_eq!(origin.request_count(), 0);
}

#[tokio::test]
async fn cors_preflights_are_answered_locally() {
    let w = world().await;
    let request = request("OPTIONS", "cdn.test", "/v3/entries")
        .header("origin", "https://site.example")
        .header("access-control-request-method", "GET")
        .header(
            "access-control-request-headers",
            "api_key, access_token, branch",
        )
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = send(w.gateway.http, request).await;
    assert_eq!(reply.status, 204);
    assert_eq!(reply.headers["access-control-allow-origin"], "*");
    let allowed = reply.headers["access-control-allow-headers"]
        .to_str()
        .unwrap();
    for header in ["api_key", "access_token", "preview_token", "branch"] {
        assert!(allowed.contains(header), "{allowed}");
    }
    assert_eq!(reply.headers["access-control-allow-methods"], "GET, HEAD");
    assert_eq!(w.origin.request_count(), 0);
    // A refusal seen by a browser is readable.
    let refused = send(
        w.gateway.http,
        get(
            "cdn.test",
            "/v3/x",
            &[SITE, ("origin", "https://site.example")],
        ),
    )
    .await;
    assert_eq!(refused.headers["access-control-allow-origin"], "*");
}

#[tokio::test]
async fn upstream_errors_are_502_and_timeouts_504() {
    let w = world_with("[upstream]\nrequest_timeout = \"300ms\"\n").await;
    let token = [SITE, ("access_token", PROD)];
    // HTTP/1.1 (the connection's watchdog times the call): twice on one
    // keep-alive connection, then a prompt answer on it.
    let (mut sender, _connection) = h1(w.gateway.http).await;
    for _ in 0..2 {
        let started = std::time::Instant::now();
        let slow = get("cdn.test", "/slow?ms=3000", &token);
        let reply = read(sender.send_request(slow).await.unwrap()).await;
        assert_eq!(reply.status, 504);
        assert_eq!(reply.reason(), "upstream_timeout");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
    let prompt = get("cdn.test", "/slow?ms=1", &token);
    let reply = read(sender.send_request(prompt).await.unwrap()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // HTTP/2 (each stream times its own call).
    let mut h2 = h2c(w.gateway.http).await;
    let started = std::time::Instant::now();
    let slow = http::Request::builder()
        .uri("http://cdn.test/slow?ms=3000")
        .header("api_key", API_KEY)
        .header("access_token", PROD)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let reply = read(h2.send_request(slow).await.unwrap()).await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.reason(), "upstream_timeout");
    assert!(started.elapsed() >= Duration::from_millis(300));
    let reply = send(w.gateway.http, get("cdn.test", "/reset", &token)).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.reason(), "upstream_error");

    // An upstream nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    let gateway = spawn_ready(&config(
        &format!("http://{closed}"),
        &cma_registry(&cma.url(), None),
    ))
    .await;
    let reply = send(gateway.http, get("cdn.test", "/v3/x", &token)).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.reason(), "upstream_error");
    assert_eq!(reply.json()["error_code"], 502);
}

#[tokio::test]
async fn an_upstream_body_that_stalls_is_cut_after_request_timeout() {
    // An origin that sends a head and 3 of 100 promised bytes, then goes silent.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalled = listener.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = [0u8; 4096];
            let _ = stream.read(&mut head).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc")
                .await;
            held.push(stream);
        }
    });
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    let gateway = spawn_ready(&config_with(
        &format!("http://{stalled}"),
        &cma_registry(&cma.url(), None),
        "[upstream]\nrequest_timeout = \"300ms\"\n",
    ))
    .await;
    let stream = TcpStream::connect(gateway.http).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(get("cdn.test", "/v3/x", &[SITE, ("access_token", PROD)]))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let started = std::time::Instant::now();
    let body = tokio::time::timeout(
        Duration::from_secs(5),
        http_body_util::BodyExt::collect(response.into_body()),
    )
    .await
    .expect("the stalled body must be cut, not left hanging");
    assert!(
        body.is_err(),
        "a 100-byte body with 3 bytes must end in an error"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    holder.abort();
}

#[tokio::test]
async fn upstream_statuses_and_large_bodies_stream_through() {
    let w = world().await;
    let token = [SITE, ("access_token", PROD)];
    let reply = send(w.gateway.http, get("cdn.test", "/status/404", &token)).await;
    assert_eq!(reply.status, 404);
    assert_eq!(
        reply.reason(),
        "",
        "an upstream answer is not a gateway refusal"
    );
    let reply = send(
        w.gateway.http,
        get("cdn.test", "/big?bytes=5000000", &token),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), 5_000_000);
}

/// Writes raw bytes on a new connection and reads until the server closes
/// or 2 s pass.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn row_16_bad_requests_never_reach_the_origin() {
    let w = world_with("[server]\nmax_body_bytes = 1024\n").await;
    let head = |extra: &str| {
        format!("GET /v3/x HTTP/1.1\r\nhost: cdn.test\r\napi_key: {API_KEY}\r\naccess_token: {PROD}\r\n{extra}\r\n")
    };
    let smuggle = raw(
        w.gateway.http,
        format!(
            "POST /stacks/{API_KEY} HTTP/1.1\r\nhost: graphql.test\r\naccess_token: {PROD}\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(smuggle.starts_with("HTTP/1.1 400"), "{smuggle}");
    assert!(
        smuggle.contains("x-stackgate-reason: bad_request"),
        "{smuggle}"
    );

    let long_url = format!(
        "GET /v3/x?q={} HTTP/1.1\r\nhost: cdn.test\r\napi_key: {API_KEY}\r\naccess_token: {PROD}\r\n\r\n",
        "a".repeat(9000)
    );
    let reply = raw(w.gateway.http, long_url.as_bytes()).await;
    assert!(
        reply.starts_with("HTTP/1.1 414"),
        "{}",
        &reply[..reply.len().min(200)]
    );

    let big_head = head(&format!("x-big: {}\r\n", "b".repeat(17 * 1024)));
    let reply = raw(w.gateway.http, big_head.as_bytes()).await;
    assert!(
        reply.starts_with("HTTP/1.1 431"),
        "{}",
        &reply[..reply.len().min(200)]
    );

    let big_body = request(
        "POST",
        "graphql.test",
        &format!("/stacks/{API_KEY}?environment=production"),
    )
    .header("access_token", PROD)
    .body(Full::new(Bytes::from(vec![b'{'; 2048])))
    .unwrap();
    let reply = send(w.gateway.http, big_body).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.reason(), "bad_request");

    let dup = head(&format!("access_token: {STAGING}\r\n"));
    let reply = raw(w.gateway.http, dup.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");

    let garbage = raw(w.gateway.http, b"GARBAGE\x01\x02 / HTTP/9\r\n\r\n").await;
    assert!(
        garbage.starts_with("HTTP/1.1 400") || garbage.is_empty(),
        "{garbage}"
    );

    assert_eq!(w.origin.request_count(), 0);
    // And the gateway still serves.
    let reply = send(
        w.gateway.http,
        get("cdn.test", "/v3/x", &[SITE, ("access_token", PROD)]),
    )
    .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test]
async fn metrics_count_by_token_uid_and_reason() {
    let w = world().await;
    send(
        w.gateway.http,
        get("cdn.test", "/v3/x", &[SITE, ("access_token", PROD)]),
    )
    .await;
    send(
        w.gateway.http,
        get("cdn.test", "/v3/x", &[SITE, ("access_token", "cs_nope")]),
    )
    .await;
    let text = w.gateway.metrics().await;
    assert!(
        text.contains(r#"stackgate_requests_total{outcome="forwarded",route="delivery",stack="website",token="blt_prod"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"stackgate_rejections_total{reason="invalid_token",stack="website"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("stackgate_registry_tokens{stack=\"website\"} 2"),
        "{text}"
    );
    for value in ALL_VALUES {
        assert!(!text.contains(value));
    }

    // A refusal that names the token counts against it.
    send(
        w.gateway.http,
        get(
            "cdn.test",
            "/v3/x?environment=staging",
            &[SITE, ("access_token", PROD)],
        ),
    )
    .await;
    let tokens = w.gateway.admin("GET", "/admin/tokens").await.json();
    let prod = listed_token(&tokens, "blt_prod");
    assert_eq!(prod["requests"], 2, "{prod}");
    assert_eq!(prod["rejections"], 1, "{prod}");
    assert!(
        prod["last_used"].as_u64().unwrap() > 1_700_000_000,
        "{prod}"
    );
    let staging = listed_token(&tokens, "blt_staging");
    assert_eq!(staging["requests"], 0);
    assert!(staging["last_used"].is_null());
}
