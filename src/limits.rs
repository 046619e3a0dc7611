//! Rate limits (SPEC §6, row 15 of §3): governor token buckets per token,
//! per stack for what reaches the origin, and per client IP for failed
//! authentications.
//!
//! This module owns every bucket and must keep three things true:
//!
//! - **Memory stays bounded.** A per-token bucket exists only for a token
//!   that was identified and permitted (so a flood of random token values
//!   creates none) and goes when the token goes ([`Limits::forget`], called
//!   when a sync removes it). Client IPs are tracked only after a failed
//!   authentication, at most [`MAX_TRACKED_IPS`] per stack; idle ones (whose
//!   bucket has refilled) are pruned at most every [`PRUNE_EVERY`], driven by
//!   the failed authentications themselves. When the map is full of busy IPs
//!   a new IP is not tracked (it fails open, logged) rather than evicting an
//!   IP that is being penalised. (A request decided just before a sync
//!   removed its token can recreate that token's bucket right after
//!   `forget`: one small entry per such race, never used again since the
//!   token is no longer permitted.)
//! - **A refused request spends nothing.** The origin bucket is looked at
//!   (without taking) before the token's bucket is taken, and taken only
//!   after it: a request refused by its token's limit spends no origin
//!   budget, and one refused by the origin limit spends none of its token's.
//!   Governor has no "peek", so the origin and IP buckets use `PeekState`
//!   and `IpStore`, governor state stores that can evaluate the GCRA
//!   without storing the outcome.
//! - **No validity oracle for brute-forcers.** A request refused by rows 8
//!   to 14 takes one cell from its client's bucket (IPv4 address, or IPv6
//!   /64 since one host owns a whole /64). Once that bucket is empty, every
//!   request from the client that reaches the token checks (rows 8 and
//!   later) gets 429 `rate_limited` whatever its token, valid or not, until
//!   the bucket refills: the answer no longer depends on the token, and
//!   neither the token's own bucket nor the origin's is touched.
//!
//! Row 15's headers: `X-RateLimit-Limit` is the configured `rate` (per
//! second) of the bucket that refused, `X-RateLimit-Remaining` is 0, and
//! `Retry-After` is the wait until that bucket has a cell again, rounded up
//! to whole seconds, at least 1.

use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{NotUntil, Quota, RateLimiter};

use crate::config::{LimitSettings, RateLimit, StackConfig};
use crate::decision::Reject;
use crate::registry::Token;

/// Most client IPs tracked for failed authentications, per stack.
pub const MAX_TRACKED_IPS: usize = 100_000;
/// Shortest time between two prunes of a stack's idle client IPs.
pub const PRUNE_EVERY: Duration = Duration::from_secs(1);

/// Which bucket refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// The token's own (`per_token` or an override).
    Token,
    /// The stack's `origin` bucket.
    Origin,
    /// The client IP's `failed_auth_per_ip` bucket.
    FailedAuth,
}

/// A refusal by a rate limit: what row 15's response says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The bucket that refused.
    pub bucket: Bucket,
    /// Its configured rate per second (`X-RateLimit-Limit`).
    pub limit: u32,
    /// Whole seconds until it has a cell again, at least 1 (`Retry-After`).
    pub retry_after_secs: u64,
}

impl Limited {
    /// The rejection (row 15) to answer with.
    pub fn reject(&self) -> Reject {
        Reject::RateLimited {
            limit: self.limit,
            remaining: 0,
            retry_after_secs: self.retry_after_secs,
        }
    }
}

/// Every rate limiter of the gateway, one set per stack (indexed like
/// `Config::stacks` and `StackRegistry::index`).
pub struct Limits<C: Clock + Clone = DefaultClock> {
    clock: C,
    stacks: Vec<StackLimits<C>>,
}

struct StackLimits<C: Clock + Clone> {
    per_token: Option<RateLimit>,
    overrides: Vec<(String, RateLimit)>,
    tokens: DashMap<Arc<str>, TokenBucket<C>, foldhash::fast::RandomState>,
    origin: Option<Limit<Limiter<Probe, PeekState, C>>>,
    failed_auth: Option<IpLimits<C>>,
}

