use std::time::Duration;

use super::*;

const FULL: &str = r#"
[listen]
http  = "0.0.0.0:8080"
https = "0.0.0.0:8443"
admin = "127.0.0.1:9090"

[tls]
cert = "certs/gateway.pem"
key  = "certs/gateway.key"

[admin]
token_env = "STACKGATE_ADMIN_TOKEN"

[server]
header_timeout = "10s"
idle_timeout = "60s"
max_connections = 10000
max_body_bytes = 1048576
grace_period = "30s"
send_timeout = "60s"

[upstream]
connect_timeout = "2s"
request_timeout = "30s"
max_connections = 1024
ca_file = "certs/private-ca.pem"

[[routes]]
kind = "delivery"
hosts = ["cdn.example.com", "*"]
path_prefix = "/cda"
upstream = "https://cdn.contentstack.io"
region = "na"

[[routes]]
kind = "preview"
hosts = ["preview.example.com"]
region = "eu"

[[stacks]]
name = "website"
api_key = "blt0123456789abcdef"

[stacks.registry]
cma_url = "https://api.contentstack.io"
auth = "authtoken"
credential_env = "STACKGATE_CMA_AUTHTOKEN"
sync_interval = "10s"
snapshot = "/var/lib/stackgate/website.json"
max_removal_ratio = 0.5
max_staleness = "6h"

[stacks.limits]
per_token = { rate = 200, burst = 400 }
origin = { rate = 80, burst = 160 }
failed_auth_per_ip = { rate = 5, burst = 20 }

[[stacks.limits.overrides]]
token = "blt_heavy"
rate = 1000
burst = 2000
"#;

fn env_with_secrets(name: &str) -> Option<String> {
    match name {
        "STACKGATE_ADMIN_TOKEN" => Some("admin-secret".into()),
        "STACKGATE_CMA_AUTHTOKEN" => Some("cma-secret".into()),
        _ => None,
    }
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, &env_with_secrets)
}

fn error_key(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("expected an error"),
        Err(err) => err.key().unwrap_or("<none>").to_owned(),
    }
}

#[test]
fn the_spec_example_parses_with_every_key() {
    let config = parse(FULL).unwrap();
    assert_eq!(config.listen.http, Some("0.0.0.0:8080".parse().unwrap()));
    assert_eq!(config.server.max_body_bytes, 1_048_576);
    assert_eq!(config.upstream.request_timeout, Duration::from_secs(30));
    assert_eq!(config.server.send_timeout, Duration::from_secs(60));
    assert_eq!(config.upstream.max_connections, 1024);
    assert_eq!(config.routes[0].path_prefix.as_deref(), Some("/cda"));
    assert_eq!(
        config.routes[1].upstream.authority.as_str(),
        "eu-rest-preview.contentstack.com"
    );
    let stack = &config.stacks[0];
    match &stack.registry.source {
        Source::Cma {
            auth,
            credential,
            interval,
            ..
        } => {
            assert_eq!(*auth, CmaAuth::Authtoken);
            assert_eq!(credential.expose(), "cma-secret");
            assert_eq!(*interval, Duration::from_secs(10));
        }
        Source::File { .. } => panic!("expected the CMA source"),
    }
    assert_eq!(
        stack.registry.max_staleness,
        Some(Duration::from_secs(6 * 3600))
    );
    assert_eq!(
        stack.limits.per_token,
        Some(RateLimit {
            rate: 200,
            burst: 400
        })
    );
    assert_eq!(stack.limits.overrides[0].0, "blt_heavy");
    assert_eq!(
        config.admin_token.as_ref().map(Secret::expose),
        Some("admin-secret")
    );
}

#[test]
fn secrets_never_show_in_debug_output() {
    let config = parse(FULL).unwrap();
    let dump = format!("{config:?}");
    assert!(!dump.contains("admin-secret"));
    assert!(!dump.contains("cma-secret"));
}

#[test]
fn bad_duration_names_its_full_key() {
    let text = FULL.replace("sync_interval = \"10s\"", "sync_interval = \"often\"");
    assert_eq!(error_key(&text), "stacks[0].registry.sync_interval");
}

#[test]
fn unknown_keys_are_named() {
    let text = FULL.replace(
        "idle_timeout = \"60s\"",
        "idle_timeout = \"60s\"\nidle_timout = \"1s\"",
    );
    let err = parse(&text).unwrap_err();
    assert!(err.to_string().contains("idle_timout"), "{err}");
    assert!(err.key().unwrap().starts_with("server"), "{err}");
}

