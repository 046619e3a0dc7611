//! Soak: load through the release gateway for a set time while its
//! registry changes every 100 ms, every answer checked against the registry.
//!
//! ```sh
//! cargo bench --bench soak                              # 60 s, 32 connections, fake CMA
//! cargo bench --bench soak -- --duration 600            # the recorded 10-minute run
//! cargo bench --bench soak -- --source file --concurrency 64
//! ```
//!
//! Options: `--duration SECS` (60), `--concurrency N` (32 client connections:
//! one in eight h2c with 8 streams each, one in sixteen a "stranger" sending
//! only unknown tokens, the rest HTTP/1.1 keep-alive clients each holding one
//! token's sessions), `--source cma|file` (the registry source: the fake CMA
//! of `tests/support/cma.rs`, or a tokens file; default `cma`),
//! `--rate N` (5000 requests/s across all clients, steady so that memory
//! after warm-up and at the end is compared at one load level on a shared
//! machine; 0: as fast as the clients go), `--change-every MS` (100),
//! `--tokens N` (40 listed at start), `--universe N` (120: at most that many
//! distinct tokens are ever listed, then additions re-list removed ones; 0:
//! a fresh token every time), `--warmup SECS` (20, at most a quarter of the
//! run), `--seed N`.
//!
//! Why a universe: the gateway remembers every removed token's digests for
//! 7 days (README), so with fresh tokens its memory grows with the number of
//! tokens ever removed, by design. A bounded universe keeps that memory
//! bounded, so that any growth the RSS check sees is a leak.
//!
//! A change is one of: add a token, remove one, narrow one (drop a branch or
//! alias, `$all` down to `main`, or move it to another environment), revoke
//! one through `POST /admin/tokens/{uid}/revoke`, lift a revocation, re-add a
//! removed one. Syncs are `POST /admin/sync` (the CMA source is set to poll
//! hourly), so each change is live exactly when its admin call returns; see
//! `soak/model.rs` for how an answer is judged against the versions that
//! were possible while it was in flight. With the fake CMA, a sync waits for
//! a slot of the gateway's CMA budget (5 GET/s), so changes come about 6.7
//! a second; with `--source file` every tick is a change.
//!
//! It fails (exit status 1) on any wrongly allowed or wrongly rejected
//! answer, other mismatch, 5xx, unexplained transport error or timeout, lost
//! h2c connection, HTTP/1.1 connection left open after a change that had to
//! close it, or failed change; or if the gateway's RSS at the end exceeds
//! its RSS after warm-up by more than 20%, or descriptors do not return to
//! their level before the load once the clients have closed.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/support/cma.rs"]
mod cma;
#[path = "soak/driver.rs"]
mod driver;
#[path = "soak/harness.rs"]
mod harness;
#[path = "soak/load.rs"]
mod load;
#[path = "soak/model.rs"]
mod model;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driver::{Driver, Source};
use harness::{AdminClient, Sample};
use load::{Ctx, REASONS};
use model::{ChangeKind, History, Tok, Version};

/// The soak stack's api_key.
pub const API_KEY: &str = "blt_soak_stack";
const ADMIN: &str = "soak-admin-bearer";
/// How often the gateway process is sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// RSS at the end may exceed RSS after warm-up by this fraction.
const RSS_TOLERANCE: f64 = 0.20;
/// Descriptors (other than client and upstream connections) after the run
/// may exceed those before it by this many.
const FD_MARGIN: usize = 4;

struct Args {
    duration: Duration,
    concurrency: usize,
    source: String,
    change_every: Duration,
    tokens: u32,
    warmup: Duration,
    seed: u64,
    /// Requests per second across all clients; 0: as fast as they go.
    rate: u64,
    /// Distinct tokens ever listed; 0: no limit.
    universe: u32,
}

fn args() -> Args {
    let mut args = Args {
        duration: Duration::from_secs(60),
        concurrency: 32,
        source: "cma".into(),
        change_every: Duration::from_millis(100),
        tokens: 40,
        warmup: Duration::from_secs(20),
        seed: 8,
        rate: 5000,
        universe: 120,
    };
    let list: Vec<String> = std::env::args().collect();
    for pair in list.windows(2) {
        let number = || -> u64 { pair[1].parse().expect("a number") };
        match pair[0].as_str() {
            "--duration" => args.duration = Duration::from_secs(number()),
            "--concurrency" => args.concurrency = number().max(4) as usize,
            "--source" => args.source = pair[1].clone(),
            "--change-every" => args.change_every = Duration::from_millis(number()),
            "--tokens" => args.tokens = number().max(4) as u32,
            "--warmup" => args.warmup = Duration::from_secs(number()),
            "--seed" => args.seed = number(),
            "--rate" => args.rate = number(),
            "--universe" => args.universe = number() as u32,
            _ => {}
        }
    }
    assert!(
        args.source == "cma" || args.source == "file",
        "--source is cma or file"
    );
    args.warmup = args.warmup.min(args.duration / 4);
    args
}

