//! Revocation ends live sessions at once (SPEC §4), over real sockets: idle
//! keep-alive connections, responses cut off mid-body, HTTP/2 streams reset
//! while the connection carries on for other tokens, preview-only deletion,
//! and scope narrowing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

async fn world() -> World {
    World::start(standard_tokens(), "").await
}

impl World {
    /// Lists `tokens` in the CMA and syncs; returns when the gateway has applied it.
    async fn sync_to(&self, tokens: Vec<serde_json::Value>) -> Instant {
        self.cma.set_tokens(tokens);
        let reply = self.gateway.admin("POST", "/admin/sync").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert!(
            reply.json()["stacks"]["website"]["error"].is_null(),
            "{}",
            reply.text()
        );
        Instant::now()
    }
}

/// A kept-alive HTTP/1.1 client connection that reports when the server closes it.
struct KeepAlive {
    sender: http1::SendRequest<Full<Bytes>>,
    closed: oneshot::Receiver<()>,
}

async fn keep_alive(addr: SocketAddr) -> KeepAlive {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    let (tx, closed) = oneshot::channel();
    tokio::spawn(async move {
        let _ = connection.await;
        let _ = tx.send(());
    });
    KeepAlive { sender, closed }
}

impl KeepAlive {
    async fn get(&mut self, request: Request<Full<Bytes>>) -> Reply {
        read(self.sender.send_request(request).await.unwrap()).await
    }

    async fn start(&mut self, request: Request<Full<Bytes>>) -> http::Response<Incoming> {
        self.sender.send_request(request).await.unwrap()
    }

    /// Waits (5 s at most) for the server to close the connection.
    async fn wait_closed(&mut self) {
        tokio::time::timeout(Duration::from_secs(5), &mut self.closed)
            .await
            .expect("the gateway did not close the connection")
            .unwrap();
    }

    fn is_open(&mut self) -> bool {
        matches!(
            self.closed.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        )
    }
}

fn delivery(uri: &str, token: &str) -> Request<Full<Bytes>> {
    get(
        "cdn.test",
        uri,
        &[("api_key", API_KEY), ("access_token", token)],
    )
}

fn delivery_on(uri: &str, token: &str, branch: &str) -> Request<Full<Bytes>> {
    get(
        "cdn.test",
        uri,
        &[
            ("api_key", API_KEY),
            ("access_token", token),
            ("branch", branch),
        ],
    )
}

fn preview(uri: &str) -> Request<Full<Bytes>> {
    get(
        "preview.test",
        uri,
        &[
            ("api_key", API_KEY),
            ("access_token", PROD),
            ("preview_token", PROD_PREVIEW),
        ],
    )
}

/// Reads until the body ends; returns (lines read, whether it ended in an
/// error). The origin's stream chunks are one line each.
async fn drain(body: &mut Incoming) -> (usize, bool) {
    let mut lines = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(15), body.frame()).await {
            Err(_) => panic!("body neither ended nor failed"),
            Ok(None) => return (lines, false),
            Ok(Some(Err(_))) => return (lines, true),
            Ok(Some(Ok(frame))) => lines += frame.data_ref().map_or(0, count_lines),
        }
    }
}

fn count_lines(data: &Bytes) -> usize {
    data.iter().filter(|&&b| b == b'\n').count()
}

/// Reads the first data frame, so the stream is known to be flowing; returns
/// the lines in it.
async fn first_chunk(body: &mut Incoming) -> usize {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("no first chunk")
            .expect("body ended early")
            .expect("body failed early");
        if let Some(data) = frame.data_ref() {
            return count_lines(data);
        }
    }
}

fn without_prod() -> Vec<serde_json::Value> {
    standard_tokens()
        .into_iter()
        .filter(|t| t["uid"] != "blt_prod")
        .collect()
}

