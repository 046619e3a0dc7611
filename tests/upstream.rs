//! The HTTP/1.1 upstream pool: a request leases an idle connection or opens
//! one, and its response body gives it back once read to the end; a body
//! cut off closes it; a connection the origin closed is replaced; requests
//! that change route reach each route's upstream (SPEC §2).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpStream;

/// A kept-alive HTTP/1.1 client connection to the gateway.
async fn keep_alive(addr: SocketAddr) -> http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

/// The production token's credentials, which every route here allows.
const AUTH: [(&str, &str); 2] = [("api_key", API_KEY), ("access_token", PROD)];

/// A GET on `cdn.test` with [`AUTH`].
fn allowed(path: &str) -> http::Request<Full<Bytes>> {
    get("cdn.test", path, &AUTH)
}

async fn get_on(sender: &mut http1::SendRequest<Full<Bytes>>, host: &str, path: &str) -> Reply {
    sender.ready().await.unwrap();
    let request = get(host, path, &AUTH);
    read(sender.send_request(request).await.unwrap()).await
}

async fn gateway_to(origin: &str, extra: &str) -> (TestGateway, cma::FakeCma) {
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    let gateway = spawn_ready(&config_with(origin, &cma_registry(&cma.url(), None), extra)).await;
    (gateway, cma)
}

#[tokio::test]
async fn http1_requests_share_pooled_upstream_connections() {
    let origin = origin::spawn_origin().await;
    let (gw, _cma) = gateway_to(&origin.url(), "").await;
    let pool = &gw.shared.h1pool;

    // Sequential requests, on one client connection or on another: one
    // upstream connection, back in the pool after each response.
    let mut first = keep_alive(gw.http).await;
    let mut second = keep_alive(gw.http).await;
    for (i, on_second) in [false, false, true, false].into_iter().enumerate() {
        let client = if on_second { &mut second } else { &mut first };
        let reply = get_on(client, "cdn.test", &format!("/v3/entries/{i}")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        wait_until("the connection is back in the pool", || pool.idle() == 1).await;
    }
    assert_eq!(origin.connections(), 1);

    // Two requests at once take two.
    let slow =
        tokio::spawn(async move { get_on(&mut first, "cdn.test", "/slow?ms=300").await.status });
    origin.wait_for_requests(5).await;
    assert_eq!(pool.idle(), 0, "the one connection is leased");
    let reply = get_on(&mut second, "cdn.test", "/v3/while-slow").await;
    assert_eq!(reply.status, 200);
    assert_eq!(slow.await.unwrap(), 200);
    assert_eq!(origin.connections(), 2);
    wait_until("both connections are back", || pool.idle() == 2).await;

    // HTTP/2 streams to a plain-http upstream take the same pool (h2 upstream
    // needs TLS), with the upstream's Host.
    let mut h2 = h2c(gw.http).await;
    let request = allowed("/v3/h2");
    let reply = read(h2.send_request(request).await.unwrap()).await;
    assert_eq!(reply.status, 200);
    let seen = origin.last_request().unwrap();
    assert_eq!(seen.path, "/v3/h2");
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.header("host"), Some(&*origin.addr.to_string()));
    assert_eq!(origin.connections(), 2, "an idle connection carried it");
    wait_until("both connections are back", || pool.idle() == 2).await;
}

#[tokio::test]
async fn a_response_cut_off_mid_body_closes_its_upstream_connection() {
    let origin = origin::spawn_origin().await;
    let (gw, _cma) = gateway_to(&origin.url(), "").await;
    let pool = &gw.shared.h1pool;

    let mut client = keep_alive(gw.http).await;
    let request = allowed("/stream?chunks=200&interval_ms=20");
    let response = client.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    origin.wait_for_streams_started(1).await;
    // The client goes away mid-body.
    drop(response);
    drop(client);
    origin.wait_for_stream_aborted(1).await;
    assert_eq!(pool.idle(), 0, "a half-read connection is not reused");

    let mut client = keep_alive(gw.http).await;
    let reply = get_on(&mut client, "cdn.test", "/v3/after").await;
    assert_eq!(reply.status, 200);
    assert_eq!(origin.connections(), 2, "a new connection was opened");
    wait_until("that one is back in the pool", || pool.idle() == 1).await;
}

