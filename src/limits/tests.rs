#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Unit tests of the rate limits, on governor's fake clock.

use std::net::{Ipv4Addr, Ipv6Addr};

use governor::clock::FakeRelativeClock;

use super::*;
use crate::registry::Digest;

fn rate(rate: u32, burst: u32) -> Option<RateLimit> {
    Some(RateLimit { rate, burst })
}

fn token(uid: &str, name: &str) -> Token {
    Token {
        usage: Default::default(),
        uid: Arc::from(uid),
        name: name.to_owned(),
        scope: Default::default(),
        delivery: Digest::of(uid.as_bytes()),
        preview: None,
    }
}

fn limits(settings: LimitSettings) -> (Limits<FakeRelativeClock>, FakeRelativeClock) {
    limits_capped(settings, MAX_TRACKED_IPS)
}

fn limits_capped(
    settings: LimitSettings,
    cap: usize,
) -> (Limits<FakeRelativeClock>, FakeRelativeClock) {
    let clock = FakeRelativeClock::default();
    // Stack 1 has no limits at all.
    let stacks = [settings, LimitSettings::default()];
    (Limits::with_clock(&stacks, clock.clone(), cap), clock)
}

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
}

const SECOND: Duration = Duration::from_secs(1);

#[test]
fn a_token_gets_its_burst_then_429_until_a_cell_comes_back() {
    let (limits, clock) = limits(LimitSettings {
        per_token: rate(1, 3),
        ..Default::default()
    });
    let a = token("blt_a", "A");
    for _ in 0..3 {
        assert_eq!(limits.admit(0, &a), Ok(()));
    }
    let refused = limits.admit(0, &a).unwrap_err();
    assert_eq!(
        refused,
        Limited {
            bucket: Bucket::Token,
            limit: 1,
            retry_after_secs: 1
        }
    );
    assert_eq!(
        refused.reject(),
        Reject::RateLimited {
            limit: 1,
            remaining: 0,
            retry_after_secs: 1
        }
    );
    clock.advance(SECOND);
    assert_eq!(limits.admit(0, &a), Ok(()));
    assert!(limits.admit(0, &a).is_err());
    // Another token has its own bucket; a stack without limits has none.
    assert_eq!(limits.admit(0, &token("blt_b", "B")), Ok(()));
    for _ in 0..100 {
        assert_eq!(limits.admit(1, &a), Ok(()));
    }
    assert_eq!(limits.tracked_tokens(0), 2);
    assert_eq!(limits.tracked_tokens(1), 0);
}

#[test]
fn retry_after_is_whole_seconds_and_at_least_one() {
    let (limits, clock) = limits(LimitSettings {
        per_token: rate(4, 1),
        origin: rate(1, 2),
        ..Default::default()
    });
    let a = token("blt_a", "A");
    assert_eq!(limits.admit(0, &a), Ok(()));
    clock.advance(Duration::from_millis(240));
    // 10 ms until the token's next cell: still one whole second.
    let refused = limits.admit(0, &a).unwrap_err();
    assert_eq!(
        (refused.bucket, refused.retry_after_secs),
        (Bucket::Token, 1)
    );
    clock.advance(Duration::from_millis(10));
    assert_eq!(limits.admit(0, &a), Ok(()));
    clock.advance(Duration::from_millis(250));
    // 500 ms until the origin's next cell.
    let refused = limits.admit(0, &a).unwrap_err();
    assert_eq!(
        refused,
        Limited {
            bucket: Bucket::Origin,
            limit: 1,
            retry_after_secs: 1
        }
    );
}

#[test]
fn overrides_by_uid_or_name_replace_per_token() {
    let (limits, _clock) = limits(LimitSettings {
        per_token: rate(1, 1),
        overrides: vec![
            ("blt_vip".to_owned(), RateLimit { rate: 2, burst: 5 }),
            ("Mobile app".to_owned(), RateLimit { rate: 3, burst: 2 }),
        ],
        ..Default::default()
    });
    let allowed = |t: &Token| (0..10).take_while(|_| limits.admit(0, t).is_ok()).count();
    assert_eq!(allowed(&token("blt_plain", "Plain")), 1);
    assert_eq!(allowed(&token("blt_vip", "Whatever")), 5);
    assert_eq!(allowed(&token("blt_mobile", "Mobile app")), 2);
    let refused = limits.admit(0, &token("blt_mobile", "Mobile app"));
    assert_eq!(refused.unwrap_err().limit, 3);
    // Renamed into an override: the bucket is rebuilt with the new limit.
    assert_eq!(allowed(&token("blt_plain", "Mobile app")), 2);
}

