//! A real `redis-server` for a test: on a free loopback port, in a temporary
//! directory, nothing persisted; killed when dropped. `scripts/test.sh`
//! installs Debian's `redis-server` when it is missing.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server`.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `redis-server` binary (PATH, or Debian's location).
pub fn server_binary() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let candidate = PathBuf::from(dir).join("redis-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    let debian = PathBuf::from("/usr/bin/redis-server");
    assert!(
        debian.is_file(),
        "redis-server is not installed: run scripts/test.sh (it installs it) or apt-get install redis-server"
    );
    debian
}

impl Redis {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut redis = Redis {
            child: None,
            port,
            dir,
        };
        redis.restart();
        redis
    }

    /// `redis://127.0.0.1:<port>/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server again on the same port (after [`Redis::kill`]).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let child = Command::new(server_binary())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping() {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server never answered");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A synchronous connection, for the test's own reads and writes.
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap()
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut conn) = client.get_connection_with_timeout(Duration::from_millis(200)) else {
            return false;
        };
        redis::cmd("PING").query::<String>(&mut conn).is_ok()
    }

    /// Every key and every value (strings, hashes, sets, sorted sets) as text.
    pub fn dump(&self) -> Vec<(String, String)> {
        let mut conn = self.connection();
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut conn).unwrap();
        let mut out = Vec::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE").arg(&key).query(&mut conn).unwrap();
            let value = match kind.as_str() {
                "string" => redis::cmd("GET")
                    .arg(&key)
                    .query::<String>(&mut conn)
                    .unwrap(),
                "hash" => {
                    let v: Vec<String> = redis::cmd("HGETALL").arg(&key).query(&mut conn).unwrap();
                    v.join("\n")
                }
                "set" => {
                    let v: Vec<String> = redis::cmd("SMEMBERS").arg(&key).query(&mut conn).unwrap();
                    v.join("\n")
                }
                "zset" => {
                    let v: Vec<String> = redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(0)
                        .arg(-1)
                        .query(&mut conn)
                        .unwrap();
                    v.join("\n")
                }
                other => format!("<{other}>"),
            };
            out.push((key, value));
        }
        out
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
