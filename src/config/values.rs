//! Single values of the file, checked: durations, base URLs, secrets.

use std::time::Duration;

use http::uri::Uri;

use super::file::DurationStr;
use super::types::{ConfigError, Secret};

/// An `http(s)://host[:port]` URL with no path.
pub fn parse_base_url(key: &str, text: &str) -> Result<Uri, ConfigError> {
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

/// A duration that must not be zero, or `default` when absent.
pub fn positive(
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

/// A secret from the environment variable the file names.
pub fn required_env(
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
