//! `stackgate demo --cluster N` (SPEC §10): N replicas of the demo gateway
//! in one process, sharing one local `redis-server` (found on `PATH`) on
//! consecutive ports from the demo's, and the commands that show a
//! revocation sent to one replica ending a live session on another.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::{free_or_any, spawn_origin, DemoError, DEMO_CONFIG, DEMO_TOKENS};
use crate::config::Config;
use crate::Gateway;

/// The demo cluster's key prefix in Redis.
pub const KEY_PREFIX: &str = "stackgate-demo";
/// The demo cluster's lease: short, so that failover shows quickly.
pub const LEASE: &str = "2s";

/// What to do when `redis-server` is not on `PATH`.
pub const INSTALL_REDIS: &str = "redis-server was not found on PATH; install it \
(Debian/Ubuntu: apt-get install redis-server; Fedora: dnf install redis; \
macOS: brew install redis), or Valkey's valkey-server renamed or linked as redis-server";

/// A running cluster demo.
pub struct ClusterDemo {
    pub replicas: Vec<Gateway>,
    pub origin: SocketAddr,
    pub redis_url: String,
    pub admin_token: String,
    pub dir: PathBuf,
    redis: Child,
    origin_stop: CancellationToken,
}

/// `redis-server` on `PATH`, if there is one.
pub fn find_redis_server() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("redis-server"))
        .find(|candidate| candidate.is_file())
}

fn shifted(addr: SocketAddr, by: usize) -> SocketAddr {
    if addr.port() == 0 {
        return addr;
    }
    let port = usize::from(addr.port()).saturating_add(by);
    SocketAddr::new(addr.ip(), u16::try_from(port).unwrap_or(0))
}

