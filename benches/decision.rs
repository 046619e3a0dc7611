//! The decision path: what `decision::decide` costs per request with
//! 1k, 100k and 1M tokens in a stack's registry, what a registry swap of 100k
//! tokens costs, and how much memory a registered token takes.
//!
//! Run: `cargo bench --bench decision` (about 3 minutes; most of it is
//! building the 1M-token registry and criterion's warm-ups). A filter works
//! as usual, e.g. `cargo bench --bench decision -- decide/spread`;
//! `DECISION_SIZES=1000000` builds only the registries listed (for profiling).
//!
//! Groups:
//! - `digest`: SHA-256 of one presented token value (part of every decision).
//! - `lookup/{hot,spread}/N`: `Registry::lookup` of a digest already computed.
//! - `decide/{hot,spread}/N`: the whole of `decide` for an allowed delivery
//!   request with `?environment=production` and a `branch` header: route
//!   match, query scan (row 3), api_key, registry load, SHA-256 of the
//!   token, lookup, environment and branch scope checks, the `Permit`.
//!   `hot` sends the same token every time (its registry entries stay in
//!   cache); `spread` cycles through 4,096 distinct tokens spread over the
//!   whole registry, so at 100k and 1M tokens most of what the lookup and
//!   the scope checks read misses the CPU caches, as with many clients.
//!   Both put the token's header into one request before each call (a
//!   header insert, ~10-20 ns, is inside the measured time), and give each
//!   call a fresh `DigestMemo`, as a connection's first request has.
//! - `decide/hot-same-connection/N`: `hot` with one `DigestMemo` for every
//!   call, as one connection sending the same token again: no SHA-256.
//! - `limits/{hot,spread}/N`: row 15 for the same permitted requests:
//!   `Limits::penalized` (the client IP's failed-auth bucket) then
//!   `Limits::admit` (the token's bucket, then the stack's origin bucket),
//!   with every limit configured and high enough never to refuse. The
//!   decision path of a request is `decide` plus this.
//! - `swap/100k`: `Registry::next` with 100k tokens of which one changed
//!   (diff, revoked-digest bookkeeping, rebuild of the maps).
//!
//! Memory per token is printed as each registry is built: bytes requested
//! from the allocator and still held once a registry of N tokens is built
//! (counted by a global allocator wrapping mimalloc, the binary's
//! allocator), divided by N; allocator slack is not counted (the load script
//! reports the gateway's RSS for that).
//!
//! Not included: `check_http` (row 16), a few header scans.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use criterion::{BatchSize, BenchmarkId, Criterion};
use http::header::HeaderValue;
use http::request::Parts;
use http::uri::{Authority, Scheme};
use http::Request;
use mimalloc::MiMalloc;
use tokio::time::Instant;

use std::net::{IpAddr, Ipv4Addr};

use governor::clock::DefaultClock;
use stackgate::config::{LimitSettings, RateLimit, RegistrySettings, Source};
use stackgate::decision::{decide, Decision, ACCESS_TOKEN};
use stackgate::limits::{Limits, MAX_TRACKED_IPS};
use stackgate::registry::diff::next;
use stackgate::registry::{
    Digest, DigestMemo, Environment, Lookup, Registry, Scope, StackRegistry, Stacks, Token,
};
use stackgate::route::{Cors, Route, RouteKind, Router, Upstream};

