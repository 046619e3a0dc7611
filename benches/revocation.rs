//! Revocation at scale: opens 10,000 sessions of one token and
//! 1,000 of others through the release binary, revokes the one through the
//! admin API, and reports how long until the last of its sessions was closed
//! and that no other session was touched.
//!
//! Run: `cargo bench --bench revocation` (options: `-- --sessions N --others M --rounds R`).
//! The gateway runs as a child process so that client and server sockets
//! each fit in their own file-descriptor limit.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/origin.rs"]
mod origin;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Semaphore};

const API_KEY: &str = "blt_bench_stack";
const ADMIN: &str = "bench-admin-bearer";
const VICTIM: &str = "cs_bench_victim_value";

struct Args {
    sessions: usize,
    others: usize,
    rounds: usize,
}

fn args() -> Args {
    let mut args = Args {
        sessions: 10_000,
        others: 1_000,
        rounds: 3,
    };
    let list: Vec<String> = std::env::args().collect();
    for pair in list.windows(2) {
        let value = || pair[1].parse().expect("a number");
        match pair[0].as_str() {
            "--sessions" => args.sessions = value(),
            "--others" => args.others = value(),
            "--rounds" => args.rounds = value(),
            _ => {}
        }
    }
    args
}

struct Gateway {
    child: Child,
    http: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token(uid: &str, value: &str) -> serde_json::Value {
    serde_json::json!({
        "uid": uid, "name": uid, "token": value, "type": "delivery",
        "scope": [{"module": "environment", "environments": [{"name": "production", "uid": "blt_env"}]}]
    })
}

fn start_gateway(origin: &str, others: usize) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let mut tokens = vec![token("blt_victim", VICTIM)];
    tokens.extend(
        (0..others).map(|i| token(&format!("blt_other_{i}"), &format!("cs_bench_other_{i}"))),
    );
    let tokens_file = dir.path().join("tokens.json");
    std::fs::write(
        &tokens_file,
        serde_json::json!({ "tokens": tokens }).to_string(),
    )
    .unwrap();
    let config = dir.path().join("stackgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[listen]
http = "127.0.0.1:0"
admin = "127.0.0.1:0"
[admin]
token_env = "BENCH_ADMIN"
[server]
max_connections = 50000
idle_timeout = "10m"
[[routes]]
kind = "delivery"
hosts = ["*"]
upstream = "{origin}"
[[stacks]]
name = "bench"
api_key = "{API_KEY}"
[stacks.registry]
tokens_file = "{}"
max_staleness = "0"
"#,
            tokens_file.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_stackgate"))
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config)
        .env("BENCH_ADMIN", ADMIN)
        .env(
            "RUST_LOG",
            std::env::var("BENCH_GATEWAY_LOG")
                .unwrap_or_else(|_| "warn,stackgate::app=info,stackgate::state=info".into()),
        )
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the gateway");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut http, mut admin) = (None, None);
    for line in lines.by_ref() {
        let line = line.unwrap();
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if json["message"] == "listening" {
            let addr = json["addr"].as_str().unwrap().parse().unwrap();
            match json["listener"].as_str() {
                Some("http") => http = Some(addr),
                Some("admin") => admin = Some(addr),
                _ => {}
            }
        }
        if http.is_some() && admin.is_some() {
            break;
        }
    }
    // Keep draining the gateway's log so that it never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("\"ERROR\"") || line.contains("\"WARN\"") {
                eprintln!("gateway: {line}");
            }
        }
    });
    Gateway {
        child,
        http: http.expect("http address"),
        admin: admin.expect("admin address"),
        _dir: dir,
    }
}

/// A kept-alive connection that has served one request, and a signal for when it closes.
struct Session {
    sender: http1::SendRequest<Full<Bytes>>,
    closed: oneshot::Receiver<Instant>,
}

async fn open(addr: SocketAddr, token: String) -> Session {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    let (tx, closed) = oneshot::channel();
    tokio::spawn(async move {
        let _ = connection.await;
        let _ = tx.send(Instant::now());
    });
    let request = Request::get("/v3/entries")
        .header("host", "bench")
        .header("api_key", API_KEY)
        .header("access_token", token)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    Session { sender, closed }
}

