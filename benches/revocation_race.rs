//! A request decided just before a revocation must not outlive it (SPEC §4):
//! either it is aborted and its HTTP/1.1 connection closed, or it was decided
//! after the revocation and refused. This bench looks for the window between
//! the two: one token is revoked and its revocation lifted through the admin
//! API, back to back, while clients open fresh connections and send the
//! token's first request on each. After a 200, a client waits until the next
//! revocation has been confirmed and sends a second request on the same
//! connection: the revocation had to close it, so any answer is a session
//! that survived its revocation.
//!
//! Run: `cargo bench --bench revocation_race` (options: `-- --duration SECS
//! --clients N`; 60 s and 48 by default). Exits 1 if a session survived.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "soak/harness.rs"]
mod harness;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

const API_KEY: &str = "blt_race_stack";
const ADMIN: &str = "race-admin-bearer";
const TOKEN: &str = "cs_race_delivery_value";
const UID: &str = "blt_race_token";

struct Shared {
    /// Odd versions revoke the token, even ones lift the revocation.
    started: AtomicU64,
    confirmed: AtomicU64,
    stop: AtomicBool,
    first_requests: AtomicU64,
    survived: AtomicU64,
}

fn request() -> http::Request<Full<Bytes>> {
    http::Request::get("/v3/content_types/blog/entries")
        .header("host", "cdn.race")
        .header("api_key", API_KEY)
        .header("access_token", TOKEN)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn client(gateway: std::net::SocketAddr, shared: Arc<Shared>) {
    while !shared.stop.load(SeqCst) {
        let stream = tokio::net::TcpStream::connect(gateway).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(connection);
        let lo = shared.confirmed.load(SeqCst);
        let answer = sender.send_request(request()).await;
        let hi = shared.started.load(SeqCst);
        let Ok(answer) = answer else { continue };
        let status = answer.status();
        if answer.into_body().collect().await.is_err() || status != 200 {
            continue;
        }
        shared.first_requests.fetch_add(1, SeqCst);
        // Allowed, so decided under the newest lifted (even) version in the window.
        let allowed_at = hi - hi % 2;
        assert!(allowed_at >= lo);
        let revoked_at = allowed_at + 1;
        while shared.confirmed.load(SeqCst) < revoked_at && !shared.stop.load(SeqCst) {
            tokio::task::yield_now().await;
        }
        if shared.stop.load(SeqCst) {
            return;
        }
        if sender.ready().await.is_err() {
            continue; // closed, as it must be
        }
        if let Ok(second) = sender.send_request(request()).await {
            shared.survived.fetch_add(1, SeqCst);
            println!(
                "SURVIVED: first request allowed (versions {lo}..={hi}); revocation v{revoked_at} \
                 confirmed; a second request on the same connection was answered {}",
                second.status()
            );
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let list: Vec<String> = std::env::args().collect();
    let (mut duration, mut clients) = (60, 48);
    for pair in list.windows(2) {
        match pair[0].as_str() {
            "--duration" => duration = pair[1].parse().expect("seconds"),
            "--clients" => clients = pair[1].parse().expect("a number"),
            _ => {}
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let survived = runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let origin = harness::spawn_origin().await;
        let tokens = dir.path().join("tokens.json");
        let token = serde_json::json!({
            "uid": UID, "name": UID, "token": TOKEN, "type": "delivery",
            "scope": [{"module": "environment", "environments": [{"name": "production", "uid": "blt_env"}]}]
        });
        std::fs::write(&tokens, serde_json::json!({ "tokens": [token] }).to_string()).unwrap();
        let config = dir.path().join("stackgate.toml");
        std::fs::write(
            &config,
            format!(
                "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[admin]\ntoken_env = \"SOAK_ADMIN\"\n\
                 [[routes]]\nkind = \"delivery\"\nhosts = [\"*\"]\nupstream = \"http://{origin}\"\n\
                 [[stacks]]\nname = \"race\"\napi_key = \"{API_KEY}\"\n[stacks.registry]\n\
                 tokens_file = \"{}\"\nmax_staleness = \"0\"\n",
                tokens.display()
            ),
        )
        .unwrap();
        let gateway = harness::start(&config, ADMIN);
        let mut admin = harness::AdminClient::new(gateway.admin, ADMIN);
        let ready = Instant::now();
        while admin.call("GET", "/readyz").await.map(|a| a.0) != Ok(200) {
            assert!(ready.elapsed() < Duration::from_secs(10), "not ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let shared = Arc::new(Shared {
            started: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            first_requests: AtomicU64::new(0),
            survived: AtomicU64::new(0),
        });
        let tasks: Vec<_> = (0..clients)
            .map(|_| tokio::spawn(client(gateway.http, Arc::clone(&shared))))
            .collect();
        let started = Instant::now();
        let mut version = 0;
        while started.elapsed() < Duration::from_secs(duration) {
            version += 1;
            shared.started.store(version, SeqCst);
            let method = if version % 2 == 1 { "POST" } else { "DELETE" };
            let (status, body) = admin
                .call(method, &format!("/admin/tokens/{UID}/revoke"))
                .await
                .unwrap();
            assert_eq!(status, 200, "{body}");
            shared.confirmed.store(version, SeqCst);
        }
        shared.stop.store(true, SeqCst);
        for task in tasks {
            task.await.unwrap();
        }
        let survived = shared.survived.load(SeqCst);
        println!(
            "{duration} s: {} revocations, {} first requests allowed, {survived} sessions survived their revocation",
            version.div_ceil(2),
            shared.first_requests.load(SeqCst),
        );
        survived
    });
    runtime.shutdown_background();
    if survived > 0 {
        std::process::exit(1);
    }
}
