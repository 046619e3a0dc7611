//! What every node does with what the cluster publishes: the subscriber
//! (announcements and sync requests), applying each stack's published
//! versions in order, catching up from the stored version after a
//! disconnect, and replaying the admin revocations made while Redis was
//! away.

use super::*;

impl Cluster {
    pub(super) async fn subscriber_loop(self: Arc<Self>, shutdown: CancellationToken) {
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
        let (name, ask) = SyncAsk::parse(payload);
        let Some(state) = self.index_of(name).and_then(|i| self.stacks.get(i)) else {
            return;
        };
        if let SyncAsk::Admin { force } = ask {
            if force {
                state.sync_force.store(true, Ordering::Release);
            }
            state.sync_publish.store(true, Ordering::Release);
        }
        state.sync_requested.store(true, Ordering::Release);
        state.wake.notify_one();
    }

    /// Applies announcements, and every tick checks the stored version in
    /// case one was missed.
    pub(super) async fn apply_loop(self: Arc<Self>, index: usize, shutdown: CancellationToken) {
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
            let _ = self.raise_floor(state, local).await;
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

    pub(super) async fn write_revocation(
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
    pub(super) async fn catch_up(&self, index: usize) -> Result<(), LinkError> {
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
                        let candidate = compose(version, tokens, current, revoked, &admin);
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
                        Some(compose(
                            v,
                            tokens,
                            Some(current),
                            current.revoked().clone(),
                            &admin,
                        ))
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
}