type Limiter<K, S, C> = RateLimiter<K, S, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// A limiter with the limit it was built from.
struct Limit<L> {
    limit: RateLimit,
    limiter: L,
}

/// A token's bucket; its `limit` is kept so that a changed override (the
/// token was renamed) rebuilds it.
type TokenBucket<C> = Limit<Limiter<NotKeyed, InMemoryState, C>>;

struct IpLimits<C: Clock + Clone> {
    limit: RateLimit,
    limiter: Limiter<IpProbe, IpStore, C>,
    /// When the last prune ran, in nanoseconds since `start`.
    last_prune: AtomicU64,
    start: C::Instant,
}

impl Limits {
    /// Buckets for `stacks` on the real clock.
    pub fn new(stacks: &[StackConfig]) -> Limits {
        Limits::with_clock(
            stacks.iter().map(|stack| &stack.limits),
            DefaultClock::default(),
            MAX_TRACKED_IPS,
        )
    }
}

impl<C: Clock + Clone> Limits<C> {
    /// Buckets for each stack's `[stacks.limits]`, in stack order, on
    /// `clock`, tracking at most `max_ips` client IPs per stack (tests use a
    /// fake clock and a small cap).
    pub fn with_clock<'a>(
        stacks: impl IntoIterator<Item = &'a LimitSettings>,
        clock: C,
        max_ips: usize,
    ) -> Limits<C> {
        let stacks = stacks
            .into_iter()
            .map(|settings| StackLimits::new(settings, &clock, max_ips))
            .collect();
        Limits { clock, stacks }
    }

    /// Row 15 for a permitted request of `token` on stack `stack`: its own
    /// bucket, then the origin's. Takes a cell from each only if both have
    /// one (but for a race with another request on the origin bucket).
    pub fn admit(&self, stack: usize, token: &Token) -> Result<(), Limited> {
        let Some(limits) = self.stacks.get(stack) else {
            return Ok(());
        };
        if let Some(origin) = &limits.origin {
            check_origin(origin, &Probe::Peek, &self.clock)?;
        }
        if let Some(limit) = limits.token_limit(token) {
            limits.take_token(&token.uid, limit, &self.clock)?;
        }
        if let Some(origin) = &limits.origin {
            check_origin(origin, &Probe::Take, &self.clock)?;
        }
        Ok(())
    }

    /// Whether `ip` has used up its failed-authentication bucket on `stack`;
    /// takes nothing. A request that reaches the token checks is refused
    /// with this before its token's verdict is given (see the module doc).
    pub fn penalized(&self, stack: usize, ip: IpAddr) -> Result<(), Limited> {
        let Some(ips) = self.stacks.get(stack).and_then(|s| s.failed_auth.as_ref()) else {
            return Ok(());
        };
        let probe = IpProbe {
            ip: client_key(ip),
            probe: Probe::Peek,
        };
        check_ip(ips, &probe, &self.clock)
    }

    /// Counts a failed authentication (rows 8 to 14) of `ip` on `stack`.
    /// `Err` when its bucket was already empty: the request is answered 429.
    pub fn failed_auth(&self, stack: usize, ip: IpAddr) -> Result<(), Limited> {
        let Some(ips) = self.stacks.get(stack).and_then(|s| s.failed_auth.as_ref()) else {
            return Ok(());
        };
        self.prune_if_due(ips);
        let probe = IpProbe {
            ip: client_key(ip),
            probe: Probe::Take,
        };
        check_ip(ips, &probe, &self.clock)
    }

    /// Drops the bucket of a token that is gone.
    pub fn forget(&self, stack: usize, uid: &str) {
        if let Some(limits) = self.stacks.get(stack) {
            limits.tokens.remove(uid);
        }
    }

    /// How many tokens of `stack` have a bucket.
    pub fn tracked_tokens(&self, stack: usize) -> usize {
        self.stacks.get(stack).map_or(0, |s| s.tokens.len())
    }

    /// How many client IPs of `stack` have a failed-authentication bucket.
    pub fn tracked_ips(&self, stack: usize) -> usize {
        self.stacks
            .get(stack)
            .and_then(|s| s.failed_auth.as_ref())
            .map_or(0, |ips| ips.limiter.len())
    }

    /// Forgets the client IPs whose bucket is full again: they carry no
    /// information. Failed authentications do this on their own, at most
    /// every [`PRUNE_EVERY`] per stack.
    pub fn prune(&self) {
        for ips in self.stacks.iter().filter_map(|s| s.failed_auth.as_ref()) {
            ips.limiter.retain_recent();
        }
    }

    fn prune_if_due(&self, ips: &IpLimits<C>) {
        let now = self.clock.now().duration_since(ips.start).as_u64();
        let last = ips.last_prune.load(Ordering::Relaxed);
        let every = u64::try_from(PRUNE_EVERY.as_nanos()).unwrap_or(u64::MAX);
        if now.saturating_sub(last) < every {
            return;
        }
        // One caller prunes; the others go on.
        if ips
            .last_prune
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            ips.limiter.retain_recent();
        }
    }
}