#[tokio::test]
async fn an_upstream_connection_the_origin_closed_is_replaced() {
    // One answer per connection, then a close without saying so (no
    // `connection: close`), as an origin whose keep-alive timeout fired.
    let origin = raw_origin(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
    )
    .await;
    let (accepted, closed) = (&origin.accepted, &origin.closed);
    let (gw, _cma) = gateway_to(&format!("http://{}", origin.addr), "").await;
    let mut client = keep_alive(gw.http).await;
    for i in 1..=4 {
        let reply = get_on(&mut client, "cdn.test", "/v3/entries").await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
        assert_eq!(reply.body, "{}");
        // The origin has closed the connection before the next request is sent.
        wait_until("the origin closed its connection", || {
            closed.load(Ordering::SeqCst) == i
        })
        .await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        4,
        "one connection per request"
    );
    wait_until("no open idle connection", || gw.shared.h1pool.idle() == 0).await;
}

#[tokio::test]
async fn a_client_connection_that_changes_route_reaches_each_upstream() {
    let (a, b) = (origin::spawn_origin().await, origin::spawn_origin().await);
    let extra = format!(
        "[[routes]]\nkind = \"delivery\"\nhosts = [\"other.test\"]\nupstream = \"{}\"\n",
        b.url()
    );
    let (gw, _cma) = gateway_to(&a.url(), &extra).await;
    let mut client = keep_alive(gw.http).await;
    for (host, path) in [
        ("cdn.test", "/v3/a1"),
        ("other.test", "/v3/b1"),
        ("cdn.test", "/v3/a2"),
        ("other.test", "/v3/b2"),
    ] {
        let reply = get_on(&mut client, host, path).await;
        assert_eq!(reply.status, 200, "{host}{path}: {}", reply.text());
    }
    let paths = |o: &origin::Origin| {
        o.requests()
            .iter()
            .map(|r| r.path.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(paths(&a), ["/v3/a1", "/v3/a2"]);
    assert_eq!(paths(&b), ["/v3/b1", "/v3/b2"]);
    for (origin, seen) in [(&a, a.requests()), (&b, b.requests())] {
        for request in seen {
            assert_eq!(request.header("host"), Some(&*origin.addr.to_string()));
        }
    }
    // Each upstream has its own idle list: one connection to each.
    assert_eq!((a.connections(), b.connections()), (1, 1));
}

#[tokio::test]
async fn https_upstreams_are_verified_and_reached_over_tls() {
    let pki = pki::Pki::new();
    let server_config = pki.leaf(1).server_config(&[b"h2", b"http/1.1"]);
    let origin = origin::spawn_tls_origin(server_config).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, pki.ca_pem()).unwrap();
    let extra = format!("[upstream]\nca_file = \"{}\"\n", ca_file.display());
    let (gw, _cma) = gateway_to(&origin.url(), &extra).await;
    let host = format!("localhost:{}", origin.addr.port());

    // HTTP/1.1 clients: the HTTP/1.1 pool, over TLS, one connection reused.
    let mut client = keep_alive(gw.http).await;
    for i in 0..2 {
        let reply = get_on(&mut client, "cdn.test", &format!("/v3/tls/{i}")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        wait_until("the connection is back in the pool", || {
            gw.shared.h1pool.idle() == 1
        })
        .await;
    }
    assert_eq!(origin.connections(), 1);
    for seen in origin.requests() {
        assert_eq!(seen.version, http::Version::HTTP_11);
        assert_eq!(seen.header("host"), Some(&*host));
    }

    // HTTP/2 clients to an https upstream: the shared client, h2 by ALPN.
    let mut h2 = h2c(gw.http).await;
    let request = allowed("/v3/tls/h2");
    let reply = read(h2.send_request(request).await.unwrap()).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = origin.last_request().unwrap();
    assert_eq!(seen.path, "/v3/tls/h2");
    assert_eq!(seen.version, http::Version::HTTP_2);

    // Without the private CA the upstream's certificate is not trusted: 502,
    // on both paths, and nothing reaches the origin.
    let (untrusting, _cma2) = gateway_to(&origin.url(), "").await;
    let before = origin.request_count();
    let mut client = keep_alive(untrusting.http).await;
    let reply = get_on(&mut client, "cdn.test", "/v3/untrusted").await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.reason(), "upstream_error");
    let mut h2 = h2c(untrusting.http).await;
    let request = allowed("/v3/untrusted");
    let reply = read(h2.send_request(request).await.unwrap()).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(origin.request_count(), before);
}

/// `upstream.max_connections`: past it a request waits up to
/// `connect_timeout` for a connection to come free, then gets 503
/// `upstream_busy`; once one is free, requests go through again.
#[tokio::test]
async fn past_max_connections_a_request_waits_then_gets_upstream_busy() {
    let origin = origin::spawn_origin().await;
    let extra = "[upstream]\nmax_connections = 1\nconnect_timeout = \"300ms\"\n";
    let (gw, _cma) = gateway_to(&origin.url(), extra).await;

    // One slow request holds the only connection.
    let addr = gw.http;
    let slow = tokio::spawn(async move { send(addr, allowed("/slow?ms=2000")).await });
    origin.wait_for_requests(1).await;

    let started = std::time::Instant::now();
    let busy = send(gw.http, allowed("/v3/entries/busy")).await;
    assert_eq!(busy.status, 503, "{}", busy.text());
    assert_eq!(busy.reason(), "upstream_busy");
    assert_eq!(busy.json()["error_code"], 503);
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "refused after {:?}, before connect_timeout",
        started.elapsed()
    );
    assert_eq!(origin.request_count(), 1, "the busy request was forwarded");

    // The slow one finishes; its connection is free again.
    assert_eq!(slow.await.unwrap().status, 200);
    assert_eq!(
        send(gw.http, allowed("/v3/entries/after")).await.status,
        200
    );
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"stackgate_rejections_total{reason="upstream_busy",stack="website"} 1"#),
        "{metrics}"
    );
}

