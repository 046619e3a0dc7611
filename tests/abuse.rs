//! Hostile clients and faulty origins (SPEC §3 rows 16 and 17,
//! §5 `[server]`): slow heads, idle keep-alive, connection floods, HTTP/2
//! rapid reset and stream floods, oversized header lists, and origins that
//! reset, stall, answer garbage or send huge bodies. Every test also shows
//! that the gateway keeps serving a well-behaved client meanwhile.
//!
//! The tests measure the whole process (RSS, open file descriptors), so they
//! run one at a time under [`SERIAL`].
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

/// One test at a time: RSS and descriptor counts are per process.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Small timeouts so that the watchdog acts within the test's patience.
const TIGHT: &str = "[server]\nheader_timeout = \"300ms\"\nidle_timeout = \"400ms\"\n";

/// How long a well-behaved client may wait for its answer under attack.
const PROMPT: Duration = Duration::from_secs(5);

struct World {
    gateway: TestGateway,
    origin: origin::Origin,
    _cma: cma::FakeCma,
}

async fn world_with(extra: &str) -> World {
    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    let gateway = spawn_ready(&config_with(
        &origin.url(),
        &cma_registry(&cma.url(), None),
        extra,
    ))
    .await;
    World {
        gateway,
        origin,
        _cma: cma,
    }
}

/// An allowed GET on the delivery route (HTTP/1.1 form: `host` header).
fn allowed(uri: &str) -> http::Request<Full<Bytes>> {
    get(
        "cdn.test",
        uri,
        &[("api_key", API_KEY), ("access_token", PROD)],
    )
}

