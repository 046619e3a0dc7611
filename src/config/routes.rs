//! `[[routes]]`: kind, hosts, prefix, upstream and CORS, checked.

use http::uri::Scheme;
use std::sync::Arc;

use crate::region::Region;
use crate::route::{Cors, Route, RouteKind, Upstream};

use super::file;
use super::types::ConfigError;
use super::values::parse_base_url;

/// One `[[routes]]` entry, checked.
pub fn convert_route(index: usize, route: file::Route) -> Result<Route, ConfigError> {
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
/// Two routes may not claim the same host and prefix.
pub fn check_route_overlap(routes: &[Arc<Route>]) -> Result<(), ConfigError> {
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
