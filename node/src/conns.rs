//! The registry of an agent's forwarded connections: their two sockets,
//! so a connection can be ended from outside without a timer or a select
//! in its task. The kernel already records when each TCP socket last sent
//! and received data (`TCP_INFO`'s `tcpi_last_data_sent` /
//! `tcpi_last_data_recv`), so with an idle timeout one sweeper thread asks
//! it about every connection now and then and shuts down those on which
//! nothing moved for that long; at the end of a shutdown's grace period
//! [`Connections::cut_all`] shuts down the rest. A connection costs one slab
//! entry instead of a tokio timer, a cancellation future and a clock read per
//! transfer — most of what an idle connection's memory would otherwise be
//! beyond its sockets.
//!
//! A shutdown (`SHUT_RDWR` on both sockets) wakes the connection's task
//! through the sockets' own readiness; the task sees end-of-stream, finishes,
//! and learns from its [`Watch`] why. A connection leaves the slab before
//! its sockets close, and sockets are shut down only under the slab's lock,
//! so no descriptor number that was closed and reused is ever touched.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use tokio::net::TcpStream;

/// Connections looked at per lock hold, so a sweep over many thousand
/// connections never holds up new ones for long.
const SWEEP_CHUNK: usize = 256;

/// Shortest and longest pause between sweeps; in between, a quarter of the
/// timeout, so a connection is closed within 1.25 × the timeout.
const MIN_PERIOD: Duration = Duration::from_millis(10);
const MAX_PERIOD: Duration = Duration::from_secs(30);

/// An agent's forwarded connections. Clones share the registry; the idle
/// sweeper stops when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Connections(Arc<Registry>);

#[derive(Debug)]
struct Registry {
    /// Idle timeout in milliseconds; `None`: connections never idle out.
    idle_ms: Option<u32>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    open: slab::Slab<Entry>,
    /// Set by [`Connections::cut_all`]: later connections are cut at once.
    cut: bool,
}

#[derive(Debug)]
struct Entry {
    fds: [RawFd; 2],
    ended: Option<Ended>,
}

/// Why a connection was shut down from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// No byte moved for the idle timeout.
    Idle(Duration),
    /// [`Connections::cut_all`], at the end of a shutdown's grace period.
    Cut,
}

impl Connections {
    /// A registry; with an `idle_timeout` (millisecond resolution, at least
    /// 1 ms) this starts the sweeper thread that closes idle connections.
    pub fn start(idle_timeout: Option<Duration>) -> io::Result<Self> {
        let idle_ms = idle_timeout.map(|t| u32::try_from(t.as_millis()).unwrap_or(u32::MAX).max(1));
        let registry = Arc::new(Registry {
            idle_ms,
            state: Mutex::new(State::default()),
        });
        if let Some(timeout) = idle_timeout {
            let period = (timeout / 4).clamp(MIN_PERIOD, MAX_PERIOD);
            let weak = Arc::downgrade(&registry);
            std::thread::Builder::new()
                .name("strait-idle".into())
                .spawn(move || sweep_loop(&weak, period))?;
        }
        Ok(Self(registry))
    }

    /// Registers the connection between `a` and `b` until the returned
    /// [`Watch`] is finished or dropped, which must happen before either
    /// socket is closed. After [`cut_all`](Self::cut_all) the connection is
    /// shut down at once.
    pub fn watch(&self, a: &TcpStream, b: &TcpStream) -> Watch<'_> {
        let fds = [a.as_raw_fd(), b.as_raw_fd()];
        let mut state = self.0.lock();
        let ended = if state.cut {
            shutdown_both(fds);
            Some(Ended::Cut)
        } else {
            None
        };
        let key = state.open.insert(Entry { fds, ended });
        Watch {
            registry: &self.0,
            key,
        }
    }

    /// Shuts down every registered connection, and every one registered
    /// from now on.
    pub fn cut_all(&self) {
        let mut state = self.0.lock();
        state.cut = true;
        for (_, entry) in &mut state.open {
            if entry.ended.is_none() {
                shutdown_both(entry.fds);
                entry.ended = Some(Ended::Cut);
            }
        }
    }

    /// Connections registered now.
    pub fn len(&self) -> usize {
        self.0.lock().open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Shuts down every connection idle for the timeout, a chunk of the
    /// slab per lock hold.
    fn sweep(&self, idle_ms: u32) {
        let timeout = Duration::from_millis(u64::from(idle_ms));
        let mut next = 0usize;
        loop {
            let mut state = self.lock();
            let end = state.open.capacity();
            if next >= end {
                return;
            }
            let stop = next.saturating_add(SWEEP_CHUNK).min(end);
            for key in next..stop {
                let Some(entry) = state.open.get_mut(key) else {
                    continue;
                };
                if entry.ended.is_none() && entry.fds.iter().all(|&fd| idle_for_ms(fd) >= idle_ms) {
                    shutdown_both(entry.fds);
                    entry.ended = Some(Ended::Idle(timeout));
                }
            }
            next = stop;
        }
    }
}

