//! What operators see (SPEC §7, §9): every metric of §7 with its exact
//! labels and type in the Prometheus text format, token series removed with
//! their token, one access line per request, and no token value anywhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A third token, kept live (and in use) to the end of the metrics test.
const EXTRA: &str = "cs_extra_delivery_value_4d";

/// Every secret the tests use: none may show in a metric or a log line.
fn secrets() -> Vec<&'static str> {
    let mut all = ALL_VALUES.to_vec();
    all.extend([EXTRA, ADMIN_TOKEN]);
    all
}

fn tokens() -> Vec<serde_json::Value> {
    let mut tokens = standard_tokens();
    tokens.push(cma::token_json(
        "blt_extra",
        "Extra",
        EXTRA,
        None,
        ("production", "blt_env_prod"),
        None,
        None,
    ));
    tokens
}

async fn world() -> World {
    World::start(tokens(), "").await
}

const SITE: (&str, &str) = ("api_key", API_KEY);

// ---------------------------------------------------------------------------
// The Prometheus text format
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }

    fn has(&self, labels: &[(&str, &str)]) -> bool {
        labels.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// A parsed `/metrics` page.
#[derive(Debug, Default)]
struct Exposition {
    help: BTreeMap<String, String>,
    types: BTreeMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    fn parse(text: &str) -> Exposition {
        let mut page = Exposition::default();
        for (number, line) in text.lines().enumerate() {
            let at = || format!("line {}: {line:?}", number + 1);
            if line.trim().is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                assert!(valid_name(name), "bad metric name, {}", at());
                let previous = page.help.insert(name.to_owned(), help.to_owned());
                assert!(previous.is_none(), "a second HELP, {}", at());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("{}", at()));
                assert!(valid_name(name), "bad metric name, {}", at());
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "unknown type, {}",
                    at()
                );
                assert!(
                    !page.samples.iter().any(|s| family_of(&s.name, name)),
                    "TYPE after its samples, {}",
                    at()
                );
                let previous = page.types.insert(name.to_owned(), kind.to_owned());
                assert!(previous.is_none(), "a second TYPE, {}", at());
            } else if line.starts_with('#') {
                continue;
            } else {
                let sample = parse_sample(line).unwrap_or_else(|e| panic!("{e}, {}", at()));
                page.samples.push(sample);
            }
        }
        page
    }

    /// The family a sample belongs to, by its TYPE line.
    fn family(&self, sample: &str) -> Option<&str> {
        if self.types.contains_key(sample) {
            return self.types.get_key_value(sample).map(|(k, _)| k.as_str());
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = sample.strip_suffix(suffix)?;
            let (name, kind) = self.types.get_key_value(base)?;
            (kind == "histogram").then_some(name.as_str())
        })
    }

    fn named(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The value of the one sample `name` with (at least) `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<_> = self
            .named(name)
            .into_iter()
            .filter(|s| s.has(labels))
            .collect();
        assert!(found.len() <= 1, "several {name} {labels:?}: {found:?}");
        found.first().map(|s| s.value)
    }

    /// Every sample labelled `token="uid"`.
    fn with_token(&self, uid: &str) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.label("token") == Some(uid))
            .collect()
    }
}

fn family_of(sample: &str, family: &str) -> bool {
    sample == family
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| sample.strip_suffix(suffix) == Some(family))
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// `name{label="value",...} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or_else(|| "no value".to_owned())?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            match chars.peek() {
                Some((_, '}')) => {
                    chars.next();
                    break;
                }
                Some(_) => {}
                None => return Err("unterminated label set".to_owned()),
            }
            let mut label = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                label.push(c);
            }
            if !valid_name(&label) || label.contains(':') {
                return Err(format!("bad label name {label:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("label {label} has no quoted value"));
            }
            let mut value = String::new();
            loop {
                match chars.next().map(|(_, c)| c) {
                    Some('"') => break,
                    Some('\\') => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    Some(c) => value.push(c),
                    None => return Err("unterminated label value".to_owned()),
                }
            }
            if labels.insert(label.clone(), value).is_some() {
                return Err(format!("label {label} twice"));
            }
            match chars.peek().map(|(_, c)| *c) {
                Some(',') => {
                    chars.next();
                }
                Some('}') => {}
                other => return Err(format!("unexpected {other:?} after a label")),
            }
        }
        let consumed = chars.next().map_or(inner.len(), |(i, _)| i);
        rest = &inner[consumed..];
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or_else(|| "no value".to_owned())?;
    let value: f64 = value
        .parse()
        .map_err(|e| format!("bad value {value:?}: {e}"))?;
    if let Some(timestamp) = fields.next() {
        timestamp
            .parse::<i64>()
            .map_err(|e| format!("bad timestamp {timestamp:?}: {e}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".to_owned());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

#[test]
fn the_parser_reads_the_text_format() {
    let page = Exposition::parse(
        "# HELP x_total Things.\n# TYPE x_total counter\nx_total{a=\"1\",b=\"q\\\"\\\\\\n\"} 3\nx_total 4 1700000000000\n\
         # TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n",
    );
    assert_eq!(page.types["x_total"], "counter");
    assert_eq!(page.help["x_total"], "Things.");
    assert_eq!(page.samples.len(), 5);
    assert_eq!(page.samples[0].labels["b"], "q\"\\\n");
    assert_eq!(page.samples[0].value, 3.0);
    assert!(page.samples[0].labels.contains_key("a"));
    assert!(page.samples[1].labels.is_empty());
    assert_eq!(page.samples[2].labels["le"], "+Inf");
    assert_eq!(page.family("h_count"), Some("h"));
    assert_eq!(page.family("x_total_count"), None);
    assert!(parse_sample("x{a=\"1\" 3").is_err());
    assert!(parse_sample("x{a=1} 3").is_err());
    assert!(parse_sample("x three").is_err());
}

/// The metrics of SPEC §7: name, type, labels (histograms: of `_sum` and
/// `_count`; `_bucket` adds `le`).
const SPEC_METRICS: [(&str, &str, &[&str]); 12] = [
    (
        "stackgate_requests_total",
        "counter",
        &["stack", "token", "route", "outcome"],
    ),
    (
        "stackgate_rejections_total",
        "counter",
        &["stack", "reason"],
    ),
    (
        "stackgate_upstream_duration_seconds",
        "histogram",
        &["route"],
    ),
    (
        "stackgate_request_duration_seconds",
        "histogram",
        &["route"],
    ),
    ("stackgate_active_sessions", "gauge", &["stack", "token"]),
    (
        "stackgate_sessions_dropped_total",
        "counter",
        &["stack", "cause"],
    ),
    ("stackgate_revocation_seconds", "histogram", &[]),
    ("stackgate_registry_tokens", "gauge", &["stack"]),
    ("stackgate_registry_version", "gauge", &["stack"]),
    (
        "stackgate_registry_last_success_timestamp_seconds",
        "gauge",
        &["stack"],
    ),
    (
        "stackgate_registry_sync_failures_total",
        "counter",
        &["stack"],
    ),
    ("stackgate_registry_held_back_removals", "gauge", &["stack"]),
];

fn label_set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// Asserts that `name` is exported as `kind` with samples labelled exactly
/// `labels` (histograms: `_bucket` with `le`, `_sum`, `_count`, consistent).
fn assert_family(page: &Exposition, name: &str, kind: &str, labels: &[&str]) {
    assert_eq!(
        page.types.get(name).map(String::as_str),
        Some(kind),
        "TYPE of {name}"
    );
    assert!(
        page.help.get(name).is_some_and(|h| !h.is_empty()),
        "HELP of {name}"
    );
    let samples: Vec<&Sample> = page
        .samples
        .iter()
        .filter(|s| page.family(&s.name) == Some(name))
        .collect();
    assert!(!samples.is_empty(), "no sample of {name}");
    let expected = label_set(labels);
    if kind != "histogram" {
        for sample in &samples {
            assert_eq!(sample.name, name);
            let got: BTreeSet<String> = sample.labels.keys().cloned().collect();
            assert_eq!(got, expected, "labels of {sample:?}");
        }
        return;
    }
    let mut with_le = expected.clone();
    with_le.insert("le".to_owned());
    let (mut buckets, mut sums, mut counts) = (0, Vec::new(), Vec::new());
    for sample in &samples {
        let got: BTreeSet<String> = sample.labels.keys().cloned().collect();
        match sample.name.strip_prefix(name) {
            Some("_bucket") => {
                assert_eq!(got, with_le, "labels of {sample:?}");
                buckets += 1;
            }
            Some("_sum") => {
                assert_eq!(got, expected, "labels of {sample:?}");
                sums.push(*sample);
            }
            Some("_count") => {
                assert_eq!(got, expected, "labels of {sample:?}");
                counts.push(*sample);
            }
            _ => panic!("{sample:?} in histogram {name}"),
        }
    }
    assert!(buckets > 0, "{name} has no _bucket");
    assert!(!sums.is_empty(), "{name} has no _sum");
    assert_eq!(sums.len(), counts.len(), "{name}: one _sum per _count");
    // Per series: cumulative buckets, ending in +Inf equal to _count.
    for count in counts {
        let mut series: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.name == format!("{name}_bucket"))
            .filter(|s| {
                s.labels
                    .iter()
                    .all(|(k, v)| k == "le" || count.labels.get(k) == Some(v))
            })
            .map(|s| (s.labels["le"].parse::<f64>().unwrap(), s.value))
            .collect();
        series.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            series.windows(2).all(|w| w[0].1 <= w[1].1),
            "{name}: buckets not cumulative: {series:?}"
        );
        let last = series.last().expect("buckets");
        assert!(last.0.is_infinite(), "{name}: no +Inf bucket");
        assert_eq!(last.1, count.value, "{name}: +Inf bucket != _count");
    }
}

/// No label value is or holds a secret, and the page holds none.
fn assert_no_secrets_in(text: &str, page: &Exposition) {
    for secret in secrets() {
        assert!(!text.contains(secret), "{secret:?} in /metrics:\n{text}");
        for sample in &page.samples {
            for value in sample.labels.values() {
                assert!(!value.contains(secret), "{secret:?} in {sample:?}");
            }
        }
    }
}

async fn scrape(gateway: &TestGateway) -> (String, Exposition) {
    let reply = gateway.admin_plain("GET", "/metrics").await;
    assert_eq!(reply.status, 200);
    let content_type = reply.headers["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/plain"),
        "content-type {content_type}"
    );
    let text = reply.text();
    let page = Exposition::parse(&text);
    for name in page.types.keys() {
        assert!(name.starts_with("stackgate_"), "unprefixed metric {name}");
    }
    for sample in &page.samples {
        assert!(
            page.family(&sample.name).is_some(),
            "{sample:?} has no TYPE line"
        );
    }
    assert_no_secrets_in(&text, &page);
    (text, page)
}

