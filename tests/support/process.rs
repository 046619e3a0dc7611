//! `stackgate run` as a child process: its log lines read on threads, its
//! listening addresses, and a kill when dropped.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{get, send, ADMIN_TOKEN, CMA_SECRET};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_stackgate");
/// How long any awaited event may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// Lines of a child's output, read on a thread.
pub struct Lines {
    rx: mpsc::UnboundedReceiver<String>,
    pub seen: Vec<String>,
}

impl Lines {
    pub fn read(from: impl Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(from).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
        }
    }

    /// The first line (seen before or arriving now) that `matches`.
    pub async fn wait_for(&mut self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        if let Some(line) = self.seen.iter().find(|l| matches(l)) {
            return line.clone();
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Ok(None) => panic!("output ended before {what}:\n{}", self.seen.join("\n")),
                Err(_) => panic!("timed out waiting for {what}:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Whatever arrived so far, without waiting.
    pub fn drain(&mut self) -> &[String] {
        while let Ok(line) = self.rx.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }
}

/// A running `stackgate run`, killed (SIGKILL) when dropped.
pub struct Node {
    pub child: Child,
    pub stderr: Lines,
    pub http: SocketAddr,
    pub admin: SocketAddr,
}

/// The value of `name=` in a text log line, quotes removed.
fn text_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let value = line[start..].split_whitespace().next()?;
    Some(value.trim_matches('"'))
}

fn listening_addr(line: &str, listener: &str) -> Option<SocketAddr> {
    let is_it = line.contains(" listening") && text_field(line, "listener") == Some(listener);
    is_it.then(|| text_field(line, "addr")?.parse().ok())?
}

impl Node {
    /// Starts `stackgate run --config <config>` with the standard secrets
    /// and `env`, and waits for its listeners (not for readiness).
    pub async fn start(config: &Path, env: &[(&str, &str)]) -> Node {
        let mut command = Command::new(BIN);
        command
            .env("STACKGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("STACKGATE_CMA_AUTHTOKEN", CMA_SECRET)
            .env("RUST_LOG", "stackgate=debug")
            .arg("run")
            .arg("--config")
            .arg(config)
            .current_dir(config.parent().unwrap());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("stackgate starts");
        let mut stderr = Lines::read(child.stderr.take().unwrap());
        let line = stderr
            .wait_for("the http listening line", |l| {
                listening_addr(l, "http").is_some()
            })
            .await;
        let http = listening_addr(&line, "http").unwrap();
        let line = stderr
            .wait_for("the admin listening line", |l| {
                listening_addr(l, "admin").is_some()
            })
            .await;
        let admin = listening_addr(&line, "admin").unwrap();
        Node {
            child,
            stderr,
            http,
            admin,
        }
    }

    /// Polls `/readyz` until it answers 200.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let reply = send(self.admin, get("admin", "/readyz", &[])).await;
            if reply.status == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "never ready: {}", reply.text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything the node logged so far.
    pub fn log(&mut self) -> String {
        self.stderr.drain().join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An admin API call with the bearer to the admin listener at `addr`.
pub async fn admin_call(addr: SocketAddr, method: &str, path: &str) -> super::Reply {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin")
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    send(addr, request).await
}

impl Node {
    /// An admin API call with the bearer.
    pub async fn admin(&self, method: &str, path: &str) -> super::Reply {
        admin_call(self.admin, method, path).await
    }

    /// `GET /admin/cluster` as JSON.
    pub async fn cluster(&self) -> serde_json::Value {
        let reply = self.admin("GET", "/admin/cluster").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()
    }
}
