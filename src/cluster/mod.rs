//! Cluster mode (SPEC §10): replicas share one view of every stack through
//! Redis. Without `[cluster]` nothing here runs.
//!
//! - One poller per `cma_url` stack: the node holding the stack's lease
//!   (renewed every `lease / 5`, expiring `3/4 × lease` after its holder's
//!   last renewal, so that a survivor takes over within `lease`) syncs with
//!   the CMA and publishes each new registry; the CMA budget of 5 requests a
//!   second is counted in Redis for the whole cluster.
//! - Every node applies every published version through
//!   [`StackRegistry::install_published`] and [`Shared::apply_change`], the
//!   same diff-driven revocation as a local sync, and never a version older
//!   than the one it holds.
//! - Admin revocations apply on the node asked at once, then go to Redis
//!   (their own set and a version bump); the others apply them on the
//!   announcement.
//! - Redis unreachable: nodes serve what they have; after `lease` each polls
//!   the CMA alone (fallback); when Redis is back they publish what they
//!   revoked meanwhile and converge on a version above any of theirs.
//!
//! Invariants: nothing on the request path waits on Redis; every Redis call
//! has a timeout ([`link::Link`]); no token value is ever written to Redis.
//! This module calls down into [`crate::state`] and [`crate::registry`]; only
//! [`crate::app`] and [`crate::admin`] call into it.

pub mod doc;
mod follow;
pub mod keys;
mod lead;
pub mod link;
mod scripts;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use redis::Script;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{ClusterSettings, Source as SourceConfig};
use crate::metrics::ClusterMetrics;
use crate::registry::diff::Diff;
use crate::registry::snapshot::unix_secs;
use crate::registry::source::{SharedBudget, CMA_REQUESTS_PER_SECOND};
use crate::registry::{Change, Registry, StackRegistry, SyncReport, Token};
use crate::state::{record_registry, Shared};

use doc::{compose, same_content, Doc};
use keys::StackKeys;
use link::{Link, LinkError};

/// What a sync request (on the cluster's sync channel) asks of the poller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncAsk {
    /// `/admin/sync` on another node: sync, and publish a version even if
    /// nothing changed, so that the node waiting sees the version move.
    Admin { force: bool },
    /// A node back from a Redis outage holds a version above the stored
    /// one: sync (it may have seen deletions the poller has not), and
    /// publish only what changed; the raised floor lifts the next version
    /// above it. Several nodes reconnecting must not each add a version.
    Ahead,
}

impl SyncAsk {
    /// The stack and the request a payload names (an unknown flag reads as
    /// a plain `/admin/sync`).
    fn parse(payload: &str) -> (&str, SyncAsk) {
        match payload.split_once(' ') {
            Some((name, "force")) => (name, SyncAsk::Admin { force: true }),
            Some((name, "ahead")) => (name, SyncAsk::Ahead),
            Some((name, _)) => (name, SyncAsk::Admin { force: false }),
            None => (payload, SyncAsk::Admin { force: false }),
        }
    }
}

/// How long `POST /admin/sync` waits for the poller's new version.
pub const SYNC_WAIT: Duration = Duration::from_secs(30);