async fn start_redis(binary: &Path, dir: &Path) -> Result<(Child, String), DemoError> {
    let port = free_or_any(
        "127.0.0.1:6379"
            .parse()
            .map_err(|_| DemoError::Redis("bad address".into()))?,
    );
    let port = if port.port() == 0 {
        std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port()
    } else {
        port.port()
    };
    let child = Command::new(binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let url = format!("redis://127.0.0.1:{port}/");
    let client = redis::Client::open(url.as_str()).map_err(|e| DemoError::Redis(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ping = async {
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .ok()
        };
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(500), ping).await {
            return Ok((child, url));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(DemoError::Redis(format!(
                "redis-server on port {port} did not answer"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts the origin, a `redis-server` and `replicas` gateways on
/// `http`, `http + 1`, ... and `admin`, `admin + 1`, ... (a free port where
/// one is taken).
pub async fn start(
    replicas: usize,
    http: SocketAddr,
    admin: SocketAddr,
) -> Result<ClusterDemo, DemoError> {
    let binary = find_redis_server().ok_or_else(|| DemoError::Redis(INSTALL_REDIS.to_owned()))?;
    let dir = std::env::temp_dir().join(format!("stackgate-demo-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let tokens_file = dir.join("tokens.json");
    std::fs::write(&tokens_file, DEMO_TOKENS)?;
    let (redis, redis_url) = start_redis(&binary, &dir).await?;

    let origin_stop = CancellationToken::new();
    let origin = spawn_origin(origin_stop.clone()).await?;
    let admin_token = format!("{:032x}", rand::random::<u128>());
    let mut gateways = Vec::with_capacity(replicas);
    for i in 0..replicas {
        let node = i + 1;
        let mut text = DEMO_CONFIG
            .replace("{http}", &free_or_any(shifted(http, i)).to_string())
            .replace("{admin}", &free_or_any(shifted(admin, i)).to_string())
            .replace("{origin}", &format!("http://{origin}"))
            .replace("{tokens_file}", &tokens_file.display().to_string())
            .replace(
                "{snapshot}",
                &dir.join(format!("snapshot-{node}.json"))
                    .display()
                    .to_string(),
            );
        text.push_str(&format!(
            "\n[cluster]\nredis_url_env = \"STACKGATE_DEMO_REDIS_URL\"\nnode_id = \"demo-{node}\"\nkey_prefix = \"{KEY_PREFIX}\"\nlease = \"{LEASE}\"\n"
        ));
        let (token, url) = (admin_token.clone(), redis_url.clone());
        let config = Config::parse(&text, &move |name| match name {
            "STACKGATE_DEMO_ADMIN_TOKEN" => Some(token.clone()),
            "STACKGATE_DEMO_REDIS_URL" => Some(url.clone()),
            _ => None,
        })?;
        gateways.push(Gateway::start(config).await?);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let loaded = |g: &Gateway| g.shared.stacks.iter().all(|s| s.view().is_some());
    while !gateways.iter().all(loaded) {
        if tokio::time::Instant::now() > deadline {
            return Err(DemoError::Registry(
                "a replica's registry did not load".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(ClusterDemo {
        replicas: gateways,
        origin,
        redis_url,
        admin_token,
        dir,
        redis,
        origin_stop,
    })
}

impl ClusterDemo {
    /// The walkthrough printed at start.
    pub fn instructions(&self) -> String {
        let url = |a: Option<SocketAddr>| a.map_or_else(String::new, |a| format!("http://{a}"));
        let gw: Vec<String> = self.replicas.iter().map(|g| url(g.http_addr)).collect();
        let admin: Vec<String> = self
            .replicas
            .iter()
            .map(|g| format!("http://{}", g.admin_addr))
            .collect();
        let first =
            |list: &[String], i: usize| list.get(i).or(list.first()).cloned().unwrap_or_default();
        let bearer = &self.admin_token;
        let site = "-H 'api_key: blt_demo_stack'";
        let token = "-H 'access_token: cs_demo_website_delivery'";
        let mut replicas = String::new();
        for (i, (g, a)) in gw.iter().zip(&admin).enumerate() {
            replicas.push_str(&format!(
                "  replica demo-{}  gateway {g}  admin {a}\n",
                i + 1
            ));
        }
        let n = self.replicas.len();
        let (gw2, gw3) = (first(&gw, 1), first(&gw, 2));
        let (admin1, admin3) = (first(&admin, 0), first(&admin, 2));
        format!(
            r#"stackgate demo --cluster {n} is running (Ctrl-C to stop): {n} replicas sharing one redis-server.
{replicas}  redis    {redis}   (keys under "{KEY_PREFIX}:")
  bearer   {bearer}   (every replica's admin API)
  origin   http://{origin}   (a small stand-in for the CDA)
  tokens   {tokens}   (each replica reads it; edit it and every replica reloads)

Watch a revocation sent to one replica end a live session on another.
Start a slow stream on replica demo-2 in one terminal...
  curl -N {site} {token} '{gw2}/v3/stream'
...then revoke the token on replica demo-1 in another; the stream on demo-2 stops at once:
  curl -X POST -H 'Authorization: Bearer {bearer}' '{admin1}/admin/tokens/blt_demo_website/revoke'
Every replica now answers 401 token_revoked:
  curl -i {site} {token} '{gw3}/v3/entries'
Lift it on any replica (here demo-3); every replica serves the token again:
  curl -X DELETE -H 'Authorization: Bearer {bearer}' '{admin3}/admin/tokens/blt_demo_website/revoke'

The cluster as a replica sees it (node id, redis up or down, versions, nodes):
  curl -s -H 'Authorization: Bearer {bearer}' '{admin1}/admin/cluster'
  curl -s '{admin1}/metrics' | grep '^stackgate_cluster_'
"#,
            redis = self.redis_url,
            origin = self.origin,
            tokens = self.dir.join("tokens.json").display(),
        )
    }

    /// Runs until a signal, then stops the replicas, the origin and Redis,
    /// and removes the demo files.
    pub async fn run_until_signal(self) {
        let ClusterDemo {
            replicas,
            dir,
            mut redis,
            origin_stop,
            ..
        } = self;
        let mut replicas = replicas.into_iter();
        if let Some(first) = replicas.next() {
            first.run_until_signal().await;
        }
        for replica in replicas {
            replica.shutdown(Duration::from_secs(1)).await;
        }
        origin_stop.cancel();
        let _ = redis.kill().await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
