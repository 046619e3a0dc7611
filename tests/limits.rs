//! Rate limits end to end (SPEC §6, row 15 of §3): per token, per stack
//! origin, and failed authentications per client IP, over loopback with the
//! fake CMA and origin. The smallest rate is one per second, so the tests
//! only rely on a burst being spent at once; where a cell could come back
//! during a slow run, the bound allows for the time that passed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Instant;

use serde_json::Value;
use support::*;

struct World {
    gateway: TestGateway,
    origin: origin::Origin,
    cma: cma::FakeCma,
}

/// A gateway whose stack has `limits` as its `[stacks.limits]` body (and
/// whatever `[[stacks.limits.overrides]]` follow it).
async fn world(limits: &str) -> World {
    let origin = origin::spawn_origin().await;
    let cma = cma::spawn_cma().await;
    cma.set_tokens(standard_tokens());
    let registry = format!(
        "{}\n[stacks.limits]\n{limits}\n",
        cma_registry(&cma.url(), None)
    );
    let gateway = spawn_ready(&config(&origin.url(), &registry)).await;
    World {
        gateway,
        origin,
        cma,
    }
}

const SITE: (&str, &str) = ("api_key", API_KEY);

async fn entries(w: &World, token: &str) -> Reply {
    send(
        w.gateway.http,
        get(
            "cdn.test",
            "/v3/content_types/blog/entries",
            &[SITE, ("access_token", token)],
        ),
    )
    .await
}

/// Sends with `token` until refused (at most `max`); returns how many got
/// through and the refusal.
async fn until_refused(w: &World, token: &str, max: usize) -> (usize, Reply) {
    for sent in 0..max {
        let reply = entries(w, token).await;
        if reply.status != 200 {
            return (sent, reply);
        }
    }
    panic!("{max} requests with no refusal");
}

/// How many cells a bucket refilling `rate` a second, first used after
/// `since`, can have got back by now.
fn refilled(since: Instant, rate: u32) -> usize {
    (since.elapsed().as_secs_f64() * f64::from(rate)).floor() as usize
}

fn assert_rate_limited(reply: &Reply, limit: &str) {
    assert_eq!(reply.status, 429, "{}", reply.text());
    assert_eq!(reply.reason(), "rate_limited");
    let retry_after: u64 = reply.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1, "Retry-After {retry_after}");
    assert_eq!(reply.headers["x-ratelimit-limit"], limit);
    assert_eq!(reply.headers["x-ratelimit-remaining"], "0");
    let body = reply.json();
    assert_eq!(body["error_code"], 429);
    assert!(body["error_message"].is_string());
    assert!(body["errors"].is_object());
}

