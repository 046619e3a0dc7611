//! What the node holding a stack's lease does: keep the lease, sync with the
//! CMA (sharing the cluster's budget), publish each new version fenced by
//! the lease, and the admin API's cluster-wide revocations and syncs.

use super::*;

impl Cluster {
    /// Holds (or waits for) the stack's lease, and polls the CMA while it
    /// holds it, or alone while Redis is unreachable.
    pub(super) async fn lead_loop(self: Arc<Self>, index: usize, shutdown: CancellationToken) {
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
            let publish = requested && state.sync_publish.swap(false, Ordering::AcqRel);
            if (leader || fallback) && (requested || Instant::now() >= next_sync) {
                let report = if leader {
                    self.lead_sync(index, force, publish).await
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
    pub(super) async fn take_budget(&self) {
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
        } else if !self
            .request_sync(&stack.name, SyncAsk::Admin { force })
            .await
        {
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
}