/// Why cluster mode could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster: {0}")]
    Link(#[from] LinkError),
    #[error("cluster metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

struct Scripts {
    lease: Script,
    release: Script,
    publish: Script,
    admin: Script,
    read: Script,
    version: Script,
    state: Script,
    raise_floor: Script,
    budget: Script,
    heartbeat: Script,
}

/// What this node knows of one stack in the cluster.
struct StackState {
    keys: StackKeys,
    /// A `cma_url` stack (leased); a `tokens_file` stack is read by each node.
    cma: bool,
    interval: Duration,
    /// The lease holder as last seen.
    leader: Mutex<Option<String>>,
    /// This node calls the CMA for the stack (lease holder, or fallback).
    polling: AtomicBool,
    fallback: AtomicBool,
    sync_requested: AtomicBool,
    sync_force: AtomicBool,
    /// A requested sync publishes even if nothing changed (`/admin/sync`).
    sync_publish: AtomicBool,
    /// Wakes the lease loop (a sync request).
    wake: Notify,
    /// Wakes the apply loop (an announcement).
    catch_up: Notify,
    /// The cluster version this node has caught up to.
    applied: watch::Sender<u64>,
    /// Admin revocations made while Redis was unreachable: (uid, revoked).
    pending: Mutex<Vec<(String, bool)>>,
    /// The epoch of the stored registry last seen; another one means Redis
    /// lost its data since.
    epoch: Mutex<Option<String>>,
    /// Redis holds no registry document for the stack (a new or emptied
    /// Redis): the poller publishes one at once.
    doc_missing: AtomicBool,
    /// One catch-up (and replay of pending revocations) at a time.
    catching_up: tokio::sync::Mutex<()>,
}

/// This node's part in the cluster.
pub struct Cluster {
    shared: Arc<Shared>,
    node_id: String,
    prefix: String,
    lease: Duration,
    link: Link,
    metrics: ClusterMetrics,
    stacks: Vec<StackState>,
    nodes: Mutex<Vec<String>>,
    scripts: Scripts,
    was_up: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How often leases are renewed and versions checked.
fn tick(lease: Duration) -> Duration {
    (lease / 5).max(Duration::from_millis(50))
}

/// How long a lease lives after its last renewal.
fn lease_ttl(lease: Duration) -> Duration {
    lease * 3 / 4
}

/// The timeout of every Redis call.
fn call_timeout(lease: Duration) -> Duration {
    (lease / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// The cluster's CMA budget, as the registry's clients spend it: one Redis
/// slot per page request. Without Redis the node's own budget still applies.
struct RedisBudget(std::sync::Weak<Cluster>);

impl SharedBudget for RedisBudget {
    fn take(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if let Some(cluster) = self.0.upgrade() {
                cluster.take_budget().await;
            }
        })
    }
}

impl Cluster {
    /// Cluster mode for `shared` (no I/O yet: Redis is reached by [`Cluster::start`]'s tasks).
    pub fn new(
        shared: Arc<Shared>,
        settings: &ClusterSettings,
    ) -> Result<Arc<Cluster>, ClusterError> {
        // Leader and fallback series exist for leased (`cma_url`) stacks only.
        let names: Vec<&str> = shared
            .stacks
            .iter()
            .filter(|s| matches!(s.settings().source, SourceConfig::Cma { .. }))
            .map(|s| &*s.name)
            .collect();
        let metrics = shared.metrics.cluster(&names)?;
        let link = Link::new(settings.redis_url.expose(), call_timeout(settings.lease))?;
        let stacks = shared
            .stacks
            .iter()
            .map(|stack| {
                let (cma, interval) = match &stack.settings().source {
                    SourceConfig::Cma { interval, .. } => (true, *interval),
                    SourceConfig::File { .. } => {
                        (false, crate::registry::source::FILE_POLL_INTERVAL)
                    }
                };
                StackState {
                    keys: StackKeys::new(&settings.key_prefix, &stack.name),
                    cma,
                    interval,
                    leader: Mutex::new(None),
                    polling: AtomicBool::new(false),
                    fallback: AtomicBool::new(false),
                    sync_requested: AtomicBool::new(false),
                    sync_force: AtomicBool::new(false),
                    sync_publish: AtomicBool::new(false),
                    wake: Notify::new(),
                    catch_up: Notify::new(),
                    applied: watch::Sender::new(0),
                    pending: Mutex::new(Vec::new()),
                    epoch: Mutex::new(None),
                    doc_missing: AtomicBool::new(false),
                    catching_up: tokio::sync::Mutex::new(()),
                }
            })
            .collect();
        Ok(Arc::new(Cluster {
            node_id: settings.node_id.clone(),
            prefix: settings.key_prefix.clone(),
            lease: settings.lease,
            link,
            metrics,
            stacks,
            nodes: Mutex::new(Vec::new()),
            scripts: Scripts {
                lease: Script::new(scripts::LEASE),
                release: Script::new(scripts::RELEASE),
                publish: Script::new(scripts::PUBLISH),
                admin: Script::new(scripts::ADMIN),
                read: Script::new(scripts::READ),
                version: Script::new(scripts::VERSION),
                state: Script::new(scripts::STATE),
                raise_floor: Script::new(scripts::RAISE_FLOOR),
                budget: Script::new(scripts::BUDGET),
                heartbeat: Script::new(scripts::HEARTBEAT),
            },
            was_up: AtomicBool::new(false),
            shared,
        }))
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Starts the background tasks: heartbeat, subscriber, and per stack an
    /// apply loop and (for `cma_url` stacks) the lease and poll loop.
    pub fn start(self: &Arc<Self>, tracker: &TaskTracker, shutdown: &CancellationToken) {
        // Every CMA page request of this node takes a slot of the cluster's
        // budget too (SPEC §10: 5 GET/s for the whole cluster).
        let shared_budget = RedisBudget(Arc::downgrade(self));
        self.shared.cma_budget.share(Arc::new(shared_budget));
        tracker.spawn(Arc::clone(self).heartbeat_loop(shutdown.clone()));
        tracker.spawn(Arc::clone(self).subscriber_loop(shutdown.clone()));
        for (index, state) in self.stacks.iter().enumerate() {
            tracker.spawn(Arc::clone(self).apply_loop(index, shutdown.clone()));
            if state.cma {
                tracker.spawn(Arc::clone(self).lead_loop(index, shutdown.clone()));
            }
        }
    }

    fn stack(&self, index: usize) -> Option<(&Arc<StackRegistry>, &StackState)> {
        Some((self.shared.stacks.get(index)?, self.stacks.get(index)?))
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.shared.stacks.iter().position(|s| &*s.name == name)
    }

    /// Whether this node polls for the stack on its own for want of Redis.
    fn in_fallback(&self) -> bool {
        !self.link.is_up() && self.link.down_for() >= self.lease
    }

    async fn heartbeat_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let nodes_key = keys::nodes(&self.prefix);
        let window = (self.lease * 3).as_millis().to_string();
        loop {
            let now = unix_ms().to_string();
            let seen = self
                .link
                .script::<Vec<String>>(
                    &self.scripts.heartbeat,
                    &[&nodes_key],
                    &[&self.node_id, &now, &window],
                )
                .await;
            if let Ok(nodes) = seen {
                self.metrics.nodes.set(nodes.len() as i64);
                self.shared.limits.set_nodes(nodes.len());
                *lock(&self.nodes) = nodes;
            }
            let up = self.link.is_up();
            self.metrics.redis_up.set(i64::from(up));
            if up != self.was_up.swap(up, Ordering::AcqRel) {
                if up {
                    tracing::info!(node = %self.node_id, "redis reachable");
                    self.on_reconnect().await;
                } else {
                    tracing::warn!(node = %self.node_id, "redis unreachable; serving what this node knows");
                }
            }
            tokio::select! {
                () = tokio::time::sleep(tick(self.lease)) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Raises the stack's version floor in Redis to `local` (never lowers
    /// it); returns the registry version stored there.
    async fn raise_floor(&self, state: &StackState, local: u64) -> Result<u64, LinkError> {
        self.link
            .script::<u64>(
                &self.scripts.raise_floor,
                &[&state.keys.registry],
                &[&local.to_string()],
            )
            .await
    }

    /// Redis is back (or reached for the first time): raise each stack's
    /// floor to what this node holds, so that the next version passes it,
    /// and ask for a sync where this node ran ahead.
    async fn on_reconnect(&self) {
        for (index, state) in self.stacks.iter().enumerate() {
            let Some((stack, _)) = self.stack(index) else {
                continue;
            };
            let local = stack.view().map_or(0, |v| v.registry.version());
            if let Ok(stored) = self.raise_floor(state, local).await {
                if state.cma && local > stored {
                    self.request_sync(&stack.name, SyncAsk::Ahead).await;
                }
            }
            state.catch_up.notify_one();
        }
    }

    async fn request_sync(&self, stack: &str, ask: SyncAsk) -> bool {
        let payload = match ask {
            SyncAsk::Admin { force: true } => format!("{stack} force"),
            SyncAsk::Admin { force: false } => stack.to_owned(),
            SyncAsk::Ahead => format!("{stack} ahead"),
        };
        self.link
            .publish(&keys::sync_channel(&self.prefix), &payload)
            .await
            .is_ok()
    }

    /// The leader of a stack as last seen, and the cluster version applied here.
    pub fn stack_view(&self, index: usize) -> (Option<String>, u64) {
        match self.stacks.get(index) {
            Some(state) => (lock(&state.leader).clone(), *state.applied.borrow()),
            None => (None, 0),
        }
    }

    /// `GET /admin/cluster`.
    pub fn status(&self) -> Value {
        let mut stacks = serde_json::Map::new();
        for (index, stack) in self.shared.stacks.iter().enumerate() {
            let Some(state) = self.stacks.get(index) else {
                continue;
            };
            let version = stack.view().map_or(0, |v| v.registry.version());
            let polling = if state.cma {
                state.polling.load(Ordering::Acquire)
            } else {
                true
            };
            stacks.insert(
                stack.name.to_string(),
                json!({
                    "version": version,
                    "cluster_version": *state.applied.borrow(),
                    "leader": if state.cma { lock(&state.leader).clone() } else { None },
                    "polling": polling,
                    "fallback": state.fallback.load(Ordering::Acquire),
                    "source": if state.cma { "cma" } else { "file" },
                }),
            );
        }
        json!({
            "node_id": self.node_id,
            "redis": if self.link.is_up() { "up" } else { "down" },
            "lease_ms": u64::try_from(self.lease.as_millis()).unwrap_or(u64::MAX),
            "stacks": stacks,
            "nodes": *lock(&self.nodes),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::SyncAsk;

    #[test]
    fn sync_requests_read_as_they_were_sent() {
        assert_eq!(
            SyncAsk::parse("website"),
            ("website", SyncAsk::Admin { force: false })
        );
        assert_eq!(
            SyncAsk::parse("website force"),
            ("website", SyncAsk::Admin { force: true })
        );
        assert_eq!(SyncAsk::parse("website ahead"), ("website", SyncAsk::Ahead));
        assert_eq!(
            SyncAsk::parse("website later"),
            ("website", SyncAsk::Admin { force: false })
        );
    }
}