fn token_usage(tokens: &Value, uid: &str) -> (u64, u64) {
    let token = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["uid"] == uid)
        .unwrap_or_else(|| panic!("{uid} not listed in {tokens}"));
    (
        token["requests"].as_u64().unwrap(),
        token["rejections"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn a_token_over_its_limit_gets_429_and_nothing_reaches_the_origin() {
    let w = world("per_token = { rate = 1, burst = 3 }").await;
    let started = Instant::now();
    let (allowed, refused) = until_refused(&w, PROD, 20).await;
    assert!(
        (3..=3 + refilled(started, 1)).contains(&allowed),
        "{allowed} allowed"
    );
    assert_rate_limited(&refused, "1");
    assert_eq!(
        w.origin.request_count(),
        allowed,
        "the refusal was not forwarded"
    );

    // Another token has its own bucket.
    let other = entries(&w, STAGING).await;
    assert_eq!(other.status, 200, "{}", other.text());
    assert_eq!(w.origin.request_count(), allowed + 1);

    let metrics = w.gateway.metrics().await;
    assert!(
        metrics.contains(r#"stackgate_rejections_total{reason="rate_limited",stack="website"} 1"#),
        "{metrics}"
    );
    let tokens = w.gateway.admin("GET", "/admin/tokens").await.json();
    assert_eq!(token_usage(&tokens, "blt_prod"), (allowed as u64 + 1, 1));
    assert_eq!(token_usage(&tokens, "blt_staging"), (1, 0));
    let logs = logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("reason=\"rate_limited\"") && l.contains("blt_prod")),
        "the refusal is in the access log"
    );
    assert_eq!(w.gateway.shared.limits.tracked_tokens(0), 2);
}

#[tokio::test]
async fn overrides_by_name_and_by_uid_change_the_budget() {
    let w = world(
        "per_token = { rate = 1, burst = 1 }\n\
         [[stacks.limits.overrides]]\ntoken = \"Production\"\nrate = 2\nburst = 5\n\
         [[stacks.limits.overrides]]\ntoken = \"blt_staging\"\nrate = 3\nburst = 3\n",
    )
    .await;
    let started = Instant::now();
    let (by_name, refused) = until_refused(&w, PROD, 30).await;
    assert!(
        (5..=5 + refilled(started, 2)).contains(&by_name),
        "{by_name} allowed by name"
    );
    assert_rate_limited(&refused, "2");

    let started = Instant::now();
    let (by_uid, refused) = until_refused(&w, STAGING, 30).await;
    assert!(
        (3..=3 + refilled(started, 3)).contains(&by_uid),
        "{by_uid} allowed by uid"
    );
    assert_rate_limited(&refused, "3");
    assert_eq!(w.origin.request_count(), by_name + by_uid);
}

#[tokio::test]
async fn the_origin_limit_caps_the_sum_across_tokens() {
    let w =
        world("origin = { rate = 1, burst = 4 }\nper_token = { rate = 100, burst = 100 }").await;
    let started = Instant::now();
    let mut allowed = 0;
    let refused = loop {
        let token = if allowed % 2 == 0 { PROD } else { STAGING };
        let reply = entries(&w, token).await;
        if reply.status != 200 {
            break reply;
        }
        allowed += 1;
        assert!(allowed < 20, "the origin limit never refused");
    };
    assert!(
        (4..=4 + refilled(started, 1)).contains(&allowed),
        "{allowed} allowed"
    );
    assert_rate_limited(&refused, "1");
    assert_eq!(w.origin.request_count(), allowed);
    // Both tokens are refused now, neither by its own budget.
    let replies = [entries(&w, PROD).await, entries(&w, STAGING).await];
    if refilled(started, 1) == 0 {
        for reply in &replies {
            assert_rate_limited(reply, "1");
        }
        assert_eq!(w.origin.request_count(), allowed);
    }
}

#[tokio::test]
async fn a_client_that_fails_auth_burst_times_gets_429_even_with_a_valid_token() {
    let w =
        world("per_token = { rate = 1, burst = 5 }\nfailed_auth_per_ip = { rate = 1, burst = 3 }")
            .await;
    let started = Instant::now();
    let mut failures = 0;
    let penalty = loop {
        let reply = entries(&w, "cs_not_a_token").await;
        if reply.status == 401 {
            assert_eq!(reply.reason(), "invalid_token");
            failures += 1;
            assert!(failures < 20, "never penalised");
            continue;
        }
        break reply;
    };
    assert!(
        (3..=3 + refilled(started, 1)).contains(&failures),
        "{failures} failures before the penalty"
    );
    assert_rate_limited(&penalty, "1");

    // A valid token from the same client gets the very same answer as an
    // invalid one: no validity oracle, nothing forwarded, no token budget
    // spent. So does a valid token out of its scope.
    let valid = entries(&w, PROD).await;
    let out_of_scope = send(
        w.gateway.http,
        get(
            "cdn.test",
            "/v3/x",
            &[SITE, ("access_token", STAGING), ("branch", "nope")],
        ),
    )
    .await;
    // The first cell comes back a second after the first failure.
    if refilled(started, 1) == 0 {
        assert_rate_limited(&valid, "1");
        assert_eq!(valid.body, penalty.body);
        assert_rate_limited(&out_of_scope, "1");
        assert_eq!(w.origin.request_count(), 0);
        assert_eq!(w.gateway.shared.limits.tracked_tokens(0), 0);
        let tokens = w.gateway.admin("GET", "/admin/tokens").await.json();
        assert_eq!(
            token_usage(&tokens, "blt_prod"),
            (0, 0),
            "the penalty names no token"
        );
    } else {
        eprintln!("slow run: the penalty ended before the valid token was sent");
    }
    assert_eq!(w.gateway.shared.limits.tracked_ips(0), 1);

    // Refusals before the token checks are not failed authentications and
    // are answered as usual.
    let unknown_stack = send(
        w.gateway.http,
        get(
            "cdn.test",
            "/v3/x",
            &[("api_key", "blt_nope"), ("access_token", PROD)],
        ),
    )
    .await;
    assert_eq!(unknown_stack.reason(), "unknown_stack");
}

#[tokio::test]
async fn a_flood_of_random_tokens_creates_no_token_bucket() {
    let w =
        world("per_token = { rate = 1, burst = 1 }\nfailed_auth_per_ip = { rate = 1, burst = 3 }")
            .await;
    for i in 0..40 {
        let reply = entries(&w, &format!("cs_random_{i:04}_{}", rand_suffix(i))).await;
        assert!(
            [401, 429].contains(&reply.status.as_u16()),
            "{}",
            reply.text()
        );
    }
    let limits = &w.gateway.shared.limits;
    assert_eq!(limits.tracked_tokens(0), 0);
    assert_eq!(limits.tracked_ips(0), 1);
    assert_eq!(w.origin.request_count(), 0);
}

fn rand_suffix(i: u32) -> u64 {
    u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[tokio::test]
async fn a_deleted_tokens_limiter_goes_with_it() {
    let w = world("per_token = { rate = 1, burst = 1 }").await;
    assert_eq!(entries(&w, PROD).await.status, 200);
    assert_eq!(entries(&w, STAGING).await.status, 200);
    let limits = &w.gateway.shared.limits;
    assert_eq!(limits.tracked_tokens(0), 2);

    let mut tokens = standard_tokens();
    tokens.retain(|t| t["name"] != "Production");
    w.cma.set_tokens(tokens);
    let reply = w.gateway.admin("POST", "/admin/sync?force=true").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        limits.tracked_tokens(0),
        1,
        "only blt_staging keeps a bucket"
    );
    assert_eq!(entries(&w, PROD).await.reason(), "token_revoked");
    assert_eq!(limits.tracked_tokens(0), 1);

    // An admin revocation keeps the bucket: it can be undone.
    let reply = w
        .gateway
        .admin("POST", "/admin/tokens/blt_staging/revoke")
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(limits.tracked_tokens(0), 1);
}
