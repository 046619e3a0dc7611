//! stackgate: an edge gateway for Contentstack's delivery, preview and GraphQL
//! APIs. It resolves every request's token against a registry synced from the
//! CMA, forwards only what the token's scope allows, and cuts off a token's
//! live sessions the moment it is revoked.
//!
//! # Layout
//! From the bottom up; a module imports only modules above it in this list
//! or beside it on its floor, never one that imports it back.
//!
//! What everything acts on:
//! - [`memory`]: the registry's heavy work on one thread that hands the
//!   memory it frees back to the system.
//! - [`config`]: the TOML file (SPEC §5), parsed then validated into checked types.
//! - [`region`], [`route`]: Contentstack's hosts; matching a request to a route.
//! - [`registry`]: tokens per stack, synced from the CMA or a file, snapshotted,
//!   swapped whole, with a diff per change.
//! - [`reject`]: why a request is refused, one reason per row of SPEC §3.
//! - [`canonical`]: one reading of a request: spellings, hosts, query, path.
//! - [`decision`]: the decision table of SPEC §3 as pure functions.
//! - [`sessions`]: live sessions per token, and revocation.
//! - [`conn`]: what a client connection knows (peer, sessions, activity), and
//!   the executor that runs each HTTP/2 stream as a task a reset can drop.
//! - [`limits`]: rate limits (SPEC §6): per token, per stack origin, and
//!   failed authentications per client IP.
//! - [`metrics`]: the Prometheus metrics of SPEC §7.
//! - [`upstream`]: the pooled rustls client for upstreams and the CMA.
//! - [`response`]: the one place the gateway's own responses are built.
//! - [`state`]: [`Shared`], and the one function that applies a registry change.
//!
//! What serves requests, calling down into [`state`]:
//! - [`proxy`]: the request path (check, decide, forward, stream back).
//! - [`cluster`]: cluster mode on Redis (SPEC §10): the poller lease, the
//!   published registry versions, cluster-wide admin revocations and limit
//!   shares. Background tasks only; the request path never waits on Redis.
//! - [`admin`]: health, readiness, metrics and the admin API (calls
//!   [`cluster`] in cluster mode).
//!
//! What builds and starts things:
//! - [`server`]: listeners, TLS, the per-connection task, its timeouts, and
//!   the parking of idle HTTP/1.1 connections.
//! - [`app`]: wiring, background services and the shutdown tree.
//! - [`demo`]: `stackgate demo`.
//! - [`logging`]: text or JSON logs.
//!
//! A request's path through the code: `server::serve_connection` ->
//! `proxy::handle` -> `decision::check_and_read` and `decision::decide_read` ->
//! `proxy::grant` (`sessions::Sessions::begin`, `decision::recheck`,
//! `proxy::outgoing::Target`) -> `proxy::forward` (the body; the client's
//! head moved into `proxy::outgoing::upstream_request`) -> upstream ->
//! `proxy::body::Tracked`.

pub mod admin;
pub mod app;
pub mod canonical;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod decision;
pub mod demo;
pub mod limits;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod proxy;
pub mod region;
pub mod registry;
pub mod reject;
pub mod response;
pub mod route;
pub mod server;
pub mod sessions;
pub mod state;
pub mod upstream;

pub use app::Gateway;
pub use state::Shared;

/// The runtime the binary (and `examples/bare_proxy.rs`) runs on: one worker
/// per CPU the process may use (its affinity mask and cgroup quota, as
/// `available_parallelism` reads them). With one CPU, the single-threaded
/// scheduler: the work-stealing one would only add its queues and atomics
/// around the same one thread (the single-threaded one serves about 16% more
/// requests per second on one core; BENCHMARKS.md, "Request path under load").
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}