#[test]
fn an_override_applies_without_a_per_token_default() {
    let (limits, _clock) = limits(LimitSettings {
        overrides: vec![("blt_one".to_owned(), RateLimit { rate: 1, burst: 1 })],
        ..Default::default()
    });
    let other = token("blt_other", "Other");
    for _ in 0..50 {
        assert_eq!(limits.admit(0, &other), Ok(()));
    }
    assert_eq!(limits.tracked_tokens(0), 0, "no limit, no bucket");
    let one = token("blt_one", "One");
    assert_eq!(limits.admit(0, &one), Ok(()));
    assert!(limits.admit(0, &one).is_err());
}

#[test]
fn a_token_refusal_spends_no_origin_budget() {
    let (limits, _clock) = limits(LimitSettings {
        per_token: rate(1, 1),
        origin: rate(1, 3),
        ..Default::default()
    });
    let a = token("blt_a", "A");
    assert_eq!(limits.admit(0, &a), Ok(()));
    for _ in 0..10 {
        assert_eq!(limits.admit(0, &a).unwrap_err().bucket, Bucket::Token);
    }
    assert_eq!(limits.admit(0, &token("blt_b", "B")), Ok(()));
    assert_eq!(limits.admit(0, &token("blt_c", "C")), Ok(()));
    let refused = limits.admit(0, &token("blt_d", "D")).unwrap_err();
    assert_eq!(refused.bucket, Bucket::Origin);
    assert_eq!(refused.limit, 1);
}

#[test]
fn an_origin_refusal_spends_no_token_budget() {
    let (limits, clock) = limits(LimitSettings {
        per_token: rate(1, 2),
        origin: rate(10, 1),
        ..Default::default()
    });
    let (a, b) = (token("blt_a", "A"), token("blt_b", "B"));
    assert_eq!(limits.admit(0, &a), Ok(()));
    for _ in 0..5 {
        assert_eq!(limits.admit(0, &b).unwrap_err().bucket, Bucket::Origin);
    }
    let tenth = Duration::from_millis(100);
    clock.advance(tenth);
    assert_eq!(limits.admit(0, &b), Ok(()));
    clock.advance(tenth);
    assert_eq!(limits.admit(0, &b), Ok(()), "b still had its second cell");
    clock.advance(tenth);
    assert_eq!(limits.admit(0, &b).unwrap_err().bucket, Bucket::Token);
}

#[test]
fn failed_auths_empty_the_ip_bucket_then_the_ip_is_penalized() {
    let (limits, clock) = limits(LimitSettings {
        per_token: rate(1, 5),
        failed_auth_per_ip: rate(1, 3),
        ..Default::default()
    });
    let client = ip(7);
    for _ in 0..3 {
        assert_eq!(limits.penalized(0, client), Ok(()));
        assert_eq!(limits.failed_auth(0, client), Ok(()));
    }
    let expected = Limited {
        bucket: Bucket::FailedAuth,
        limit: 1,
        retry_after_secs: 1,
    };
    assert_eq!(limits.penalized(0, client), Err(expected));
    assert_eq!(limits.failed_auth(0, client), Err(expected));
    // Looking and refused failures take nothing: one second brings one back.
    for _ in 0..10 {
        let _ = limits.penalized(0, client);
        let _ = limits.failed_auth(0, client);
    }
    // Other clients, other stacks, and the token buckets are untouched.
    assert_eq!(limits.penalized(0, ip(8)), Ok(()));
    assert_eq!(limits.penalized(1, client), Ok(()));
    assert_eq!(limits.failed_auth(1, client), Ok(()));
    assert_eq!(limits.tracked_tokens(0), 0);
    clock.advance(SECOND);
    assert_eq!(limits.penalized(0, client), Ok(()));
    assert_eq!(limits.failed_auth(0, client), Ok(()));
    assert_eq!(limits.penalized(0, client), Err(expected));
}

#[test]
fn looking_at_an_unknown_ip_tracks_nothing() {
    let (limits, _clock) = limits(LimitSettings {
        failed_auth_per_ip: rate(1, 3),
        ..Default::default()
    });
    for last in 0..=255 {
        assert_eq!(limits.penalized(0, ip(last)), Ok(()));
    }
    assert_eq!(limits.tracked_ips(0), 0);
}

