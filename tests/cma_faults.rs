//! The registry through a misbehaving CMA: the rate limit's
//! `Retry-After`, a hanging CMA, staleness that fails closed and recovers,
//! a bad credential logged once, and several stacks sharing the budget.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::{Duration, Instant};

use support::*;

fn registry(cma: &str, interval: &str, extra: &str) -> String {
    format!(
        "cma_url = \"{cma}\"\nauth = \"authtoken\"\ncredential_env = \"STACKGATE_CMA_AUTHTOKEN\"\nsync_interval = \"{interval}\"\n{extra}"
    )
}

async fn status(gateway: &TestGateway, token: &str) -> (u16, String) {
    let reply = send(
        gateway.http,
        get(
            "cdn.test",
            "/v3/x",
            &[("api_key", API_KEY), ("access_token", token)],
        ),
    )
    .await;
    (reply.status.as_u16(), reply.reason().to_owned())
}

#[tokio::test]
async fn retry_after_holds_back_the_next_cma_request() {
    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    let gateway = spawn_ready(&config(&origin.url(), &registry(&cma.url(), "1h", ""))).await;

    cma.set_mode(cma::Mode::RateLimited {
        retry_after_secs: 2,
    });
    let limited = gateway.admin("POST", "/admin/sync").await.json();
    assert!(
        limited["stacks"]["website"]["error"]
            .as_str()
            .unwrap()
            .contains("429"),
        "{limited}"
    );
    let refused_at = Instant::now();
    let calls = cma.call_count();

    cma.set_mode(cma::Mode::Normal);
    let report = gateway.admin("POST", "/admin/sync").await.json();
    assert!(report["stacks"]["website"]["error"].is_null(), "{report}");
    assert_eq!(cma.call_count(), calls + 1);
    assert!(
        refused_at.elapsed() >= Duration::from_millis(1900),
        "the CMA was asked again {:?} after a Retry-After of 2 s",
        refused_at.elapsed()
    );
    assert_eq!(
        status(&gateway, PROD).await.0,
        200,
        "the registry served throughout"
    );
}

#[tokio::test]
async fn a_spent_organization_budget_holds_back_the_next_request() {
    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    let gateway = spawn_ready(&config(&origin.url(), &registry(&cma.url(), "1h", ""))).await;
    cma.set_rate_limit_remaining(Some(0));
    gateway.admin("POST", "/admin/sync").await;
    let answered = Instant::now();
    cma.set_rate_limit_remaining(None);
    gateway.admin("POST", "/admin/sync").await;
    assert!(
        answered.elapsed() >= Duration::from_millis(900),
        "asked again {:?} after X-RateLimit-Remaining: 0",
        answered.elapsed()
    );
}

