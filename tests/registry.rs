//! The token registry end to end (SPEC §3 rows 5-9, §4, §5 `[stacks.registry]`,
//! §7): the CMA client's requests and paging, failed syncs that change
//! nothing, the snapshot across restarts, the admin sync report, the
//! mass-removal guard, the tokens file, the admin API, and that no token value
//! ever leaks. Real loopback servers throughout: a fake CMA, a fake origin and
//! the gateway.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use support::cma::Mode;
use support::*;

const SITE: (&str, &str) = ("api_key", API_KEY);
/// A value no registry ever listed.
const NEVER_KNOWN: &str = "cs_never_known_value_0z";
/// Values of the extra tokens some tests add; like [`ALL_VALUES`], never to be shown.
const EXTRA: &str = "cs_extra_delivery_value_4d";
const EXTRA_B: &str = "cs_extra_delivery_value_5e";
const FRESH: &str = "cs_fresh_delivery_value_6f";
const OUR_VALUES: [&str; 3] = [EXTRA, EXTRA_B, FRESH];
/// The stack-level series of the failure counter and the held-back gauge.
const FAILURES: &str = r#"stackgate_registry_sync_failures_total{stack="website"}"#;
const HELD_BACK: &str = r#"stackgate_registry_held_back_removals{stack="website"}"#;
/// The change lists of a sync report.
const DIFF_LISTS: [&str; 6] = [
    "added",
    "removed",
    "preview_removed",
    "rotated",
    "narrowed",
    "changed",
];

struct World {
    gateway: TestGateway,
    cma: cma::FakeCma,
    _origin: origin::Origin,
}

/// A fake CMA listing `tokens`, a fake origin, and a gateway that has loaded them.
async fn world(tokens: Vec<Value>, snapshot: Option<&Path>) -> World {
    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(tokens);
    let gateway = spawn_ready(&config(&origin.url(), &cma_registry(&cma.url(), snapshot))).await;
    World {
        gateway,
        cma,
        _origin: origin,
    }
}

/// A token without preview token or branch modules, in the production environment.
fn plain_token(uid: &str, value: &str) -> Value {
    cma::token_json(
        uid,
        uid,
        value,
        None,
        ("production", "blt_env_prod"),
        None,
        None,
    )
}

/// The standard tokens plus `blt_a` ([`EXTRA`]) and `blt_b` ([`EXTRA_B`]).
fn four_tokens() -> Vec<Value> {
    let mut tokens = standard_tokens();
    tokens.push(plain_token("blt_a", EXTRA));
    tokens.push(plain_token("blt_b", EXTRA_B));
    tokens
}

/// Only the standard staging token.
fn staging_only() -> Vec<Value> {
    standard_tokens()
        .into_iter()
        .filter(|t| t["uid"] == "blt_staging")
        .collect()
}

/// A delivery request for the test stack with `access_token: token`.
async fn cda(gateway: &TestGateway, token: &str) -> Reply {
    send(
        gateway.http,
        get(
            "cdn.test",
            "/v3/content_types/blog/entries",
            &[SITE, ("access_token", token)],
        ),
    )
    .await
}