/// Scrapes until `condition` holds; panics after 10 s.
async fn scrape_until(
    gateway: &TestGateway,
    what: &str,
    condition: impl Fn(&Exposition) -> bool,
) -> (String, Exposition) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (text, page) = scrape(gateway).await;
        if condition(&page) {
            return (text, page);
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An HTTP/1.1 keep-alive connection that made one allowed request with
/// `token` and stays open.
struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    connection: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

impl KeepAlive {
    async fn open(addr: std::net::SocketAddr, token: &str) -> KeepAlive {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let connection = tokio::spawn(connection);
        let mut keep_alive = KeepAlive { sender, connection };
        let reply = keep_alive
            .send(get(
                "cdn.test",
                "/v3/entries",
                &[SITE, ("access_token", token)],
            ))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        keep_alive
    }

    async fn send(&mut self, request: http::Request<Full<Bytes>>) -> Reply {
        self.sender.ready().await.unwrap();
        read(self.sender.send_request(request).await.unwrap()).await
    }

    /// Waits (10 s at most) until the gateway has closed the connection.
    async fn closed(self) {
        let KeepAlive { sender, connection } = self;
        tokio::time::timeout(Duration::from_secs(10), connection)
            .await
            .expect("the gateway closed the connection")
            .unwrap()
            .ok();
        drop(sender);
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ---------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------

#[tokio::test]
async fn every_spec_metric_is_exported_with_its_labels() {
    let w = world().await;
    let gw = &w.gateway;
    let website = ("stack", "website");
    let sessions = "stackgate_active_sessions";

    // Allowed, refused, and an upstream error. Extra and staging are used on
    // one connection each, so that their revocations cut exactly one.
    let mut extra = KeepAlive::open(gw.http, EXTRA).await;
    let mut staging = KeepAlive::open(gw.http, STAGING).await;
    let refused = staging
        .send(get(
            "cdn.test",
            "/v3/entries",
            &[SITE, ("access_token", STAGING), ("branch", "feature")],
        ))
        .await;
    assert_eq!(refused.reason(), "branch_out_of_scope");
    let refused = extra
        .send(get(
            "cdn.test",
            "/v3/entries",
            &[SITE, ("access_token", "cs_nope")],
        ))
        .await;
    assert_eq!(refused.reason(), "invalid_token");
    let reply = send(
        gw.http,
        get("cdn.test", "/v3/entries", &[SITE, ("access_token", PROD)]),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let failed = send(
        gw.http,
        get("cdn.test", "/reset", &[SITE, ("access_token", PROD)]),
    )
    .await;
    assert_eq!(failed.status, 502, "{}", failed.text());
    assert_eq!(failed.reason(), "upstream_error");
    // A failed sync.
    w.cma.set_mode(cma::Mode::Status(500));
    assert_eq!(gw.admin("POST", "/admin/sync").await.status, 200);
    w.cma.set_mode(cma::Mode::Normal);

    // An admin revocation cuts the extra session.
    let revoked = gw.admin("POST", "/admin/tokens/blt_extra/revoke").await;
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    assert_eq!(
        revoked.json()["sessions_cancelled"],
        1,
        "{}",
        revoked.text()
    );
    extra.closed().await;
    scrape_until(gw, "the admin revocation's metrics", |page| {
        page.value("stackgate_revocation_seconds_count", &[]) == Some(1.0)
            && page.value(
                "stackgate_sessions_dropped_total",
                &[website, ("cause", "admin_revoked")],
            ) == Some(1.0)
    })
    .await;

    // A CMA sync deletes staging while its session is open.
    let (_, before) = scrape(gw).await;
    assert!(
        !before.with_token("blt_staging").is_empty(),
        "staging has series before it is deleted"
    );
    let tokens_before = before
        .value("stackgate_registry_tokens", &[website])
        .unwrap();
    let version_before = before
        .value("stackgate_registry_version", &[website])
        .unwrap();
    w.cma.set_tokens(
        tokens()
            .into_iter()
            .filter(|t| t["uid"] != "blt_staging")
            .collect(),
    );
    let synced = gw.admin("POST", "/admin/sync").await;
    assert_eq!(synced.status, 200, "{}", synced.text());
    staging.closed().await;

    // A live prod session for the scrape.
    let prod = KeepAlive::open(gw.http, PROD).await;
    let (text, page) = scrape_until(gw, "the deletion's metrics", |page| {
        page.value(
            "stackgate_sessions_dropped_total",
            &[website, ("cause", "token_deleted")],
        ) == Some(1.0)
            && page.value("stackgate_revocation_seconds_count", &[]) == Some(2.0)
    })
    .await;

    // Every metric of SPEC §7 (but active_sessions, last), with exactly its
    // labels and its type.
    for (name, kind, labels) in SPEC_METRICS {
        if name != sessions {
            assert_family(&page, name, kind, labels);
        }
    }

    // The values the traffic above must have left.
    let requests = "stackgate_requests_total";
    let forwarded = [
        website,
        ("token", "blt_prod"),
        ("route", "delivery"),
        ("outcome", "forwarded"),
    ];
    assert!(page.value(requests, &forwarded) >= Some(2.0), "{text}");
    let upstream_error = [
        website,
        ("token", "blt_prod"),
        ("route", "delivery"),
        ("outcome", "upstream_error"),
    ];
    assert_eq!(page.value(requests, &upstream_error), Some(1.0), "{text}");
    let rejected = [
        website,
        ("token", ""),
        ("route", "delivery"),
        ("outcome", "rejected"),
    ];
    assert_eq!(page.value(requests, &rejected), Some(1.0), "{text}");
    for sample in page.named(requests) {
        let outcome = sample.label("outcome").unwrap();
        assert!(
            ["forwarded", "rejected", "upstream_error"].contains(&outcome),
            "{sample:?}"
        );
    }
    let rejections = "stackgate_rejections_total";
    for reason in ["invalid_token", "branch_out_of_scope", "upstream_error"] {
        assert_eq!(
            page.value(rejections, &[website, ("reason", reason)]),
            Some(1.0),
            "{reason}: {text}"
        );
    }
    for histogram in [
        "stackgate_upstream_duration_seconds_count",
        "stackgate_request_duration_seconds_count",
    ] {
        assert!(
            page.value(histogram, &[("route", "delivery")]) >= Some(4.0),
            "{histogram}: {text}"
        );
    }
    assert_eq!(
        page.value(
            "stackgate_sessions_dropped_total",
            &[website, ("cause", "admin_revoked")]
        ),
        Some(1.0)
    );
    assert_eq!(
        page.value("stackgate_registry_tokens", &[website]),
        Some(tokens_before - 1.0),
        "{text}"
    );
    assert!(
        page.value("stackgate_registry_version", &[website]) > Some(version_before),
        "{text}"
    );
    let last_success = page
        .value(
            "stackgate_registry_last_success_timestamp_seconds",
            &[website],
        )
        .unwrap();
    assert!(
        (unix_now() - last_success).abs() < 600.0,
        "last success {last_success}, now {}",
        unix_now()
    );
    assert_eq!(
        page.value("stackgate_registry_sync_failures_total", &[website]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        page.value("stackgate_registry_held_back_removals", &[website]),
        Some(0.0)
    );

    // The deleted token's series are gone, and a later use of its value
    // (refused as revoked) brings none back.
    assert!(
        page.with_token("blt_staging").is_empty(),
        "series of a deleted token: {:?}",
        page.with_token("blt_staging")
    );
    let refused = send(
        gw.http,
        get(
            "cdn.test",
            "/v3/entries",
            &[SITE, ("access_token", STAGING)],
        ),
    )
    .await;
    assert_eq!(refused.reason(), "token_revoked");
    let (_, page) = scrape(gw).await;
    assert!(
        page.with_token("blt_staging").is_empty(),
        "a deleted token's series came back: {:?}",
        page.with_token("blt_staging")
    );
    assert_no_secrets_in_logs();

    // active_sessions, computed at scrape time: the open prod connection.
    assert!(
        page.value(sessions, &[website, ("token", "blt_prod")]) >= Some(1.0),
        "no {sessions} sample for the open prod connection; /metrics:\n{}",
        gw.metrics().await
    );
    assert_family(&page, sessions, "gauge", &["stack", "token"]);
    drop(prod);
}

// ---------------------------------------------------------------------------
// Access logs
// ---------------------------------------------------------------------------

/// The value of `name=` in a text log line, quotes removed.
fn text_field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {name}="))? + name.len() + 2;
    let value = line[start..].split_whitespace().next()?;
    Some(value.trim_matches('"'))
}

/// The access lines that carry request id `id`.
fn access_lines(id: &str) -> Vec<String> {
    logs()
        .lines()
        .filter(|l| l.contains("stackgate::access"))
        .filter(|l| text_field(l, "request_id") == Some(id))
        .map(str::to_owned)
        .collect()
}

fn assert_no_secrets_in_logs() {
    let logs = logs();
    for secret in secrets() {
        for line in logs.lines() {
            assert!(!line.contains(secret), "{secret:?} logged: {line}");
        }
    }
}

/// What one access line must say.
struct Expect {
    id: &'static str,
    status: u16,
    stack: &'static str,
    token: &'static str,
    route: &'static str,
    reason: Option<&'static str>,
}

#[tokio::test]
async fn every_request_writes_one_access_line() {
    let w = world().await;
    let gw = &w.gateway;
    let id = |id: &'static str| ("x-request-id", id);

    let mut expected = Vec::new();
    let mut exchange = |request, expect: Expect| {
        expected.push((request, expect));
    };
    exchange(
        get(
            "cdn.test",
            "/v3/entries",
            &[SITE, ("access_token", PROD), id("obs-log-allowed")],
        ),
        Expect {
            id: "obs-log-allowed",
            status: 200,
            stack: "website",
            token: "blt_prod",
            route: "delivery",
            reason: None,
        },
    );
    exchange(
        get(
            "preview.test",
            "/v3/entries",
            &[
                SITE,
                ("access_token", PROD),
                ("preview_token", PROD_PREVIEW),
                ("live_preview", "hash"),
                id("obs-log-preview"),
            ],
        ),
        Expect {
            id: "obs-log-preview",
            status: 200,
            stack: "website",
            token: "blt_prod",
            route: "preview",
            reason: None,
        },
    );
    exchange(
        request(
            "POST",
            "graphql.test",
            "/stacks/blt_test_stack?environment=staging",
        )
        .header("access_token", STAGING)
        .header("x-request-id", "obs-log-graphql")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            r#"{"query":"{ all_blog { total } }"}"#,
        )))
        .unwrap(),
        Expect {
            id: "obs-log-graphql",
            status: 200,
            stack: "website",
            token: "blt_staging",
            route: "graphql",
            reason: None,
        },
    );
    exchange(
        get(
            "cdn.test",
            "/v3/entries",
            &[SITE, ("access_token", "cs_nope"), id("obs-log-invalid")],
        ),
        Expect {
            id: "obs-log-invalid",
            status: 401,
            stack: "website",
            token: "",
            route: "delivery",
            reason: Some("invalid_token"),
        },
    );
    exchange(
        get(
            "cdn.test",
            "/v3/entries",
            &[
                SITE,
                ("access_token", STAGING),
                ("branch", "feature"),
                id("obs-log-branch"),
            ],
        ),
        Expect {
            id: "obs-log-branch",
            status: 422,
            stack: "website",
            token: "blt_staging",
            route: "delivery",
            reason: Some("branch_out_of_scope"),
        },
    );
    exchange(
        get(
            "cdn.test",
            "/v3/entries?environment=staging",
            &[SITE, ("access_token", PROD), id("obs-log-environment")],
        ),
        Expect {
            id: "obs-log-environment",
            status: 403,
            stack: "website",
            token: "blt_prod",
            route: "delivery",
            reason: Some("environment_out_of_scope"),
        },
    );
    exchange(
        get(
            "nowhere.test",
            "/v3/entries",
            &[SITE, ("access_token", PROD), id("obs-log-no-route")],
        ),
        Expect {
            id: "obs-log-no-route",
            status: 421,
            stack: "",
            token: "",
            route: "",
            reason: Some("no_route"),
        },
    );
    exchange(
        get(
            "cdn.test",
            "/reset",
            &[SITE, ("access_token", PROD), id("obs-log-upstream")],
        ),
        Expect {
            id: "obs-log-upstream",
            status: 502,
            stack: "website",
            token: "blt_prod",
            route: "delivery",
            reason: Some("upstream_error"),
        },
    );

    // A CORS preflight, answered by the gateway itself.
    exchange(
        http::Request::builder()
            .method("OPTIONS")
            .uri("/v3/entries")
            .header("host", "cdn.test")
            .header("origin", "https://site.example")
            .header("access-control-request-method", "GET")
            .header("x-request-id", "obs-log-preflight")
            .body(Full::new(Bytes::new()))
            .unwrap(),
        Expect {
            id: "obs-log-preflight",
            status: 204,
            stack: "",
            token: "",
            route: "delivery",
            reason: None,
        },
    );

    let mut expects = Vec::new();
    for (request, expect) in expected {
        let reply = send(gw.http, request).await;
        assert_eq!(
            reply.status,
            expect.status,
            "{}: {}",
            expect.id,
            reply.text()
        );
        assert_eq!(reply.headers["x-request-id"], expect.id);
        expects.push(expect);
    }
    // One over h2c, on one connection with a refusal.
    let mut h2 = h2c(gw.http).await;
    for (request_id, token, status) in [
        ("obs-log-h2-allowed", EXTRA, 200),
        ("obs-log-h2-refused", "cs_nope", 401),
    ] {
        let request = http::Request::builder()
            .uri("http://cdn.test/v3/entries")
            .header("api_key", API_KEY)
            .header("access_token", token)
            .header("x-request-id", request_id)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let reply = read(h2.send_request(request).await.unwrap()).await;
        assert_eq!(reply.status, status, "{}", reply.text());
    }
    expects.push(Expect {
        id: "obs-log-h2-allowed",
        status: 200,
        stack: "website",
        token: "blt_extra",
        route: "delivery",
        reason: None,
    });
    expects.push(Expect {
        id: "obs-log-h2-refused",
        status: 401,
        stack: "website",
        token: "",
        route: "delivery",
        reason: Some("invalid_token"),
    });

    for expect in &expects {
        let lines = access_lines(expect.id);
        assert_eq!(
            lines.len(),
            1,
            "{}: expected one access line, got {lines:#?}",
            expect.id
        );
        let line = &lines[0];
        let status = expect.status.to_string();
        assert_eq!(text_field(line, "status"), Some(status.as_str()), "{line}");
        assert_eq!(text_field(line, "stack"), Some(expect.stack), "{line}");
        assert_eq!(text_field(line, "route"), Some(expect.route), "{line}");
        if expect.token.is_empty() {
            assert!(
                text_field(line, "token").is_none_or(str::is_empty),
                "{line}"
            );
        } else {
            assert_eq!(text_field(line, "token"), Some(expect.token), "{line}");
        }
        assert_eq!(text_field(line, "reason"), expect.reason, "{line}");
        assert!(text_field(line, "duration_ms").is_some(), "{line}");
    }
    assert_eq!(
        w.origin.request_count(),
        5,
        "allowed requests and the reset"
    );

    assert_no_secrets_in_logs();
}