#[tokio::test]
async fn an_outage_is_polled_with_backoff() {
    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    // Every 100 ms when healthy.
    let gateway = spawn_ready(&config(&origin.url(), &registry(&cma.url(), "100ms", ""))).await;
    let before = cma.call_count();
    cma.set_mode(cma::Mode::Status(500));
    let outage = Instant::now();
    // Wait out 2 s of outage (polling the gateway, which keeps serving).
    while outage.elapsed() < Duration::from_secs(2) {
        assert_eq!(status(&gateway, PROD).await.0, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls = cma.call_count() - before;
    // Without backoff: ~20 calls. Doubling from 100 ms (±20%): at most ~5.
    assert!(calls <= 7, "{calls} CMA calls in 2 s of outage");
    assert!(calls >= 2, "the CMA was not retried ({calls} calls)");
    let metrics = gateway.metrics().await;
    assert!(!metrics.contains("stackgate_registry_sync_failures_total{stack=\"website\"} 0"));
}

#[tokio::test]
async fn a_hanging_cma_times_out_and_changes_nothing() {
    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    // sync_interval 1s: a page may take at most 1 s.
    let gateway = spawn_ready(&config(&origin.url(), &registry(&cma.url(), "1s", ""))).await;
    let version = gateway.version();
    cma.set_tokens(vec![]);
    cma.set_mode(cma::Mode::Hang);
    let started = Instant::now();
    let report = gateway.admin("POST", "/admin/sync").await.json();
    let error = report["stacks"]["website"]["error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(error.contains("did not answer"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(8));
    assert_eq!(gateway.version(), version);
    assert_eq!(status(&gateway, PROD).await.0, 200);
    let stacks = gateway.admin("GET", "/admin/stacks").await.json();
    assert!(
        stacks["stacks"][0]["consecutive_failures"]
            .as_u64()
            .unwrap()
            >= 1,
        "{stacks}"
    );
}

#[tokio::test]
async fn a_stale_registry_fails_closed_and_recovers_by_itself() {
    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    let gateway = spawn_ready(&config(
        &origin.url(),
        &registry(&cma.url(), "200ms", "max_staleness = \"1s\"\n"),
    ))
    .await;
    assert_eq!(status(&gateway, PROD).await.0, 200);

    cma.set_mode(cma::Mode::Status(503));
    wait_until_async(|| async { status(&gateway, PROD).await.0 == 503 }).await;
    let forwarded = origin.request_count();
    assert_eq!(status(&gateway, PROD).await.1, "registry_stale");
    assert_eq!(status(&gateway, STAGING).await.1, "registry_stale");
    assert_eq!(
        origin.request_count(),
        forwarded,
        "nothing is forwarded while stale"
    );

    // The CMA recovers: the next scheduled sync makes the stack fresh again.
    cma.set_mode(cma::Mode::Normal);
    wait_until_async(|| async { status(&gateway, PROD).await.0 == 200 }).await;
    assert_eq!(status(&gateway, STAGING).await.0, 200);
}

#[tokio::test]
async fn a_bad_credential_is_logged_once_per_streak() {
    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    let text = config(&origin.url(), &registry(&cma.url(), "1h", ""))
        .replace("name = \"website\"", "name = \"credlog\"");
    let gateway = spawn_ready(&text).await;
    cma.set_mode(cma::Mode::Status(401));
    for _ in 0..4 {
        let report = gateway.admin("POST", "/admin/sync").await.json();
        assert!(
            report["stacks"]["credlog"]["error"]
                .as_str()
                .unwrap()
                .contains("credential"),
            "{report}"
        );
    }
    let lines = logs()
        .lines()
        .filter(|l| l.contains("credlog") && l.contains("registry sync failed"))
        .count();
    assert_eq!(
        lines, 1,
        "a bad credential must be logged once, not per poll"
    );
    assert_eq!(status(&gateway, PROD).await.0, 200);
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("stackgate_registry_sync_failures_total{stack=\"credlog\"} 4"),
        "{metrics}"
    );
}

#[tokio::test]
async fn several_stacks_share_one_cma_budget() {
    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    let mut text = config(&origin.url(), &registry(&cma.url(), "1h", ""));
    for i in 0..9 {
        text.push_str(&format!(
            "\n[[stacks]]\nname = \"extra{i}\"\napi_key = \"blt_extra_{i}\"\n[stacks.registry]\n{}",
            registry(&cma.url(), "1h", "")
        ));
    }
    let started = Instant::now();
    let gateway = spawn_ready(&text).await;
    // Ten stacks' first syncs, one page each, at most five a second.
    assert!(cma.call_count() >= 10);
    assert!(
        started.elapsed() >= Duration::from_millis(1700),
        "10 CMA requests went out in {:?}: faster than 5 a second",
        started.elapsed()
    );
    assert_eq!(status(&gateway, PROD).await.0, 200);
}

/// Polls an async condition every 20 ms until it holds; panics after 10 s.
async fn wait_until_async<F, Fut>(mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(Instant::now() < deadline, "condition not met within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The kill switch never waits on the CMA. With a sync stuck halfway through
/// a page (a page may take 20 s here), an admin revocation answers, cuts the
/// token's live stream and refuses the token while the page is still held;
/// and the sync, once the page ends, does not undo it.
#[tokio::test]
async fn an_admin_revocation_does_not_wait_for_a_sync_stuck_mid_page() {
    use http_body_util::BodyExt;

    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    let gateway = spawn_ready(&config(&origin.url(), &registry(&cma.url(), "1h", ""))).await;

    // A live stream of the token about to be revoked.
    let stream = tokio::net::TcpStream::connect(gateway.http).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = sender
        .send_request(get(
            "cdn.test",
            "/stream?chunks=400&interval_ms=50",
            &[("api_key", API_KEY), ("access_token", PROD)],
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    assert!(body.frame().await.unwrap().is_ok(), "the stream started");

    // A sync whose page stops halfway (it lists one more token).
    let mut tokens = standard_tokens();
    tokens.push(cma::token_json(
        "blt_extra",
        "Extra",
        "cs_extra_delivery_value_9z",
        None,
        ("production", "blt_env_prod"),
        None,
        None,
    ));
    cma.set_tokens(tokens);
    cma.set_mode(cma::Mode::HangMidPage);
    let admin = gateway.admin;
    let sync = tokio::spawn(async move {
        let request = http::Request::builder()
            .method("POST")
            .uri("/admin/sync")
            .header("host", "admin")
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        send(admin, request).await
    });
    cma.wait_for_hung(1).await;

    let revoked = gateway.admin("POST", "/admin/tokens/blt_prod/revoke").await;
    assert_eq!(revoked.status, 200, "{}", revoked.text());
    assert!(
        !sync.is_finished(),
        "the revocation answered only once the sync had ended"
    );
    assert_eq!(
        cma.hanging(),
        1,
        "the revocation answered only once the CMA page ended"
    );
    assert_eq!(
        revoked.json()["sessions_cancelled"],
        1,
        "{}",
        revoked.text()
    );
    let changed = logs()
        .lines()
        .filter(|l| l.contains("registry changed") && l.contains("stack=website"))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert!(
        changed.iter().any(|l| l.contains("sessions_cancelled=1")),
        "the log does not count the stream the revocation cut: {changed:?}"
    );
    // The live stream ends in an error, and the token is refused, while
    // the page is still held.
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(_)) => return true,
                None => return false,
            }
        }
    })
    .await
    .expect("the revoked stream went on");
    assert!(cut, "the revoked stream ran to its end");
    assert_eq!(
        status(&gateway, PROD).await,
        (401, "token_revoked".to_owned())
    );
    assert_eq!(cma.hanging(), 1, "the CMA page is still held");
    assert!(!sync.is_finished(), "the sync is still fetching");

    // The page ends; the sync applies its list over the revocation.
    cma.release();
    let report = sync.await.unwrap().json();
    assert!(report["stacks"]["website"]["error"].is_null(), "{report}");
    assert_eq!(
        report["stacks"]["website"]["added"][0], "blt_extra",
        "{report}"
    );
    assert_eq!(
        status(&gateway, PROD).await,
        (401, "token_revoked".to_owned()),
        "the sync that fetched before the revocation undid it"
    );
    assert_eq!(status(&gateway, "cs_extra_delivery_value_9z").await.0, 200);
    let listed = gateway.admin("GET", "/admin/tokens").await.json();
    let prod = listed_token(&listed, "blt_prod");
    assert_eq!(prod["revoked"], true, "{listed}");
}
