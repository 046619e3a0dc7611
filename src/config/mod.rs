//! Configuration: the TOML file of SPEC §5, read and validated in two layers.
//!
//! [`mod@file`] mirrors the format with serde (`deny_unknown_fields`); this module
//! converts it into checked types. Every error names the key it is about
//! (`stacks[0].registry.sync_interval: ...`), so `stackgate check` can point
//! an operator at the line to fix. Secrets are read from the environment
//! variables the file names, never from the file, and never printed.

pub mod file;
mod routes;
mod stacks;
mod types;
mod values;

pub use types::*;

use routes::{check_route_overlap, convert_route};
use stacks::convert_stack;
use values::{positive, required_env};

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use file::FileConfig;

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
        cluster,
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
        send_timeout,
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
        send_timeout: positive("server.send_timeout", send_timeout, DEFAULT_SEND_TIMEOUT)?,
    };

    let file::Upstream {
        connect_timeout,
        request_timeout,
        max_connections: upstream_max_connections,
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
        max_connections: match upstream_max_connections {
            Some(0) => {
                return Err(ConfigError::invalid(
                    "upstream.max_connections",
                    "must be at least 1",
                ))
            }
            other => other.unwrap_or(DEFAULT_UPSTREAM_MAX_CONNECTIONS),
        },
        ca_file,
    };

    let routes = convert_all("routes", routes, |(index, route)| {
        convert_route(index, route).map(Arc::new)
    })?;
    check_route_overlap(&routes)?;

    let stacks = convert_all("stacks", stacks, |(index, stack)| {
        convert_stack(index, stack, env)
    })?;
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

    let cluster = cluster.map(|c| convert_cluster(c, env)).transpose()?;

    Ok(Config {
        listen,
        tls,
        admin_token,
        server,
        upstream,
        routes,
        stacks,
        cluster,
    })
}

fn convert_cluster(
    cluster: file::Cluster,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ClusterSettings, ConfigError> {
    let file::Cluster {
        redis_url_env,
        node_id,
        key_prefix,
        lease,
    } = cluster;
    let redis_url = required_env("cluster.redis_url_env", &redis_url_env, env)?;
    let scheme_ok = ["redis://", "rediss://"]
        .iter()
        .any(|s| redis_url.expose().starts_with(s));
    // The URL may carry a password: the error names the variable, not the value.
    if !scheme_ok || redis::IntoConnectionInfo::into_connection_info(redis_url.expose()).is_err() {
        return Err(ConfigError::invalid(
            "cluster.redis_url_env",
            format!("environment variable {redis_url_env} must hold a redis:// or rediss:// URL"),
        ));
    }
    let valid_id = |text: &str| {
        !text.is_empty()
            && text.len() <= 128
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:@".contains(&b))
    };
    let node_id = match node_id {
        Some(id) if valid_id(&id) => id,
        Some(_) => {
            return Err(ConfigError::invalid(
                "cluster.node_id",
                "must be 1 to 128 characters of letters, digits and - _ . : @",
            ))
        }
        None => default_node_id(),
    };
    let key_prefix = match key_prefix {
        Some(p) if p.is_empty() || p.chars().any(|c| c.is_whitespace() || c.is_control()) => {
            return Err(ConfigError::invalid(
                "cluster.key_prefix",
                "must be non-empty, without spaces or control characters",
            ))
        }
        Some(p) => p,
        None => DEFAULT_KEY_PREFIX.to_owned(),
    };
    let lease = positive("cluster.lease", lease, DEFAULT_LEASE)?;
    if lease < std::time::Duration::from_millis(500) {
        return Err(ConfigError::invalid(
            "cluster.lease",
            "must be at least 500ms",
        ));
    }
    Ok(ClusterSettings {
        redis_url,
        node_id,
        key_prefix,
        lease,
    })
}

/// `<hostname>-<pid>`: unique per process on a host, readable in `/admin/cluster`.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "stackgate".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Converts every entry of a `[[key]]` array, which must have one at least.
fn convert_all<T, U>(
    key: &str,
    entries: Vec<T>,
    convert: impl FnMut((usize, T)) -> Result<U, ConfigError>,
) -> Result<Vec<U>, ConfigError> {
    if entries.is_empty() {
        return Err(ConfigError::invalid(
            key,
            format!("at least one [[{key}]] entry is required"),
        ));
    }
    entries.into_iter().enumerate().map(convert).collect()
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

#[cfg(test)]
mod tests;
