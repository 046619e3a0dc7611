//! Configuration: the TOML file of SPEC §5, read and validated in two layers.
//!
//! [`file`] mirrors the format with serde (`deny_unknown_fields`); this module
//! converts it into checked types. Every error names the key it is about
//! (`stacks[0].registry.sync_interval: ...`), so `stackgate check` can point
//! an operator at the line to fix. Secrets are read from the environment
//! variables the file names, never from the file, and never printed.

pub mod file;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Scheme, Uri};

use crate::region::Region;
use crate::route::{Cors, Route, RouteKind, Upstream};
use file::{DurationStr, FileConfig};

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
    fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
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
}

/// `[upstream]`.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub ca_file: Option<PathBuf>,
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

impl Config {
    /// Reads and validates a config file, taking secrets from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, &|name| std::env::var(name).ok())
    }

    /// Parses and validates `text`; `env` looks up environment variables.
    /// Relative paths in the file are relative to the working directory.
    pub fn parse(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let file = parse_file(text)?;
        convert(file, env)
    }
}

fn parse_file(text: &str) -> Result<FileConfig, ConfigError> {
    let deserializer = toml::Deserializer::new(text);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let key = err.path().to_string();
        let inner = err.into_inner();
        let line = inner
            .span()
            .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
        let mut message = inner.message().to_owned();
        if let Some(line) = line {
            message.push_str(&format!(" (line {line})"));
        }
        let key = if key == "." || key.is_empty() {
            "config".to_owned()
        } else {
            key
        };
        ConfigError::invalid(key, message)
    })
}