fn sweep_loop(registry: &Weak<Registry>, period: Duration) {
    loop {
        std::thread::sleep(period);
        let Some(r) = registry.upgrade() else {
            return;
        };
        if let Some(idle_ms) = r.idle_ms {
            r.sweep(idle_ms);
        }
    }
}

/// A connection's entry in the registry; removed on [`Watch::finish`] or
/// drop.
#[derive(Debug)]
pub struct Watch<'a> {
    registry: &'a Registry,
    key: usize,
}

impl Watch<'_> {
    /// Unregisters the connection; says why it was shut down from outside,
    /// if it was.
    pub fn finish(self) -> Option<Ended> {
        let ended = self
            .registry
            .lock()
            .open
            .try_remove(self.key)
            .and_then(|e| e.ended);
        std::mem::forget(self);
        ended
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        self.registry.lock().open.try_remove(self.key);
    }
}

/// The coarsest Linux clock tick (HZ=100), in milliseconds. `TCP_INFO`
/// counts idle time in ticks, so its figure can run up to one tick ahead of
/// the real idle time.
const KERNEL_TICK_MS: u32 = 10;

/// Milliseconds since `fd` surely last sent or received data: `TCP_INFO`'s
/// figure less one clock tick, so a connection is never closed before its
/// idle timeout (a few milliseconds after it at most); 0 when the kernel
/// can't say (so the connection is kept).
fn idle_for_ms(fd: RawFd) -> u32 {
    // SAFETY: all-zero bytes are a valid `tcp_info` (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>())
        .unwrap_or(libc::socklen_t::MAX);
    // SAFETY: `fd` is open (the caller holds the registry's lock, which
    // keeps its connection from closing), `info` is writable for `len` bytes, and the
    // kernel writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return 0;
    }
    info.tcpi_last_data_recv
        .min(info.tcpi_last_data_sent)
        .saturating_sub(KERNEL_TICK_MS)
}

/// `shutdown(fd, SHUT_RDWR)` on both sockets of a connection; errors (the
/// peer already gone) don't matter: the connection's task finds out from
/// the sockets either way.
fn shutdown_both(fds: [RawFd; 2]) {
    for fd in fds {
        // SAFETY: `fd` is open (the caller holds the registry's lock, see
        // `idle_for_ms`); shutdown touches no memory of ours.
        unsafe {
            libc::shutdown(fd, libc::SHUT_RDWR);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        (c, s)
    }

    #[tokio::test]
    async fn reaps_only_connections_that_went_quiet() {
        let conns = Connections::start(Some(Duration::from_millis(300))).expect("start");
        let (mut quiet_peer, quiet) = pair().await;
        let (mut busy_peer, mut busy) = pair().await;
        let quiet_watch = conns.watch(&quiet, &quiet);
        let busy_watch = conns.watch(&busy, &busy);
        assert_eq!(conns.len(), 2);

        // The quiet connection's peer sees end-of-stream once it is reaped;
        // the busy one keeps talking all the while and is never touched.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 1];
        loop {
            busy_peer.write_all(b"x").await.expect("busy write");
            busy.read_exact(&mut buf).await.expect("busy read");
            match tokio::time::timeout(Duration::from_millis(50), quiet_peer.read(&mut buf)).await {
                Ok(Ok(0)) => break,
                Ok(other) => panic!("quiet connection: {other:?}"),
                Err(_) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "quiet connection never reaped"
                ),
            }
        }
        assert_eq!(
            quiet_watch.finish(),
            Some(Ended::Idle(Duration::from_millis(300)))
        );
        assert_eq!(busy_watch.finish(), None, "busy connection ended");
        assert!(conns.is_empty());
        busy_peer.write_all(b"y").await.expect("busy still open");
    }

    #[tokio::test]
    async fn cut_all_ends_open_and_later_connections() {
        let conns = Connections::start(None).expect("start");
        let (mut open_peer, open) = pair().await;
        let watch = conns.watch(&open, &open);
        conns.cut_all();
        let mut buf = [0u8; 1];
        assert_eq!(open_peer.read(&mut buf).await.expect("read"), 0);
        assert_eq!(watch.finish(), Some(Ended::Cut));

        let (mut late_peer, late) = pair().await;
        let watch = conns.watch(&late, &late);
        assert_eq!(late_peer.read(&mut buf).await.expect("read"), 0);
        drop(watch);
        assert!(conns.is_empty());
    }
}
