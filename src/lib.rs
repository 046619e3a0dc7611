//! stackgate: an edge gateway for Contentstack's delivery, preview and GraphQL
//! APIs. It resolves every request's token against a registry synced from the
//! CMA, forwards only what the token's scope allows, and cuts off a token's
//! live sessions the moment it is revoked.
//!
//! # Layout
//! - [`config`]: the TOML file (SPEC §5), parsed then validated into checked types.
//! - [`region`], [`route`]: Contentstack's hosts; matching a request to a route.
//! - [`registry`]: tokens per stack, synced from the CMA or a file, snapshotted,
//!   swapped whole, with a diff per change.
//! - [`decision`]: the decision table of SPEC §3 as pure functions.
//! - [`response`]: the one place a refusal becomes a response.
//! - [`sessions`]: live sessions per token, and revocation.
//! - [`limits`]: rate limits (SPEC §6): per token, per stack origin, and
//!   failed authentications per client IP.
//! - [`proxy`]: the request path (check, decide, forward, stream back).
//! - [`server`]: listeners, TLS, the per-connection task and its timeouts.
//! - [`upstream`]: the pooled rustls client for upstreams and the CMA.
//! - [`admin`]: health, readiness, metrics and the admin API.
//! - [`metrics`]: the Prometheus metrics of SPEC §7.
//! - [`app`]: wiring, background services and the shutdown tree.
//! - [`demo`]: `stackgate demo`.
//! - [`logging`]: text or JSON logs.
//!
//! A request's path through the code: `server::serve_connection` ->
//! `proxy::handle` -> `decision::check_http` and `decision::decide` ->
//! `sessions::Sessions::begin` -> upstream -> `proxy::Tracked` body.

pub mod admin;
pub mod app;
pub mod config;
pub mod decision;
pub mod demo;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod region;
pub mod registry;
pub mod response;
pub mod route;
pub mod server;
pub mod sessions;
pub mod upstream;

pub use app::{Gateway, Shared};

/// The runtime the binary (and `examples/bare_proxy.rs`) runs on: one worker
/// per CPU the process may use (its affinity mask and cgroup quota, as
/// `available_parallelism` reads them). With one CPU, the single-threaded
/// scheduler: the work-stealing one would only add its queues and atomics
/// around the same one thread (the single-threaded one serves about 16% more
/// requests per second on one core; BENCHMARKS.md, fourth session).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}