/// [`cda`] on a connection the gateway may cut: a request in flight when its
/// token is revoked is aborted (SPEC §4), so pollers racing a revocation get
/// `None` rather than a panic.
async fn try_cda(gateway: &TestGateway, token: &str) -> Option<Reply> {
    let stream = tokio::net::TcpStream::connect(gateway.http).await.ok()?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(connection);
    let request = get(
        "cdn.test",
        "/v3/content_types/blog/entries",
        &[SITE, ("access_token", token)],
    );
    let (parts, body) = sender.send_request(request).await.ok()?.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// `token` reaches the origin.
async fn assert_forwarded(gateway: &TestGateway, token: &str, what: &str) {
    let reply = cda(gateway, token).await;
    assert_eq!(
        reply.status,
        200,
        "{what}: {} {}",
        reply.reason(),
        reply.text()
    );
    assert_eq!(reply.headers["x-origin"], "fake-cda", "{what}");
}

/// `token` is refused with `status` and `reason`.
async fn assert_refused(gateway: &TestGateway, token: &str, status: u16, reason: &str, what: &str) {
    let reply = cda(gateway, token).await;
    assert_eq!(
        (reply.status.as_u16(), reply.reason()),
        (status, reason),
        "{what}: {}",
        reply.text()
    );
}

/// `POST path` on the admin API; the `website` stack's report.
async fn sync(gateway: &TestGateway, path: &str) -> Value {
    let reply = gateway.admin("POST", path).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["stacks"]["website"].clone()
}

/// A list of uids from a report or status.
fn uids(value: &Value, key: &str) -> Vec<String> {
    value[key]
        .as_array()
        .unwrap_or_else(|| panic!("{key} is not a list in {value}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

fn assert_no_diff(report: &Value) {
    for key in DIFF_LISTS {
        assert!(uids(report, key).is_empty(), "{key} in {report}");
    }
}

/// The `website` entry of `GET /admin/stacks`.
async fn stack_status(gateway: &TestGateway) -> Value {
    let reply = gateway.admin("GET", "/admin/stacks").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["stacks"][0]["name"], "website", "{body}");
    body["stacks"][0].clone()
}

/// The value of one series in `/metrics`.
async fn metric(gateway: &TestGateway, series: &str) -> f64 {
    let text = gateway.metrics().await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// Waits until the first stack's snapshot has been written (it is written
/// after the registry is swapped in, so after [`spawn_ready`] returns).
async fn wait_for_snapshot(gateway: &TestGateway) {
    let stack = gateway.shared.stacks.get(0).unwrap();
    wait_until("the snapshot written", || {
        stack.status().snapshot_written.is_some()
    })
    .await;
}

/// Polls `check` every 20 ms until it holds; panics after 10 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_no_value(text: &str, what: &str) {
    for value in ALL_VALUES.iter().chain(OUR_VALUES.iter()) {
        assert!(
            !text.contains(value),
            "{what} holds the secret {value:?}:\n{text}"
        );
    }
}

/// `{"tokens": [...]}` written by rename, so the gateway never reads half a file.
fn write_tokens_file(path: &Path, body: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn token_list(tokens: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({ "tokens": tokens })).unwrap()
}

#[tokio::test]
async fn the_cma_is_asked_with_the_api_key_and_authtoken() {
    let w = world(standard_tokens(), None).await;
    let calls = w.cma.calls();
    assert_eq!(calls.len(), 1, "two tokens fit one page: {calls:?}");
    let call = &calls[0];
    assert_eq!(call.path, cma::TOKENS_PATH);
    assert_eq!(call.header("api_key"), Some(API_KEY));
    assert_eq!(call.header("authtoken"), Some(CMA_SECRET));
    assert_eq!(call.header("authorization"), None);
    assert_eq!(call.query_param("skip"), Some("0"));
    let limit: usize = call.query_param("limit").unwrap().parse().unwrap();
    assert!((1..=cma::MAX_LIMIT).contains(&limit), "limit={limit}");
    assert_eq!(call.query_param("include_count"), Some("true"));
    assert_forwarded(&w.gateway, PROD, "PROD").await;
}

#[tokio::test]
async fn bearer_auth_sends_an_authorization_header_instead() {
    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    let registry = format!(
        "cma_url = \"{}\"\nauth = \"bearer\"\ncredential_env = \"STACKGATE_CMA_AUTHTOKEN\"\nsync_interval = \"1h\"\n",
        cma.url()
    );
    let gateway = spawn_ready(&config(&origin.url(), &registry)).await;
    let calls = cma.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    assert_eq!(call.path, cma::TOKENS_PATH);
    assert_eq!(call.header("api_key"), Some(API_KEY));
    let expected = format!("Bearer {CMA_SECRET}");
    assert_eq!(call.header("authorization"), Some(expected.as_str()));
    assert_eq!(call.header("authtoken"), None);
    assert_eq!(call.query_param("skip"), Some("0"));
    assert!(call.query_param("limit").is_some());
    assert_eq!(call.query_param("include_count"), Some("true"));
    assert_forwarded(&gateway, STAGING, "STAGING").await;
}

#[tokio::test]
async fn every_page_of_a_long_token_list_is_loaded() {
    let tokens: Vec<Value> = (0..250)
        .map(|i| {
            plain_token(
                &format!("blt_page_{i:03}"),
                &format!("cs_page_value_{i:03}"),
            )
        })
        .collect();
    let w = world(tokens, None).await;
    assert_eq!(stack_status(&w.gateway).await["tokens"], 250);
    assert_forwarded(&w.gateway, "cs_page_value_249", "the 250th token").await;
    assert_forwarded(&w.gateway, "cs_page_value_000", "the first token").await;
    assert_forwarded(&w.gateway, "cs_page_value_150", "a middle token").await;
    assert_refused(&w.gateway, NEVER_KNOWN, 401, "invalid_token", "unknown").await;
    let skips: Vec<String> = w
        .cma
        .calls()
        .iter()
        .map(|c| c.query_param("skip").unwrap_or("").to_owned())
        .collect();
    assert_eq!(skips, ["0", "100", "200"]);
}

#[tokio::test]
async fn a_failed_sync_changes_nothing() {
    let w = world(standard_tokens(), None).await;
    let gateway = &w.gateway;
    let version = gateway.version();
    assert!(version > 0);
    let failures_before = metric(gateway, FAILURES).await;

    // Were any of these applied, blt_prod would be gone and 120 tokens added.
    let mut listed = staging_only();
    listed.extend(
        (0..120).map(|i| plain_token(&format!("blt_fill_{i:03}"), &format!("cs_fill_{i:03}"))),
    );
    w.cma.set_tokens(listed);
    let modes = [
        Mode::Status(500),
        Mode::Status(401),
        Mode::Status(412),
        Mode::InvalidJson,
        Mode::WrongShape,
        Mode::LoopingPages,
        Mode::RateLimited {
            retry_after_secs: 1,
        },
    ];
    for (i, mode) in modes.into_iter().enumerate() {
        let what = format!("{mode:?}");
        w.cma.set_mode(mode);
        let calls = w.cma.call_count();
        let report = sync(gateway, "/admin/sync").await;
        assert!(w.cma.call_count() > calls, "{what}: the CMA was not asked");
        let error = report["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no error in {report}"));
        assert!(!error.is_empty(), "{what}");
        assert_no_value(error, &what);
        assert_eq!(report["version"], version, "{what}: {report}");
        assert_no_diff(&report);
        assert_eq!(gateway.version(), version, "{what}");

        assert_forwarded(gateway, PROD, &what).await;
        assert_forwarded(gateway, STAGING, &what).await;
        assert_refused(gateway, NEVER_KNOWN, 401, "invalid_token", &what).await;
        assert_refused(gateway, "cs_fill_000", 401, "invalid_token", &what).await;

        let status = stack_status(gateway).await;
        assert!(status["last_error"].is_string(), "{what}: {status}");
        assert_eq!(status["consecutive_failures"], i + 1, "{what}: {status}");
        assert_eq!(status["tokens"], 2, "{what}: {status}");
        assert_eq!(status["registry_version"], version, "{what}: {status}");
        assert_eq!(
            metric(gateway, FAILURES).await,
            failures_before + (i + 1) as f64,
            "{what}"
        );
    }

    w.cma.set_tokens(staging_only());
    w.cma.set_mode(Mode::Normal);
    let report = sync(gateway, "/admin/sync").await;
    assert!(report.get("error").is_none(), "{report}");
    assert_eq!(uids(&report, "removed"), ["blt_prod"]);
    assert!(uids(&report, "added").is_empty(), "{report}");
    assert_eq!(report["version"], version + 1);
    assert_refused(gateway, PROD, 401, "token_revoked", "after recovery").await;
    assert_forwarded(gateway, STAGING, "after recovery").await;
    let status = stack_status(gateway).await;
    assert!(status["last_error"].is_null(), "{status}");
    assert_eq!(status["consecutive_failures"], 0, "{status}");
}

#[tokio::test]
async fn an_unreachable_cma_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("website.json");
    let w = world(standard_tokens(), Some(&snapshot)).await;
    wait_for_snapshot(&w.gateway).await;
    let version = w.gateway.version();
    assert!(w.gateway.stop(Duration::from_secs(5)).await);

    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let origin = origin::spawn_origin().await;
    let registry = cma_registry(&format!("http://{closed}"), Some(&snapshot));
    let gateway = spawn_gateway(&config(&origin.url(), &registry)).await;
    let stack = std::sync::Arc::clone(gateway.shared.stacks.get(0).unwrap());
    wait_until("the first sync failed", || {
        stack.status().consecutive_failures >= 1
    })
    .await;
    let failures_before = metric(&gateway, FAILURES).await;

    let report = sync(&gateway, "/admin/sync").await;
    let error = report["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{report}"));
    assert_no_value(error, "connect error");
    assert_eq!(report["version"], version, "{report}");
    assert_no_diff(&report);
    assert_eq!(gateway.version(), version);
    assert_forwarded(&gateway, PROD, "closed port").await;
    assert_forwarded(&gateway, STAGING, "closed port").await;
    assert_refused(&gateway, NEVER_KNOWN, 401, "invalid_token", "closed port").await;
    let status = stack_status(&gateway).await;
    assert!(status["last_error"].is_string(), "{status}");
    assert_eq!(status["consecutive_failures"], 2, "{status}");
    assert_eq!(metric(&gateway, FAILURES).await, failures_before + 1.0);
}

