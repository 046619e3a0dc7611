//! The `stackgate` binary: parse the command line, load the config, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use stackgate::config::Config;
use stackgate::logging::{self, LogFormat};
use stackgate::Gateway;

/// mimalloc: many small, short-lived allocations per request and per
/// connection; glibc's free path (chunk consolidation) showed in revocation
/// profiles. See BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Edge gateway for Contentstack's delivery, preview and GraphQL APIs.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log line format (RUST_LOG sets the level; default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with a config file.
    Run {
        #[arg(long, short, default_value = "config/stackgate.toml")]
        config: PathBuf,
    },
    /// Validate a config file: exit 0, or non-zero naming the bad key.
    Check {
        #[arg(long, short, default_value = "config/stackgate.toml")]
        config: PathBuf,
    },
    /// Run everything on loopback with an embedded sample stack.
    Demo {
        /// Gateway address (a free port is used if this one is taken).
        #[arg(long, default_value = stackgate::demo::DEFAULT_HTTP)]
        http: SocketAddr,
        /// Admin address (a free port is used if this one is taken).
        #[arg(long, default_value = stackgate::demo::DEFAULT_ADMIN)]
        admin: SocketAddr,
        /// Run N replicas sharing one local redis-server (found on PATH),
        /// on consecutive ports from --http and --admin (SPEC §10).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
        cluster: Option<u16>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config } => {
            let _log = logging::init(cli.log_format);
            report(run(&config))
        }
        Command::Demo {
            http,
            admin,
            cluster,
        } => {
            let _log = logging::init(cli.log_format);
            match cluster {
                Some(replicas) => report(demo_cluster(usize::from(replicas), http, admin)),
                None => report(demo(http, admin)),
            }
        }
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    // What was logged comes before what is printed here.
    logging::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    if let Some(tls) = &config.tls {
        if let Err(err) = stackgate::server::load_tls(tls) {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    }
    if let Err(err) = stackgate::upstream::build_client(
        config.upstream.connect_timeout,
        config.upstream.ca_file.as_deref(),
    ) {
        eprintln!("error: {err}");
        return ExitCode::from(2);
    }
    for warning in config.warnings() {
        eprintln!("warning: {warning}");
    }
    println!(
        "{}: ok ({} routes, {} stacks)",
        path.display(),
        config.routes.len(),
        config.stacks.len()
    );
    ExitCode::SUCCESS
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    stackgate::runtime().context("starting the runtime")
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path).with_context(|| format!("config {}", path.display()))?;
    runtime()?.block_on(async {
        let gateway = Gateway::start(config).await?;
        gateway.run_until_signal().await;
        Ok(())
    })
}

fn demo(http: SocketAddr, admin: SocketAddr) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let demo = stackgate::demo::start(http, admin).await?;
        println!("{}", demo.instructions());
        demo.run_until_signal().await;
        Ok(())
    })
}

fn demo_cluster(replicas: usize, http: SocketAddr, admin: SocketAddr) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let demo = stackgate::demo::cluster::start(replicas, http, admin).await?;
        println!("{}", demo.instructions());
        demo.run_until_signal().await;
        Ok(())
    })
}