/// An allowed GET for an h2 connection (authority in the URI).
fn allowed_h2(uri: &str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .uri(format!("http://cdn.test{uri}"))
        .header("api_key", API_KEY)
        .header("access_token", PROD)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// A well-behaved client on a fresh connection gets 200, promptly.
async fn assert_serves(addr: SocketAddr, what: &str) {
    let reply = timeout(PROMPT, send(addr, allowed("/v3/entries")))
        .await
        .unwrap_or_else(|_| panic!("{what}: a normal client waited over {PROMPT:?}"));
    assert_eq!(reply.status, 200, "{what}: {}", reply.text());
}

/// Resident set size of this process (gateway, fakes and test alike).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .unwrap();
    kib * 1024
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Waits (`within` at most) until the open descriptors are back to `baseline`
/// plus `slack`: closed connections are released asynchronously.
async fn wait_for_fds(baseline: usize, slack: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let now = open_fds();
        if now <= baseline + slack {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "descriptors leaked: {now} open, {baseline} before (slack {slack})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `bytes` one at a time, `every` apart, until the peer stops taking
/// them; the write half stays open afterwards.
fn trickle(
    mut write: tokio::net::tcp::OwnedWriteHalf,
    bytes: Vec<u8>,
    every: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        for byte in bytes {
            if write.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
        std::future::pending::<()>().await;
    })
}

fn head(uri: &str) -> String {
    format!("GET {uri} HTTP/1.1\r\nhost: cdn.test\r\napi_key: {API_KEY}\r\naccess_token: {PROD}\r\nx-padding: {}\r\n\r\n", "p".repeat(64))
}

#[tokio::test]
async fn slowloris_heads_are_cut_off_after_header_timeout() {
    let _serial = SERIAL.lock().await;
    let w = world_with(TIGHT).await;
    let addr = w.gateway.http;

    // A head trickling in, one byte every 100 ms (it would take ~15 s).
    // Timed from before the connect: the gateway's clock starts later.
    let started = Instant::now();
    let slow = TcpStream::connect(addr).await.unwrap();
    let (mut read, write) = slow.into_split();
    let writer = trickle(
        write,
        head("/v3/entries").into_bytes(),
        Duration::from_millis(100),
    );
    // Meanwhile a normal client is served.
    let (closed, ()) = tokio::join!(
        read_until_closed(&mut read, Duration::from_secs(3)),
        assert_serves(addr, "during a slowloris"),
    );
    writer.abort();
    let answer = closed.expect("the slow connection was still open after 3 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        !answer.starts_with("HTTP/1.1 200"),
        "a trickled head was answered: {answer}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "closed before header_timeout: {:?}",
        started.elapsed()
    );

    // A connection that sends nothing at all.
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let answer = read_until_closed(&mut silent, Duration::from_secs(3))
        .await
        .expect("a silent connection was still open after 3 s");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "closed before header_timeout: {:?}",
        started.elapsed()
    );

    // A keep-alive connection whose second head trickles: timed from its
    // first byte, not let off because the first request went well.
    let conn = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = conn.into_split();
    write.write_all(head("/v3/first").as_bytes()).await.unwrap();
    let first = read_response(&mut read, &mut Vec::new(), PROMPT).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let writer = trickle(
        write,
        head("/v3/second").into_bytes(),
        Duration::from_millis(100),
    );
    let closed = read_until_closed(&mut read, Duration::from_secs(3)).await;
    writer.abort();
    let answer = closed.expect("a trickled second head kept the connection open");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

    assert_eq!(
        w.origin
            .requests()
            .iter()
            .filter(|r| r.path == "/v3/second")
            .count(),
        0,
        "a trickled head reached the origin"
    );
    assert_serves(addr, "after the slowloris").await;
}

#[tokio::test]
async fn idle_keep_alive_closes_but_a_streaming_response_does_not() {
    let _serial = SERIAL.lock().await;
    let w = world_with(TIGHT).await;
    let addr = w.gateway.http;

    let (mut sender, connection) = h1(addr).await;
    let reply = read(sender.send_request(allowed("/v3/a")).await.unwrap()).await;
    assert_eq!(reply.status, 200);
    // Kept alive: a second request on the same connection is served.
    let reply = read(sender.send_request(allowed("/v3/b")).await.unwrap()).await;
    assert_eq!(reply.status, 200);
    let idle_from = Instant::now();
    let ended = timeout(Duration::from_secs(3), connection)
        .await
        .expect("an idle keep-alive connection was still open after 3 s");
    assert!(ended.unwrap().is_ok());
    assert!(
        idle_from.elapsed() >= Duration::from_millis(100),
        "closed too early for an idle timeout: {:?}",
        idle_from.elapsed()
    );
    assert!(sender.is_closed());

    // A response streaming for ~1 s (longer than idle_timeout) is in flight:
    // the connection stays open until it is done.
    let (mut sender, mut connection) = h1(addr).await;
    let response = sender
        .send_request(allowed("/stream?chunks=20&interval_ms=50"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = Vec::new();
    let streaming_from = Instant::now();
    let serve_meanwhile = tokio::spawn(assert_serves(addr, "during a long stream"));
    while let Some(frame) = timeout(PROMPT, body.frame())
        .await
        .expect("a chunk in time")
    {
        let frame = frame.expect("the stream was cut off");
        if let Ok(data) = frame.into_data() {
            received.extend_from_slice(&data);
        }
        assert!(
            !connection.is_finished(),
            "the connection closed while a response was in flight"
        );
    }
    assert!(streaming_from.elapsed() >= Duration::from_millis(400));
    let text = String::from_utf8_lossy(&received);
    assert_eq!(text.lines().count(), 20, "{text}");
    assert!(text.ends_with("{\"chunk\":19}\n"), "{text}");
    serve_meanwhile.await.unwrap();
    // Then it idles out like any other.
    timeout(Duration::from_secs(3), &mut connection)
        .await
        .expect("not closed after the stream ended and idle_timeout passed")
        .unwrap()
        .unwrap();
    assert_eq!(w.origin.streams().completed, 1);
}

#[tokio::test]
async fn connections_beyond_max_connections_are_shed() {
    let _serial = SERIAL.lock().await;
    let w = world_with("[server]\nmax_connections = 5\nidle_timeout = \"60s\"\n").await;
    let addr = w.gateway.http;

    let mut held = Vec::new();
    for i in 0..5 {
        let (mut sender, connection) = h1(addr).await;
        let reply = read(sender.send_request(allowed("/v3/held")).await.unwrap()).await;
        assert_eq!(reply.status, 200, "connection {i}");
        held.push((sender, connection));
    }

    // The sixth is accepted and dropped without an answer.
    let mut sixth = TcpStream::connect(addr).await.unwrap();
    let _ = sixth.write_all(head("/v3/sixth").as_bytes()).await;
    let answer = read_until_closed(&mut sixth, PROMPT)
        .await
        .expect("the sixth connection was neither served nor shed");
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    let (mut sender, _connection) = h1(addr).await;
    assert!(
        timeout(PROMPT, sender.send_request(allowed("/v3/sixth")))
            .await
            .expect("a shed connection hung")
            .is_err(),
        "a request on a shed connection was answered"
    );
    drop(sender);

    // The five still work.
    for (i, (sender, _)) in held.iter_mut().enumerate() {
        let reply = read(sender.send_request(allowed("/v3/again")).await.unwrap()).await;
        assert_eq!(reply.status, 200, "connection {i}");
    }

    // Closing one makes room for a new one.
    let (sender, connection) = held.remove(0);
    drop(sender);
    timeout(PROMPT, connection).await.unwrap().unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (mut sender, _connection) = h1(addr).await;
        if let Ok(Ok(response)) = timeout(PROMPT, sender.send_request(allowed("/v3/new"))).await {
            assert_eq!(read(response).await.status, 200);
            break;
        }
        // Shed while the gateway had not yet seen the close: try again.
        assert!(
            Instant::now() < deadline,
            "no room for a new connection after one closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        w.origin
            .requests()
            .iter()
            .filter(|r| r.path == "/v3/sixth")
            .count(),
        0
    );
}

#[tokio::test]
async fn http2_rapid_reset_leaves_other_clients_served() {
    let _serial = SERIAL.lock().await;
    let w = world_with("").await;
    let addr = w.gateway.http;
    assert_serves(addr, "before the attack").await;
    let rss_before = rss_bytes();

    // Another client keeps making requests for the whole attack.
    let attacking = Arc::new(AtomicBool::new(true));
    let bystander = {
        let attacking = Arc::clone(&attacking);
        tokio::spawn(async move {
            let mut sender = h2c(addr).await;
            let mut served = 0;
            while attacking.load(Ordering::Relaxed) || served == 0 {
                let reply = timeout(PROMPT, sender.send_request(allowed_h2("/v3/bystander")))
                    .await
                    .expect("the bystander waited too long")
                    .expect("the bystander's request failed");
                assert_eq!(read(reply).await.status, 200);
                served += 1;
            }
            served
        })
    };

    // 2,000 streams opened and reset at once: each batch goes out as
    // HEADERS, then dropping the response futures sends RST_STREAM.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut attacker, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let mut sent = 0;
    for _ in 0..100 {
        if attacker.ready().await.is_err() {
            break;
        }
        let pending: Vec<_> = (0..20)
            .map(|_| attacker.send_request(allowed_h2("/slow?ms=50")))
            .collect();
        sent += pending.len();
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(pending);
    }
    let goaway = connection.is_finished() || attacker.ready().await.is_err();
    eprintln!(
        "rapid reset: {sent} streams reset, attacker connection {}, origin saw {} requests",
        if goaway { "closed" } else { "open" },
        w.origin.request_count()
    );
    attacking.store(false, Ordering::Relaxed);
    let served = timeout(Duration::from_secs(30), bystander)
        .await
        .expect("the bystander never finished")
        .unwrap();
    assert!(served >= 1);
    assert_serves(addr, "after the rapid reset").await;
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(
        grown < 64 << 20,
        "RSS grew by {} MiB during a rapid reset",
        grown >> 20
    );
}

#[tokio::test]
async fn http2_stream_flood_is_bounded_by_max_concurrent_streams() {
    let _serial = SERIAL.lock().await;
    let w = world_with("").await;
    let addr = w.gateway.http;
    let sender = h2c(addr).await;

    // The origin counts /stream responses started and finished (its last
    // chunk handed over); one started and not finished is a stream open at
    // the gateway, so the difference bounds what the gateway lets through.
    let done = Arc::new(AtomicUsize::new(0));
    let mut flood = Vec::new();
    for _ in 0..1000 {
        let mut sender = sender.clone();
        let done = Arc::clone(&done);
        flood.push(tokio::spawn(async move {
            let outcome = match sender
                .send_request(allowed_h2("/stream?chunks=4&interval_ms=50"))
                .await
            {
                Ok(response) => {
                    let status = response.status();
                    response.into_body().collect().await.map(|_| status).ok()
                }
                // Refused cleanly (RST_STREAM, GOAWAY).
                Err(_) => None,
            };
            done.fetch_add(1, Ordering::Relaxed);
            outcome
        }));
    }
    let mut most = 0;
    let mut checked_bystander = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while done.load(Ordering::Relaxed) < 1000 {
        let s = w.origin.streams();
        let in_flight = s.started - s.completed - s.aborted;
        most = most.max(in_flight);
        if !checked_bystander && in_flight >= 100 {
            assert_serves(addr, "during a stream flood").await;
            checked_bystander = true;
        }
        assert!(Instant::now() < deadline, "the flood never drained");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        most <= 256,
        "{most} streams in flight at once on one connection"
    );
    let mut ok = 0;
    for task in flood {
        if let Some(status) = task.await.unwrap() {
            assert_eq!(status, 200);
            ok += 1;
        }
    }
    eprintln!("stream flood: {ok} of 1000 served, at most {most} in flight");
    assert!(ok > 0);
    assert!(checked_bystander || most < 100);
    assert_serves(addr, "after the stream flood").await;
}

/// One allowed request on `sender`, answered 200 within [`PROMPT`]; returns 1.
async fn h2_served(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    what: &str,
) -> usize {
    let reply = timeout(PROMPT, sender.send_request(allowed_h2("/v3/bystander")))
        .await
        .unwrap_or_else(|_| panic!("{what}: the bystander waited over {PROMPT:?}"))
        .unwrap_or_else(|err| panic!("{what}: the bystander's request failed: {err}"));
    assert_eq!(read(reply).await.status, 200, "{what}");
    1
}

/// SETTINGS frames in the flood: 8,000,000 empty ones, 72 MB, more than
/// loopback socket buffers can hold (`tcp_wmem` and `tcp_rmem` allow at most
/// 4 and 32 MiB on the test machine), so that a gateway that reads on
/// regardless is caught taking all of it.
const SETTINGS_FLOOD: usize = 8_000_000;
/// A flood that makes no progress for this long has been stopped.
const STALLED: Duration = Duration::from_secs(1);

// Two workers, as in the binary: the flooding connection, which the test
// binary logs frame by frame, has one to itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_settings_flood_is_bounded() {
    // An empty SETTINGS frame costs its sender 9 bytes and obliges the peer
    // to answer with a 9-byte ACK (CVE-2019-9515). The h2 crate handles one
    // SETTINGS frame at a time and reads the next frame only once the last
    // one's ACK is in its 16 KiB write buffer, so a client that reads no ACK
    // makes the gateway stop reading once the socket buffers are full: the
    // flood costs socket buffers, not memory.
    let _serial = SERIAL.lock().await;
    let w = world_with("").await;
    let addr = w.gateway.http;
    assert_serves(addr, "before the flood").await;
    let rss_before = rss_bytes();
    let logs_before = capture_logs().lock().unwrap().len();

    // A small receive buffer, so that unread ACKs fill it soon.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let attacker = socket.connect(addr).await.unwrap();
    let (answers, mut write) = attacker.into_split();
    let (progress, mut taken) = tokio::sync::watch::channel(0usize);
    let flood = tokio::spawn(async move {
        const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];
        write.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let chunk = EMPTY_SETTINGS.repeat(1000);
        for _ in 0..SETTINGS_FLOOD / 1000 {
            write.write_all(&chunk).await?;
            progress.send_modify(|n| *n += chunk.len());
        }
        Ok::<_, std::io::Error>(())
    });

    // A client on another connection is served every 256 KiB of the flood,
    // and once more when it has stopped.
    let mut bystander = h2c(addr).await;
    let mut served = 0;
    // The flood goes on until the gateway stops taking it (or closes the
    // connection, or takes it all).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next_serve = 0;
    let stopped = loop {
        match timeout(STALLED, taken.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break "the writer ended",
            Err(_) => break "no progress",
        }
        let now = *taken.borrow();
        if now >= next_serve {
            served += h2_served(&mut bystander, "during a SETTINGS flood").await;
            next_serve = now + (256 << 10);
        }
        assert!(
            Instant::now() < deadline,
            "the gateway was still taking the flood after 30 s"
        );
    };
    served += h2_served(&mut bystander, "with a SETTINGS flood stopped").await;
    let taken = *taken.borrow();
    let ended = flood.is_finished();
    flood.abort();
    if ended {
        // Taking it all is what must not happen; being cut off is fine.
        let outcome = flood.await.unwrap();
        assert!(
            outcome.is_err(),
            "the gateway read all {SETTINGS_FLOOD} SETTINGS frames while their ACKs went unread"
        );
    }
    drop(answers);
    let logged = capture_logs().lock().unwrap().len() - logs_before;
    let grown = rss_bytes().saturating_sub(rss_before);
    eprintln!(
        "settings flood: {stopped} after {taken} of {} bytes, bystander served {served} times, \
         RSS +{} MiB of which logs {} MiB",
        SETTINGS_FLOOD * 9,
        grown >> 20,
        logged >> 20,
    );
    assert!(taken < SETTINGS_FLOOD * 9);
    // The test binary logs h2 at debug level into memory: not the gateway's.
    let gateway_grown = grown.saturating_sub(logged as u64);
    assert!(
        gateway_grown < 16 << 20,
        "RSS grew by {} MiB (besides logs) during a SETTINGS flood",
        gateway_grown >> 20
    );
    assert_serves(addr, "after the SETTINGS flood").await;
}

#[tokio::test]
async fn a_huge_h2_header_list_is_refused_and_not_forwarded() {
    let _serial = SERIAL.lock().await;
    let w = world_with("").await;
    let addr = w.gateway.http;
    let mut sender = h2c(addr).await;
    let mut builder = http::Request::builder()
        .uri("http://cdn.test/v3/huge")
        .header("api_key", API_KEY)
        .header("access_token", PROD);
    let pad = "h".repeat(1024);
    for i in 0..100 {
        builder = builder.header(format!("x-pad-{i}"), pad.as_str());
    }
    let request = builder.body(Full::new(Bytes::new())).unwrap();
    let before = w.origin.request_count();
    let answer = timeout(PROMPT, sender.send_request(request))
        .await
        .expect("a huge header list hung");
    match answer {
        Ok(response) => {
            eprintln!("huge header list: answered {}", response.status());
            assert_eq!(response.status(), 431);
        }
        Err(err) => eprintln!("huge header list: stream refused ({err})"),
    }
    assert_eq!(
        w.origin.request_count(),
        before,
        "a huge header list was forwarded"
    );
    assert_serves(addr, "after a huge header list").await;
}

/// Sends `request` and reads the body; the status and the body, or the
/// body's error. Panics on a hang.
async fn send_lenient(
    addr: SocketAddr,
    request: http::Request<Full<Bytes>>,
) -> (http::StatusCode, Result<Bytes, String>, Option<String>) {
    timeout(PROMPT, async {
        let (mut sender, _connection) = h1(addr).await;
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let reason = response
            .headers()
            .get("x-stackgate-reason")
            .map(|v| v.to_str().unwrap().to_owned());
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| e.to_string());
        (status, body, reason)
    })
    .await
    .expect("the gateway hung on a faulty origin")
}

