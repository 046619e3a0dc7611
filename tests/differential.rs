//! The differential property of SPEC §2, over the wire: hostile variants of
//! an allowed request (header spellings, duplicate and `Connection`-listed
//! headers, query encodings, path dot-segments and encodings, hosts) go to
//! the real gateway in front of a recording origin. Each is either refused
//! (and nothing reaches the origin), or every credential, scope and routing
//! value the origin receives, parsed the way a LENIENT server parses it
//! (names case- and `-`/`_`-insensitive, `;` as a pair separator, `name[]`
//! as `name`, every duplicate), is one the gateway checked: the one token
//! presented, and environments and branches inside that token's scope.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::cell::Cell;
use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestRng, TestRunner};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the production token may read (tests/support: `standard_tokens`).
const PROD_ENVIRONMENTS: [&str; 2] = ["production", "blt_env_prod"];
const PROD_BRANCHES: [&str; 3] = ["main", "development", "deploy"];

/// One hostile variant of an allowed request.
#[derive(Debug, Clone)]
struct Variant {
    host: &'static str,
    prefix: &'static str,
    path: &'static str,
    query: Vec<&'static str>,
    headers: Vec<(&'static str, &'static str)>,
    connection: Option<&'static str>,
}

fn variant() -> impl Strategy<Value = Variant> {
    let route = prop::sample::select(vec![("cdn.test", ""), ("prefixed.test", "/cda")]);
    let path = prop::sample::select(vec![
        "/v3/entries",
        "/v3/./entries",
        "/v3//entries",
        "/v3/x/../entries",
        "/../v3/entries",
        "/%2e%2e/v3",
        "/v3/%2E/entries",
        "/v3/a%2fb",
        "//v3/entries",
        "/v3/entries/",
    ]);
    let query = prop::collection::vec(
        prop::sample::select(vec![
            "environment=production",
            "environment=blt_env_prod",
            "environment=staging",
            "environment[]=staging",
            "Environment=staging",
            "locale=en-us;environment=staging",
            "%65nvironment=staging",
            "environment=product%69on",
            "branch=nope",
            "include[]=author",
            "q=a+b",
            "access-token=x",
            "",
        ]),
        0..4,
    );
    let headers = prop::collection::vec(
        prop::sample::select(vec![
            ("branch", "development"),
            ("branch", "nope"),
            ("branch", "deploy"),
            ("Branch", "main"),
            ("environment", "production"),
            ("environment", "staging"),
            ("access-token", STAGING),
            ("Access_Token", STAGING),
            ("access_token", STAGING),
            ("api-key", "blt_other"),
            ("preview_token", PROD_PREVIEW),
            ("preview-token", PROD_PREVIEW),
            ("host", "preview.test"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-note", "environment=staging"),
        ]),
        0..4,
    );
    let connection = prop::option::of(prop::sample::select(vec![
        "branch",
        "environment",
        "access-token",
        "x-forwarded-for",
        "x-note",
        "keep-alive",
    ]));
    (route, path, query, headers, connection).prop_map(
        |((host, prefix), path, query, headers, connection)| Variant {
            host,
            prefix,
            path,
            query,
            headers,
            connection,
        },
    )
}

impl Variant {
    fn bytes(&self) -> Vec<u8> {
        let query = if self.query.is_empty() {
            String::new()
        } else {
            format!("?{}", self.query.join("&"))
        };
        let mut head = format!(
            "GET {}{}{query} HTTP/1.1\r\nhost: {}\r\napi_key: {API_KEY}\r\naccess_token: {PROD}\r\n",
            self.prefix, self.path, self.host
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        match self.connection {
            Some(listed) => head.push_str(&format!("connection: close, {listed}\r\n")),
            None => head.push_str("connection: close\r\n"),
        }
        head.push_str("\r\n");
        head.into_bytes()
    }
}

/// Name as a lenient server reads it.
fn lenient(name: &str) -> String {
    let name = name.split('[').next().unwrap_or(name);
    name.to_ascii_lowercase().replace('-', "_")
}

/// Every value of every name, read leniently from the headers and query the
/// origin received.
fn lenient_values(seen: &origin::Recorded) -> HashMap<String, Vec<String>> {
    let mut values: HashMap<String, Vec<String>> = HashMap::new();
    for (name, value) in &seen.headers {
        values
            .entry(lenient(name.as_str()))
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    for pair in seen.query.as_deref().unwrap_or("").split(['&', ';']) {
        for (key, value) in form_urlencoded::parse(pair.as_bytes()) {
            values
                .entry(lenient(&key))
                .or_default()
                .push(value.into_owned());
        }
        // Also read `+` literally, as a non-form parser does.
        if let Some((key, value)) = pair.split_once('=') {
            if !value.contains('+') {
                continue;
            }
            values
                .entry(lenient(key))
                .or_default()
                .push(value.to_owned());
        }
    }
    values
}

/// The path a lenient server resolves: `%2e` as a dot, dot-segments, empty
/// segments.
fn lenient_path(path: &str) -> String {
    let decoded = path.replace("%2e", ".").replace("%2E", ".");
    let mut kept: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            other => kept.push(other),
        }
    }
    format!("/{}", kept.join("/"))
}

/// Sends `bytes` and returns the status of the (one) answer.
async fn status_of(gateway: std::net::SocketAddr, bytes: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(gateway).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out))
        .await
        .expect("the gateway answers and closes")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    text.get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"))
}

