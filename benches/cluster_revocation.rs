//! Cluster revocation (SPEC §10): three replicas of the release binary on one
//! `redis-server`, 1,000 sessions of one token on each, a revocation sent to
//! one replica; reports the time from the admin call to the last session
//! closed on every replica, against one standalone gateway with the same
//! 1,000 sessions per gateway, in the same run.
//!
//! Run: `cargo bench --bench cluster_revocation` (options:
//! `-- --sessions N --rounds R`). Needs `redis-server` on PATH (or Debian's
//! /usr/bin/redis-server).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/origin.rs"]
mod origin;
#[path = "../tests/support/redis_server.rs"]
#[allow(dead_code)]
mod redis_server;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
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

struct Gateway {
    child: Child,
    http: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn arg(name: &str, default: usize) -> usize {
    let list: Vec<String> = std::env::args().collect();
    list.windows(2)
        .find(|p| p[0] == name)
        .map_or(default, |p| p[1].parse().expect("a number"))
}

fn write_config(dir: &std::path::Path, origin: &str, node: Option<usize>) -> std::path::PathBuf {
    let tokens_file = dir.join("tokens.json");
    if !tokens_file.exists() {
        let token = serde_json::json!({
            "uid": "blt_victim", "name": "victim", "token": VICTIM, "type": "delivery",
            "scope": [{"module": "environment", "environments": [{"name": "production", "uid": "blt_env"}]}]
        });
        std::fs::write(
            &tokens_file,
            serde_json::json!({ "tokens": [token] }).to_string(),
        )
        .unwrap();
    }
    let cluster = node.map_or(String::new(), |n| {
        format!(
            "[cluster]\nredis_url_env = \"BENCH_REDIS_URL\"\nnode_id = \"bench-{n}\"\nkey_prefix = \"bench\"\nlease = \"2s\"\n"
        )
    });
    let path = dir.join(format!("stackgate-{}.toml", node.unwrap_or(0)));
    std::fs::write(
        &path,
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
{cluster}
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
    path
}

fn start_gateway(config: &std::path::Path, redis_url: &str) -> Gateway {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stackgate"))
        .args(["run", "--log-format", "json", "--config"])
        .arg(config)
        .env("BENCH_ADMIN", ADMIN)
        .env("BENCH_REDIS_URL", redis_url)
        .env("RUST_LOG", "warn,stackgate::app=info")
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
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    Gateway {
        child,
        http: http.expect("http address"),
        admin: admin.expect("admin address"),
    }
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

/// When a session's connection closed.
struct Closed(oneshot::Receiver<Instant>);

/// A kept-alive connection that served one request.
async fn open(addr: SocketAddr) -> Closed {
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
        .header("access_token", VICTIM)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    tokio::spawn(async move {
        // Keep the sender alive so that the connection stays open.
        let _sender = sender;
        std::future::pending::<()>().await;
    });
    Closed(closed)
}

async fn open_many(addr: SocketAddr, n: usize) -> Vec<Closed> {
    let limit = Arc::new(Semaphore::new(256));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let limit = Arc::clone(&limit);
            tokio::spawn(async move {
                let _permit = limit.acquire().await.unwrap();
                open(addr).await
            })
        })
        .collect();
    let mut sessions = Vec::with_capacity(n);
    for task in tasks {
        sessions.push(task.await.unwrap());
    }
    sessions
}

async fn wait_ready(gateways: &[Gateway]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    for gw in gateways {
        while !admin(gw.admin, "GET", "/readyz").await.starts_with("ready") {
            assert!(Instant::now() < deadline, "not ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Opens `sessions` per gateway, revokes through the first, and returns the
/// time from the call to the last session closed on every gateway.
async fn round(gateways: &[Gateway], sessions: usize) -> Duration {
    let mut all = Vec::new();
    for gw in gateways {
        all.extend(open_many(gw.http, sessions).await);
    }
    let started = Instant::now();
    let answer = admin(gateways[0].admin, "POST", "/admin/tokens/blt_victim/revoke").await;
    assert!(answer.contains("\"revoked\":true"), "{answer}");
    let mut last = started;
    for closed in all {
        let at = tokio::time::timeout(Duration::from_secs(10), closed.0)
            .await
            .expect("a session stayed open")
            .unwrap();
        last = last.max(at);
    }
    admin(
        gateways[0].admin,
        "DELETE",
        "/admin/tokens/blt_victim/revoke",
    )
    .await;
    // Every gateway serves the token again before the next round.
    for gw in gateways {
        loop {
            let stream = TcpStream::connect(gw.http).await.unwrap();
            let (mut sender, connection) = http1::handshake(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(connection);
            let request = Request::get("/v3/entries")
                .header("host", "bench")
                .header("api_key", API_KEY)
                .header("access_token", VICTIM)
                .body(Full::new(Bytes::new()))
                .unwrap();
            if sender.send_request(request).await.unwrap().status() == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    last - started
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`
    }
    let sessions = arg("--sessions", 1000);
    let rounds = arg("--rounds", 5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let origin = origin::spawn_origin().await;
        let redis = redis_server::Redis::start();
        let dir = tempfile::tempdir().unwrap();
        let standalone = vec![start_gateway(
            &write_config(dir.path(), &origin.url(), None),
            "",
        )];
        let cluster: Vec<Gateway> = (1..=3)
            .map(|n| {
                start_gateway(
                    &write_config(dir.path(), &origin.url(), Some(n)),
                    &redis.url(),
                )
            })
            .collect();
        wait_ready(&standalone).await;
        wait_ready(&cluster).await;
        // Let every replica see the other two (heartbeats).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        for r in 0..rounds {
            let alone = round(&standalone, sessions).await;
            let alone_all = round(&standalone, 3 * sessions).await;
            let shared = round(&cluster, sessions).await;
            println!(
                "round {}: standalone, {sessions} sessions: {:.1} ms; standalone, {} sessions: {:.1} ms; \
                 cluster, 3 x {sessions} sessions, revoked on one replica: last closed on every replica {:.1} ms after the call",
                r + 1,
                ms(alone),
                3 * sessions,
                ms(alone_all),
                ms(shared)
            );
        }
        // Redis's part: publication to application on the replicas not asked.
        for gw in &cluster[1..] {
            let metrics = admin(gw.admin, "GET", "/metrics").await;
            let value = |name: &str| -> f64 {
                metrics
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0.0)
            };
            let (sum, count) = (
                value("stackgate_cluster_propagation_seconds_sum "),
                value("stackgate_cluster_propagation_seconds_count "),
            );
            println!(
                "replica {}: {count} versions applied, mean propagation {:.2} ms",
                gw.admin,
                sum / count.max(1.0) * 1000.0
            );
        }
    });
}
