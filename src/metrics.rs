//! Prometheus metrics (SPEC §7), all prefixed `stackgate_`.
//!
//! The `token` label is always a token's uid, never its value; series of a
//! token that is gone are removed with [`Metrics::forget_token`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::route::RouteKind;

/// Values of the `outcome` label of `stackgate_requests_total`.
pub const OUTCOMES: [&str; 3] = ["forwarded", "rejected", "upstream_error"];
/// The `stack` label when a request names no configured stack.
pub const NO_STACK: &str = "";
/// The `token` label when no token was identified.
pub const NO_TOKEN: &str = "";

/// Every metric the gateway exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub rejections: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub request_duration: HistogramVec,
    pub active_sessions: IntGaugeVec,
    pub sessions_dropped: IntCounterVec,
    pub revocation_seconds: Histogram,
    pub registry_tokens: IntGaugeVec,
    pub registry_version: IntGaugeVec,
    pub registry_last_success: GaugeVec,
    pub registry_sync_failures: IntCounterVec,
    pub registry_held_back: IntGaugeVec,
    pub snapshot_write_failures: IntCounterVec,
    pub connections_parked: prometheus::IntGauge,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const REVOCATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace("stackgate");
        let hopts = |name: &str, help: &str, buckets: &[f64]| {
            HistogramOpts::new(name, help)
                .namespace("stackgate")
                .buckets(buckets.to_vec())
        };
        let metrics = Metrics {
            requests: IntCounterVec::new(
                opts(
                    "requests_total",
                    "Requests by stack, token uid, route kind and outcome.",
                ),
                &["stack", "token", "route", "outcome"],
            )?,
            rejections: IntCounterVec::new(
                opts(
                    "rejections_total",
                    "Requests refused by the gateway, by reason.",
                ),
                &["stack", "reason"],
            )?,
            upstream_duration: HistogramVec::new(
                hopts(
                    "upstream_duration_seconds",
                    "Time from forwarding to the upstream's response head.",
                    LATENCY_BUCKETS,
                ),
                &["route"],
            )?,
            request_duration: HistogramVec::new(
                hopts(
                    "request_duration_seconds",
                    "Time from request head to response head.",
                    LATENCY_BUCKETS,
                ),
                &["route"],
            )?,
            active_sessions: IntGaugeVec::new(
                opts(
                    "active_sessions",
                    "Client connections on which a token is in use.",
                ),
                &["stack", "token"],
            )?,
            sessions_dropped: IntCounterVec::new(
                opts(
                    "sessions_dropped_total",
                    "Sessions ended by the gateway, by cause.",
                ),
                &["stack", "cause"],
            )?,
            revocation_seconds: Histogram::with_opts(hopts(
                "revocation_seconds",
                "From the registry learning of a revocation to the token's last session closed.",
                REVOCATION_BUCKETS,
            ))?,
            registry_tokens: IntGaugeVec::new(
                opts("registry_tokens", "Tokens in the registry."),
                &["stack"],
            )?,
            registry_version: IntGaugeVec::new(
                opts("registry_version", "Registry version."),
                &["stack"],
            )?,
            registry_last_success: GaugeVec::new(
                opts(
                    "registry_last_success_timestamp_seconds",
                    "Unix time of the last successful registry sync.",
                ),
                &["stack"],
            )?,
            registry_sync_failures: IntCounterVec::new(
                opts("registry_sync_failures_total", "Failed registry syncs."),
                &["stack"],
            )?,
            registry_held_back: IntGaugeVec::new(
                opts(
                    "registry_held_back_removals",
                    "Token removals held back by the mass-removal guard.",
                ),
                &["stack"],
            )?,
            snapshot_write_failures: IntCounterVec::new(
                opts(
                    "snapshot_write_failures_total",
                    "Snapshot writes that failed (the registry is then not persisted).",
                ),
                &["stack"],
            )?,
            connections_parked: prometheus::IntGauge::with_opts(opts(
                "connections_parked",
                "Idle HTTP/1.1 keep-alive connections parked without hyper's buffers.",
            ))?,
            registry,
        };
        let collectors: [Box<dyn prometheus::core::Collector>; 14] = [
            Box::new(metrics.requests.clone()),
            Box::new(metrics.rejections.clone()),
            Box::new(metrics.upstream_duration.clone()),
            Box::new(metrics.request_duration.clone()),
            Box::new(metrics.active_sessions.clone()),
            Box::new(metrics.sessions_dropped.clone()),
            Box::new(metrics.revocation_seconds.clone()),
            Box::new(metrics.registry_tokens.clone()),
            Box::new(metrics.registry_version.clone()),
            Box::new(metrics.registry_last_success.clone()),
            Box::new(metrics.registry_sync_failures.clone()),
            Box::new(metrics.registry_held_back.clone()),
            Box::new(metrics.snapshot_write_failures.clone()),
            Box::new(metrics.connections_parked.clone()),
        ];
        for collector in collectors {
            metrics.registry.register(collector)?;
        }
        Ok(metrics)
    }

    /// Prepares the per-stack series so they show before the first event.
    pub fn init_stack(&self, stack: &str) {
        self.registry_sync_failures.with_label_values(&[stack]);
        self.registry_held_back.with_label_values(&[stack]).set(0);
        self.registry_tokens.with_label_values(&[stack]);
        self.registry_version.with_label_values(&[stack]);
        self.registry_last_success.with_label_values(&[stack]);
        self.snapshot_write_failures.with_label_values(&[stack]);
    }

    /// Removes every series labelled with a token that is gone.
    pub fn forget_token(&self, stack: &str, uid: &str) {
        for route in RouteKind::ALL {
            for outcome in OUTCOMES {
                let _ = self
                    .requests
                    .remove_label_values(&[stack, uid, route.name(), outcome]);
            }
        }
        let _ = self.active_sessions.remove_label_values(&[stack, uid]);
    }

    /// `request_duration_seconds` and `upstream_duration_seconds` of each
    /// route kind, resolved once so that a request does no label lookup.
    pub fn durations(&self) -> RouteDurations {
        let by_route =
            |vec: &HistogramVec| RouteKind::ALL.map(|kind| vec.with_label_values(&[kind.name()]));
        RouteDurations {
            request: by_route(&self.request_duration),
            upstream: by_route(&self.upstream_duration),
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let families = self.registry.gather();
        if TextEncoder::new().encode(&families, &mut out).is_err() {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// The duration histograms of every route kind, indexed by [`RouteKind::index`].
pub struct RouteDurations {
    pub request: [Histogram; RouteKind::ALL.len()],
    pub upstream: [Histogram; RouteKind::ALL.len()],
}

/// A token's counters for `GET /admin/tokens` (requests seen, how many were
/// refused, when the token was last used) and its
/// `requests_total{outcome="forwarded"}` series, resolved on first use.
///
/// Held by the registry's token ([`crate::registry::Token::usage`]) and
/// carried by uid from one registry version to the next, so a request
/// reaches it through the token it was decided on: no map lookup, a few
/// atomic adds. It goes with the token.
#[derive(Default)]
pub struct Usage {
    requests: AtomicU64,
    rejections: AtomicU64,
    /// Unix seconds; 0 for never.
    last_used: AtomicU64,
    forwarded: [OnceLock<IntCounter>; RouteKind::ALL.len()],
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Usage {
    /// Counts a refused request.
    pub fn refused(&self) {
        self.requests.fetch_add(1, Relaxed);
        self.rejections.fetch_add(1, Relaxed);
        self.last_used.store(unix_now(), Relaxed);
    }

    /// Counts a forwarded request, here and in `requests_total` (the series
    /// of token `uid` on stack `stack`, route kind `route`).
    pub fn forwarded(&self, metrics: &Metrics, stack: &str, uid: &str, route: RouteKind) {
        self.requests.fetch_add(1, Relaxed);
        self.last_used.store(unix_now(), Relaxed);
        self.forwarded[route.index()]
            .get_or_init(|| {
                metrics
                    .requests
                    .with_label_values(&[stack, uid, route.name(), "forwarded"])
            })
            .inc();
    }

    /// Requests seen (forwarded or refused).
    pub fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }

    /// Requests refused.
    pub fn rejections(&self) -> u64 {
        self.rejections.load(Relaxed)
    }

    /// When the token was last used (Unix seconds), if ever.
    pub fn last_used(&self) -> Option<u64> {
        Some(self.last_used.load(Relaxed)).filter(|&secs| secs > 0)
    }
}

/// The cluster metrics of SPEC §10, registered beside the others only in
/// cluster mode (a standalone `/metrics` stays as it was).
#[derive(Clone)]
pub struct ClusterMetrics {
    /// `stackgate_cluster_redis_up`: 1 while Redis answers.
    pub redis_up: prometheus::IntGauge,
    /// `stackgate_cluster_leader{stack}`: 1 on the node polling for the stack.
    pub leader: IntGaugeVec,
    /// `stackgate_cluster_nodes`: nodes seen in the last 3 × lease.
    pub nodes: prometheus::IntGauge,
    /// `stackgate_cluster_propagation_seconds`: publication to application here.
    pub propagation: Histogram,
    /// `stackgate_cluster_fallback{stack}`: 1 while this node polls alone.
    pub fallback: IntGaugeVec,
}

const PROPAGATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

impl Metrics {
    /// Registers the cluster metrics (call once), with leader and fallback
    /// series for `stacks` (the leased ones).
    pub fn cluster(&self, stacks: &[&str]) -> Result<ClusterMetrics, prometheus::Error> {
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace("stackgate");
        let cluster = ClusterMetrics {
            redis_up: prometheus::IntGauge::with_opts(opts(
                "cluster_redis_up",
                "1 while this node reaches Redis, else 0.",
            ))?,
            leader: IntGaugeVec::new(
                opts(
                    "cluster_leader",
                    "1 on the node that holds the stack's poller lease.",
                ),
                &["stack"],
            )?,
            nodes: prometheus::IntGauge::with_opts(opts(
                "cluster_nodes",
                "Nodes seen in the last 3 x lease.",
            ))?,
            propagation: Histogram::with_opts(
                HistogramOpts::new(
                    "cluster_propagation_seconds",
                    "From a registry version's publication to its application on this node.",
                )
                .namespace("stackgate")
                .buckets(PROPAGATION_BUCKETS.to_vec()),
            )?,
            fallback: IntGaugeVec::new(
                opts(
                    "cluster_fallback",
                    "1 while this node polls the CMA on its own because Redis is unreachable.",
                ),
                &["stack"],
            )?,
        };
        self.registry.register(Box::new(cluster.redis_up.clone()))?;
        self.registry.register(Box::new(cluster.leader.clone()))?;
        self.registry.register(Box::new(cluster.nodes.clone()))?;
        self.registry
            .register(Box::new(cluster.propagation.clone()))?;
        self.registry.register(Box::new(cluster.fallback.clone()))?;
        for stack in stacks {
            cluster.leader.with_label_values(&[stack]).set(0);
            cluster.fallback.with_label_values(&[stack]).set(0);
        }
        Ok(cluster)
    }
}
