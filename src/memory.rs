//! The registry's heavy work, on one thread that hands the memory it frees
//! back to the system: reading and parsing a token list, building a
//! registry, writing its snapshot, dropping a replaced one.
//!
//! mimalloc returns freed pages to the system only after a delay, and only
//! when the thread that owns them allocates or collects again; memory one
//! thread frees for another waits for that owner. Spread over tokio's
//! blocking threads, which go idle after a reload, the transient memory of
//! every reload of 100,000 tokens stayed resident (about 240 MiB instead of
//! 70 MiB; see BENCHMARKS.md, "Memory after reloads"). On one thread that
//! both allocates and frees it, a collection after each job returns it.

use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

type Job = Box<dyn FnOnce() + Send>;

/// A job gave no result: it panicked (the worker goes on without it), or
/// the worker thread could not be started.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the registry worker gave no result (a job panicked, or the thread could not start)")]
pub struct JobFailed;

/// Runs `job` on the registry worker thread and returns its result; `job`'s
/// captures are dropped there, then the freed memory goes back to the
/// system. Awaited through tokio's blocking pool, so that the runtime
/// counts the job as blocking work (paused test clocks do not run ahead).
pub async fn offload<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, JobFailed> {
    tokio::task::spawn_blocking(move || run(job))
        .await
        .map_err(|_| JobFailed)?
}

/// Drops `value` on the registry worker thread without waiting: freeing a
/// large registry's maps takes milliseconds, which requests would otherwise
/// wait for on a single-threaded runtime.
pub fn drop_off_runtime<T: Send + 'static>(value: T) {
    // Were the worker gone, the value would be dropped here, with the job.
    let _ = submit(Box::new(move || drop(value)));
}

/// Returns the memory mimalloc holds free to the system now.
pub fn release_free_memory() {
    // SAFETY: `mi_collect` takes no pointer and has no precondition. When
    // mimalloc is not the global allocator (tests), it has nothing to free.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Runs `job` on the worker and waits for it (from a blocking thread).
fn run<T: Send + 'static>(job: impl FnOnce() -> T + Send + 'static) -> Result<T, JobFailed> {
    let (tx, rx) = mpsc::sync_channel(1);
    submit(Box::new(move || {
        let out = job();
        let _ = tx.send(out);
    }))?;
    rx.recv().map_err(|_| JobFailed)
}

fn submit(job: Job) -> Result<(), JobFailed> {
    static WORKER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let worker = WORKER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("stackgate-registry".into())
            .spawn(move || {
                for job in rx {
                    // A panicking job loses its own result (its caller sees
                    // `JobFailed`), not the worker.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    release_free_memory();
                }
            });
        if let Err(err) = spawned {
            tracing::error!(error = %err, "the registry worker thread could not start");
        }
        Mutex::new(tx)
    });
    let sender = worker.lock().unwrap_or_else(|p| p.into_inner());
    sender.send(job).map_err(|_| JobFailed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_the_worker_and_a_panic_loses_only_its_own_result() {
        let thread = offload(|| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert_eq!(thread.as_deref(), Some("stackgate-registry"));
        let panicked = offload(|| -> u8 { panic!("a job that fails") }).await;
        assert!(panicked.is_err());
        assert_eq!(offload(|| 2 + 2).await.unwrap(), 4);
    }
}