#[test]
fn what_reaches_the_origin_is_what_was_checked() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (gateway, origin, _cma) = runtime.block_on(async {
        let origin = origin::spawn_origin().await;
        let cma = cma::spawn_cma().await;
        cma.set_tokens(standard_tokens());
        let gateway = spawn_ready(&config(&origin.url(), &cma_registry(&cma.url(), None))).await;
        (gateway, origin, cma)
    });
    let origin_host = origin.url().trim_start_matches("http://").to_owned();
    let mut runner = TestRunner::new_with_rng(
        RunnerConfig {
            cases: 400,
            failure_persistence: None,
            ..RunnerConfig::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let (forwarded, refused) = (Cell::new(0u32), Cell::new(0u32));
    runner
        .run(&variant(), |v| {
            let before = origin.request_count();
            let status = runtime.block_on(status_of(gateway.http, &v.bytes()));
            let after = origin.request_count();
            if status != 200 {
                refused.set(refused.get() + 1);
                prop_assert!((400..500).contains(&status), "{status} for {v:?}");
                prop_assert_eq!(after, before, "refused ({}) but forwarded: {:?}", status, v);
                return Ok(());
            }
            forwarded.set(forwarded.get() + 1);
            prop_assert_eq!(after, before + 1);
            let seen = origin.last_request().unwrap();
            let values = lenient_values(&seen);
            let all = |name: &str| values.get(name).cloned().unwrap_or_default();
            prop_assert_eq!(all("access_token"), vec![PROD.to_owned()], "{:?}", v);
            prop_assert_eq!(all("api_key"), vec![API_KEY.to_owned()], "{:?}", v);
            prop_assert!(all("preview_token").is_empty(), "{:?}", v);
            prop_assert_eq!(all("host"), vec![origin_host.clone()], "{:?}", v);
            for environment in all("environment") {
                prop_assert!(
                    PROD_ENVIRONMENTS.contains(&environment.as_str()),
                    "environment {environment} reached the origin: {v:?}"
                );
            }
            for branch in all("branch") {
                prop_assert!(
                    PROD_BRANCHES.contains(&branch.as_str()),
                    "branch {branch} reached the origin: {v:?}"
                );
            }
            // The path arrives resolved: a lenient server reads it as it is.
            let sent = match seen.path.trim_end_matches('/') {
                "" => "/",
                trimmed => trimmed,
            };
            prop_assert_eq!(lenient_path(&seen.path), sent, "{:?}", v);
            prop_assert!(seen.path.starts_with("/v3"), "{} for {v:?}", seen.path);
            Ok(())
        })
        .unwrap();
    let (forwarded, refused) = (forwarded.get(), refused.get());
    eprintln!("{forwarded} forwarded, {refused} refused");
    assert!(
        forwarded >= 20,
        "only {forwarded} forwarded: the generator misses the allowed region"
    );
    assert!(refused >= 100, "only {refused} refused");
}