#[tokio::test]
async fn faulty_origins_fail_cleanly_without_leaks() {
    let _serial = SERIAL.lock().await;
    let short = raw_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc").await;
    let noise = raw_origin(b"\x00\xff\x13garbage \x7f\r\n\x01\r\n\r\n").await;
    let extra = format!(
        "[upstream]\nrequest_timeout = \"300ms\"\n\n\
         [[routes]]\nkind = \"delivery\"\nhosts = [\"short.test\"]\nupstream = \"http://{short}\"\n\n\
         [[routes]]\nkind = \"delivery\"\nhosts = [\"noise.test\"]\nupstream = \"http://{noise}\"\n",
        short = short.addr,
        noise = noise.addr,
    );
    let w = world_with(&extra).await;
    let addr = w.gateway.http;
    let token = [("api_key", API_KEY), ("access_token", PROD)];
    assert_serves(addr, "before the faults").await;
    let fds_before = open_fds();

    // Reset by the origin.
    let reply = timeout(PROMPT, send(addr, get("cdn.test", "/reset", &token)))
        .await
        .unwrap();
    assert_eq!(reply.status, 502);
    assert_eq!(reply.reason(), "upstream_error");
    // Stalled past request_timeout.
    let started = Instant::now();
    let reply = timeout(PROMPT, send(addr, get("cdn.test", "/slow?ms=5000", &token)))
        .await
        .unwrap();
    assert_eq!(reply.status, 504);
    assert_eq!(reply.reason(), "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(4));
    // A body shorter than its Content-Length: refused or cut, never whole.
    let (status, body, reason) = send_lenient(addr, get("short.test", "/v3/x", &token)).await;
    eprintln!("short body: {status} {body:?}");
    match status.as_u16() {
        502 => assert_eq!(reason.as_deref(), Some("upstream_error")),
        200 => assert!(
            body.as_ref().map_or(true, |b| b.len() < 10),
            "a cut body arrived whole: {body:?}"
        ),
        other => panic!("short body: unexpected {other}"),
    }
    // Not HTTP at all.
    let (status, _, reason) = send_lenient(addr, get("noise.test", "/v3/x", &token)).await;
    assert_eq!(status, 502);
    assert_eq!(reason.as_deref(), Some("upstream_error"));
    assert_serves(addr, "after the garbage origins").await;

    // 50 MB stream through without being buffered.
    let rss_before = rss_bytes();
    let (mut sender, _connection) = h1(addr).await;
    let response = timeout(
        PROMPT,
        sender.send_request(get("cdn.test", "/big?bytes=50000000", &token)),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut total = 0usize;
    let mut peak = rss_before;
    let mut frames = 0u64;
    while let Some(frame) = timeout(PROMPT, body.frame())
        .await
        .expect("a chunk in time")
    {
        if let Ok(data) = frame.unwrap().into_data() {
            total += data.len();
        }
        frames += 1;
        if frames.is_multiple_of(64) {
            peak = peak.max(rss_bytes());
        }
    }
    assert_eq!(total, 50_000_000);
    let grown = peak.saturating_sub(rss_before);
    assert!(
        grown < 20 << 20,
        "RSS grew by {} MiB while streaming 50 MB",
        grown >> 20
    );
    drop(sender);

    // Nothing left behind, and other routes unaffected.
    assert_serves(addr, "after the faults").await;
    short.task.abort();
    noise.task.abort();
    wait_for_fds(fds_before, 8, Duration::from_secs(20)).await;
    let reply = timeout(
        PROMPT,
        send(addr, get("prefixed.test", "/cda/v3/entries", &token)),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// An origin whose accept queue is full: the kernel drops further SYNs, so a
/// connect to it neither succeeds nor fails until the connector gives up.
async fn unreachable_origin() -> (SocketAddr, Vec<TcpStream>, tokio::net::TcpListener) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    // With a backlog of 0 the queue holds one connection; fill it (and one
    // more in case the kernel rounds up), never accepting.
    let mut fillers = Vec::new();
    for _ in 0..2 {
        if let Ok(Ok(stream)) = timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
        {
            fillers.push(stream);
        }
    }
    (addr, fillers, listener)
}

#[tokio::test]
async fn an_origin_that_cannot_be_reached_in_time_is_504() {
    let _serial = SERIAL.lock().await;
    let (unreachable, _fillers, _listener) = unreachable_origin().await;
    // A port nobody listens on: the connect is refused at once.
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let extra = format!(
        "[upstream]\nconnect_timeout = \"200ms\"\nrequest_timeout = \"20s\"\n\n\
         [[routes]]\nkind = \"delivery\"\nhosts = [\"unreachable.test\"]\nupstream = \"http://{unreachable}\"\n\n\
         [[routes]]\nkind = \"delivery\"\nhosts = [\"refused.test\"]\nupstream = \"http://{closed}\"\n"
    );
    let w = world_with(&extra).await;
    let addr = w.gateway.http;
    let token = [("api_key", API_KEY), ("access_token", PROD)];

    // Well inside request_timeout: the connect timeout decided, and it is a
    // timeout (504), not a refusal (502).
    let reply = timeout(
        Duration::from_secs(10),
        send(addr, get("unreachable.test", "/v3/content_types", &token)),
    )
    .await
    .expect("connect_timeout must end the wait, not request_timeout");
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.reason(), "upstream_timeout");
    assert_eq!(reply.json()["error_code"], 504);

    // A refused connect stays a 502.
    let reply = timeout(
        PROMPT,
        send(addr, get("refused.test", "/v3/content_types", &token)),
    )
    .await
    .unwrap();
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert_eq!(reply.reason(), "upstream_error");
    assert_serves(addr, "after the unreachable origin").await;
}

/// Accepted sockets have TCP keepalive, so a client that vanished without a
/// FIN (power loss, a NAT that dropped the mapping) is found by the kernel.
/// Read from /proc/net/tcp: an idle established socket with keepalive runs
/// the keepalive timer (`tr` 02), one without runs none (00).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn accepted_sockets_have_tcp_keepalive() {
    let _serial = SERIAL.lock().await;
    let w = world_with("").await;
    let client = TcpStream::connect(w.gateway.http).await.unwrap();
    let client_port = client.local_addr().unwrap().port();
    let gateway_port = w.gateway.http.port();
    // The gateway's end of this connection: local = gateway, remote = client.
    let timer = |table: &str| {
        table.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
            let ours = port(fields.get(1)?) == Some(gateway_port)
                && port(fields.get(2)?) == Some(client_port)
                && fields.get(3) == Some(&"01");
            ours.then(|| fields.get(5).map(|tr| tr[..2].to_owned()))?
        })
    };
    // The kernel lists the socket once the handshake is done, before the
    // gateway accepts it and sets the option: wait for the timer.
    wait_until(
        "a keepalive timer on the gateway's end of the connection",
        || timer(&std::fs::read_to_string("/proc/net/tcp").unwrap()).as_deref() == Some("02"),
    )
    .await;
    drop(client);
}