#[test]
fn missing_env_vars_are_named_by_the_key_that_names_them() {
    let err = Config::parse(FULL, &|_| None).unwrap_err();
    assert_eq!(err.key(), Some("admin.token_env"));
    assert!(err.to_string().contains("STACKGATE_ADMIN_TOKEN"));
    let only_admin = |name: &str| (name == "STACKGATE_ADMIN_TOKEN").then(|| "x".to_owned());
    let err = Config::parse(FULL, &only_admin).unwrap_err();
    assert_eq!(err.key(), Some("stacks[0].registry.credential_env"));
}

#[test]
fn exactly_one_registry_source() {
    let both = FULL.replace("snapshot =", "tokens_file = \"t.json\"\nsnapshot =");
    assert_eq!(error_key(&both), "stacks[0].registry");
    let neither = FULL.replace("cma_url = \"https://api.contentstack.io\"", "");
    assert_eq!(error_key(&neither), "stacks[0].registry");
}

#[test]
fn bad_values_name_their_key() {
    let cases = [
        ("region = \"na\"", "region = \"mars\"", "routes[0].region"),
        ("kind = \"delivery\"", "kind = \"cdn\"", "routes[0].kind"),
        (
            "path_prefix = \"/cda\"",
            "path_prefix = \"cda\"",
            "routes[0].path_prefix",
        ),
        (
            "upstream = \"https://cdn.contentstack.io\"",
            "upstream = \"ftp://x\"",
            "routes[0].upstream",
        ),
        (
            "max_removal_ratio = 0.5",
            "max_removal_ratio = 1.5",
            "stacks[0].registry.max_removal_ratio",
        ),
        (
            "http  = \"0.0.0.0:8080\"",
            "http  = \"localhost\"",
            "listen.http",
        ),
        (
            "per_token = { rate = 200",
            "per_token = { rate = 0",
            "stacks[0].limits.per_token.rate",
        ),
        (
            "max_connections = 10000",
            "max_connections = 0",
            "server.max_connections",
        ),
        (
            "max_connections = 10000",
            "max_connections = \"many\"",
            "server.max_connections",
        ),
        (
            "max_connections = 1024",
            "max_connections = 0",
            "upstream.max_connections",
        ),
        (
            "send_timeout = \"60s\"",
            "send_timeout = \"0\"",
            "server.send_timeout",
        ),
        // No duration may be long enough for `Instant + Duration` to overflow.
        (
            "max_staleness = \"6h\"",
            "max_staleness = \"100000000years\"",
            "stacks[0].registry.max_staleness",
        ),
        (
            "idle_timeout = \"60s\"",
            "idle_timeout = \"11years\"",
            "server.idle_timeout",
        ),
        (
            "request_timeout = \"30s\"",
            "request_timeout = \"584542046090years\"",
            "upstream.request_timeout",
        ),
    ];
    for (from, to, key) in cases {
        assert!(FULL.contains(from), "fixture lacks {from}");
        assert_eq!(error_key(&FULL.replace(from, to)), key, "{from} -> {to}");
    }
}

#[test]
fn https_needs_tls() {
    let text = FULL.replace(
        "[tls]\ncert = \"certs/gateway.pem\"\nkey  = \"certs/gateway.key\"\n",
        "",
    );
    assert_eq!(error_key(&text), "tls");
}

#[test]
fn zero_staleness_means_never_stale_and_defaults_apply() {
    let text = r#"
[listen]
http = "127.0.0.1:0"
[[routes]]
kind = "graphql"
hosts = ["*"]
[[stacks]]
name = "s"
api_key = "k"
[stacks.registry]
tokens_file = "tokens.json"
max_staleness = "0"
"#;
    let config = parse(text).unwrap();
    assert_eq!(config.stacks[0].registry.max_staleness, None);
    assert_eq!(config.listen.admin, DEFAULT_ADMIN_ADDR.parse().unwrap());
    assert_eq!(config.server.header_timeout, DEFAULT_HEADER_TIMEOUT);
    assert_eq!(
        config.routes[0].upstream.authority.as_str(),
        "graphql.contentstack.com"
    );
    assert!(config.admin_token.is_none());
    assert_eq!(config.server.send_timeout, DEFAULT_SEND_TIMEOUT);
    assert_eq!(
        config.upstream.max_connections,
        DEFAULT_UPSTREAM_MAX_CONNECTIONS
    );
    assert!(
        config.warnings().is_empty(),
        "no [admin], nothing to persist"
    );
}

#[test]
fn an_admin_api_without_a_snapshot_is_warned_about() {
    assert!(parse(FULL).unwrap().warnings().is_empty());
    let text = FULL.replace("snapshot = \"/var/lib/stackgate/website.json\"\n", "");
    let warnings = parse(&text).unwrap().warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("stacks[0].registry.snapshot"),
        "{warnings:?}"
    );
}

