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
pub mod keys;
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

    /// Redis is back (or reached for the first time): raise each stack's
    /// floor to what this node holds, so that the next version passes it,
    /// and ask for a sync where this node ran ahead.
    async fn on_reconnect(&self) {
        for (index, state) in self.stacks.iter().enumerate() {
            let Some((stack, _)) = self.stack(index) else {
                continue;
            };
            let local = stack.view().map_or(0, |v| v.registry.version());
            let stored = self
                .link
                .script::<u64>(
                    &self.scripts.raise_floor,
                    &[&state.keys.registry],
                    &[&local.to_string()],
                )
                .await;
            if let Ok(stored) = stored {
                if state.cma && local > stored {
                    self.request_sync(&stack.name, false).await;
                }
            }
            state.catch_up.notify_one();
        }
    }

    async fn request_sync(&self, stack: &str, force: bool) -> bool {
        let payload = if force {
            format!("{stack} force")
        } else {
            stack.to_owned()
        };
        self.link
            .publish(&keys::sync_channel(&self.prefix), &payload)
            .await
            .is_ok()
    }

    async fn subscriber_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let sync_channel = keys::sync_channel(&self.prefix);
        let pattern = keys::versions_pattern(&self.prefix);
        loop {
            let timeout = self.link.timeout();
            let connected = async {
                let mut pubsub =
                    tokio::time::timeout(timeout, self.link.client().get_async_pubsub())
                        .await
                        .ok()?
                        .ok()?;
                tokio::time::timeout(timeout, pubsub.psubscribe(&pattern))
                    .await
                    .ok()?
                    .ok()?;
                tokio::time::timeout(timeout, pubsub.subscribe(&sync_channel))
                    .await
                    .ok()?
                    .ok()?;
                Some(pubsub)
            };
            let pubsub = tokio::select! {
                pubsub = connected => pubsub,
                () = shutdown.cancelled() => return,
            };
            if let Some(pubsub) = pubsub {
                // Announcements may have been missed while unsubscribed.
                for state in &self.stacks {
                    state.catch_up.notify_one();
                }
                let mut messages = pubsub.into_on_message();
                loop {
                    let message = tokio::select! {
                        message = messages.next() => message,
                        () = shutdown.cancelled() => return,
                    };
                    let Some(message) = message else { break };
                    let channel = message.get_channel_name();
                    let payload: String = message.get_payload().unwrap_or_default();
                    if channel == sync_channel {
                        self.on_sync_request(&payload);
                    } else if let Some(index) =
                        keys::stack_of_channel(&self.prefix, channel).and_then(|n| self.index_of(n))
                    {
                        if let Some(state) = self.stacks.get(index) {
                            state.catch_up.notify_one();
                        }
                    }
                }
                tracing::debug!("redis subscription ended; resubscribing");
            }
            tokio::select! {
                () = tokio::time::sleep(tick(self.lease)) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    fn on_sync_request(&self, payload: &str) {
        let (name, force) = match payload.split_once(' ') {
            Some((name, flag)) => (name, flag == "force"),
            None => (payload, false),
        };
        let Some(state) = self.index_of(name).and_then(|i| self.stacks.get(i)) else {
            return;
        };
        if force {
            state.sync_force.store(true, Ordering::Release);
        }
        state.sync_requested.store(true, Ordering::Release);
        state.wake.notify_one();
    }

    /// Applies announcements, and every tick checks the stored version in
    /// case one was missed.
    async fn apply_loop(self: Arc<Self>, index: usize, shutdown: CancellationToken) {
        let Some((_, state)) = self.stack(index) else {
            return;
        };
        let mut check = tokio::time::interval(tick(self.lease));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let announced = tokio::select! {
                () = state.catch_up.notified() => true,
                _ = check.tick() => false,
                () = shutdown.cancelled() => return,
            };
            if !announced {
                let stored = self
                    .link
                    .script::<u64>(&self.scripts.version, &[&state.keys.registry], &[])
                    .await;
                let pending = !lock(&state.pending).is_empty();
                let Ok(stored) = stored else { continue };
                if state.cma {
                    self.raise_floor_if_ahead(index, stored).await;
                }
                if stored == *state.applied.borrow() && !pending {
                    continue;
                }
            }
            if let Err(err) = self.catch_up(index).await {
                tracing::debug!(stack = index, error = %err, "cluster catch-up failed");
            }
        }
    }

    /// A node that ran ahead of the stored version (it polled alone while
    /// Redis was away) raises the stack's floor to its version; the poller
    /// sees the floor and publishes above it, so every node converges
    /// without relying on a pub/sub message arriving.
    async fn raise_floor_if_ahead(&self, index: usize, stored: u64) {
        let Some((stack, state)) = self.stack(index) else {
            return;
        };
        let local = stack.view().map_or(0, |v| v.registry.version());
        if local > stored {
            let _ = self
                .link
                .script::<u64>(
                    &self.scripts.raise_floor,
                    &[&state.keys.registry],
                    &[&local.to_string()],
                )
                .await;
        }
    }

    /// Publishes this node's pending admin revocations for the stack.
    async fn replay_pending(&self, index: usize) -> Result<(), LinkError> {
        let Some((stack, state)) = self.stack(index) else {
            return Ok(());
        };
        loop {
            let next = lock(&state.pending).first().cloned();
            let Some((uid, revoked)) = next else {
                return Ok(());
            };
            let local = stack.view().map_or(0, |v| v.registry.version());
            self.write_revocation(state, &uid, revoked, local).await?;
            tracing::info!(stack = %stack.name, token = %uid, revoked, "published an admin revocation made while redis was unreachable");
            let mut pending = lock(&state.pending);
            if pending.first() == Some(&(uid, revoked)) {
                pending.remove(0);
            }
        }
    }

    async fn write_revocation(
        &self,
        state: &StackState,
        uid: &str,
        revoked: bool,
        min_version: u64,
    ) -> Result<u64, LinkError> {
        let k = &state.keys;
        self.link
            .script::<u64>(
                &self.scripts.admin,
                &[&k.registry, &k.admin_revoked, &k.versions],
                &[
                    uid,
                    if revoked { "1" } else { "0" },
                    &min_version.to_string(),
                    &unix_ms().to_string(),
                ],
            )
            .await
    }

    /// Reads the stored registry and installs it if it is newer than the
    /// one in force (or the same version with other contents).
    async fn catch_up(&self, index: usize) -> Result<(), LinkError> {
        let Some((stack, state)) = self.stack(index) else {
            return Ok(());
        };
        let _one_at_a_time = state.catching_up.lock().await;
        self.replay_pending(index).await?;
        let k = &state.keys;
        type Stored = (u64, Option<String>, u64, Vec<String>, Option<String>);
        let (version, text, published_ms, admin, epoch): Stored = self
            .link
            .script(&self.scripts.read, &[&k.registry, &k.admin_revoked], &[])
            .await?;
        let admin: BTreeSet<String> = admin.into_iter().collect();
        if state.cma && text.is_none() && !state.doc_missing.swap(true, Ordering::AcqRel) {
            state.wake.notify_one();
        } else if text.is_some() {
            state.doc_missing.store(false, Ordering::Release);
        }
        if self
            .republish_if_lost(index, version, epoch, &admin)
            .await?
        {
            return Ok(());
        }
        if version == 0 {
            return Ok(());
        }
        let parsed = match text.as_deref().map(Doc::parse) {
            None => None,
            Some(Ok(doc)) => match doc.parts() {
                Ok(parts) => Some((parts, doc.synced_at)),
                Err(err) => {
                    tracing::error!(stack = %stack.name, version, error = %err, "ignoring a stored registry");
                    return Ok(());
                }
            },
            Some(Err(err)) => {
                tracing::error!(stack = %stack.name, version, error = %err, "ignoring a stored registry");
                return Ok(());
            }
        };
        let synced_at = match &parsed {
            Some((_, secs)) => UNIX_EPOCH + Duration::from_secs(*secs),
            None => stack.status().last_success.unwrap_or_else(SystemTime::now),
        };
        let installed = stack
            .install_published(synced_at, |current| {
                let held = current.map_or(0, Registry::version);
                match parsed {
                    Some(((tokens, revoked), _)) => {
                        let candidate = compose(version, tokens, revoked, &admin);
                        let newer = version > held
                            || (version == held
                                && !current.is_some_and(|c| same_content(c, &candidate)));
                        newer.then_some(candidate)
                    }
                    // No document (a tokens_file stack, or no poller yet):
                    // the cluster's admin set over this node's own tokens.
                    None => {
                        let current = current?;
                        let same = current
                            .admin_revoked()
                            .iter()
                            .map(|u| &**u)
                            .eq(admin.iter().map(String::as_str));
                        if same && version <= held {
                            return None;
                        }
                        // Never backward: a node ahead moves one version on.
                        let v = if version > held { version } else { held + 1 };
                        let tokens = current.tokens().map(|t| Token::clone(t)).collect();
                        Some(compose(v, tokens, current.revoked().clone(), &admin))
                    }
                }
            })
            .await;
        if let Some((previous, registry)) = installed {
            self.apply_installed(stack, previous.as_deref(), &registry);
            if published_ms > 0 {
                let seconds = unix_ms().saturating_sub(published_ms) as f64 / 1000.0;
                self.metrics.propagation.observe(seconds);
            }
        }
        state.applied.send_if_modified(|applied| {
            let moved = version > *applied;
            *applied = (*applied).max(version);
            moved
        });
        Ok(())
    }

    /// Redis empty, or reset since this node last read it (another epoch):
    /// the admin revocations this node holds that Redis lacks are published
    /// again, so that losing Redis's data never lifts a revocation. Returns
    /// whether it did (the caller reads again on the announcement).
    async fn republish_if_lost(
        &self,
        index: usize,
        version: u64,
        epoch: Option<String>,
        admin: &BTreeSet<String>,
    ) -> Result<bool, LinkError> {
        let Some((stack, state)) = self.stack(index) else {
            return Ok(false);
        };
        let lost = {
            let mut seen = lock(&state.epoch);
            let lost = match (&*seen, &epoch) {
                (Some(seen), Some(now)) => seen != now,
                (Some(_), None) => true,
                (None, _) => version == 0,
            };
            if epoch.is_some() {
                *seen = epoch;
            }
            lost
        };
        if !lost {
            return Ok(false);
        }
        let missing: Vec<String> = stack.view().map_or_else(Vec::new, |view| {
            view.registry
                .admin_revoked()
                .iter()
                .filter(|uid| !admin.contains(&***uid))
                .map(|uid| uid.to_string())
                .collect()
        });
        if missing.is_empty() {
            return Ok(false);
        }
        tracing::warn!(stack = %stack.name, revocations = missing.len(), "redis lost the cluster's state; publishing this node's admin revocations again");
        lock(&state.pending).extend(missing.into_iter().map(|uid| (uid, true)));
        self.replay_pending(index).await?;
        Ok(true)
    }

    /// Revokes what an installed version no longer allows, through the one
    /// path every registry change takes.
    fn apply_installed(
        &self,
        stack: &StackRegistry,
        previous: Option<&Registry>,
        next: &Arc<Registry>,
    ) {
        let empty = Registry::default();
        let old = previous.unwrap_or(&empty);
        let tokens: Vec<Token> = next.tokens().map(|t| Token::clone(t)).collect();
        let listed = Diff::between(old, &tokens);
        let mut admin = Diff::default();
        for uid in next.admin_revoked().difference(old.admin_revoked()) {
            admin.removed.push(uid.to_string());
        }
        for uid in old.admin_revoked().difference(next.admin_revoked()) {
            admin.added.push(uid.to_string());
        }
        let learned_at = Instant::now();
        let quiet = listed.is_empty() && admin.is_empty();
        for (diff, by_admin) in [(listed, false), (admin, true)] {
            if !diff.is_empty() {
                let change = Change {
                    diff,
                    registry: Arc::clone(next),
                    learned_at,
                };
                self.shared.apply_change(stack, &change, by_admin);
            }
        }
        if quiet {
            record_registry(&self.shared.metrics, stack, next);
        }
        tracing::debug!(stack = %stack.name, version = next.version(), "applied a cluster version");
    }

    /// Holds (or waits for) the stack's lease, and polls the CMA while it
    /// holds it, or alone while Redis is unreachable.
    async fn lead_loop(self: Arc<Self>, index: usize, shutdown: CancellationToken) {
        let Some((stack, state)) = self.stack(index) else {
            return;
        };
        let ttl = lease_ttl(self.lease).as_millis().to_string();
        let mut next_sync = Instant::now();
        let mut was_leader = false;
        loop {
            let holder = self
                .link
                .script::<Option<String>>(
                    &self.scripts.lease,
                    &[&state.keys.lease],
                    &[&self.node_id, &ttl],
                )
                .await;
            let leader = match holder {
                Ok(holder) => {
                    let leader = holder.as_deref() == Some(self.node_id.as_str());
                    *lock(&state.leader) = holder;
                    leader
                }
                Err(_) => false,
            };
            let fallback = !leader && self.in_fallback();
            if fallback != state.fallback.swap(fallback, Ordering::AcqRel) {
                if fallback {
                    tracing::warn!(stack = %stack.name, "redis unreachable for the lease; polling the CMA alone");
                    next_sync = Instant::now();
                } else {
                    tracing::info!(stack = %stack.name, "fallback over");
                }
            }
            self.metrics
                .fallback
                .with_label_values(&[&stack.name])
                .set(i64::from(fallback));
            self.metrics
                .leader
                .with_label_values(&[&stack.name])
                .set(i64::from(leader));
            if leader && !was_leader {
                tracing::info!(stack = %stack.name, node = %self.node_id, "took the poller lease");
                // Build on the newest published version, then sync at once.
                let _ = self.catch_up(index).await;
                next_sync = Instant::now();
            } else if was_leader && !leader {
                tracing::warn!(stack = %stack.name, node = %self.node_id, "lost the poller lease");
            }
            was_leader = leader;
            state.polling.store(leader || fallback, Ordering::Release);

            if leader {
                let stored = self
                    .link
                    .script::<(u64, u64)>(&self.scripts.state, &[&state.keys.registry], &[])
                    .await;
                let behind = stored.is_ok_and(|(version, floor)| floor > 0 && floor >= version);
                if state.doc_missing.swap(false, Ordering::AcqRel) || behind {
                    // A new or emptied Redis, or a node ahead of the stored
                    // version: publish above them all, from a fresh sync
                    // unless the CMA is failing (then what this node has,
                    // and the backoff holds).
                    if stack.status().consecutive_failures == 0 {
                        self.lead_sync(index, false, true).await;
                        next_sync = Instant::now() + state.interval;
                    } else {
                        self.publish(index).await;
                    }
                }
            }
            let requested = state.sync_requested.swap(false, Ordering::AcqRel);
            let force = requested && state.sync_force.swap(false, Ordering::AcqRel);
            if (leader || fallback) && (requested || Instant::now() >= next_sync) {
                let report = if leader {
                    self.lead_sync(index, force, requested).await
                } else {
                    self.shared.sync_stack(stack, force).await
                };
                let status = stack.status();
                let interval = if fallback {
                    self.fallback_interval(state.interval)
                } else {
                    state.interval
                };
                let wait = if report.error.is_some() {
                    crate::registry::poll::backoff(
                        interval,
                        status.consecutive_failures,
                        status.last_error.as_ref(),
                        rand::random::<f64>(),
                    )
                } else {
                    interval
                };
                next_sync = Instant::now() + wait;
            }
            tokio::select! {
                () = tokio::time::sleep(tick(self.lease)) => {}
                () = state.wake.notified() => {}
                () = shutdown.cancelled() => {
                    if leader {
                        let _ = self
                            .link
                            .script::<i64>(&self.scripts.release, &[&state.keys.lease], &[&self.node_id])
                            .await;
                    }
                    return;
                }
            }
        }
    }

    /// In fallback each node takes its share of the CMA budget: with `n`
    /// nodes and `s` stacks polling alone, one sync per stack every
    /// `n × s / 5` seconds at most.
    fn fallback_interval(&self, interval: Duration) -> Duration {
        let nodes = lock(&self.nodes).len().max(1) as f64;
        let stacks = self.stacks.iter().filter(|s| s.cma).count().max(1) as f64;
        let share = Duration::from_secs_f64(nodes * stacks / f64::from(CMA_REQUESTS_PER_SECOND));
        interval.max(share)
    }

    /// Syncs as the stack's poller and publishes the result (always when
    /// `publish` is set, so that the version moves for a waiting
    /// `/admin/sync`; otherwise only when the registry changed).
    async fn lead_sync(&self, index: usize, force: bool, publish: bool) -> SyncReport {
        let Some((stack, state)) = self.stack(index) else {
            return SyncReport::default();
        };
        // Each page of the sync takes a slot of the cluster's budget (see
        // `RedisBudget`).
        let report = self.shared.sync_stack(stack, force).await;
        if report.error.is_some() {
            return report;
        }
        let newer = stack
            .view()
            .is_some_and(|v| v.registry.version() > *state.applied.borrow());
        if publish || newer {
            self.publish(index).await;
        }
        report
    }

    /// Publishes the registry in force (fenced by the lease).
    async fn publish(&self, index: usize) {
        let Some((stack, state)) = self.stack(index) else {
            return;
        };
        let Some(view) = stack.view() else {
            return;
        };
        let registry = &view.registry;
        let synced_at = stack.status().last_success.map_or(0, unix_secs);
        let doc = Doc::of(registry, synced_at).to_json();
        let k = &state.keys;
        let published = self
            .link
            .script::<i64>(
                &self.scripts.publish,
                &[&k.registry, &k.lease, &k.versions],
                &[
                    &self.node_id,
                    &doc,
                    &registry.version().to_string(),
                    &unix_ms().to_string(),
                ],
            )
            .await;
        match published {
            Ok(-1) => {
                tracing::warn!(stack = %stack.name, node = %self.node_id, "not published: this node no longer holds the lease");
            }
            Ok(version) => {
                tracing::info!(stack = %stack.name, version, tokens = registry.len(), "published a registry version");
                state.catch_up.notify_one();
            }
            Err(err) => {
                tracing::warn!(stack = %stack.name, error = %err, "registry version not published");
            }
        }
    }

    /// Waits (up to a second) for one request of the cluster-wide CMA
    /// budget. Without Redis the node's own budget still applies.
    async fn take_budget(&self) {
        for _ in 0..20 {
            let second = unix_ms() / 1000;
            let key = keys::cma_budget(&self.prefix, second);
            let granted = self
                .link
                .script::<i64>(
                    &self.scripts.budget,
                    &[&key],
                    &[&CMA_REQUESTS_PER_SECOND.to_string()],
                )
                .await;
            match granted {
                Ok(1) | Err(_) => return,
                Ok(_) => {
                    let into = unix_ms() % 1000;
                    tokio::time::sleep(Duration::from_millis(1000 - into.min(999))).await;
                }
            }
        }
    }

    /// After an admin revocation was applied here: writes it to Redis for
    /// every node (or keeps it to publish once Redis is back). `versions`
    /// are the stacks' versions before the local change.
    pub async fn publish_revocation(&self, uid: &str, revoked: bool, known: &[(usize, u64)]) {
        for &(index, before) in known {
            let Some((stack, state)) = self.stack(index) else {
                continue;
            };
            match self.write_revocation(state, uid, revoked, before + 1).await {
                Ok(version) => {
                    tracing::info!(stack = %stack.name, token = uid, revoked, version, "admin revocation published to the cluster");
                    state.catch_up.notify_one();
                }
                Err(err) => {
                    tracing::warn!(stack = %stack.name, token = uid, error = %err, "admin revocation kept to publish when redis is back");
                    lock(&state.pending).push((uid.to_owned(), revoked));
                }
            }
        }
    }

    /// The stacks that know `uid` (as `set_admin_revocation` would), with
    /// their versions now.
    pub fn stacks_knowing(&self, uid: &str) -> Vec<(usize, u64)> {
        self.shared
            .stacks
            .iter()
            .filter_map(|stack| {
                let view = stack.view()?;
                let known = view.registry.get(uid).is_some() || view.registry.is_admin_revoked(uid);
                known.then(|| (stack.index, view.registry.version()))
            })
            .collect()
    }

    /// `POST /admin/sync` in cluster mode: the poller of each `cma_url`
    /// stack syncs and publishes; the answer waits until the new version is
    /// applied here. Without Redis, and for `tokens_file` stacks, a local sync.
    pub async fn sync(&self, force: bool) -> Value {
        let mut stacks = BTreeMap::new();
        for (index, stack) in self.shared.stacks.iter().enumerate() {
            let report = match self.stacks.get(index) {
                Some(state) if state.cma && self.link.is_up() => {
                    self.cluster_sync(index, stack, state, force).await
                }
                _ => self.shared.sync_stack(stack, force).await,
            };
            stacks.insert(
                stack.name.to_string(),
                serde_json::to_value(report).unwrap_or(Value::Null),
            );
        }
        json!({ "stacks": stacks })
    }

    async fn cluster_sync(
        &self,
        index: usize,
        stack: &StackRegistry,
        state: &StackState,
        force: bool,
    ) -> SyncReport {
        let before = stack.view().map(|v| Arc::clone(&v.registry));
        let stored = self
            .link
            .script::<u64>(&self.scripts.version, &[&state.keys.registry], &[])
            .await;
        let Ok(stored) = stored else {
            return self.shared.sync_stack(stack, force).await;
        };
        let mut applied = state.applied.subscribe();
        let leader = lock(&state.leader).as_deref() == Some(self.node_id.as_str());
        if leader {
            let report = self.lead_sync(index, force, true).await;
            if report.error.is_some() {
                return report;
            }
        } else if !self.request_sync(&stack.name, force).await {
            return self.shared.sync_stack(stack, force).await;
        }
        let waited = tokio::time::timeout(SYNC_WAIT, applied.wait_for(|v| *v > stored)).await;
        let after = stack.view().map(|v| Arc::clone(&v.registry));
        let version = after.as_ref().map_or(0, |r| r.version());
        let diff = match (&before, &after) {
            (Some(before), Some(after)) => {
                let tokens: Vec<Token> = after.tokens().map(|t| Token::clone(t)).collect();
                Diff::between(before, &tokens)
            }
            _ => Diff::default(),
        };
        SyncReport {
            diff,
            held_back: stack.status().held_back,
            version,
            error: match waited {
                Ok(Ok(_)) => None,
                _ => Some("the poller did not publish a new version in time".to_owned()),
            },
        }
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
