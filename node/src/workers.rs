//! Forwarding workers: one single-threaded runtime per worker thread, each
//! with its own `SO_REUSEPORT` socket on every TCP listener address, so a
//! connection is accepted, connected and forwarded on one thread with no
//! cross-thread wakeups — the worker model of nginx and HAProxy. The rest of
//! the agent (watch, DNS, UDP, metrics) stays on the main runtime.

use std::io;
use std::num::NonZeroUsize;
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// Running worker runtimes. Dropping the last handle on them stops the
/// threads; tasks still on them are dropped (their sockets close), which is
/// why the agent drains connections before it lets go of its workers.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    exit: CancellationToken,
}

impl Workers {
    /// Starts `count` worker threads, named `strait-fwd-N`.
    pub fn start(count: NonZeroUsize) -> io::Result<Arc<Self>> {
        let exit = CancellationToken::new();
        let mut handles = Vec::with_capacity(count.get());
        for i in 0..count.get() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let exit = exit.clone();
            std::thread::Builder::new()
                .name(format!("strait-fwd-{i}"))
                .spawn(move || rt.block_on(exit.cancelled()))?;
        }
        Ok(Arc::new(Self { handles, exit }))
    }

    /// The runtimes, one per worker thread.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.exit.cancel();
    }
}

/// The number of workers when none is configured: one per CPU this process
/// may run on.
pub fn default_count() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_each_worker_thread_and_stop_with_the_last_handle() {
        let workers = Workers::start(NonZeroUsize::new(2).expect("2")).expect("start");
        let names: Vec<String> = workers
            .handles()
            .iter()
            .map(|h| {
                let (tx, rx) = std::sync::mpsc::channel();
                h.spawn(async move {
                    let name = std::thread::current().name().map(str::to_string);
                    let _ = tx.send(name.unwrap_or_default());
                });
                rx.recv_timeout(std::time::Duration::from_secs(30))
                    .expect("worker ran the task")
            })
            .collect();
        assert_eq!(names, ["strait-fwd-0", "strait-fwd-1"]);

        let (tx, rx) = std::sync::mpsc::channel::<()>();
        workers.handles()[0].spawn(async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        drop(workers);
        // The runtime shut down and dropped the pending task (and its sender).
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(30)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }
}