#[tokio::test]
async fn deleting_a_token_closes_its_idle_keep_alive_connections() {
    let w = world().await;
    let mut prod = keep_alive(w.gateway.http).await;
    let mut staging = keep_alive(w.gateway.http).await;
    assert_eq!(prod.get(delivery("/v3/a", PROD)).await.status, 200);
    assert_eq!(staging.get(delivery("/v3/a", STAGING)).await.status, 200);
    assert_eq!(w.gateway.shared.sessions.live(0, "blt_prod"), 1);

    let learned = w.sync_to(without_prod()).await;
    prod.wait_closed().await;
    println!(
        "idle keep-alive closed {:?} after the sync answered",
        learned.elapsed()
    );
    assert!(staging.is_open(), "another token's connection was touched");
    assert_eq!(staging.get(delivery("/v3/b", STAGING)).await.status, 200);
    let reply = send(w.gateway.http, delivery("/v3/c", PROD)).await;
    assert_eq!(reply.reason(), "token_revoked");

    let metrics = w.gateway.metrics().await;
    assert!(
        metrics.contains(
            r#"stackgate_sessions_dropped_total{cause="token_deleted",stack="website"} 1"#
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("stackgate_revocation_seconds_count 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains(r#"token="blt_prod""#),
        "series of a deleted token remain: {metrics}"
    );
}

#[tokio::test]
async fn a_streaming_response_is_cut_off_mid_body() {
    let w = world().await;
    let mut conn = keep_alive(w.gateway.http).await;
    let response = conn
        .start(delivery("/stream?chunks=200&interval_ms=50", PROD))
        .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    first_chunk(&mut body).await;

    let learned = w.sync_to(without_prod()).await;
    let (more, failed) = drain(&mut body).await;
    println!(
        "stream cut {:?} after the sync answered, {more} lines later",
        learned.elapsed()
    );
    assert!(failed, "the body must end in an error, not run to its end");
    assert!(more < 150, "the stream ran on: {more} more lines");
    conn.wait_closed().await;
    w.origin.wait_for_stream_aborted(1).await;
    assert_eq!(w.origin.streams().completed, 0);
}

#[tokio::test]
async fn http2_resets_only_the_revoked_tokens_streams() {
    let w = world().await;
    let mut h2 = h2c(w.gateway.http).await;
    let uri = |path: &str| format!("http://cdn.test{path}");
    let stream = |token: &str, path: &str| {
        Request::builder()
            .uri(uri(path))
            .header("api_key", API_KEY)
            .header("access_token", token)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let prod = h2
        .send_request(stream(PROD, "/stream?chunks=200&interval_ms=50"))
        .await
        .unwrap();
    let staging = h2
        .send_request(stream(STAGING, "/stream?chunks=30&interval_ms=50"))
        .await
        .unwrap();
    let (mut prod_body, mut staging_body) = (prod.into_body(), staging.into_body());
    first_chunk(&mut prod_body).await;
    let staging_first = first_chunk(&mut staging_body).await;

    w.sync_to(without_prod()).await;
    let (_, prod_failed) = drain(&mut prod_body).await;
    assert!(prod_failed, "the revoked token's stream must be reset");
    let (staging_chunks, staging_failed) = drain(&mut staging_body).await;
    assert!(
        !staging_failed,
        "the other token's stream must run to its end"
    );
    assert_eq!(staging_first + staging_chunks, 30);

    // The connection is still up for the other token.
    let reply = read(h2.send_request(stream(STAGING, "/v3/after")).await.unwrap()).await;
    assert_eq!(reply.status, 200);
    let reply = read(h2.send_request(stream(PROD, "/v3/after")).await.unwrap()).await;
    assert_eq!(reply.reason(), "token_revoked");
    assert_eq!(w.gateway.shared.sessions.live(0, "blt_prod"), 0);
}

/// A revoked HTTP/2 stream is reset at once even while its client's window
/// is shut (hyper does not come back to a body without window, so the reset
/// cannot wait for the body to be asked for more), and nothing it had queued
/// goes out later.
#[tokio::test]
async fn http2_a_revoked_stream_with_its_window_shut_is_reset_at_once() {
    let w = world().await;
    let (mut h2, _closed) = h2c_small_stream_window(w.gateway.http).await;
    let big = Request::get("http://cdn.test/big?bytes=67108864")
        .header("api_key", API_KEY)
        .header("access_token", PROD)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = h2.send_request(big).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut taken = 0;
    while taken == 0 {
        let frame = body.frame().await.unwrap().unwrap();
        taken += frame.data_ref().map_or(0, Bytes::len);
    }
    // Read no more: the window stays shut (send_timeout is 60 s).

    w.sync_to(without_prod()).await;
    w.origin.wait_for_big_aborted(1).await;
    let ended = read_to_end_or_error(&mut body, &mut taken).await;
    let err = ended.expect("the revoked stream ended as if complete");
    assert!(format!("{err:?}").contains("CANCEL"), "{err:?}");
    assert!(taken <= 64 * 1024, "{taken} bytes went out");

    // The connection goes on for the other tokens.
    let staging = Request::get("http://cdn.test/v3/after")
        .header("api_key", API_KEY)
        .header("access_token", STAGING)
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(
        read(h2.send_request(staging).await.unwrap()).await.status,
        200
    );
}

#[tokio::test]
async fn deleting_only_the_preview_token_leaves_delivery_sessions_alone() {
    let w = world().await;
    let mut preview_conn = keep_alive(w.gateway.http).await;
    let mut delivery_conn = keep_alive(w.gateway.http).await;
    let preview_stream = preview_conn
        .start(preview("/stream?chunks=200&interval_ms=50"))
        .await;
    let delivery_stream = delivery_conn
        .start(delivery("/stream?chunks=40&interval_ms=50", PROD))
        .await;
    let (mut preview_body, mut delivery_body) =
        (preview_stream.into_body(), delivery_stream.into_body());
    first_chunk(&mut preview_body).await;
    first_chunk(&mut delivery_body).await;

    let mut tokens = standard_tokens();
    tokens[0].as_object_mut().unwrap().remove("preview_token");
    w.sync_to(tokens).await;

    let (_, preview_failed) = drain(&mut preview_body).await;
    assert!(preview_failed, "the preview session must end");
    preview_conn.wait_closed().await;
    let (_, delivery_failed) = drain(&mut delivery_body).await;
    assert!(!delivery_failed, "the delivery session must go on");
    assert!(delivery_conn.is_open());
    assert_eq!(
        delivery_conn.get(delivery("/v3/again", PROD)).await.status,
        200
    );
    assert_eq!(
        send(w.gateway.http, preview("/v3/again")).await.reason(),
        "token_revoked"
    );
    let metrics = w.gateway.metrics().await;
    assert!(metrics.contains(
        r#"stackgate_sessions_dropped_total{cause="preview_deleted",stack="website"} 1"#
    ));
}

#[tokio::test]
async fn narrowing_a_scope_ends_only_the_sessions_it_no_longer_covers() {
    let w = world().await;
    let mut on_main = keep_alive(w.gateway.http).await;
    let mut on_dev = keep_alive(w.gateway.http).await;
    let mut on_alias = keep_alive(w.gateway.http).await;
    assert_eq!(
        on_main.get(delivery_on("/v3/a", PROD, "main")).await.status,
        200
    );
    assert_eq!(
        on_dev
            .get(delivery_on("/v3/a", PROD, "development"))
            .await
            .status,
        200
    );
    assert_eq!(
        on_alias
            .get(delivery_on("/v3/a", PROD, "deploy"))
            .await
            .status,
        200
    );

    let mut tokens = standard_tokens();
    tokens[0] = cma::token_json(
        "blt_prod",
        "Production",
        PROD,
        Some(PROD_PREVIEW),
        ("production", "blt_env_prod"),
        Some(&["main"]),
        Some(&["deploy"]),
    );
    w.sync_to(tokens).await;
    on_dev.wait_closed().await;
    assert!(on_main.is_open());
    assert!(on_alias.is_open());
    assert_eq!(
        on_main.get(delivery_on("/v3/b", PROD, "main")).await.status,
        200
    );
    assert_eq!(
        on_alias
            .get(delivery_on("/v3/b", PROD, "deploy"))
            .await
            .status,
        200
    );
    let reply = send(w.gateway.http, delivery_on("/v3/c", PROD, "development")).await;
    assert_eq!(reply.reason(), "branch_out_of_scope");

    // Moving the token to another environment ends the rest.
    let mut tokens = standard_tokens();
    tokens[0] = cma::token_json(
        "blt_prod",
        "Production",
        PROD,
        Some(PROD_PREVIEW),
        ("staging", "blt_env_staging"),
        Some(&["main"]),
        Some(&["deploy"]),
    );
    w.sync_to(tokens).await;
    on_main.wait_closed().await;
    on_alias.wait_closed().await;

    // The token changed twice; what it counted stayed with it (by uid).
    let tokens = w.gateway.admin("GET", "/admin/tokens").await.json();
    let prod = listed_token(&tokens, "blt_prod");
    assert_eq!(prod["environment"]["name"], "staging", "{prod}");
    assert_eq!(prod["requests"], 6, "{prod}");
    assert_eq!(prod["rejections"], 1, "{prod}");
}

#[tokio::test]
async fn admin_revocation_ends_sessions_and_lifting_it_restores_access() {
    let w = world().await;
    let mut conn = keep_alive(w.gateway.http).await;
    let response = conn
        .start(delivery("/stream?chunks=200&interval_ms=50", PROD))
        .await;
    let mut body = response.into_body();
    first_chunk(&mut body).await;

    let started = Instant::now();
    let reply = w
        .gateway
        .admin("POST", "/admin/tokens/blt_prod/revoke")
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["sessions_cancelled"], 1);
    let (_, failed) = drain(&mut body).await;
    assert!(failed);
    conn.wait_closed().await;
    println!(
        "admin revocation: stream cut and connection closed {:?} after the call",
        started.elapsed()
    );
    assert_eq!(
        send(w.gateway.http, delivery("/v3/x", PROD)).await.reason(),
        "token_revoked"
    );
    let metrics = w.gateway.metrics().await;
    assert!(metrics
        .contains(r#"stackgate_sessions_dropped_total{cause="admin_revoked",stack="website"} 1"#));

    // Still revoked after a sync that lists the token.
    w.sync_to(standard_tokens()).await;
    assert_eq!(
        send(w.gateway.http, delivery("/v3/x", PROD)).await.reason(),
        "token_revoked"
    );
    let reply = w
        .gateway
        .admin("DELETE", "/admin/tokens/blt_prod/revoke")
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        send(w.gateway.http, delivery("/v3/x", PROD)).await.status,
        200
    );
}

#[tokio::test]
async fn a_request_waiting_for_its_response_head_is_aborted() {
    let w = world().await;
    let mut conn = keep_alive(w.gateway.http).await;
    let pending = tokio::spawn(async move {
        let mut request = delivery("/slow?ms=5000", PROD);
        request.headers_mut().insert(
            "x-request-id",
            http::HeaderValue::from_static("revoked-waiting-for-head"),
        );
        let result = conn.sender.send_request(request).await;
        (result.is_err(), conn)
    });
    w.origin.wait_for_requests(1).await;
    let started = Instant::now();
    w.sync_to(without_prod()).await;
    let (failed, mut conn) = tokio::time::timeout(Duration::from_secs(3), pending)
        .await
        .unwrap()
        .unwrap();
    assert!(failed, "the request must be aborted, not answered");
    assert!(started.elapsed() < Duration::from_secs(3));
    conn.wait_closed().await;
    // Its access line says so, with the fields of every other line.
    let line = || {
        logs()
            .lines()
            .find(|l| l.contains("revoked-waiting-for-head") && l.contains("stackgate::access"))
            .map(str::to_owned)
    };
    wait_until("the aborted request's access line", || line().is_some()).await;
    let line = line().unwrap();
    assert!(line.contains("request aborted"), "{line}");
    for field in [
        "stack=website",
        "token=blt_prod",
        "route=delivery",
        "duration_ms=",
    ] {
        assert!(line.contains(field), "{field}: {line}");
    }
    assert!(!line.contains(PROD), "{line}");
}

/// The requests `GET /admin/tokens` would show for `uid` on the first
/// stack: `None` when the registry does not list it.
fn requests_of(shared: &stackgate::Shared, uid: &str) -> Option<u64> {
    let view = shared.stacks.get(0)?.view()?;
    let token = view.registry.get(uid)?;
    Some(token.usage.requests())
}

/// No resurrection (SPEC §6, §7): a request decided on the registry version
/// before its token's deletion, and counted after it, leaves no usage entry,
/// no `requests_total` series and no limiter bucket behind.
#[tokio::test]
async fn a_request_decided_before_a_deletion_does_not_resurrect_its_token() {
    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    let text = config(&origin.url(), &cma_registry(&cma.url(), None))
        + "\n[stacks.limits]\nper_token = { rate = 1000, burst = 1000 }\n";
    let gateway = spawn_ready(&text).await;
    let shared = std::sync::Arc::clone(&gateway.shared);
    let reply = send(gateway.http, delivery("/v3/entries", PROD)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(requests_of(&shared, "blt_prod"), Some(1));
    assert_eq!(shared.limits.tracked_tokens(0), 1);

    // Decided on the version that still lists the token...
    let (parts, _) = delivery("/v3/entries", PROD).into_parts();
    let now = tokio::time::Instant::now();
    let stackgate::decision::Decision::Forward(permit) = stackgate::decision::decide(
        &shared.router,
        &shared.stacks,
        &parts,
        &Default::default(),
        now,
    ) else {
        panic!("PROD is allowed before its deletion");
    };
    // ... which is deleted (its state forgotten) before the request is counted.
    cma.set_tokens(without_prod());
    let report = gateway.admin("POST", "/admin/sync").await.json();
    assert_eq!(
        report["stacks"]["website"]["removed"][0], "blt_prod",
        "{report}"
    );
    assert_eq!(requests_of(&shared, "blt_prod"), None);
    assert!(shared.limits.admit(0, &permit.token).is_ok());
    shared.record_forwarded(
        permit.stack,
        &permit.token,
        permit.route.kind,
        permit.version,
    );
    // Counted on the token it was decided on, which went with its version.
    assert_eq!(permit.token.usage.requests(), 2);

    assert_eq!(
        requests_of(&shared, "blt_prod"),
        None,
        "the usage entry came back"
    );
    assert_eq!(shared.limits.tracked_tokens(0), 0, "the bucket came back");
    let metrics = gateway.metrics().await;
    assert!(
        !metrics.contains("token=\"blt_prod\""),
        "a series of the deleted token came back:\n{metrics}"
    );
}

/// The same over the wire, as the revocation race bench does it: clients
/// keep sending a token's requests while it is deleted and listed again,
/// over and over. Once it is deleted for good and every request has ended,
/// nothing of it is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_deleted_under_load_leaves_no_state_behind() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    let text = config(&origin.url(), &cma_registry(&cma.url(), None))
        + "\n[stacks.limits]\nper_token = { rate = 100000, burst = 100000 }\n";
    let gateway = spawn_ready(&text).await;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..6)
        .map(|_| {
            let (addr, stop) = (gateway.http, std::sync::Arc::clone(&stop));
            tokio::spawn(async move {
                let mut answered = 0u32;
                while !stop.load(Ordering::SeqCst) {
                    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                        continue;
                    };
                    let Ok((mut sender, conn)) = http1::handshake(TokioIo::new(stream)).await
                    else {
                        continue;
                    };
                    tokio::spawn(conn);
                    if let Ok(response) = sender.send_request(delivery("/v3/entries", PROD)).await {
                        let _ = response.into_body().collect().await;
                        answered += 1;
                    }
                }
                answered
            })
        })
        .collect();
    for _ in 0..15 {
        cma.set_tokens(without_prod());
        gateway.admin("POST", "/admin/sync").await;
        cma.set_tokens(standard_tokens());
        gateway.admin("POST", "/admin/sync").await;
    }
    cma.set_tokens(without_prod());
    let report = gateway.admin("POST", "/admin/sync").await.json();
    assert_eq!(
        report["stacks"]["website"]["removed"][0], "blt_prod",
        "{report}"
    );
    stop.store(true, Ordering::SeqCst);
    let mut answered = 0;
    for client in clients {
        answered += client.await.unwrap();
    }
    assert!(answered > 0, "no request went through");
    let shared = &gateway.shared;
    wait_until("every session of the deleted token over", || {
        shared.sessions.live(0, "blt_prod") == 0
    })
    .await;
    assert_eq!(requests_of(shared, "blt_prod"), None, "usage came back");
    assert_eq!(shared.limits.tracked_tokens(0), 0, "a bucket came back");
    let metrics = gateway.metrics().await;
    assert!(
        !metrics.contains("token=\"blt_prod\""),
        "a series of the deleted token came back"
    );
}

#[tokio::test]
async fn a_request_whose_body_is_still_arriving_is_cut_off() {
    use tokio::io::AsyncWriteExt;
    let w = world().await;
    // A GraphQL POST whose head is sent and whose body is not: the session
    // is registered once the request is permitted, before its body is read.
    let mut stream = TcpStream::connect(w.gateway.http).await.unwrap();
    let head = format!(
        "POST /stacks/{API_KEY}?environment=production HTTP/1.1\r\nhost: graphql.test\r\naccess_token: {PROD}\r\ncontent-type: application/json\r\ncontent-length: 64\r\n\r\n{{\"query\":"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let sessions = &w.gateway.shared.sessions;
    wait_until("the upload's session", || sessions.live(0, "blt_prod") == 1).await;

    let reply = w
        .gateway
        .admin("POST", "/admin/tokens/blt_prod/revoke")
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["sessions_cancelled"], 1);
    let answered = read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .expect("the connection is closed by the revocation");
    assert!(
        answered.is_empty(),
        "an upload cut by a revocation is answered with nothing: {}",
        String::from_utf8_lossy(&answered)
    );
    assert_eq!(w.origin.request_count(), 0, "the origin saw the request");
}