impl<C: Clock + Clone> StackLimits<C> {
    fn new(settings: &LimitSettings, clock: &C, max_ips: usize) -> StackLimits<C> {
        let LimitSettings {
            per_token,
            origin,
            failed_auth_per_ip,
            overrides,
        } = settings;
        StackLimits {
            per_token: *per_token,
            overrides: overrides.clone(),
            tokens: DashMap::default(),
            origin: origin.map(|limit| Limit {
                limit,
                limiter: RateLimiter::new(quota(limit), PeekState::default(), clock.clone()),
            }),
            failed_auth: failed_auth_per_ip.map(|limit| IpLimits {
                limit,
                limiter: RateLimiter::new(quota(limit), IpStore::new(max_ips), clock.clone()),
                last_prune: AtomicU64::new(0),
                start: clock.now(),
            }),
        }
    }

    /// The token's limit: an override naming its uid or name, else `per_token`.
    fn token_limit(&self, token: &Token) -> Option<RateLimit> {
        self.overrides
            .iter()
            .find(|(who, _)| **who == *token.uid || *who == token.name)
            .map(|(_, limit)| *limit)
            .or(self.per_token)
    }

    fn take_token(&self, uid: &Arc<str>, limit: RateLimit, clock: &C) -> Result<(), Limited> {
        if let Some(bucket) = self.tokens.get(&**uid) {
            if bucket.limit == limit {
                return check_token(&bucket, clock);
            }
        }
        let bucket = self
            .tokens
            .entry(Arc::clone(uid))
            .and_modify(|bucket| {
                if bucket.limit != limit {
                    *bucket = token_bucket(limit, clock);
                }
            })
            .or_insert_with(|| token_bucket(limit, clock));
        check_token(&bucket, clock)
    }
}

fn token_bucket<C: Clock + Clone>(limit: RateLimit, clock: &C) -> TokenBucket<C> {
    Limit {
        limit,
        limiter: RateLimiter::direct_with_clock(quota(limit), clock.clone()),
    }
}

fn check_token<C: Clock + Clone>(bucket: &TokenBucket<C>, clock: &C) -> Result<(), Limited> {
    bucket
        .limiter
        .check()
        .map_err(|refused| limited(&refused, clock, Bucket::Token, bucket.limit))
}

fn check_origin<C: Clock + Clone>(
    origin: &Limit<Limiter<Probe, PeekState, C>>,
    probe: &Probe,
    clock: &C,
) -> Result<(), Limited> {
    origin
        .limiter
        .check_key(probe)
        .map_err(|refused| limited(&refused, clock, Bucket::Origin, origin.limit))
}

fn check_ip<C: Clock + Clone>(
    ips: &IpLimits<C>,
    probe: &IpProbe,
    clock: &C,
) -> Result<(), Limited> {
    ips.limiter
        .check_key(probe)
        .map_err(|refused| limited(&refused, clock, Bucket::FailedAuth, ips.limit))
}