/// Destructures the whole file so that a new key cannot be forgotten here.
fn convert(file: FileConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let FileConfig {
        listen,
        tls,
        admin,
        server,
        upstream,
        routes,
        stacks,
    } = file;

    let listen = convert_listen(listen)?;
    if listen.https.is_some() && tls.is_none() {
        return Err(ConfigError::invalid(
            "tls",
            "listen.https is set, so [tls] with cert and key is required",
        ));
    }
    let tls = tls.map(|file::Tls { cert, key }| TlsFiles { cert, key });
    let admin_token = admin
        .map(|file::Admin { token_env }| required_env("admin.token_env", &token_env, env))
        .transpose()?;

    let file::Server {
        header_timeout,
        idle_timeout,
        max_connections,
        max_body_bytes,
        grace_period,
    } = server;
    let server = ServerSettings {
        header_timeout: positive(
            "server.header_timeout",
            header_timeout,
            DEFAULT_HEADER_TIMEOUT,
        )?,
        idle_timeout: positive("server.idle_timeout", idle_timeout, DEFAULT_IDLE_TIMEOUT)?,
        max_connections: match max_connections {
            Some(0) => {
                return Err(ConfigError::invalid(
                    "server.max_connections",
                    "must be at least 1",
                ))
            }
            other => other.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        },
        max_body_bytes: match max_body_bytes {
            Some(0) => {
                return Err(ConfigError::invalid(
                    "server.max_body_bytes",
                    "must be at least 1",
                ))
            }
            other => other.unwrap_or(DEFAULT_MAX_BODY_BYTES),
        },
        grace_period: grace_period.map_or(DEFAULT_GRACE_PERIOD, |d| d.0),
    };

    let file::Upstream {
        connect_timeout,
        request_timeout,
        ca_file,
    } = upstream;
    let upstream = UpstreamSettings {
        connect_timeout: positive(
            "upstream.connect_timeout",
            connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        )?,
        request_timeout: positive(
            "upstream.request_timeout",
            request_timeout,
            DEFAULT_REQUEST_TIMEOUT,
        )?,
        ca_file,
    };

    if routes.is_empty() {
        return Err(ConfigError::invalid(
            "routes",
            "at least one [[routes]] entry is required",
        ));
    }
    let routes = routes
        .into_iter()
        .enumerate()
        .map(|(index, route)| convert_route(index, route).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    check_route_overlap(&routes)?;

    if stacks.is_empty() {
        return Err(ConfigError::invalid(
            "stacks",
            "at least one [[stacks]] entry is required",
        ));
    }
    let stacks = stacks
        .into_iter()
        .enumerate()
        .map(|(index, stack)| convert_stack(index, stack, env))
        .collect::<Result<Vec<_>, _>>()?;
    for (index, stack) in stacks.iter().enumerate() {
        if let Some(first) = stacks[..index].iter().position(|s| s.name == stack.name) {
            return Err(ConfigError::invalid(
                format!("stacks[{index}].name"),
                format!(
                    "duplicate stack name {:?} (also stacks[{first}])",
                    stack.name
                ),
            ));
        }
        if let Some(first) = stacks[..index]
            .iter()
            .position(|s| s.api_key == stack.api_key)
        {
            return Err(ConfigError::invalid(
                format!("stacks[{index}].api_key"),
                format!("duplicate api_key (also stacks[{first}])"),
            ));
        }
    }

    Ok(Config {
        listen,
        tls,
        admin_token,
        server,
        upstream,
        routes,
        stacks,
    })
}

fn convert_listen(listen: file::Listen) -> Result<Listen, ConfigError> {
    let file::Listen { http, https, admin } = listen;
    let addr = |key: &str, text: Option<String>| -> Result<Option<SocketAddr>, ConfigError> {
        text.map(|text| {
            text.parse().map_err(|_| {
                ConfigError::invalid(
                    key,
                    format!("invalid address {text:?}: expected IP:PORT such as \"0.0.0.0:8080\""),
                )
            })
        })
        .transpose()
    };
    let http = addr("listen.http", http)?;
    let https = addr("listen.https", https)?;
    let admin = addr("listen.admin", admin)?;
    if http.is_none() && https.is_none() {
        return Err(ConfigError::invalid(
            "listen",
            "set listen.http, listen.https, or both",
        ));
    }
    let admin = match admin {
        Some(admin) => admin,
        None => DEFAULT_ADMIN_ADDR
            .parse()
            .map_err(|_| ConfigError::invalid("listen.admin", "invalid default"))?,
    };
    Ok(Listen { http, https, admin })
}

fn convert_route(index: usize, route: file::Route) -> Result<Route, ConfigError> {
    let file::Route {
        kind,
        hosts,
        path_prefix,
        upstream,
        region,
        cors,
    } = route;
    let key = |name: &str| format!("routes[{index}].{name}");
    let kind = match kind {
        file::RouteKindName::Delivery => RouteKind::Delivery,
        file::RouteKindName::Preview => RouteKind::Preview,
        file::RouteKindName::Graphql => RouteKind::Graphql,
        file::RouteKindName::GraphqlPreview => RouteKind::GraphqlPreview,
    };
    if hosts.is_empty() {
        return Err(ConfigError::invalid(
            key("hosts"),
            "at least one host (or \"*\") is required",
        ));
    }
    let hosts = hosts
        .into_iter()
        .map(|host| {
            // A port is ignored, as on requests (SPEC §2).
            let host = crate::route::normalize_host(host.trim()).into_owned();
            if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
                Err(ConfigError::invalid(
                    key("hosts"),
                    format!("invalid host name {host:?}"),
                ))
            } else {
                Ok(host)
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let path_prefix = match path_prefix {
        None => None,
        Some(prefix) if !prefix.starts_with('/') => {
            return Err(ConfigError::invalid(
                key("path_prefix"),
                format!("{prefix:?} must start with '/'"),
            ));
        }
        Some(prefix) => {
            let trimmed = prefix.trim_end_matches('/');
            (!trimmed.is_empty()).then(|| trimmed.to_owned())
        }
    };
    let region = region
        .map(|name| {
            name.parse::<Region>()
                .map_err(|err| ConfigError::invalid(key("region"), err.to_string()))
        })
        .transpose()?
        .unwrap_or_default();
    let upstream_url = upstream.unwrap_or_else(|| region.upstream(kind));
    let upstream = parse_base_url(&key("upstream"), &upstream_url)?;
    let upstream = Upstream {
        scheme: upstream.scheme().cloned().unwrap_or(Scheme::HTTPS),
        authority: upstream
            .authority()
            .cloned()
            .ok_or_else(|| ConfigError::invalid(key("upstream"), "missing host"))?,
    };
    let cors = match cors {
        None => Cors::default(),
        Some(file::Cors {
            allow_origins,
            allow_headers,
            max_age,
        }) => {
            let defaults = Cors::default();
            Cors {
                allow_origins,
                allow_headers: allow_headers.map_or(defaults.allow_headers, |list| list.join(", ")),
                max_age: max_age.map_or(defaults.max_age, |d| d.0),
            }
        }
    };
    Ok(Route {
        index,
        kind,
        hosts,
        path_prefix,
        upstream,
        cors,
    })
}

/// Two routes claiming the same host and prefix would make one unreachable.
fn check_route_overlap(routes: &[Arc<Route>]) -> Result<(), ConfigError> {
    for (index, route) in routes.iter().enumerate() {
        for earlier in &routes[..index] {
            let same_prefix = earlier.path_prefix == route.path_prefix;
            if let Some(host) = route
                .hosts
                .iter()
                .find(|h| same_prefix && earlier.hosts.contains(h))
            {
                return Err(ConfigError::invalid(
                    format!("routes[{index}].hosts"),
                    format!(
                        "host {host:?} with the same path_prefix is already served by routes[{}]",
                        earlier.index
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// An `http(s)://host[:port]` URL with no path.
fn parse_base_url(key: &str, text: &str) -> Result<Uri, ConfigError> {
    let uri: Uri = text
        .parse()
        .map_err(|_| ConfigError::invalid(key, format!("invalid URL {text:?}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(ConfigError::invalid(
                key,
                format!("{text:?} must start with http:// or https://"),
            ))
        }
    }
    if uri.authority().is_none() {
        return Err(ConfigError::invalid(key, format!("{text:?} has no host")));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(ConfigError::invalid(
            key,
            format!("{text:?} must not have a path or query"),
        ));
    }
    Ok(uri)
}

fn convert_stack(
    index: usize,
    stack: file::Stack,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<StackConfig, ConfigError> {
    let file::Stack {
        name,
        api_key,
        registry,
        limits,
    } = stack;
    let key = |name: &str| format!("stacks[{index}].{name}");
    if name.trim().is_empty() {
        return Err(ConfigError::invalid(key("name"), "must not be empty"));
    }
    if api_key.trim().is_empty() {
        return Err(ConfigError::invalid(key("api_key"), "must not be empty"));
    }
    let file::Registry {
        cma_url,
        auth,
        credential_env,
        sync_interval,
        tokens_file,
        snapshot,
        max_removal_ratio,
        max_staleness,
    } = registry;
    let source = match (cma_url, tokens_file) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(ConfigError::invalid(
                key("registry"),
                "set exactly one of cma_url and tokens_file",
            ));
        }
        (Some(url), None) => {
            let url = parse_base_url(&key("registry.cma_url"), &url)?;
            let credential_env = credential_env.ok_or_else(|| {
                ConfigError::invalid(key("registry.credential_env"), "required with cma_url")
            })?;
            let credential = required_env(&key("registry.credential_env"), &credential_env, env)?;
            Source::Cma {
                url,
                auth: match auth {
                    None | Some(file::AuthName::Authtoken) => CmaAuth::Authtoken,
                    Some(file::AuthName::Bearer) => CmaAuth::Bearer,
                },
                credential,
                interval: positive(
                    &key("registry.sync_interval"),
                    sync_interval,
                    DEFAULT_SYNC_INTERVAL,
                )?,
            }
        }
        (None, Some(path)) => Source::File { path },
    };
    let max_removal_ratio = max_removal_ratio.unwrap_or(DEFAULT_MAX_REMOVAL_RATIO);
    if !(0.0..=1.0).contains(&max_removal_ratio) {
        return Err(ConfigError::invalid(
            key("registry.max_removal_ratio"),
            format!("{max_removal_ratio} is not between 0 and 1"),
        ));
    }
    let max_staleness = match max_staleness {
        None => Some(DEFAULT_MAX_STALENESS),
        Some(DurationStr(d)) if d.is_zero() => None,
        Some(DurationStr(d)) => Some(d),
    };
    let limits = match limits {
        None => LimitSettings::default(),
        Some(file::Limits {
            per_token,
            origin,
            failed_auth_per_ip,
            overrides,
        }) => LimitSettings {
            per_token: rate(&key("limits.per_token"), per_token)?,
            origin: rate(&key("limits.origin"), origin)?,
            failed_auth_per_ip: rate(&key("limits.failed_auth_per_ip"), failed_auth_per_ip)?,
            overrides: overrides
                .into_iter()
                .enumerate()
                .map(
                    |(
                        i,
                        file::Override {
                            token,
                            rate: r,
                            burst,
                        },
                    )| {
                        let key = key(&format!("limits.overrides[{i}]"));
                        if token.trim().is_empty() {
                            return Err(ConfigError::invalid(
                                format!("{key}.token"),
                                "must not be empty",
                            ));
                        }
                        let limit = rate(&key, Some(file::Rate { rate: r, burst }))?;
                        Ok((token, limit.unwrap_or(RateLimit { rate: r, burst })))
                    },
                )
                .collect::<Result<_, _>>()?,
        },
    };
    Ok(StackConfig {
        name,
        api_key,
        registry: RegistrySettings {
            source,
            snapshot,
            max_removal_ratio,
            max_staleness,
        },
        limits,
    })
}

fn rate(key: &str, rate: Option<file::Rate>) -> Result<Option<RateLimit>, ConfigError> {
    let Some(file::Rate { rate, burst }) = rate else {
        return Ok(None);
    };
    if rate == 0 {
        return Err(ConfigError::invalid(
            format!("{key}.rate"),
            "must be at least 1",
        ));
    }
    if burst == 0 {
        return Err(ConfigError::invalid(
            format!("{key}.burst"),
            "must be at least 1",
        ));
    }
    Ok(Some(RateLimit { rate, burst }))
}

fn positive(
    key: &str,
    value: Option<DurationStr>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(DurationStr(d)) if d.is_zero() => {
            Err(ConfigError::invalid(key, "must be greater than 0"))
        }
        Some(DurationStr(d)) => Ok(d),
    }
}

fn required_env(
    key: &str,
    name: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, ConfigError> {
    if name.trim().is_empty() {
        return Err(ConfigError::invalid(
            key,
            "must name an environment variable",
        ));
    }
    match env(name) {
        Some(value) if !value.is_empty() => Ok(Secret::new(value)),
        Some(_) => Err(ConfigError::invalid(
            key,
            format!("environment variable {name} is empty"),
        )),
        None => Err(ConfigError::invalid(
            key,
            format!("environment variable {name} is not set"),
        )),
    }
}

#[cfg(test)]
mod tests;