/// The binary's allocator (mimalloc), counting bytes held and the peak
/// while `COUNTING` is set (only around registry builds, so the timed benches
/// pay one relaxed load per allocation).
struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to `MiMalloc` unchanged; the counters only
// observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = MiMalloc.alloc(layout);
        if !ptr.is_null() {
            note(layout.size() as isize);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = MiMalloc.alloc_zeroed(layout);
        if !ptr.is_null() {
            note(layout.size() as isize);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        MiMalloc.dealloc(ptr, layout);
        note(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = MiMalloc.realloc(ptr, layout, new_size);
        if !new.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        new
    }
}

fn note(delta: isize) {
    if COUNTING.load(Ordering::Relaxed) {
        let live = LIVE.fetch_add(delta, Ordering::Relaxed) + delta;
        PEAK.fetch_max(live, Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const HOST: &str = "cdn.bench.test";
const API_KEY: &str = "blt0123456789abcdef";
const SIZES: [usize; 3] = [1_000, 100_000, 1_000_000];
/// `SIZES`, or the sizes listed in `DECISION_SIZES` (e.g. `1000,1000000`),
/// so that profiling one size need not build the others.
fn sizes() -> Vec<usize> {
    match std::env::var("DECISION_SIZES") {
        Ok(list) => list
            .split(',')
            .map(|n| n.trim().parse().expect("DECISION_SIZES: numbers"))
            .collect(),
        Err(_) => SIZES.to_vec(),
    }
}

/// Distinct requests cycled through by the `spread` benches.
const SPREAD: usize = 4_096;

/// The delivery token value of token `i`: the shape of a real `cs...` value.
fn value(i: usize) -> String {
    format!(
        "cs{:032x}",
        (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
    )
}

/// A token shaped like the CMA's: uid, name, one environment, a branch
/// module and a preview token.
fn token(i: usize) -> Token {
    Token {
        usage: Default::default(),
        uid: Arc::from(format!("blt{i:016x}")),
        name: format!("Delivery token {i}"),
        scope: Arc::new(Scope {
            environments: vec![Environment {
                name: "production".into(),
                uid: "blt5f1c2a9e3d7b4c60".into(),
            }],
            branches: Some(vec!["main".into()]),
            aliases: None,
        }),
        delivery: Digest::of(value(i).as_bytes()),
        preview: Some(Digest::of(format!("pv{i:030x}").as_bytes())),
    }
}

fn tokens(n: usize) -> Vec<Token> {
    (0..n).map(token).collect()
}

fn settings() -> RegistrySettings {
    RegistrySettings {
        source: Source::File {
            path: PathBuf::new(),
        },
        snapshot: None,
        max_removal_ratio: 0.5,
        max_staleness: Some(Duration::from_secs(6 * 3600)),
    }
}

fn router() -> Router {
    Router::new(&[Arc::new(Route {
        index: 0,
        kind: RouteKind::Delivery,
        hosts: vec![HOST.to_owned(), "*".to_owned()],
        path_prefix: None,
        upstream: Upstream {
            scheme: Scheme::HTTP,
            authority: Authority::from_static("127.0.0.1:1"),
        },
        cors: Cors::default(),
    })])
}

/// An allowed delivery request presenting token `i`.
fn request(i: usize) -> Parts {
    Request::get("/v3/content_types/blog_post/entries?environment=production&locale=en-us")
        .header("host", HOST)
        .header("api_key", API_KEY)
        .header("access_token", value(i))
        .header("branch", "main")
        .header("user-agent", "contentstack-delivery-javascript/3.20")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

/// `SPREAD` distinct token indexes spread over `0..n`.
fn spread_indexes(n: usize) -> Vec<usize> {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    (0..SPREAD)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        })
        .collect()
}

/// Builds a registry of `n` tokens and reports what it kept allocated.
fn build(n: usize) -> Registry {
    let started = StdInstant::now();
    LIVE.store(0, Ordering::Relaxed);
    PEAK.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    let registry = Registry::from_parts(1, tokens(n), Default::default(), Default::default());
    COUNTING.store(false, Ordering::Relaxed);
    let held = LIVE.load(Ordering::Relaxed);
    let peak = PEAK.load(Ordering::Relaxed);
    println!(
        "memory: {n:>9} tokens: {:>6.1} MiB held, {:>5.0} B/token held ({:.0} B/token peak while building); built in {:.2?}",
        held as f64 / (1024.0 * 1024.0),
        held as f64 / n as f64,
        peak as f64 / n as f64,
        started.elapsed(),
    );
    registry
}

fn stacks(registry: Registry) -> Stacks {
    Stacks::new(vec![Arc::new(StackRegistry::with_registry(
        0,
        "bench",
        API_KEY,
        settings(),
        registry,
    ))])
}

/// Every limit of `[stacks.limits]` set, none ever reached.
fn limits() -> Limits {
    let high = RateLimit {
        rate: 1_000_000_000,
        burst: 1_000_000_000,
    };
    let settings = LimitSettings {
        per_token: Some(high),
        origin: Some(high),
        failed_auth_per_ip: Some(RateLimit { rate: 5, burst: 20 }),
        overrides: Vec::new(),
    };
    Limits::with_clock([&settings], DefaultClock::default(), MAX_TRACKED_IPS)
}

fn allowed(decision: Decision<'_, '_>) {
    match decision {
        Decision::Forward(permit) => {
            black_box(&permit);
        }
        Decision::Preflight(_) => panic!("preflight"),
        Decision::Refuse(refusal) => panic!("refused: {}", refusal.reject.reason()),
    }
}

fn bench_digest(c: &mut Criterion) {
    let presented = value(12_345);
    c.bench_function("digest", |b| {
        b.iter(|| Digest::of(black_box(presented.as_bytes())))
    });
}

/// A token's value as a header value that clones without touching memory
/// (so that swapping it into the request costs the same for every token).
fn static_value(i: usize) -> HeaderValue {
    HeaderValue::from_static(Box::leak(value(i).into_boxed_str()))
}

fn bench_size(c: &mut Criterion, n: usize) {
    let router = router();
    let stacks = stacks(build(n));
    let view = stacks.by_api_key(API_KEY).unwrap().view().unwrap();
    let registry = &view.registry;
    let spread = spread_indexes(n);
    let digests: Vec<Digest> = spread
        .iter()
        .map(|&i| Digest::of(value(i).as_bytes()))
        .collect();
    let values: Vec<HeaderValue> = spread.iter().map(|&i| static_value(i)).collect();
    let hot_value = static_value(n / 2);
    let hot_digest = Digest::of(value(n / 2).as_bytes());
    let mut parts = request(n / 2);
    let now = Instant::now();
    // Every prepared request must be allowed, or the figures mean nothing.
    for v in values.iter().chain([&hot_value]) {
        parts.headers.insert(ACCESS_TOKEN, v.clone());
        allowed(decide(
            &router,
            &stacks,
            &parts,
            &DigestMemo::default(),
            now,
        ));
    }

    let mut group = c.benchmark_group("lookup");
    group.bench_function(BenchmarkId::new("hot", n), |b| {
        b.iter(|| {
            let found = registry.lookup(black_box(&hot_digest));
            assert!(matches!(found, Lookup::Live(..)));
        })
    });
    group.bench_function(BenchmarkId::new("spread", n), |b| {
        let mut next = 0;
        b.iter(|| {
            next = (next + 1) % SPREAD;
            let found = registry.lookup(black_box(&digests[next]));
            assert!(matches!(found, Lookup::Live(..)));
        })
    });
    group.finish();

    // Both variants put the token header into the same, cache-warm request
    // (as a request just parsed is); they differ only in which token it is.
    let mut group = c.benchmark_group("decide");
    // A fresh memo each time: a connection's first request, hashed.
    group.bench_function(BenchmarkId::new("hot", n), |b| {
        b.iter(|| {
            parts.headers.insert(ACCESS_TOKEN, hot_value.clone());
            let memo = DigestMemo::default();
            allowed(decide(&router, &stacks, black_box(&parts), &memo, now))
        })
    });
    // One memo: the same connection sending the same token again.
    group.bench_function(BenchmarkId::new("hot-same-connection", n), |b| {
        let memo = DigestMemo::default();
        b.iter(|| {
            parts.headers.insert(ACCESS_TOKEN, hot_value.clone());
            allowed(decide(&router, &stacks, black_box(&parts), &memo, now))
        })
    });
    group.bench_function(BenchmarkId::new("spread", n), |b| {
        let mut next = 0;
        b.iter(|| {
            next = (next + 1) % SPREAD;
            parts.headers.insert(ACCESS_TOKEN, values[next].clone());
            let memo = DigestMemo::default();
            allowed(decide(&router, &stacks, black_box(&parts), &memo, now))
        })
    });
    group.finish();

    // Row 15, for the tokens the requests above were permitted.
    let limits = limits();
    let client = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
    let permitted: Vec<Arc<Token>> = spread
        .iter()
        .map(|&i| Arc::clone(registry.get(&format!("blt{i:016x}")).unwrap()))
        .collect();
    let hot_token = Arc::clone(registry.get(&format!("blt{:016x}", n / 2)).unwrap());
    let row15 = |token: &Token| {
        limits.penalized(0, client).unwrap();
        limits.admit(0, token).unwrap();
    };
    let mut group = c.benchmark_group("limits");
    group.bench_function(BenchmarkId::new("hot", n), |b| {
        b.iter(|| row15(black_box(&hot_token)))
    });
    group.bench_function(BenchmarkId::new("spread", n), |b| {
        let mut next = 0;
        b.iter(|| {
            next = (next + 1) % SPREAD;
            row15(black_box(&permitted[next]))
        })
    });
    group.finish();
}

fn bench_swap(c: &mut Criterion) {
    const N: usize = 100_000;
    let current = Registry::from_parts(1, tokens(N), Default::default(), Default::default());
    let mut listed = tokens(N);
    // One token renamed: the commonest change a sync brings.
    listed[N / 3].name.push_str(" (renamed)");
    let mut group = c.benchmark_group("swap");
    group.sample_size(10);
    group.bench_function(BenchmarkId::from_parameter("100k"), |b| {
        b.iter_batched(
            || listed.clone(),
            |listed| {
                let (version, diff) = next(&current, listed, 2).unwrap();
                assert_eq!(diff.changed.len(), 1);
                version
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench_digest(&mut c);
    for n in sizes() {
        bench_size(&mut c, n);
    }
    bench_swap(&mut c);
    c.final_summary();
}