fn limited<C: Clock>(
    refused: &NotUntil<C::Instant>,
    clock: &C,
    bucket: Bucket,
    limit: RateLimit,
) -> Limited {
    let wait = refused.wait_time_from(clock.now());
    let retry_after_secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    Limited {
        bucket,
        limit: limit.rate,
        retry_after_secs: retry_after_secs.max(1),
    }
}

fn quota(limit: RateLimit) -> Quota {
    let nonzero = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(nonzero(limit.rate)).allow_burst(nonzero(limit.burst))
}

/// The key a client is counted under: its IPv4 address (IPv4-mapped IPv6
/// included), or the /64 of its IPv6 address.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

/// Whether a check takes a cell or only looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Probe {
    Take,
    Peek,
}

/// One bucket's GCRA state: the theoretical arrival time in nanoseconds
/// since its limiter started, 0 for a bucket never used.
#[derive(Debug, Default)]
struct Tat(AtomicU64);

impl Tat {
    /// Governor's compare-and-swap loop, but a [`Probe::Peek`] stores nothing.
    fn measure<T, F, E>(&self, probe: Probe, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut prev = self.0.load(Ordering::Acquire);
        loop {
            let (result, next) = f(NonZeroU64::new(prev).map(|n| Nanos::from(n.get())))?;
            if probe == Probe::Peek {
                return Ok(result);
            }
            match self.0.compare_exchange_weak(
                prev,
                next.as_u64(),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(result),
                Err(actual) => prev = actual,
            }
        }
    }
}

/// A direct limiter's state that can be looked at without taking.
#[derive(Debug, Default)]
struct PeekState(Tat);

impl StateStore for PeekState {
    type Key = Probe;

    fn measure_and_replace<T, F, E>(&self, key: &Probe, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure(*key, f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct IpProbe {
    ip: IpAddr,
    probe: Probe,
}

/// The failed-authentication buckets of a stack's clients, at most `cap`.
/// Looking never inserts; a client that would go over the cap is
/// measured against a fresh bucket that is not kept.
#[derive(Debug)]
struct IpStore {
    map: DashMap<IpAddr, Tat>,
    cap: usize,
    warned: AtomicBool,
}

impl IpStore {
    fn new(cap: usize) -> Self {
        IpStore {
            map: DashMap::new(),
            cap,
            warned: AtomicBool::new(false),
        }
    }
}

impl StateStore for IpStore {
    type Key = IpProbe;

    fn measure_and_replace<T, F, E>(&self, key: &IpProbe, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(tat) = self.map.get(&key.ip) {
            return tat.measure(key.probe, f);
        }
        if key.probe == Probe::Peek {
            return Tat::default().measure(Probe::Peek, f);
        }
        if self.map.len() >= self.cap {
            // Once between prunes: a flood of addresses must not flood the logs.
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    cap = self.cap,
                    "too many client IPs with failed authentications; new ones are not tracked"
                );
            }
            return Tat::default().measure(Probe::Peek, f);
        }
        let tat = self.map.entry(key.ip).or_default();
        tat.measure(Probe::Take, f)
    }
}

impl ShrinkableKeyedStateStore<IpProbe> for IpStore {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below = drop_below.as_u64();
        self.map
            .retain(|_, tat| tat.0.load(Ordering::Relaxed) > drop_below);
        self.warned.store(false, Ordering::Relaxed);
    }

    fn shrink_to_fit(&self) {
        self.map.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::net::{Ipv4Addr, Ipv6Addr};

    use governor::clock::FakeRelativeClock;

    use super::*;
    use crate::registry::Digest;

    fn rate(rate: u32, burst: u32) -> Option<RateLimit> {
        Some(RateLimit { rate, burst })
    }

    fn token(uid: &str, name: &str) -> Token {
        Token {
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
            if i % 1000 == 0 {
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
        let many =
            |from: u32| (from..from + 150).map(|n| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)));
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
}