async fn open_many(addr: SocketAddr, tokens: Vec<String>) -> Vec<Session> {
    let limit = Arc::new(Semaphore::new(256));
    let tasks: Vec<_> = tokens
        .into_iter()
        .map(|token| {
            let limit = Arc::clone(&limit);
            tokio::spawn(async move {
                let _permit = limit.acquire().await.unwrap();
                open(addr, token).await
            })
        })
        .collect();
    let mut sessions = Vec::with_capacity(tasks.len());
    for task in tasks {
        sessions.push(task.await.unwrap());
    }
    sessions
}

async fn admin(addr: SocketAddr, method: &str, path: &str) -> String {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin")
        .header("authorization", format!("Bearer {ADMIN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// The gateway's own measurement: the sum of `stackgate_revocation_seconds`.
fn revocation_sum(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("stackgate_revocation_seconds_sum "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn round(gateway: &Gateway, args: &Args) {
    let victims = open_many(gateway.http, vec![VICTIM.to_owned(); args.sessions]).await;
    let others = open_many(
        gateway.http,
        (0..args.others)
            .map(|i| format!("cs_bench_other_{i}"))
            .collect(),
    )
    .await;
    let before = revocation_sum(&admin(gateway.admin, "GET", "/metrics").await);

    if let Some(pause) = std::env::var("BENCH_PAUSE_BEFORE_REVOKE")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!("revoking in {pause} s");
        tokio::time::sleep(Duration::from_secs(pause)).await;
    }
    let started = Instant::now();
    let answer = admin(gateway.admin, "POST", "/admin/tokens/blt_victim/revoke").await;
    let answered = started.elapsed();
    let mut last = started;
    for session in victims {
        let closed = tokio::time::timeout(Duration::from_secs(10), session.closed)
            .await
            .expect("a victim session stayed open")
            .unwrap();
        last = last.max(closed);
    }
    let client_seen = last - started;
    // The gateway records its measure once the last cancelled connection
    // task has cleaned up, which may come after the client saw the reset.
    let mut server_seen = 0.0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        server_seen = revocation_sum(&admin(gateway.admin, "GET", "/metrics").await) - before;
        if server_seen > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let untouched = AtomicUsize::new(0);
    let mut others = others;
    for session in &mut others {
        if matches!(
            session.closed.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ) {
            untouched.fetch_add(1, Ordering::Relaxed);
        }
    }
    // And they still work.
    let request = Request::get("/v3/again")
        .header("host", "bench")
        .header("api_key", API_KEY)
        .header("access_token", "cs_bench_other_0")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let status = others[0]
        .sender
        .send_request(request)
        .await
        .unwrap()
        .status();
    println!(
        "sessions {} + others {}: revoke answered in {:.2} ms; gateway: last session closed {:.2} ms after learning; \
         client: last close seen {:.2} ms after the call; others untouched {}/{} (next request {})",
        args.sessions,
        args.others,
        answered.as_secs_f64() * 1000.0,
        server_seen * 1000.0,
        client_seen.as_secs_f64() * 1000.0,
        untouched.load(Ordering::Relaxed),
        args.others,
        status.as_u16(),
    );
    assert!(answer.contains("\"revoked\":true"), "{answer}");
    assert_eq!(
        untouched.load(Ordering::Relaxed),
        args.others,
        "another token's session was closed"
    );
    assert_eq!(status, 200);
    admin(gateway.admin, "DELETE", "/admin/tokens/blt_victim/revoke").await;
}

fn main() {
    let args = args();
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let origin = origin::spawn_origin().await;
        let gateway = start_gateway(&origin.url(), args.others);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !admin(gateway.admin, "GET", "/readyz")
            .await
            .starts_with("ready")
        {
            assert!(
                Instant::now() < deadline,
                "the gateway did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for _ in 0..args.rounds {
            round(&gateway, &args).await;
        }
    });
}