fn rate(rate: u64) -> String {
    if rate == 0 {
        "unpaced".into()
    } else {
        format!("paced at {rate} requests/s")
    }
}

fn config(origin: &str, registry: &str) -> String {
    let route = |kind: &str, host: &str| {
        format!("[[routes]]\nkind = \"{kind}\"\nhosts = [\"{host}\"]\nupstream = \"{origin}\"\n")
    };
    format!(
        r#"
[listen]
http = "127.0.0.1:0"
admin = "127.0.0.1:0"
[admin]
token_env = "SOAK_ADMIN"
{}{}{}
[[stacks]]
name = "soak"
api_key = "{API_KEY}"
[stacks.registry]
{registry}
max_staleness = "0"
"#,
        route("delivery", "cdn.soak"),
        route("preview", "preview.soak"),
        route("graphql", "graphql.soak"),
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list`
    }
    let args = args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let passed = runtime.block_on(soak(args));
    // Client tasks may still hold connections; do not wait for them.
    runtime.shutdown_background();
    if !passed {
        std::process::exit(1);
    }
}

async fn soak(args: Args) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let origin = harness::spawn_origin().await;
    let initial = Version {
        tokens: (0..args.tokens)
            .map(|n| (n, Arc::new(Tok::original(n))))
            .collect::<BTreeMap<_, _>>(),
        revoked: Default::default(),
        kind: ChangeKind::Initial,
        target: None,
    };
    let (source, registry) = if args.source == "cma" {
        let cma = cma::spawn_cma().await;
        cma.set_tokens(initial.list());
        let registry = format!(
            "cma_url = \"{}\"\nauth = \"authtoken\"\ncredential_env = \"SOAK_CMA\"\nsync_interval = \"1h\"",
            cma.url()
        );
        (Source::Cma(cma), registry)
    } else {
        let path = dir.path().join("tokens.json");
        let text = serde_json::json!({ "tokens": initial.list() }).to_string();
        std::fs::write(&path, text).unwrap();
        let registry = format!("tokens_file = \"{}\"", path.display());
        (Source::File(path), registry)
    };
    let config_path = dir.path().join("stackgate.toml");
    std::fs::write(&config_path, config(&format!("http://{origin}"), &registry)).unwrap();
    let gateway = harness::start(&config_path, ADMIN);
    let mut admin = AdminClient::new(gateway.admin, ADMIN);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((200, _)) = admin.call("GET", "/readyz").await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (_, stacks) = admin.call("GET", "/admin/stacks").await.unwrap();
    let stacks: serde_json::Value = serde_json::from_str(&stacks).unwrap();
    let gateway_version = stacks["stacks"][0]["registry_version"].as_u64().unwrap();
    let sample = || harness::sample(gateway.pid, gateway.http.port(), origin.port());
    let baseline = sample();

    let history = Arc::new(History::new(initial));
    let ctx = Arc::new(Ctx::new(
        gateway.http,
        Arc::clone(&history),
        args.seed,
        args.rate > 0,
    ));
    let pacer = tokio::spawn(load::pace(Arc::clone(&ctx), args.rate));
    let h2 = (args.concurrency / 8).max(1);
    let strangers = (args.concurrency / 16).max(1);
    let h1 = args.concurrency - h2 - strangers;
    println!(
        "soak: {} s, {h1} HTTP/1.1 + {strangers} stranger + {h2} h2c connections ({} streams in flight), \
         {}, source {}, a change every {} ms, {} tokens at start; gateway pid {}",
        args.duration.as_secs(),
        h1 + strangers + h2 * 8,
        rate(args.rate),
        args.source,
        args.change_every.as_millis(),
        args.tokens,
        gateway.pid
    );
    let mut clients = tokio::task::JoinSet::new();
    for id in 0..h1 {
        clients.spawn(load::h1_client(Arc::clone(&ctx), id as u64, false));
    }
    for id in 0..strangers {
        clients.spawn(load::h1_client(Arc::clone(&ctx), (h1 + id) as u64, true));
    }
    for id in 0..h2 {
        clients.spawn(load::h2_client(Arc::clone(&ctx), id as u64));
    }
    let driver = Driver::new(
        Arc::clone(&history),
        admin,
        source,
        gateway_version,
        args.universe,
        args.seed,
    );
    let change_stats = Arc::clone(&driver.stats);
    let driver = tokio::spawn(driver.run(args.change_every, ctx.stop.clone()));

    // Sample every 5 s until the end (or a failed change stops the run).
    let started = Instant::now();
    let mut samples: Vec<(Duration, Sample)> = Vec::new();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.tick().await;
    let mut last_requests = 0;
    while started.elapsed() < args.duration {
        tokio::select! {
            _ = tick.tick() => {}
            () = ctx.stop.cancelled() => break,
        }
        let s = sample();
        let at = started.elapsed();
        samples.push((at, s));
        let requests = ctx.stats.requests.load(Ordering::Relaxed);
        println!(
            "{:>5.0} s  {:>9} requests ({:>5.0}/s)  {:>5} changes  failures {}  RSS {:>6} KiB  fds {:>4} (clients {}, upstream {})",
            at.as_secs_f64(),
            requests,
            (requests - last_requests) as f64 / SAMPLE_EVERY.as_secs_f64(),
            change_stats.total(),
            ctx.stats.failures() + change_stats.failures.load(Ordering::Relaxed),
            s.rss_kib,
            s.fds,
            s.clients,
            s.upstream,
        );
        last_requests = requests;
    }
    let elapsed = started.elapsed();
    ctx.stop.cancel();
    let _ = driver.await;
    let _ = pacer.await;
    while clients.join_next().await.is_some() {}

    // Every client connection is closed: the gateway must let go of them.
    let closing = Instant::now();
    let mut after = sample();
    let settled = |s: &Sample| s.clients == 0 && s.other_fds() <= baseline.other_fds() + FD_MARGIN;
    while !settled(&after) && closing.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = sample();
    }
    let warnings = gateway.warnings.load(Ordering::Relaxed);
    if after.other_fds() > baseline.other_fds() + FD_MARGIN {
        for line in harness::describe_other_fds(gateway.pid, gateway.http.port(), origin.port()) {
            println!("  {line}");
        }
    }
    drop(gateway);
    report(
        &args,
        elapsed,
        &ctx,
        &change_stats,
        baseline,
        &samples,
        after,
        warnings,
    )
}

#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    elapsed: Duration,
    ctx: &Ctx,
    changes: &driver::ChangeStats,
    baseline: Sample,
    samples: &[(Duration, Sample)],
    after: Sample,
    warnings: u64,
) -> bool {
    let stats = &ctx.stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let requests = get(&stats.requests);
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |name: &str, value: String| rows.push((name.to_owned(), value));
    row(
        "run",
        format!(
            "{:.0} s, source {}, concurrency {}, {}",
            elapsed.as_secs_f64(),
            args.source,
            args.concurrency,
            rate(args.rate)
        ),
    );
    row(
        "requests",
        format!(
            "{requests} ({:.0}/s; HTTP/1.1 {}, h2c {})",
            requests as f64 / elapsed.as_secs_f64(),
            get(&stats.h1_requests),
            get(&stats.h2_requests)
        ),
    );
    row(
        "connections opened",
        format!(
            "HTTP/1.1 {}, h2c {}",
            get(&stats.h1_connections),
            get(&stats.h2_connections)
        ),
    );
    row(
        "allowed (200 from the origin)",
        get(&stats.allowed).to_string(),
    );
    for (i, reason) in REASONS.iter().enumerate() {
        row(
            &format!("refused {reason}"),
            get(&stats.rejected[i]).to_string(),
        );
    }
    row(
        "cut by revocation",
        format!(
            "HTTP/1.1 {}, h2 streams {}",
            get(&stats.cut_h1),
            get(&stats.cut_h2)
        ),
    );
    let must_be_zero = [
        ("wrongly allowed", get(&stats.wrongly_allowed)),
        ("wrongly rejected", get(&stats.wrongly_rejected)),
        ("other mismatches", get(&stats.other_mismatch)),
        ("5xx", get(&stats.five_xx)),
        (
            "transport errors not explained",
            get(&stats.transport_errors),
        ),
        ("timeouts", get(&stats.timeouts)),
        ("h2c connections lost", get(&stats.h2_lost)),
        ("HTTP/1.1 sessions not cut", get(&stats.missed_cuts)),
        ("failed changes", get(&changes.failures)),
    ];
    for (name, value) in must_be_zero {
        row(&format!("{name} (must be 0)"), value.to_string());
    }
    let kinds: Vec<String> = ChangeKind::ALL
        .iter()
        .zip(&changes.applied)
        .map(|(k, c)| format!("{} {}", k.name(), get(c)))
        .collect();
    row(
        "changes applied",
        format!(
            "{} ({:.1}/s): {}",
            changes.total(),
            changes.total() as f64 / elapsed.as_secs_f64(),
            kinds.join(", ")
        ),
    );
    let universe = match args.universe {
        0 => "no limit".to_owned(),
        n => format!("at most {n}"),
    };
    row(
        "distinct tokens listed",
        format!(
            "{} ({universe}; {} listed at the end)",
            ctx.history.next_fresh.load(Ordering::Relaxed),
            ctx.history.latest().tokens.len()
        ),
    );
    let avg = |total: &std::sync::atomic::AtomicU64, n: &std::sync::atomic::AtomicU64| {
        get(total) as f64 / get(n).max(1) as f64 / 1000.0
    };
    row(
        "admin call until live",
        format!(
            "sync avg {:.1} ms, max {:.1} ms; revoke/lift avg {:.1} ms, max {:.1} ms",
            avg(&changes.sync_total_us, &changes.syncs),
            get(&changes.sync_max_us) as f64 / 1000.0,
            avg(&changes.admin_total_us, &changes.admins),
            get(&changes.admin_max_us) as f64 / 1000.0,
        ),
    );

    let warm = samples
        .iter()
        .find(|(at, _)| *at >= args.warmup)
        .or(samples.first())
        .map(|(_, s)| *s)
        .unwrap_or(baseline);
    let last = samples.last().map_or(baseline, |(_, s)| *s);
    let max_rss = samples.iter().map(|(_, s)| s.rss_kib).max().unwrap_or(0);
    let max_fds = samples.iter().map(|(_, s)| s.fds).max().unwrap_or(0);
    row(
        "gateway RSS (KiB)",
        format!(
            "before load {}, after warm-up {}, max {max_rss}, end {} ({:+.1}%), after clients closed {}",
            baseline.rss_kib,
            warm.rss_kib,
            last.rss_kib,
            (last.rss_kib as f64 / warm.rss_kib.max(1) as f64 - 1.0) * 100.0,
            after.rss_kib
        ),
    );
    row(
        "gateway fds",
        format!(
            "before load {} ({} other), after warm-up {}, max {max_fds}, end {}, \
             after clients closed {} (clients {}, upstream {}, other {})",
            baseline.fds,
            baseline.other_fds(),
            warm.fds,
            last.fds,
            after.fds,
            after.clients,
            after.upstream,
            after.other_fds()
        ),
    );
    row("gateway WARN/ERROR log lines", warnings.to_string());
    let width = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    println!();
    for (name, value) in &rows {
        println!("| {name:<width$} | {value} |");
    }

    let mut failed = Vec::new();
    for (name, value) in must_be_zero {
        if value > 0 {
            failed.push(format!("{name}: {value}"));
        }
    }
    if requests == 0 || get(&stats.allowed) == 0 {
        failed.push("no request was allowed".into());
    }
    let rss_limit = warm.rss_kib as f64 * (1.0 + RSS_TOLERANCE);
    if last.rss_kib as f64 > rss_limit {
        failed.push(format!(
            "RSS grew from {} to {} KiB after warm-up (over {:.0}%)",
            warm.rss_kib,
            last.rss_kib,
            RSS_TOLERANCE * 100.0
        ));
    }
    if after.clients > 0 {
        failed.push(format!(
            "{} client connections still open at the gateway 10 s after the clients closed",
            after.clients
        ));
    }
    if after.other_fds() > baseline.other_fds() + FD_MARGIN {
        failed.push(format!(
            "descriptors other than connections grew from {} to {}",
            baseline.other_fds(),
            after.other_fds()
        ));
    }
    if after.fds > warm.fds + FD_MARGIN {
        failed.push(format!(
            "descriptors after the clients closed ({}) exceed those after warm-up ({})",
            after.fds, warm.fds
        ));
    }
    if failed.is_empty() {
        println!("\nsoak passed");
        true
    } else {
        println!("\nsoak FAILED:\n  {}", failed.join("\n  "));
        if let Some(first) = changes.first_failure.lock().unwrap().as_ref() {
            println!("  first failed change: {first}");
        }
        false
    }
}
