//! Wiring: builds the shared state ([`Shared`]) from a [`Config`], binds the listeners,
//! runs the background services (registry sync per stack, TLS reload), and
//! owns the one shutdown tree (a root cancellation token and a task tracker).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::Cluster;
use crate::config::{Config, Source as SourceConfig};
use crate::metrics::Metrics;
use crate::registry::poll::{poll_loop, OnFailure, Polled};
use crate::registry::source::{
    CmaBudget, CmaClient, FileSource, Source, CMA_REQUESTS_PER_SECOND, FILE_POLL_INTERVAL,
    MAX_PAGE_TIMEOUT, MIN_PAGE_TIMEOUT,
};
use crate::registry::{StackRegistry, Stacks};
use crate::route::Router;
use crate::server::{self, TlsReloader};
use crate::sessions::Sessions;
use crate::state::{record_registry, Shared};
use crate::upstream::h1pool::H1Pool;
use crate::upstream::{build_client, connector};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{key}: cannot listen on {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] crate::upstream::ClientError),
    #[error(transparent)]
    Tls(#[from] server::TlsError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// A running gateway.
pub struct Gateway {
    pub shared: Arc<Shared>,
    /// This node's part in the cluster, when `[cluster]` is configured.
    pub cluster: Option<Arc<Cluster>>,
    pub http_addr: Option<SocketAddr>,
    pub https_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

/// Builds the shared state (no I/O but reading snapshots and TLS files).
pub fn build_shared(config: Config) -> Result<Arc<Shared>, StartError> {
    let metrics = Metrics::new()?;
    let client = build_client(
        config.upstream.connect_timeout,
        config.upstream.ca_file.as_deref(),
    )?;
    let h1pool = H1Pool::with_limit(
        connector(
            config.upstream.connect_timeout,
            config.upstream.ca_file.as_deref(),
            false,
        )?,
        config.upstream.max_connections,
        config.upstream.connect_timeout,
    );
    let router = Router::new(&config.routes);
    let mut list = Vec::with_capacity(config.stacks.len());
    let budget = Arc::new(CmaBudget::new(CMA_REQUESTS_PER_SECOND));
    for (index, stack) in config.stacks.iter().enumerate() {
        let source = match &stack.registry.source {
            SourceConfig::Cma {
                url,
                auth,
                credential,
                interval,
            } => Source::Cma(Box::new(CmaClient {
                http: client.clone(),
                base: url.clone(),
                api_key: stack.api_key.clone(),
                auth: *auth,
                credential: credential.clone(),
                budget: Arc::clone(&budget),
                page_timeout: (*interval).clamp(MIN_PAGE_TIMEOUT, MAX_PAGE_TIMEOUT),
            })),
            SourceConfig::File { path } => Source::File(FileSource::new(path.clone())),
        };
        let registry = StackRegistry::new(
            index,
            &stack.name,
            &stack.api_key,
            stack.registry.clone(),
            source,
        );
        metrics.init_stack(&stack.name);
        match registry.load_snapshot() {
            Ok(Some(count)) => {
                tracing::info!(stack = %stack.name, tokens = count, "serving the snapshot until the first sync");
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(stack = %stack.name, error = %err, "snapshot not used (rejected whole): the registry waits for its source")
            }
        }
        if let Some(view) = registry.view() {
            record_registry(&metrics, &registry, &view.registry);
        }
        list.push(Arc::new(registry));
    }
    let names = list.iter().map(|s| Arc::clone(&s.name)).collect();
    let stacks = Stacks::new(list);
    Ok(Arc::new(Shared {
        cma_budget: budget,
        sessions: Sessions::new(metrics.clone(), names),
        limits: crate::limits::Limits::new(&config.stacks),
        config,
        router,
        stacks,
        client,
        h1pool,
        durations: metrics.durations(),
        metrics,
    }))
}

/// Keeps one stack in sync until shutdown: every `sync_interval` (every
/// [`FILE_POLL_INTERVAL`] for files), backing off on failure (see
/// [`crate::registry::poll`]).
async fn sync_loop(shared: Arc<Shared>, stack: Arc<StackRegistry>, shutdown: CancellationToken) {
    let (interval, on_failure) = match &stack.settings().source {
        SourceConfig::Cma { interval, .. } => (*interval, OnFailure::BackOff),
        // A file is not the CMA: no budget to spare, and a fixed file
        // should be served within a second, not after a backoff.
        SourceConfig::File { .. } => (FILE_POLL_INTERVAL, OnFailure::Retry),
    };
    poll_loop(interval, on_failure, shutdown, || async {
        shared.sync_stack(&stack, false).await;
        let status = stack.status();
        Polled {
            failures: status.consecutive_failures,
            error: status.last_error,
        }
    })
    .await;
}

impl Gateway {
    /// Binds every listener and starts every service.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        let tls = config.tls.clone().map(TlsReloader::new).transpose()?;
        let listen = config.listen.clone();
        let bind = |key: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { key, addr, source })
        };
        let http = match listen.http {
            Some(addr) => Some(bind("listen.http", addr).await?),
            None => None,
        };
        let https = match (listen.https, &tls) {
            (Some(addr), Some(_)) => Some(bind("listen.https", addr).await?),
            _ => None,
        };
        let admin = bind("listen.admin", listen.admin).await?;
        let local = |l: &TcpListener| l.local_addr().ok();
        let http_addr = http.as_ref().and_then(local);
        let https_addr = https.as_ref().and_then(local);
        let admin_addr = admin.local_addr().map_err(|source| StartError::Bind {
            key: "listen.admin",
            addr: listen.admin,
            source,
        })?;

        let shared = build_shared(config)?;
        // Not tracked: it writes access lines for as long as the runtime
        // runs, the drain's included (the log guard writes the last ones).
        tokio::spawn(crate::logging::flush_access_lines());
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(shared.config.server.max_connections));
        let cluster = match &shared.config.cluster {
            Some(settings) => Some(Cluster::new(Arc::clone(&shared), settings)?),
            None => None,
        };
        for stack in shared.stacks.iter() {
            let failures = shared
                .metrics
                .snapshot_write_failures
                .with_label_values(&[&stack.name]);
            tracker.spawn(Arc::clone(stack).snapshot_writer(shutdown.clone(), failures));
            // In cluster mode the cluster's lease loop polls the CMA.
            let leased =
                cluster.is_some() && matches!(stack.settings().source, SourceConfig::Cma { .. });
            if !leased {
                tracker.spawn(sync_loop(
                    Arc::clone(&shared),
                    Arc::clone(stack),
                    shutdown.clone(),
                ));
            }
        }
        if let Some(cluster) = &cluster {
            tracing::info!(node = cluster.node_id(), "cluster mode");
            cluster.start(&tracker, &shutdown);
        }
        if let Some(listener) = http {
            tracker.spawn(server::accept_loop(
                listener,
                Arc::clone(&shared),
                None,
                Arc::clone(&limit),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        if let (Some(listener), Some(tls)) = (https, tls) {
            tracker.spawn(Arc::clone(&tls).watch(shutdown.clone()));
            tracker.spawn(server::accept_loop(
                listener,
                Arc::clone(&shared),
                Some(tls),
                limit,
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        tracker.spawn(crate::admin::serve(
            admin,
            Arc::clone(&shared),
            cluster.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
        for (name, addr) in [
            ("http", http_addr),
            ("https", https_addr),
            ("admin", Some(admin_addr)),
        ] {
            if let Some(addr) = addr {
                tracing::info!(listener = name, %addr, "listening");
            }
        }
        Ok(Gateway {
            shared,
            cluster,
            http_addr,
            https_addr,
            admin_addr,
            shutdown,
            tracker,
        })
    }

    /// Cancelling this starts a graceful shutdown.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stops accepting, lets requests in flight finish for up to `grace`, then
    /// returns. Returns whether everything finished within the grace period.
    pub async fn shutdown(self, grace: Duration) -> bool {
        self.shutdown.cancel();
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }

    /// Runs until SIGTERM or SIGINT, then drains: SIGTERM for `grace_period`,
    /// SIGINT for at most a second.
    pub async fn run_until_signal(self) -> bool {
        let grace = self.shared.config.server.grace_period;
        let wait = match shutdown_signal().await {
            Signal::Terminate => grace,
            Signal::Interrupt => grace.min(Duration::from_secs(1)),
        };
        tracing::info!(grace = ?wait, "shutting down");
        let clean = self.shutdown(wait).await;
        if !clean {
            tracing::warn!("grace period over; closing the connections still open");
        }
        clean
    }
}

enum Signal {
    Terminate,
    Interrupt,
}

async fn shutdown_signal() -> Signal {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => Signal::Terminate,
                _ = tokio::signal::ctrl_c() => Signal::Interrupt,
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                Signal::Interrupt
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        Signal::Interrupt
    }
}