#[test]
fn ipv6_clients_count_by_slash_64_and_mapped_ipv4_as_ipv4() {
    let (limits, _clock) = limits(LimitSettings {
        failed_auth_per_ip: rate(1, 2),
        ..Default::default()
    });
    let one: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
    let same_64: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
    let other_64: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
    assert_eq!(limits.failed_auth(0, one.into()), Ok(()));
    assert_eq!(limits.failed_auth(0, same_64.into()), Ok(()));
    assert!(limits.penalized(0, one.into()).is_err());
    assert_eq!(limits.penalized(0, other_64.into()), Ok(()));
    assert_eq!(limits.tracked_ips(0), 1);

    let mapped = Ipv4Addr::new(198, 51, 100, 4).to_ipv6_mapped();
    assert_eq!(limits.failed_auth(0, mapped.into()), Ok(()));
    assert_eq!(
        limits.failed_auth(0, Ipv4Addr::new(198, 51, 100, 4).into()),
        Ok(())
    );
    assert!(limits.penalized(0, mapped.into()).is_err());
    assert_eq!(limits.tracked_ips(0), 2);
}

/// What the proxy does for a flood of random unknown tokens from one
/// client: each is refused by `decide` (invalid_token), so only the
/// client's failed-auth bucket is consulted; no token bucket is made.
#[test]
fn a_flood_of_unknown_tokens_from_one_ip_tracks_one_ip_and_no_token() {
    let (limits, clock) = limits(LimitSettings {
        per_token: rate(1, 1),
        origin: rate(1, 1),
        failed_auth_per_ip: rate(5, 20),
        ..Default::default()
    });
    let client = ip(66);
    let mut allowed = 0;
    for i in 0..100_000u32 {
        if limits.penalized(0, client).is_ok() && limits.failed_auth(0, client).is_ok() {
            allowed += 1;
        }
        if i.is_multiple_of(1000) {
            clock.advance(Duration::from_millis(100));
        }
    }
    // 20 at once, then 5 a second over 10 simulated seconds.
    assert!((20..=71).contains(&allowed), "{allowed}");
    assert_eq!(limits.tracked_tokens(0), 0);
    assert_eq!(limits.tracked_ips(0), 1);
}

#[test]
fn the_ip_map_is_capped_and_idle_ips_are_pruned() {
    let cap = 100;
    let (limits, clock) = limits_capped(
        LimitSettings {
            failed_auth_per_ip: rate(1, 2),
            ..Default::default()
        },
        cap,
    );
    let many = |from: u32| (from..from + 150).map(|n| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)));
    for client in many(0) {
        assert_eq!(limits.failed_auth(0, client), Ok(()));
        assert_eq!(limits.failed_auth(0, client), Ok(()));
    }
    assert_eq!(limits.tracked_ips(0), cap);
    // The first `cap` are penalised; the rest were not tracked (fail open).
    let penalized = many(0).filter(|c| limits.penalized(0, *c).is_err()).count();
    assert_eq!(penalized, cap);

    // Within PRUNE_EVERY nothing is pruned, and busy IPs are never pruned.
    clock.advance(SECOND);
    assert_eq!(limits.failed_auth(0, ip(1)), Ok(()));
    assert_eq!(limits.tracked_ips(0), cap);
    // Once their buckets are full again they carry nothing and go.
    clock.advance(3 * SECOND);
    assert_eq!(limits.failed_auth(0, ip(1)), Ok(()));
    assert_eq!(limits.tracked_ips(0), 1);
    for client in many(1000) {
        let _ = limits.failed_auth(0, client);
    }
    assert_eq!(limits.tracked_ips(0), cap);
    clock.advance(10 * SECOND);
    limits.prune();
    assert_eq!(limits.tracked_ips(0), 0);
}

#[test]
fn forget_drops_the_tokens_bucket() {
    let (limits, _clock) = limits(LimitSettings {
        per_token: rate(1, 1),
        ..Default::default()
    });
    let a = token("blt_a", "A");
    assert_eq!(limits.admit(0, &a), Ok(()));
    assert!(limits.admit(0, &a).is_err());
    assert_eq!(limits.tracked_tokens(0), 1);
    limits.forget(0, "blt_a");
    limits.forget(7, "blt_a");
    assert_eq!(limits.tracked_tokens(0), 0);
    // Listed again later, it starts afresh.
    assert_eq!(limits.admit(0, &a), Ok(()));
}
