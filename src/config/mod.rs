//! Configuration: the TOML file of SPEC §5, read and validated in two layers.
//!
//! [`file`] mirrors the format with serde (`deny_unknown_fields`); this module
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