#[tokio::test]
async fn the_snapshot_serves_a_restart_while_the_cma_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("website.json");
    let mut tokens = standard_tokens();
    tokens.push(plain_token("blt_extra", EXTRA));
    let w = world(tokens, Some(&path)).await;
    wait_for_snapshot(&w.gateway).await;

    let text = std::fs::read_to_string(&path).expect("snapshot written after the first sync");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "snapshot mode {mode:o}");
    }
    assert_no_value(&text, "the snapshot");
    for uid in ["blt_prod", "blt_staging", "blt_extra"] {
        assert!(text.contains(uid), "{uid} not in the snapshot: {text}");
    }

    // blt_extra deleted in the CMA, blt_staging revoked by the admin.
    w.cma.set_tokens(standard_tokens());
    let report = sync(&w.gateway, "/admin/sync").await;
    assert_eq!(uids(&report, "removed"), ["blt_extra"], "{report}");
    let reply = w
        .gateway
        .admin("POST", "/admin/tokens/blt_staging/revoke")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["persisted"], true, "{}", reply.text());
    assert_refused(&w.gateway, STAGING, 401, "token_revoked", "revoked").await;
    let version = w.gateway.version();
    let on_disk: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        on_disk["version"], version,
        "answered persisted before the file held it"
    );
    let calls = w.cma.call_count();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_no_value(&text, "the snapshot after a revocation");
    assert!(w.gateway.stop(Duration::from_secs(5)).await);

    w.cma.set_mode(Mode::Status(500));
    let origin = origin::spawn_origin().await;
    let gateway = spawn_gateway(&config(
        &origin.url(),
        &cma_registry(&w.cma.url(), Some(&path)),
    ))
    .await;
    let ready = gateway.admin_plain("GET", "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    // Its first sync fails; it keeps serving the snapshot.
    w.cma.wait_for_calls(calls + 1).await;
    let stack = std::sync::Arc::clone(gateway.shared.stacks.get(0).unwrap());
    wait_until("the failed sync recorded", || {
        stack.status().consecutive_failures >= 1
    })
    .await;
    assert_eq!(gateway.version(), version);
    assert_forwarded(&gateway, PROD, "PROD from the snapshot").await;
    assert_refused(
        &gateway,
        STAGING,
        401,
        "token_revoked",
        "admin-revoked STAGING",
    )
    .await;
    assert_refused(&gateway, EXTRA, 401, "token_revoked", "deleted EXTRA").await;
    assert_refused(&gateway, NEVER_KNOWN, 401, "invalid_token", "unknown").await;
    let ready = gateway.admin_plain("GET", "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    let status = stack_status(&gateway).await;
    assert!(status["last_error"].is_string(), "{status}");
    assert!(status["snapshot_age_seconds"].is_u64(), "{status}");
    assert_eq!(status["tokens"], 2, "{status}");
}

#[tokio::test]
async fn without_a_snapshot_the_stack_waits_for_the_cma() {
    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    cma.set_mode(Mode::Status(500));
    let gateway = spawn_gateway(&config(&origin.url(), &cma_registry(&cma.url(), None))).await;
    cma.wait_for_calls(1).await;
    let ready = gateway.admin_plain("GET", "/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    let reply = cda(&gateway, PROD).await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.reason(), "registry_unavailable");
    assert_eq!(reply.json()["error_code"], 503);
    assert_eq!(origin.request_count(), 0);

    cma.set_mode(Mode::Normal);
    let report = sync(&gateway, "/admin/sync").await;
    assert!(report.get("error").is_none(), "{report}");
    assert_eq!(uids(&report, "added"), ["blt_prod", "blt_staging"]);
    let ready = gateway.admin_plain("GET", "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_forwarded(&gateway, PROD, "after the CMA recovered").await;
    assert_forwarded(&gateway, STAGING, "after the CMA recovered").await;
}

#[tokio::test]
async fn admin_sync_reports_each_kind_of_change() {
    let mut before = standard_tokens();
    before.push(cma::token_json(
        "blt_narrow",
        "Narrow",
        EXTRA,
        None,
        ("production", "blt_env_prod"),
        Some(&["main", "development"]),
        None,
    ));
    before.push(plain_token("blt_gone", EXTRA_B));
    let w = world(before, None).await;
    let gateway = &w.gateway;
    let preview = || {
        get(
            "preview.test",
            "/v3/content_types/page/entries",
            &[SITE, ("preview_token", PROD_PREVIEW), ("live_preview", "h")],
        )
    };
    let narrow_dev = || {
        get(
            "cdn.test",
            "/v3/content_types/page/entries",
            &[SITE, ("access_token", EXTRA), ("branch", "development")],
        )
    };
    assert_eq!(send(gateway.http, preview()).await.status, 200);
    assert_eq!(send(gateway.http, narrow_dev()).await.status, 200);
    let version = gateway.version();

    let after = vec![
        // blt_prod's preview token deleted alone.
        cma::token_json(
            "blt_prod",
            "Production",
            PROD,
            None,
            ("production", "blt_env_prod"),
            Some(&["main", "development"]),
            Some(&["deploy"]),
        ),
        // blt_staging renamed: a change that ends nothing.
        cma::token_json(
            "blt_staging",
            "Staging (renamed)",
            STAGING,
            None,
            ("staging", "blt_env_staging"),
            None,
            None,
        ),
        // blt_narrow loses a branch.
        cma::token_json(
            "blt_narrow",
            "Narrow",
            EXTRA,
            None,
            ("production", "blt_env_prod"),
            Some(&["main"]),
            None,
        ),
        // blt_gone deleted, blt_fresh created.
        plain_token("blt_fresh", FRESH),
    ];
    w.cma.set_tokens(after);
    let report = sync(gateway, "/admin/sync").await;
    assert!(report.get("error").is_none(), "{report}");
    assert_eq!(uids(&report, "added"), ["blt_fresh"], "{report}");
    assert_eq!(uids(&report, "removed"), ["blt_gone"], "{report}");
    assert_eq!(uids(&report, "preview_removed"), ["blt_prod"], "{report}");
    assert_eq!(uids(&report, "narrowed"), ["blt_narrow"], "{report}");
    assert_eq!(uids(&report, "changed"), ["blt_staging"], "{report}");
    assert!(uids(&report, "rotated").is_empty(), "{report}");
    assert!(uids(&report, "held_back").is_empty(), "{report}");
    assert_eq!(report["version"], version + 1, "{report}");
    assert_eq!(gateway.version(), version + 1);

    // What each change does to requests.
    assert_forwarded(gateway, FRESH, "added").await;
    assert_refused(gateway, EXTRA_B, 401, "token_revoked", "removed").await;
    assert_forwarded(gateway, PROD, "preview removed: delivery unaffected").await;
    let reply = send(gateway.http, preview()).await;
    assert_eq!(
        (reply.status.as_u16(), reply.reason()),
        (401, "token_revoked"),
        "{}",
        reply.text()
    );
    let reply = send(gateway.http, narrow_dev()).await;
    assert_eq!(
        (reply.status.as_u16(), reply.reason()),
        (422, "branch_out_of_scope"),
        "{}",
        reply.text()
    );
    assert_forwarded(gateway, EXTRA, "narrowed, main still allowed").await;
    assert_forwarded(gateway, STAGING, "renamed").await;

    let again = sync(gateway, "/admin/sync").await;
    assert!(again.get("error").is_none(), "{again}");
    assert_no_diff(&again);
    assert!(uids(&again, "held_back").is_empty(), "{again}");
    assert_eq!(again["version"], version + 1, "{again}");
}

#[tokio::test]
async fn a_mass_removal_is_held_back_until_the_next_sync_confirms_it() {
    let w = world(four_tokens(), None).await;
    let gateway = &w.gateway;
    let version = gateway.version();
    assert_eq!(metric(gateway, HELD_BACK).await, 0.0);

    w.cma.set_tokens(staging_only());
    let report = sync(gateway, "/admin/sync").await;
    assert!(report.get("error").is_none(), "{report}");
    assert_eq!(
        uids(&report, "held_back"),
        ["blt_a", "blt_b", "blt_prod"],
        "{report}"
    );
    assert_no_diff(&report);
    assert_eq!(report["version"], version, "{report}");
    for (token, what) in [(PROD, "PROD"), (EXTRA, "blt_a"), (EXTRA_B, "blt_b")] {
        assert_forwarded(gateway, token, &format!("{what} held back")).await;
    }
    assert_eq!(metric(gateway, HELD_BACK).await, 3.0);
    let status = stack_status(gateway).await;
    assert_eq!(
        uids(&status, "held_back_removals"),
        ["blt_a", "blt_b", "blt_prod"],
        "{status}"
    );
    assert_eq!(status["tokens"], 4, "{status}");

    // The same list again confirms it.
    let report = sync(gateway, "/admin/sync").await;
    assert!(report.get("error").is_none(), "{report}");
    assert_eq!(
        uids(&report, "removed"),
        ["blt_a", "blt_b", "blt_prod"],
        "{report}"
    );
    assert!(uids(&report, "held_back").is_empty(), "{report}");
    assert_eq!(report["version"], version + 1, "{report}");
    for (token, what) in [(PROD, "PROD"), (EXTRA, "blt_a"), (EXTRA_B, "blt_b")] {
        assert_refused(gateway, token, 401, "token_revoked", what).await;
    }
    assert_forwarded(gateway, STAGING, "STAGING kept").await;
    assert_eq!(metric(gateway, HELD_BACK).await, 0.0);
    let status = stack_status(gateway).await;
    assert!(uids(&status, "held_back_removals").is_empty(), "{status}");
    assert_eq!(status["tokens"], 1, "{status}");
}

#[tokio::test]
async fn force_applies_a_held_back_removal_at_once() {
    let w = world(four_tokens(), None).await;
    let gateway = &w.gateway;
    let version = gateway.version();
    w.cma.set_tokens(staging_only());
    let report = sync(gateway, "/admin/sync?force=true").await;
    assert!(report.get("error").is_none(), "{report}");
    assert_eq!(
        uids(&report, "removed"),
        ["blt_a", "blt_b", "blt_prod"],
        "{report}"
    );
    assert!(uids(&report, "held_back").is_empty(), "{report}");
    assert_eq!(report["version"], version + 1, "{report}");
    assert_refused(gateway, PROD, 401, "token_revoked", "forced").await;
    assert_refused(gateway, EXTRA, 401, "token_revoked", "forced").await;
    assert_forwarded(gateway, STAGING, "STAGING kept").await;
    assert_eq!(metric(gateway, HELD_BACK).await, 0.0);
}

#[tokio::test]
async fn a_briefly_empty_list_is_held_back() {
    let w = world(four_tokens(), None).await;
    let gateway = &w.gateway;
    let version = gateway.version();
    w.cma.set_mode(Mode::Empty);
    let report = sync(gateway, "/admin/sync").await;
    assert!(report.get("error").is_none(), "{report}");
    assert_eq!(
        uids(&report, "held_back"),
        ["blt_a", "blt_b", "blt_prod", "blt_staging"],
        "{report}"
    );
    assert_no_diff(&report);
    assert_eq!(report["version"], version, "{report}");
    assert_forwarded(gateway, PROD, "empty list held back").await;
    assert_forwarded(gateway, STAGING, "empty list held back").await;
    assert_eq!(metric(gateway, HELD_BACK).await, 4.0);

    // The CMA lists everything again: nothing was removed, nothing is pending.
    w.cma.set_mode(Mode::Normal);
    let report = sync(gateway, "/admin/sync").await;
    assert_no_diff(&report);
    assert!(uids(&report, "held_back").is_empty(), "{report}");
    assert_eq!(report["version"], version, "{report}");
    assert_eq!(metric(gateway, HELD_BACK).await, 0.0);
    assert_forwarded(gateway, PROD, "after the CMA recovered").await;
}

#[tokio::test]
async fn a_tokens_file_is_followed_and_a_broken_one_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokens.json");
    write_tokens_file(&path, &token_list(standard_tokens()));
    let origin = origin::spawn_origin().await;
    let registry = format!("tokens_file = \"{}\"\n", path.display());
    let gateway = spawn_ready(&config(&origin.url(), &registry)).await;
    let g = &gateway;
    assert_forwarded(g, PROD, "from the file").await;
    assert_forwarded(g, STAGING, "from the file").await;

    write_tokens_file(&path, &token_list(staging_only()));
    eventually("PROD revoked after the file dropped it", || async move {
        try_cda(g, PROD)
            .await
            .is_some_and(|r| r.reason() == "token_revoked")
    })
    .await;
    assert_forwarded(g, STAGING, "still listed").await;
    let version = g.version();

    write_tokens_file(&path, br#"{"tokens": ["#);
    eventually("the broken file reported", || async move {
        stack_status(g).await["last_error"].is_string()
    })
    .await;
    assert_eq!(g.version(), version);
    assert_forwarded(g, STAGING, "broken file").await;
    assert_refused(g, PROD, 401, "token_revoked", "broken file").await;
    assert_eq!(stack_status(g).await["tokens"], 1);

    let mut tokens = standard_tokens();
    tokens.push(plain_token("blt_fresh", FRESH));
    write_tokens_file(&path, &token_list(tokens));
    eventually("the new file loaded", || async move {
        try_cda(g, FRESH).await.is_some_and(|r| r.status == 200)
    })
    .await;
    assert_forwarded(g, PROD, "listed again").await;
    assert_forwarded(g, STAGING, "still listed").await;
    let status = stack_status(g).await;
    assert!(status["last_error"].is_null(), "{status}");
    assert_eq!(status["tokens"], 3, "{status}");
}

/// A gateway following a tokens file that lists the four tokens; the file
/// then drops three of them (more than the default ratio of 0.5), and the
/// first poll holds the removal back.
async fn file_world_with_held_back_removal(dir: &Path) -> (TestGateway, origin::Origin) {
    let path = dir.join("tokens.json");
    write_tokens_file(&path, &token_list(four_tokens()));
    let origin = origin::spawn_origin().await;
    let registry = format!("tokens_file = \"{}\"\n", path.display());
    let gateway = spawn_ready(&config(&origin.url(), &registry)).await;
    write_tokens_file(&path, &token_list(staging_only()));
    eventually("the removal held back", || {
        let g = &gateway;
        async move { !uids(&stack_status(g).await, "held_back_removals").is_empty() }
    })
    .await;
    (gateway, origin)
}

#[tokio::test]
async fn a_mass_removal_in_the_tokens_file_is_confirmed_by_the_next_poll() {
    let dir = tempfile::tempdir().unwrap();
    let (gateway, _origin) = file_world_with_held_back_removal(dir.path()).await;
    let g = &gateway;
    // The file keeps saying so: the next poll (a second later) confirms it.
    eventually("the held-back removal applied", || async move {
        let status = stack_status(g).await;
        if status["tokens"] == 1 {
            return true;
        }
        assert!(
            !uids(&status, "held_back_removals").is_empty(),
            "the held-back removal was dropped without being applied: {status}"
        );
        false
    })
    .await;
    assert_refused(g, PROD, 401, "token_revoked", "removal confirmed").await;
    assert_refused(g, EXTRA, 401, "token_revoked", "removal confirmed").await;
    assert_forwarded(g, STAGING, "still listed").await;
}

#[tokio::test]
async fn force_applies_a_removal_held_back_from_the_tokens_file() {
    let dir = tempfile::tempdir().unwrap();
    let (gateway, _origin) = file_world_with_held_back_removal(dir.path()).await;
    let report = sync(&gateway, "/admin/sync?force=true").await;
    assert!(report.get("error").is_none(), "{report}");
    assert!(uids(&report, "held_back").is_empty(), "{report}");
    assert_refused(&gateway, PROD, 401, "token_revoked", "forced").await;
    assert_refused(&gateway, EXTRA_B, 401, "token_revoked", "forced").await;
    assert_forwarded(&gateway, STAGING, "still listed").await;
    assert_eq!(stack_status(&gateway).await["tokens"], 1);
}

/// Admin revocations answered 200 are persisted, however many arrive at once.
/// Three rounds, because a lost write is a race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_admin_revocations_all_survive_a_restart() {
    const N: usize = 40;
    let value = |i: usize| format!("cs_many_value_{i:03}");
    let tokens: Vec<Value> = (0..N)
        .map(|i| plain_token(&format!("blt_many_{i:03}"), &value(i)))
        .collect();
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("website.json");
        let w = world(tokens.clone(), Some(&path)).await;
        wait_for_snapshot(&w.gateway).await;
        let g = &w.gateway;
        let revocations = (0..N).map(|i| async move {
            g.admin("POST", &format!("/admin/tokens/blt_many_{i:03}/revoke"))
                .await
                .status
        });
        let statuses = futures_util::future::join_all(revocations).await;
        assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
        let status = stack_status(g).await;
        assert!(w.gateway.stop(Duration::from_secs(5)).await);

        w.cma.set_mode(Mode::Status(500));
        let origin = origin::spawn_origin().await;
        let registry = cma_registry(&w.cma.url(), Some(&path));
        let restarted = spawn_gateway(&config(&origin.url(), &registry)).await;
        let ready = restarted.admin_plain("GET", "/readyz").await;
        assert_eq!(
            ready.status,
            200,
            "round {round}: the snapshot was not usable: {}",
            ready.text()
        );
        let mut live = Vec::new();
        for i in 0..N {
            let reply = cda(&restarted, &value(i)).await;
            if reply.reason() != "token_revoked" {
                live.push(format!("blt_many_{i:03}"));
            }
        }
        assert!(
            live.is_empty(),
            "round {round}: revocations lost across the restart: {live:?}"
        );
        assert!(
            status["snapshot_error"].is_null(),
            "round {round}: a snapshot write failed: {status}"
        );
    }
}

#[tokio::test]
async fn the_admin_api_needs_its_bearer_and_shows_no_values() {
    let dir = tempfile::tempdir().unwrap();
    let w = world(standard_tokens(), Some(&dir.path().join("website.json"))).await;
    let gateway = &w.gateway;
    wait_for_snapshot(gateway).await;
    let with_auth = |method: &str, path: &str, auth: &str| {
        http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "admin")
            .header("authorization", auth)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    let calls = w.cma.call_count();
    for (method, path) in [
        ("GET", "/admin/tokens"),
        ("GET", "/admin/stacks"),
        ("POST", "/admin/sync"),
        ("POST", "/admin/tokens/blt_prod/revoke"),
        ("DELETE", "/admin/tokens/blt_prod/revoke"),
    ] {
        let reply = gateway.admin_plain(method, path).await;
        assert_eq!(reply.status, 401, "{method} {path} without a bearer");
        for auth in [
            "Bearer wrong-bearer".to_owned(),
            format!("Bearer {ADMIN_TOKEN}x"),
            format!("Basic {ADMIN_TOKEN}"),
            ADMIN_TOKEN.to_owned(),
        ] {
            let reply = send(gateway.admin, with_auth(method, path, &auth)).await;
            assert_eq!(reply.status, 401, "{method} {path} with {auth:?}");
        }
    }
    assert_eq!(
        w.cma.call_count(),
        calls,
        "an unauthorized sync reached the CMA"
    );
    assert_forwarded(gateway, PROD, "an unauthorized revoke did nothing").await;

    for path in ["/healthz", "/readyz", "/metrics"] {
        let reply = gateway.admin_plain("GET", path).await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
    }

    let reply = gateway.admin("GET", "/admin/tokens").await;
    assert_eq!(reply.status, 200);
    assert_no_value(&reply.text(), "/admin/tokens");
    let body = reply.json();
    let tokens = body["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2, "{body}");
    let find = |uid: &str| {
        tokens
            .iter()
            .find(|t| t["uid"] == uid)
            .unwrap_or_else(|| panic!("{uid} not in {body}"))
            .clone()
    };
    let prod = find("blt_prod");
    assert_eq!(prod["name"], "Production");
    assert_eq!(prod["stack"], "website");
    assert_eq!(prod["environment"]["name"], "production", "{prod}");
    assert_eq!(prod["environment"]["uid"], "blt_env_prod", "{prod}");
    // Scopes are kept sorted.
    assert_eq!(prod["branches"], json!(["development", "main"]));
    assert_eq!(prod["aliases"], json!(["deploy"]));
    assert_eq!(prod["has_preview"], true);
    assert_eq!(prod["revoked"], false);
    assert_eq!(prod["live_sessions"], 0);
    let staging = find("blt_staging");
    assert_eq!(staging["name"], "Staging");
    assert_eq!(staging["environment"]["name"], "staging", "{staging}");
    assert_eq!(staging["has_preview"], false);
    assert_eq!(staging["revoked"], false);
    for token in tokens {
        for key in [
            "uid",
            "name",
            "stack",
            "environment",
            "branches",
            "aliases",
            "has_preview",
            "revoked",
            "live_sessions",
        ] {
            assert!(token.get(key).is_some(), "{key} missing in {token}");
        }
    }

    let status = stack_status(gateway).await;
    assert_no_value(&status.to_string(), "/admin/stacks");
    assert_eq!(status["tokens"], 2, "{status}");
    assert_eq!(status["registry_version"], gateway.version(), "{status}");
    assert!(status["last_success"].is_u64(), "{status}");
    assert!(status["last_error"].is_null(), "{status}");
    assert!(status["snapshot_age_seconds"].is_u64(), "{status}");
    assert!(uids(&status, "held_back_removals").is_empty(), "{status}");

    for method in ["POST", "DELETE"] {
        let reply = gateway
            .admin(method, "/admin/tokens/unknown_uid/revoke")
            .await;
        assert_eq!(reply.status, 404, "{method} unknown uid: {}", reply.text());
    }

    let reply = gateway.admin("POST", "/admin/tokens/blt_prod/revoke").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_no_value(&reply.text(), "revoke answer");
    assert_refused(gateway, PROD, 401, "token_revoked", "admin revoked").await;
    let listed = gateway.admin("GET", "/admin/tokens").await.json();
    let prod = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["uid"] == "blt_prod")
        .cloned()
        .unwrap_or_else(|| panic!("blt_prod gone from {listed}"));
    assert_eq!(prod["revoked"], true, "{prod}");

    let reply = gateway
        .admin("DELETE", "/admin/tokens/blt_prod/revoke")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_forwarded(gateway, PROD, "revocation lifted").await;
    assert_forwarded(gateway, STAGING, "never revoked").await;
    // The lift moved the registry's version; the gauge follows it at once.
    let version = stack_status(gateway).await["registry_version"].clone();
    assert_eq!(version, gateway.version(), "after the lift");
    assert_eq!(
        metric(gateway, "stackgate_registry_version{stack=\"website\"}").await,
        gateway.version() as f64,
        "the gauge after the lift"
    );
}

#[tokio::test]
async fn no_token_value_leaks_into_logs_metrics_or_admin_answers() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("website.json");
    let mut tokens = standard_tokens();
    tokens.push(plain_token("blt_extra", EXTRA));
    let w = world(tokens, Some(&snapshot)).await;
    let gateway = &w.gateway;
    let mut answers = Vec::new();

    // Traffic, allowed and refused.
    let requests = [
        get("cdn.test", "/v3/x", &[SITE, ("access_token", PROD)]),
        get(
            "preview.test",
            "/v3/x",
            &[SITE, ("preview_token", PROD_PREVIEW), ("live_preview", "h")],
        ),
        get("cdn.test", "/v3/x", &[SITE, ("access_token", PROD_PREVIEW)]),
        get(
            "cdn.test",
            &format!("/v3/x?access_token={PROD}&api_key={API_KEY}"),
            &[],
        ),
        get(
            "cdn.test",
            "/v3/x",
            &[
                SITE,
                ("access_token", STAGING),
                ("authorization", &format!("Bearer {CMA_SECRET}")),
            ],
        ),
        get(
            "cdn.test",
            "/v3/x",
            &[SITE, ("access_token", STAGING), ("authtoken", CMA_SECRET)],
        ),
        get(
            "cdn.test",
            "/v3/x?environment=production",
            &[SITE, ("access_token", STAGING)],
        ),
        get(
            "cdn.test",
            "/v3/x",
            &[SITE, ("access_token", STAGING), ("branch", "feature")],
        ),
        get(
            "cdn.test",
            "/v3/x",
            &[("api_key", "blt_nope"), ("access_token", PROD)],
        ),
        get("cdn.test", "/v3/x", &[SITE, ("access_token", NEVER_KNOWN)]),
        get(
            "preview.test",
            "/v3/x",
            &[
                SITE,
                ("access_token", STAGING),
                ("preview_token", PROD_PREVIEW),
            ],
        ),
    ];
    for request in requests {
        answers.push(send(gateway.http, request).await.text());
    }

    // Failed syncs, one of them on a list whose bad entries hold values.
    for mode in [Mode::Status(500), Mode::InvalidJson, Mode::Status(401)] {
        w.cma.set_mode(mode);
        answers.push(gateway.admin("POST", "/admin/sync").await.text());
    }
    w.cma.set_mode(Mode::Normal);
    w.cma.set_tokens(vec![
        json!({ "uid": "blt_bad", "token": PROD, "scope": PROD_PREVIEW }),
        json!({ "uid": ["blt_bad"], "token": STAGING, "name": EXTRA }),
    ]);
    let report = sync(gateway, "/admin/sync").await;
    assert!(report["error"].is_string(), "{report}");
    answers.push(report.to_string());

    // A removal, an admin revocation, and requests with what they revoked.
    w.cma.set_tokens(standard_tokens());
    answers.push(gateway.admin("POST", "/admin/sync").await.text());
    answers.push(
        gateway
            .admin("POST", "/admin/tokens/blt_staging/revoke")
            .await
            .text(),
    );
    assert_refused(gateway, EXTRA, 401, "token_revoked", "deleted").await;
    assert_refused(gateway, STAGING, 401, "token_revoked", "admin revoked").await;
    assert_forwarded(gateway, PROD, "still listed").await;

    answers.push(gateway.admin("GET", "/admin/tokens").await.text());
    answers.push(gateway.admin("GET", "/admin/stacks").await.text());
    answers.push(gateway.metrics().await);
    for (i, answer) in answers.iter().enumerate() {
        assert_no_value(answer, &format!("answer #{i}"));
    }
    assert_no_value(&std::fs::read_to_string(&snapshot).unwrap(), "the snapshot");
    let logs = logs();
    assert!(!logs.is_empty(), "no logs captured");
    assert_no_value(&logs, "the logs");
}

