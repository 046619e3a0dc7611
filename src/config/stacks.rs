//! `[[stacks]]`: the stack, its registry source and its limits, checked.

use super::file::{self, DurationStr};
use super::types::*;
use super::values::{parse_base_url, positive, required_env};

/// One `[[stacks]]` entry, checked.
pub fn convert_stack(
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
