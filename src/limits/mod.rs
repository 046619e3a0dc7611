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
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};

use crate::config::{LimitSettings, RateLimit, StackConfig};
use crate::registry::Token;
use crate::reject::Reject;
use store::{IpProbe, IpStore, PeekState, Probe};

mod store;

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
    /// Cluster mode (SPEC §10): the `per_token` and `origin` buckets hold
    /// `1 / nodes` of the configured rate and burst; 1 when standalone.
    nodes: AtomicU32,
}

struct StackLimits<C: Clock + Clone> {
    per_token: Option<RateLimit>,
    overrides: Vec<(String, RateLimit)>,
    tokens: DashMap<Arc<str>, TokenBucket<C>, foldhash::fast::RandomState>,
    origin: Option<arc_swap::ArcSwap<Limit<Limiter<Probe, PeekState, C>>>>,
    failed_auth: Option<IpLimits<C>>,
}

type Limiter<K, S, C> = RateLimiter<K, S, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// A limiter with the limit it was built from (the configured one, which
/// row 15's headers name) and the number of nodes it is a share for.
struct Limit<L> {
    limit: RateLimit,
    nodes: u32,
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
        Limits {
            clock,
            stacks,
            nodes: AtomicU32::new(1),
        }
    }

    /// Cluster mode: this node admits `1 / nodes` of each `per_token` and
    /// `origin` limit (rate and burst, rounded up). Origin buckets are
    /// rebuilt at once, token buckets on their next request.
    pub fn set_nodes(&self, nodes: usize) {
        let nodes = u32::try_from(nodes).unwrap_or(u32::MAX).max(1);
        if self.nodes.swap(nodes, Ordering::AcqRel) == nodes {
            return;
        }
        for origin in self.stacks.iter().filter_map(|s| s.origin.as_ref()) {
            let limit = origin.load().limit;
            origin.store(Arc::new(origin_bucket(limit, nodes, &self.clock)));
        }
    }

    /// The number of nodes the shared limits are divided by.
    pub fn nodes(&self) -> u32 {
        self.nodes.load(Ordering::Acquire)
    }

    /// Row 15 for a permitted request of `token` on stack `stack`: its own
    /// bucket, then the origin's. Takes a cell from each only if both have
    /// one (but for a race with another request on the origin bucket).
    pub fn admit(&self, stack: usize, token: &Token) -> Result<(), Limited> {
        let Some(limits) = self.stacks.get(stack) else {
            return Ok(());
        };
        let origin = limits.origin.as_ref().map(|o| o.load());
        if let Some(origin) = &origin {
            check_origin(origin, &Probe::Peek, &self.clock)?;
        }
        if let Some(limit) = limits.token_limit(token) {
            let nodes = self.nodes.load(Ordering::Relaxed);
            limits.take_token(&token.uid, limit, nodes, &self.clock)?;
        }
        if let Some(origin) = &origin {
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
            origin: origin
                .map(|limit| arc_swap::ArcSwap::from_pointee(origin_bucket(limit, 1, clock))),
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

    fn take_token(
        &self,
        uid: &Arc<str>,
        limit: RateLimit,
        nodes: u32,
        clock: &C,
    ) -> Result<(), Limited> {
        if let Some(bucket) = self.tokens.get(&**uid) {
            if bucket.limit == limit && bucket.nodes == nodes {
                return check_token(&bucket, clock);
            }
        }
        let bucket = self
            .tokens
            .entry(Arc::clone(uid))
            .and_modify(|bucket| {
                if bucket.limit != limit || bucket.nodes != nodes {
                    *bucket = token_bucket(limit, nodes, clock);
                }
            })
            .or_insert_with(|| token_bucket(limit, nodes, clock));
        check_token(&bucket, clock)
    }
}

fn token_bucket<C: Clock + Clone>(limit: RateLimit, nodes: u32, clock: &C) -> TokenBucket<C> {
    Limit {
        limit,
        nodes,
        limiter: RateLimiter::direct_with_clock(quota(share(limit, nodes)), clock.clone()),
    }
}

fn origin_bucket<C: Clock + Clone>(
    limit: RateLimit,
    nodes: u32,
    clock: &C,
) -> Limit<Limiter<Probe, PeekState, C>> {
    Limit {
        limit,
        nodes,
        limiter: RateLimiter::new(
            quota(share(limit, nodes)),
            PeekState::default(),
            clock.clone(),
        ),
    }
}

/// One node's share of a limit: rate and burst divided by `nodes`, rounded up.
pub fn share(limit: RateLimit, nodes: u32) -> RateLimit {
    let nodes = nodes.max(1);
    RateLimit {
        rate: limit.rate.div_ceil(nodes).max(1),
        burst: limit.burst.div_ceil(nodes).max(1),
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

#[cfg(test)]
mod tests;