/// `"persisted": false` when the snapshot cannot be written (its path lies
/// under a regular file: tests run as root, so a read-only directory would
/// not fail): the revocation still takes effect at once, a warning is logged,
/// and the failure is counted.
#[tokio::test]
async fn a_failed_snapshot_write_answers_not_persisted_and_is_counted() {
    const FAILED: &str = r#"stackgate_snapshot_write_failures_total{stack="website"}"#;
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-directory");
    std::fs::write(&blocker, b"a regular file").unwrap();
    let path = blocker.join("website.json");
    let w = world(standard_tokens(), Some(&path)).await;
    let stack = std::sync::Arc::clone(w.gateway.shared.stacks.get(0).unwrap());
    wait_until("the first snapshot write failed", || {
        stack.status().snapshot_error.is_some()
    })
    .await;
    let before = metric(&w.gateway, FAILED).await;
    assert!(before >= 1.0, "the first failed write was not counted");

    let reply = w
        .gateway
        .admin("POST", "/admin/tokens/blt_staging/revoke")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["persisted"], false, "{}", reply.text());
    assert_eq!(reply.json()["revoked"], true, "{}", reply.text());
    assert_refused(&w.gateway, STAGING, 401, "token_revoked", "revoked").await;
    assert!(metric(&w.gateway, FAILED).await > before);
    assert!(
        logs()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("website") && l.contains("not persisted")),
        "no warning that the revocation is not persisted"
    );
    assert!(!path.exists());
}

