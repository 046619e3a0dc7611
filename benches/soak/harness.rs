//! What surrounds the gateway in a soak: the gateway as a child process and
//! what `/proc` says about it (resident memory, open descriptors, which of
//! its sockets are client or upstream connections), a fixed origin, and a
//! client for the admin API.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};

/// An admin call with no answer after this long fails.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A running gateway; killed when dropped.
pub struct Gateway {
    child: Child,
    pub pid: u32,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    /// WARN and ERROR lines it logged.
    pub warnings: Arc<AtomicU64>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `stackgate run --config <config>` with the admin bearer in
/// `SOAK_ADMIN` and the CMA credential in `SOAK_CMA`, and waits for its
/// listeners' addresses in its log.
pub fn start(config: &Path, admin_bearer: &str) -> Gateway {
    let mut child = Command::new(env!("CARGO_BIN_EXE_stackgate"))
        .args(["run", "--log-format", "json", "--config"])
        .arg(config)
        .env("SOAK_ADMIN", admin_bearer)
        .env("SOAK_CMA", "soak-cma-authtoken")
        .env(
            "RUST_LOG",
            std::env::var("SOAK_GATEWAY_LOG")
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
    // Keep draining the log so that the gateway never blocks on a full pipe.
    let warnings = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&warnings);
    std::thread::spawn(move || {
        let mut shown = 0;
        for line in lines.map_while(Result::ok) {
            if line.contains("\"ERROR\"") || line.contains("\"WARN\"") {
                counted.fetch_add(1, Ordering::Relaxed);
                if shown < 20 {
                    shown += 1;
                    eprintln!("gateway: {line}");
                }
            }
        }
    });
    let pid = child.id();
    Gateway {
        child,
        pid,
        http: http.expect("the gateway's http address"),
        admin: admin.expect("the gateway's admin address"),
        warnings,
    }
}

/// One look at the gateway process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub rss_kib: u64,
    pub fds: usize,
    /// Accepted client connections (sockets on the http listener's port).
    pub clients: usize,
    /// Connections to the origin.
    pub upstream: usize,
}

impl Sample {
    /// Descriptors other than client and upstream connections.
    pub fn other_fds(&self) -> usize {
        self.fds.saturating_sub(self.clients + self.upstream)
    }
}

/// Reads `/proc/<pid>`; `http_port` and `origin_port` classify its sockets.
pub fn sample(pid: u32, http_port: u16, origin_port: u16) -> Sample {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let mut inodes = Vec::new();
    let mut fds = 0;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in dir.flatten() {
            fds += 1;
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let target = target.to_string_lossy();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    inodes.push(inode);
                }
            }
        }
    }
    let ports = tcp_ports();
    let (mut clients, mut upstream) = (0, 0);
    for inode in inodes {
        if let Some((local, remote)) = ports.get(&inode) {
            if *local == http_port && *remote != 0 {
                clients += 1;
            } else if *remote == origin_port {
                upstream += 1;
            }
        }
    }
    Sample {
        rss_kib,
        fds,
        clients,
        upstream,
    }
}

/// What the descriptors other than client and upstream connections are
/// (for a failure report): `readlink` targets, and for sockets their ports.
pub fn describe_other_fds(pid: u32, http_port: u16, origin_port: u16) -> Vec<String> {
    let ports = tcp_ports();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy().into_owned();
        let inode = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse::<u64>().ok());
        let described = match inode.map(|i| ports.get(&i)) {
            Some(Some((local, remote))) => {
                if (*local == http_port && *remote != 0) || *remote == origin_port {
                    continue;
                }
                format!("{target} local port {local} remote port {remote}")
            }
            Some(None) => format!("{target} (not in /proc/net/tcp: closed or not TCP)"),
            None => target,
        };
        out.push(format!(
            "fd {}: {described}",
            entry.file_name().to_string_lossy()
        ));
    }
    out
}

/// Socket inode -> (local port, remote port), from `/proc/net/tcp{,6}`.
fn tcp_ports() -> HashMap<u64, (u16, u16)> {
    let mut out = HashMap::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 10 {
                continue;
            }
            let port = |addr: &str| {
                addr.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                    .unwrap_or(0)
            };
            if let Ok(inode) = fields[9].parse::<u64>() {
                out.insert(inode, (port(fields[1]), port(fields[2])));
            }
        }
    }
    out
}

/// A fixed origin: 200 with `x-origin: soak` and the request's path and
/// query as the body, so that an answer can be matched to its request.
/// It records nothing, so that a long run does not grow the bench's memory.
pub async fn spawn_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                    let echo = request
                        .uri()
                        .path_and_query()
                        .map_or("/", |pq| pq.as_str())
                        .to_owned();
                    let response = Response::builder()
                        .header("x-origin", "soak")
                        .header("content-type", "text/plain")
                        .body(Full::new(Bytes::from(echo)))
                        .unwrap();
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A kept-alive HTTP/1.1 connection to the admin listener.
pub struct AdminClient {
    addr: SocketAddr,
    bearer: String,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl AdminClient {
    pub fn new(addr: SocketAddr, bearer: &str) -> AdminClient {
        AdminClient {
            addr,
            bearer: bearer.to_owned(),
            sender: None,
        }
    }

    /// One call; the status and body.
    pub async fn call(&mut self, method: &str, path: &str) -> Result<(u16, String), String> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("admin connect: {e}"))?;
            let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("admin handshake: {e}"))?;
            tokio::spawn(connection);
            self.sender = Some(sender);
        }
        let Some(sender) = self.sender.as_mut() else {
            return Err("no admin connection".into());
        };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "admin")
            .header("authorization", format!("Bearer {}", self.bearer))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let answer = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, String::from_utf8_lossy(&body).into_owned()))
        };
        match tokio::time::timeout(ADMIN_TIMEOUT, answer).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(err)) => {
                self.sender = None;
                Err(format!("{method} {path}: {err}"))
            }
            Err(_) => {
                self.sender = None;
                Err(format!("{method} {path}: no answer in {ADMIN_TIMEOUT:?}"))
            }
        }
    }
}
