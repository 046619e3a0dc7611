//! Idle HTTP/1.1 keep-alive connections are parked (hyper's connection and
//! buffers dropped, the bare socket kept) and served again by a fresh one
//! when their next bytes arrive. A client must see nothing of it: the next
//! request is answered, its framing still followed, and revocation, the
//! idle timeout and shutdown still close the connection.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// An allowed delivery GET's head.
fn allowed(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nhost: cdn.test\r\napi_key: {API_KEY}\r\naccess_token: {PROD}\r\n\r\n")
}

/// How long a test waits for an answer or a close.
const WITHIN: Duration = Duration::from_secs(10);

/// Waits until the gateway counts `n` parked connections.
async fn wait_parked(w: &World, n: i64) {
    let parked = w.gateway.shared.metrics.connections_parked.clone();
    wait_until(&format!("{n} parked connections"), || parked.get() == n).await;
}

/// A connection that served `GET /v3/first` and is now parked, with what
/// was read beyond that answer.
async fn parked_connection(w: &World) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(w.gateway.http).await.unwrap();
    let mut pending = Vec::new();
    stream
        .write_all(allowed("/v3/first").as_bytes())
        .await
        .unwrap();
    let reply = read_response(&mut stream, &mut pending, WITHIN).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    wait_parked(w, 1).await;
    (stream, pending)
}

/// Reads until the peer closes (EOF or reset); panics after [`WITHIN`].
async fn wait_closed(stream: &mut TcpStream) -> Vec<u8> {
    read_until_closed(stream, WITHIN)
        .await
        .expect("the connection stayed open")
}

#[tokio::test]
async fn an_idle_connection_parks_and_its_next_requests_are_served() {
    let w = World::start(standard_tokens(), "").await;
    let mut stream = TcpStream::connect(w.gateway.http).await.unwrap();
    let mut pending = Vec::new();
    for round in 1..=3 {
        stream
            .write_all(allowed(&format!("/v3/round{round}")).as_bytes())
            .await
            .unwrap();
        let reply = read_response(&mut stream, &mut pending, WITHIN).await;
        assert!(reply.starts_with("HTTP/1.1 200"), "round {round}: {reply}");
        wait_parked(&w, 1).await;
    }
    let paths: Vec<String> = w.origin.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/v3/round1", "/v3/round2", "/v3/round3"]);
    // Metrics: the parked connection is counted, and its session is live.
    let metrics = w.gateway.metrics().await;
    assert!(
        metrics.contains("stackgate_connections_parked 1"),
        "{metrics}"
    );
    drop(stream);
    wait_parked(&w, 0).await;
}

#[tokio::test]
async fn a_parked_connection_takes_a_head_in_pieces_and_pipelined_heads() {
    let w = World::start(standard_tokens(), "").await;
    let (mut stream, mut pending) = parked_connection(&w).await;

    // A head in two writes: the first wakes the connection, which must wait
    // for the rest rather than answer or close.
    let head = allowed("/v3/pieces");
    let (a, b) = head.split_at(20);
    stream.write_all(a.as_bytes()).await.unwrap();
    wait_parked(&w, 0).await;
    stream.write_all(b.as_bytes()).await.unwrap();
    let reply = read_response(&mut stream, &mut pending, WITHIN).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    wait_parked(&w, 1).await;

    // Two heads in one segment after a park: both answered, in order.
    let both = format!("{}{}", allowed("/v3/p1"), allowed("/v3/p2"));
    stream.write_all(both.as_bytes()).await.unwrap();
    let first = read_response(&mut stream, &mut pending, WITHIN).await;
    let second = read_response(&mut stream, &mut pending, WITHIN).await;
    assert!(
        first.starts_with("HTTP/1.1 200") && second.starts_with("HTTP/1.1 200"),
        "{first}\n{second}"
    );
    let paths: Vec<String> = w.origin.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/v3/first", "/v3/pieces", "/v3/p1", "/v3/p2"]);
}

#[tokio::test]
async fn a_parked_connection_still_refuses_a_smuggled_head() {
    let w = World::start(standard_tokens(), "").await;
    let (mut stream, mut pending) = parked_connection(&w).await;
    let smuggled = format!(
        "GET /v3/x HTTP/1.1\r\nhost: cdn.test\r\napi_key: {API_KEY}\r\naccess_token: {PROD}\r\ncontent-length: 0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    stream.write_all(smuggled.as_bytes()).await.unwrap();
    let reply = read_response(&mut stream, &mut pending, WITHIN).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("x-stackgate-reason: bad_request"), "{reply}");
    for value in ALL_VALUES {
        assert!(!reply.contains(value), "a token value in the answer");
    }
    assert_eq!(w.origin.request_count(), 1, "only the first was forwarded");
}

#[tokio::test]
async fn revoking_the_token_of_a_parked_connection_closes_it() {
    let w = World::start(standard_tokens(), "").await;
    let (mut stream, _) = parked_connection(&w).await;
    let reply = w
        .gateway
        .admin("POST", "/admin/tokens/blt_prod/revoke")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let rest = wait_closed(&mut stream).await;
    assert!(
        rest.is_empty(),
        "nothing more is sent: {:?}",
        String::from_utf8_lossy(&rest)
    );
    wait_parked(&w, 0).await;
    assert_eq!(w.origin.request_count(), 1);
}

#[tokio::test]
async fn a_parked_connection_idles_out() {
    let w = World::start(standard_tokens(), "[server]\nidle_timeout = \"1s\"\n").await;
    let (mut stream, _) = parked_connection(&w).await;
    let rest = wait_closed(&mut stream).await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    wait_parked(&w, 0).await;
}

#[tokio::test]
async fn shutdown_closes_parked_connections() {
    let mut w = World::start(standard_tokens(), "").await;
    let (mut stream, _) = parked_connection(&w).await;
    let gateway = w.gateway.gateway.take().expect("running");
    let drained = gateway.shutdown(Duration::from_secs(5)).await;
    assert!(drained, "a parked connection must not hold up the drain");
    let rest = wait_closed(&mut stream).await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

#[tokio::test]
async fn http2_connections_are_not_parked() {
    let w = World::start(standard_tokens(), "").await;
    let mut h2 = h2c(w.gateway.http).await;
    let request = |path: &str| {
        http::Request::builder()
            .uri(format!("http://cdn.test{path}"))
            .header("api_key", API_KEY)
            .header("access_token", PROD)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let reply = h2.send_request(request("/v3/h2")).await.unwrap();
    assert_eq!(reply.status(), 200);
    // Long enough for an HTTP/1.1 connection to park several times over.
    let deadline = tokio::time::Instant::now() + 5 * stackgate::server::PARK_AFTER;
    while tokio::time::Instant::now() < deadline {
        assert_eq!(w.gateway.shared.metrics.connections_parked.get(), 0);
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reply = h2.send_request(request("/v3/h2b")).await.unwrap();
    assert_eq!(reply.status(), 200);
}
