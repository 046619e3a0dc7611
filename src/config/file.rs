//! The file format: serde structs that mirror SPEC §5 key for key.
//!
//! Nothing here is validated beyond what serde checks (types, unknown keys);
//! [`super::Config::parse`] turns these into the validated types. Keeping the
//! two apart lets the format stay a faithful copy of the contract while the
//! rest of the crate only ever sees checked values.

use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// The whole TOML file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Listen,
    pub tls: Option<Tls>,
    pub admin: Option<Admin>,
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub upstream: Upstream,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub stacks: Vec<Stack>,
    /// SPEC §10; absent = standalone.
    pub cluster: Option<Cluster>,
}

/// `[cluster]` (SPEC §10).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub redis_url_env: String,
    pub node_id: Option<String>,
    pub key_prefix: Option<String>,
    pub lease: Option<DurationStr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub http: Option<String>,
    pub https: Option<String>,
    pub admin: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub token_env: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub header_timeout: Option<DurationStr>,
    pub idle_timeout: Option<DurationStr>,
    pub max_connections: Option<usize>,
    pub max_body_bytes: Option<u64>,
    pub grace_period: Option<DurationStr>,
    pub send_timeout: Option<DurationStr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub connect_timeout: Option<DurationStr>,
    pub request_timeout: Option<DurationStr>,
    pub max_connections: Option<usize>,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub kind: RouteKindName,
    pub hosts: Vec<String>,
    pub path_prefix: Option<String>,
    pub upstream: Option<String>,
    pub region: Option<String>,
    pub cors: Option<Cors>,
}

/// The route kinds as spelled in the file.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteKindName {
    Delivery,
    Preview,
    Graphql,
    GraphqlPreview,
}

/// Optional per-route CORS settings (an addition to SPEC §5, see README).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cors {
    pub allow_origins: Option<Vec<String>>,
    pub allow_headers: Option<Vec<String>>,
    pub max_age: Option<DurationStr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stack {
    pub name: String,
    pub api_key: String,
    pub registry: Registry,
    pub limits: Option<Limits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    pub cma_url: Option<String>,
    pub auth: Option<AuthName>,
    pub credential_env: Option<String>,
    pub sync_interval: Option<DurationStr>,
    pub tokens_file: Option<PathBuf>,
    pub snapshot: Option<PathBuf>,
    pub max_removal_ratio: Option<f64>,
    pub max_staleness: Option<DurationStr>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthName {
    Authtoken,
    Bearer,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub per_token: Option<Rate>,
    pub origin: Option<Rate>,
    pub failed_auth_per_ip: Option<Rate>,
    #[serde(default)]
    pub overrides: Vec<Override>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub rate: u32,
    pub burst: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    pub token: String,
    pub rate: u32,
    pub burst: u32,
}

/// A duration written as a string: `"500ms"`, `"10s"`, `"6h"`, or `"0"`.
#[derive(Debug, Clone, Copy)]
pub struct DurationStr(pub Duration);

impl<'de> Deserialize<'de> for DurationStr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)
            .map_err(|_| de::Error::custom("invalid duration: expected a string like \"10s\""))?;
        parse_duration(&text)
            .map(DurationStr)
            .map_err(de::Error::custom)
    }
}

/// The longest duration any key may hold: ten years. Far beyond any sane
/// timeout or staleness, and small enough that no `Instant + Duration` the
/// gateway computes from it can overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Parses `"500ms"`, `"10s"`, `"1m30s"`, `"6h"`; `"0"` is zero. At most
/// [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let duration = humantime::parse_duration(text).map_err(|_| {
        format!("invalid duration {text:?}: expected a string like \"500ms\", \"10s\" or \"6h\"")
    })?;
    if duration > MAX_DURATION {
        return Err(format!(
            "duration {text:?} is longer than the limit of 10 years"
        ));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_the_spec_forms() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("6h"), Ok(Duration::from_secs(6 * 3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("ten seconds").is_err());
        assert!(parse_duration("10").is_err());
    }
}