#[test]
fn duplicate_stacks_and_routes_are_refused() {
    let dup = format!("{FULL}\n[[stacks]]\nname = \"website\"\napi_key = \"other\"\n[stacks.registry]\ntokens_file = \"t.json\"\n");
    assert_eq!(error_key(&dup), "stacks[1].name");
    let dup_route =
        format!("{FULL}\n[[routes]]\nkind = \"graphql\"\nhosts = [\"preview.example.com\"]\n");
    assert_eq!(error_key(&dup_route), "routes[2].hosts");
}

#[test]
fn route_hosts_are_matched_without_port_or_case() {
    let text = FULL.replace("\"cdn.example.com\"", "\"CDN.Example.com:8443\"");
    assert_ne!(text, FULL);
    let config = parse(&text).unwrap();
    assert_eq!(config.routes[0].hosts[0], "cdn.example.com");
    // The same host under another port is the same host: a duplicate.
    let dup =
        format!("{FULL}\n[[routes]]\nkind = \"graphql\"\nhosts = [\"preview.example.com:80\"]\n");
    assert_eq!(error_key(&dup), "routes[2].hosts");
}

const CLUSTER: &str = r#"
[cluster]
redis_url_env = "STACKGATE_REDIS_URL"
node_id = "gw-1"
key_prefix = "edge"
lease = "3s"
"#;

fn env_with_redis(name: &str) -> Option<String> {
    match name {
        "STACKGATE_REDIS_URL" => Some("rediss://:redis-password@redis.internal:6380/0".into()),
        other => env_with_secrets(other),
    }
}

#[test]
fn without_cluster_a_config_is_standalone() {
    assert!(parse(FULL).unwrap().cluster.is_none());
}

#[test]
fn the_cluster_section_parses_and_hides_the_url() {
    let text = format!("{FULL}{CLUSTER}");
    let config = Config::parse(&text, &env_with_redis).unwrap();
    let cluster = config.cluster.as_ref().unwrap();
    assert_eq!(cluster.node_id, "gw-1");
    assert_eq!(cluster.key_prefix, "edge");
    assert_eq!(cluster.lease, Duration::from_secs(3));
    assert!(cluster.redis_url.expose().starts_with("rediss://"));
    assert!(!format!("{config:?}").contains("redis-password"));

    let defaults = format!("{FULL}\n[cluster]\nredis_url_env = \"STACKGATE_REDIS_URL\"\n");
    let cluster = Config::parse(&defaults, &env_with_redis)
        .unwrap()
        .cluster
        .unwrap();
    assert_eq!(cluster.key_prefix, DEFAULT_KEY_PREFIX);
    assert_eq!(cluster.lease, DEFAULT_LEASE);
    assert!(cluster
        .node_id
        .ends_with(&format!("-{}", std::process::id())));
}

#[test]
fn bad_cluster_values_name_their_key() {
    let key = |text: &str, env: &dyn Fn(&str) -> Option<String>| match Config::parse(
        &format!("{FULL}{text}"),
        env,
    ) {
        Ok(_) => panic!("expected an error for {text}"),
        Err(err) => err.key().unwrap_or("<none>").to_owned(),
    };
    // The variable is not set.
    assert_eq!(key(CLUSTER, &env_with_secrets), "cluster.redis_url_env");
    // Not a Redis URL; the message names the variable, never the value.
    let http = |name: &str| match name {
        "STACKGATE_REDIS_URL" => Some("http://user:pw-77@host/".into()),
        other => env_with_secrets(other),
    };
    assert_eq!(key(CLUSTER, &http), "cluster.redis_url_env");
    let err = Config::parse(&format!("{FULL}{CLUSTER}"), &http).unwrap_err();
    assert!(!err.to_string().contains("pw-77"), "{err}");
    for (from, to, named) in [
        ("lease = \"3s\"", "lease = \"soon\"", "cluster.lease"),
        ("lease = \"3s\"", "lease = \"0s\"", "cluster.lease"),
        ("lease = \"3s\"", "lease = \"100ms\"", "cluster.lease"),
        (
            "node_id = \"gw-1\"",
            "node_id = \"gw 1\"",
            "cluster.node_id",
        ),
        (
            "key_prefix = \"edge\"",
            "key_prefix = \"\"",
            "cluster.key_prefix",
        ),
        (
            "lease = \"3s\"",
            "lease = \"3s\"\nleader = true",
            "cluster.leader",
        ),
    ] {
        assert_eq!(
            key(&CLUSTER.replace(from, to), &env_with_redis),
            named,
            "{to}"
        );
    }
}
