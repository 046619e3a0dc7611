//! The validated configuration: what the rest of the gateway reads, with
//! the defaults of SPEC §5 as named constants.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Uri;

use crate::route::Route;

/// Where the admin listener binds unless the file says otherwise.
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:9090";
/// `server.header_timeout` default.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// `server.idle_timeout` default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// `server.max_connections` default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// `server.max_body_bytes` default.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1_048_576;
/// `server.grace_period` default.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
/// `server.send_timeout` default (nginx's `send_timeout` is 60 s too).
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// `upstream.max_connections` default.
pub const DEFAULT_UPSTREAM_MAX_CONNECTIONS: usize = 1024;
/// `upstream.connect_timeout` default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// `upstream.request_timeout` default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// `stacks.registry.sync_interval` default.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(10);
/// `stacks.registry.max_removal_ratio` default.
pub const DEFAULT_MAX_REMOVAL_RATIO: f64 = 0.5;
/// `stacks.registry.max_staleness` default.
pub const DEFAULT_MAX_STALENESS: Duration = Duration::from_secs(6 * 3600);

/// A configuration problem, naming the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A key is missing, unknown, of the wrong type, or holds a bad value.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The key the error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::Read { .. } => None,
        }
    }
}

/// A secret read from the environment. Its `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<Arc<str>>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that has to send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub tls: Option<TlsFiles>,
    /// Bearer for `/admin/*`; without one, `/admin/*` always answers 401.
    pub admin_token: Option<Secret>,
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub routes: Vec<Arc<Route>>,
    pub stacks: Vec<StackConfig>,
    /// `[cluster]`; `None` = standalone (SPEC §10).
    pub cluster: Option<ClusterSettings>,
}

/// The default `cluster.key_prefix`.
pub const DEFAULT_KEY_PREFIX: &str = "stackgate";
/// The default `cluster.lease`.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);

/// `[cluster]`, checked (SPEC §10).
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// The `redis://` or `rediss://` URL; it may hold a password, so it is a secret.
    pub redis_url: Secret,
    /// This node's id in the cluster.
    pub node_id: String,
    /// Every key lives under `<key_prefix>:`.
    pub key_prefix: String,
    /// How long a stack's poller lease lasts.
    pub lease: Duration,
}

/// Listener addresses.
#[derive(Debug, Clone)]
pub struct Listen {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: SocketAddr,
}

/// Certificate chain and key for the TLS listener.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_body_bytes: u64,
    pub grace_period: Duration,
    /// A response write that makes no progress this long ends the
    /// connection (HTTP/2: the stream).
    pub send_timeout: Duration,
}

/// `[upstream]`.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// Requests in flight (so connections in use) per upstream; past it a
    /// request waits up to `connect_timeout`, then gets 503 `upstream_busy`.
    pub max_connections: usize,
    pub ca_file: Option<PathBuf>,
}

impl Config {
    /// What is valid but probably not meant: printed by `stackgate check`.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.admin_token.is_some() {
            for (index, stack) in self.stacks.iter().enumerate() {
                if stack.registry.snapshot.is_none() {
                    warnings.push(format!(
                        "stacks[{index}].registry.snapshot: not set, so admin revocations of stack {:?} live only in memory (lost on restart; answered \"persisted\": false)",
                        stack.name
                    ));
                }
            }
        }
        warnings
    }
}

/// One `[[stacks]]` entry.
#[derive(Debug, Clone)]
pub struct StackConfig {
    pub name: String,
    pub api_key: String,
    pub registry: RegistrySettings,
    pub limits: LimitSettings,
}

/// Where a stack's tokens come from and how they are kept.
#[derive(Debug, Clone)]
pub struct RegistrySettings {
    pub source: Source,
    pub snapshot: Option<PathBuf>,
    pub max_removal_ratio: f64,
    /// `None` when `max_staleness = "0"`: never stale.
    pub max_staleness: Option<Duration>,
}

/// How the CMA is asked for tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmaAuth {
    /// A user session token in the `authtoken` header.
    Authtoken,
    /// An OAuth token in `authorization: Bearer`.
    Bearer,
}

/// The source of a stack's token list.
#[derive(Debug, Clone)]
pub enum Source {
    /// `GET {url}/v3/stacks/delivery_tokens` every `interval`.
    Cma {
        url: Uri,
        auth: CmaAuth,
        credential: Secret,
        interval: Duration,
    },
    /// A file in the CMA list shape, reloaded when it changes.
    File { path: PathBuf },
}

/// A token bucket: `rate` per second, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub rate: u32,
    pub burst: u32,
}

/// `[stacks.limits]`.
#[derive(Debug, Clone, Default)]
pub struct LimitSettings {
    pub per_token: Option<RateLimit>,
    pub origin: Option<RateLimit>,
    pub failed_auth_per_ip: Option<RateLimit>,
    /// `(uid or name, limit)` pairs that replace `per_token`.
    pub overrides: Vec<(String, RateLimit)>,
}
