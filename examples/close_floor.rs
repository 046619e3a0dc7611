//! The floor under revocation at scale: how long this machine takes
//! to cut off N idle loopback TCP connections with a reset, and for a tokio
//! client holding the other ends to see every one of them close, when no
//! gateway logic runs at all.
//!
//! The server side runs in a child process (its own file-descriptor limit,
//! as in `benches/revocation.rs`), in one of three modes:
//!
//! - `raw`: the accepted sockets are plain blocking sockets, registered with
//!   no poller; `--threads T` threads each close a share with `SO_LINGER` 0.
//! - `tokio`: each socket is owned by a task of a 2-worker tokio runtime that
//!   waits on one `CancellationToken`, as a gateway connection task does; the
//!   token is cancelled and every task sets `SO_LINGER` 0 and drops its socket
//!   (epoll deregistration included).
//!
//! Run: `cargo run --release --example close_floor -- --sessions 10000 --mode raw --threads 2`

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

struct Args {
    sessions: usize,
    threads: usize,
    mode: String,
    rounds: usize,
    serve: bool,
}

fn args() -> Args {
    let mut args = Args {
        sessions: 10_000,
        threads: 1,
        mode: "raw".into(),
        rounds: 3,
        serve: false,
    };
    let list: Vec<String> = std::env::args().collect();
    for (i, arg) in list.iter().enumerate() {
        let value = || list.get(i + 1).cloned().unwrap_or_default();
        match arg.as_str() {
            "--sessions" => args.sessions = value().parse().unwrap_or(args.sessions),
            "--threads" => args.threads = value().parse().unwrap_or(args.threads),
            "--rounds" => args.rounds = value().parse().unwrap_or(args.rounds),
            "--mode" => args.mode = value(),
            "--serve" => args.serve = true,
            _ => {}
        }
    }
    args
}

fn main() -> anyhow::Result<()> {
    let args = args();
    if args.serve {
        return serve(&args);
    }
    for _ in 0..args.rounds {
        round(&args)?;
    }
    Ok(())
}

/// The server side: accept, say "ready <port>", wait for a line, cut all off.
fn serve(args: &Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    println!("port {}", listener.local_addr()?.port());
    let mut accepted = Vec::with_capacity(args.sessions);
    while accepted.len() < args.sessions {
        accepted.push(listener.accept()?.0);
    }
    let mut go = String::new();
    match args.mode.as_str() {
        "raw" => {
            println!("ready");
            std::io::stdin().read_line(&mut go)?;
            let started = Instant::now();
            let share = accepted.len().div_ceil(args.threads.max(1));
            let mut chunks = Vec::new();
            while !accepted.is_empty() {
                let rest = accepted.split_off(share.min(accepted.len()));
                chunks.push(std::mem::replace(&mut accepted, rest));
            }
            std::thread::scope(|scope| {
                for chunk in chunks {
                    scope.spawn(move || {
                        for stream in chunk {
                            let _ =
                                socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                            drop(stream);
                        }
                    });
                }
            });
            println!("closed {}", started.elapsed().as_micros());
        }
        _ => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let cancel = tokio_util::sync::CancellationToken::new();
                let tracker = tokio_util::task::TaskTracker::new();
                for stream in accepted {
                    stream.set_nonblocking(true)?;
                    let stream = tokio::net::TcpStream::from_std(stream)?;
                    let cancel = cancel.clone();
                    tracker.spawn(async move {
                        cancel.cancelled().await;
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                        drop(stream);
                    });
                }
                tracker.close();
                println!("ready");
                tokio::task::spawn_blocking(move || std::io::stdin().read_line(&mut go)).await??;
                let started = Instant::now();
                cancel.cancel();
                tracker.wait().await;
                println!("closed {}", started.elapsed().as_micros());
                anyhow::Ok(())
            })?;
        }
    }
    Ok(())
}

fn round(args: &Args) -> anyhow::Result<()> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--serve", "--mode", &args.mode])
        .args(["--sessions", &args.sessions.to_string()])
        .args(["--threads", &args.threads.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().ok_or(anyhow::anyhow!("stdin"))?;
    let mut lines = BufReader::new(child.stdout.take().ok_or(anyhow::anyhow!("stdout"))?).lines();
    let mut line = || -> anyhow::Result<String> {
        lines
            .next()
            .ok_or(anyhow::anyhow!("the child ended"))?
            .map_err(Into::into)
    };
    let port: u16 = line()?.trim_start_matches("port ").parse()?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (client_seen, server_closed) = runtime.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..args.sessions {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = tx.send(Instant::now());
            });
        }
        drop(tx);
        let ready = tokio::task::block_in_place(&mut line)?;
        anyhow::ensure!(ready == "ready", "unexpected {ready}");
        let started = Instant::now();
        stdin.write_all(b"go\n")?;
        let mut last = started;
        while let Some(at) = rx.recv().await {
            last = last.max(at);
        }
        let closed = tokio::task::block_in_place(&mut line)?;
        let server: u64 = closed.trim_start_matches("closed ").parse()?;
        anyhow::Ok((last - started, Duration::from_micros(server)))
    })?;
    child.wait()?;
    println!(
        "mode {} threads {} sessions {}: server closed all in {:.1} ms; client saw the last close after {:.1} ms",
        args.mode,
        args.threads,
        args.sessions,
        server_closed.as_secs_f64() * 1000.0,
        client_seen.as_secs_f64() * 1000.0
    );
    Ok(())
}