/// `server.send_timeout`: a client that asks for a large response and stops
/// reading is cut off once a write has made no progress that long, and its
/// session and upstream connection are released.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_send_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SIZE: usize = 64 * 1024 * 1024;
    let origin = origin::spawn_origin().await;
    let extra = "[server]\nsend_timeout = \"500ms\"\nidle_timeout = \"60s\"\n[upstream]\nrequest_timeout = \"60s\"\n";
    let (gw, _cma) = gateway_to(&origin.url(), extra).await;

    let mut stream = TcpStream::connect(gw.http).await.unwrap();
    let head = format!(
        "GET /big?bytes={SIZE} HTTP/1.1\r\nhost: cdn.test\r\napi_key: {API_KEY}\r\naccess_token: {PROD}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 4096];
    let n = stream.read(&mut first).await.unwrap();
    assert!(
        String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&first[..n])
    );
    // Stop reading. The session ends once the gateway gives up writing.
    let stack = 0;
    wait_until("the stalled client's session released", || {
        gw.shared.sessions.live(stack, "blt_prod") == 0
    })
    .await;
    assert_eq!(
        gw.shared.h1pool.idle(),
        0,
        "a cut-off upstream connection went back to the pool"
    );

    // What was buffered before the cut can still be read; then the connection ends.
    let mut total = n;
    let mut buf = vec![0u8; 1 << 20];
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection stayed open");
    assert!(total < SIZE, "the whole response was sent ({total} bytes)");
}

/// The same over HTTP/2: a stream whose client takes nothing (its window
/// stays shut) is reset after `send_timeout`, and its session and upstream
/// connection are released, while the connection and its other streams go
/// on: hyper asks a body for nothing while its stream has no window, so the
/// reset comes from outside the body.
#[tokio::test]
async fn an_http2_stream_whose_client_stops_reading_is_reset_after_send_timeout() {
    use http_body_util::BodyExt;
    const SIZE: usize = 64 * 1024 * 1024;
    let origin = origin::spawn_origin().await;
    let extra = "[server]\nsend_timeout = \"500ms\"\nidle_timeout = \"60s\"\n[upstream]\nrequest_timeout = \"60s\"\n";
    let (gw, _cma) = gateway_to(&origin.url(), extra).await;

    // A small stream window and a large connection window: the stalled
    // stream cannot block the others.
    let (mut sender, mut closed) = h2c_small_stream_window(gw.http).await;
    let big = |bytes: usize| {
        http::Request::get(format!("http://cdn.test/big?bytes={bytes}"))
            .header("api_key", API_KEY)
            .header("access_token", PROD)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let response = sender.send_request(big(SIZE)).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut taken = body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap()
        .len();
    // Read no more: the stream's window stays shut. Its upstream body is
    // dropped mid-way, so its connection is closed, not pooled.
    origin.wait_for_big_aborted(1).await;
    assert_eq!(
        gw.shared.h1pool.idle(),
        0,
        "a cut-off upstream connection went back to the pool"
    );
    // What was in flight can still be read; then the stream ends in a reset.
    let ended = read_to_end_or_error(&mut body, &mut taken).await;
    let err = ended.expect("the stalled stream ended as if complete");
    assert!(format!("{err:?}").contains("CANCEL"), "{err:?}");
    assert!(taken < SIZE, "the whole response was sent ({taken} bytes)");

    // The connection lives on, and a stream that reads is not cut.
    let reply = read(sender.send_request(big(4 * 1024 * 1024)).await.unwrap()).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), 4 * 1024 * 1024);
    assert!(
        closed.try_recv().is_err(),
        "the connection closed with its stalled stream"
    );
}