/// Without a `snapshot` path an admin revocation lives only in memory: the
/// answer says so.
#[tokio::test]
async fn without_a_snapshot_a_revocation_is_not_persisted() {
    let w = world(standard_tokens(), None).await;
    let reply = w
        .gateway
        .admin("POST", "/admin/tokens/blt_prod/revoke")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["persisted"], false, "{}", reply.text());
    assert_refused(&w.gateway, PROD, 401, "token_revoked", "revoked").await;
}

/// A snapshot with out-of-range fields (an absurd `synced_at`, `version`)
/// is rejected whole with a log line naming it, never a panic; the CMA decides.
#[tokio::test]
async fn a_snapshot_with_absurd_fields_is_rejected_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("website.json");
    {
        let w = world(standard_tokens(), Some(&path)).await;
        wait_for_snapshot(&w.gateway).await;
        assert!(w.gateway.stop(Duration::from_secs(5)).await);
    }
    let good: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for (field, value) in [
        ("synced_at", json!(u64::MAX)),
        ("version", json!(u64::MAX)),
        ("synced_at", json!(i64::MAX)),
    ] {
        let mut file = good.clone();
        file[field] = value;
        std::fs::write(&path, file.to_string()).unwrap();
        let origin = origin::spawn_origin().await;
        let cma = cma::spawn_cma().await;
        cma.set_tokens(staging_only());
        cma.set_mode(Mode::Status(500));
        let gateway = spawn_gateway(&config(
            &origin.url(),
            &cma_registry(&cma.url(), Some(&path)),
        ))
        .await;
        let ready = gateway.admin_plain("GET", "/readyz").await;
        assert_eq!(ready.status, 503, "{field}: the bad snapshot was served");
        assert!(
            logs()
                .lines()
                .any(|l| l.contains("snapshot not used") && l.contains(field)),
            "{field}: no log line names the rejected snapshot"
        );
        cma.set_mode(Mode::Normal);
        let report = sync(&gateway, "/admin/sync").await;
        assert!(report.get("error").is_none(), "{report}");
        assert_refused(&gateway, PROD, 401, "invalid_token", "the CMA decides").await;
        assert_forwarded(&gateway, STAGING, "the CMA decides").await;
    }
}
