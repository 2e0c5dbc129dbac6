//! Zero-copy bidirectional TCP forwarding with Linux `splice(2)`.
//!
//! A proxied connection's bytes normally cross the user/kernel boundary
//! twice: `read(2)` copies them from the client socket into a user buffer,
//! and `write(2)` copies them again into the upstream socket. For a node agent
//! whose main job is moving bytes, those copies dominate the forwarder's CPU
//! time. `splice(2)` instead moves page references from one socket's receive
//! queue into a pipe and from the pipe into the other socket's send queue, so
//! the payload never reaches user space. In practice that roughly halves the
//! forwarder's CPU per byte and keeps the user-space buffer footprint at zero.
//!
//! A direction takes a pipe (`pipe2` with `O_NONBLOCK | O_CLOEXEC`, grown
//! with `F_SETPIPE_SZ` when the kernel lets us) only when its source turns
//! readable, and gives it back to a small pool of empty pipes as soon as it
//! is drained and the direction waits again. An idle connection therefore
//! holds two sockets and nothing else: no pipe, no buffer, no extra
//! descriptor, which is what lets one process hold thousands of idle
//! connections within `RLIMIT_NOFILE`. All I/O is non-blocking and driven by
//! tokio's readiness (`TcpStream::try_io` plus `readable()` / `writable()`),
//! so a forwarded connection costs no thread.
//!
//! [`CopyMode::Buffered`] copies through a user-space buffer taken and given
//! back the same way. A direction that cannot get a pipe (for example
//! `EMFILE`) uses a buffer for that burst, so running out of descriptors
//! degrades throughput instead of dropping connections.
//!
//! Semantics shared by both modes:
//! - half-close is propagated: when one side reaches end-of-stream, everything
//!   already read is delivered, the other side gets `shutdown(SHUT_WR)`, and
//!   the opposite direction keeps running until it ends too;
//! - any error (`ECONNRESET`, `EPIPE`, ...) ends the whole connection: both
//!   sockets are closed and the error says which side failed and how many
//!   bytes had been delivered;
//! - registered with [`Connections`], a connection can be ended from
//!   outside: closed on both sides when no byte moved in either direction
//!   for the idle timeout, or cut at the end of a shutdown's grace period,
//!   with no timer or select in the connection's own task.
//!
//! Its `unsafe` code is three thin wrappers around `pipe2`, `fcntl` and
//! `splice` (the other module with any is [`crate::conns`]).
//!
//! Linux only. Splicing into a socket whose peer has gone raises `SIGPIPE`
//! (the kernel offers no `MSG_NOSIGNAL` for `splice`), so the process must
//! ignore `SIGPIPE`, which the Rust runtime does by default.

#![allow(unsafe_code)]

use std::fmt;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::conns::{Connections, Ended, Watch};

/// Pipe size requested per direction when splicing.
///
/// Unprivileged processes may be refused this size (`/proc/sys/fs/pipe-max-size`,
/// `pipe-user-pages-soft`); the pipe then keeps whatever size the kernel gave
/// it, which only costs throughput.
pub const DEFAULT_PIPE_SIZE: usize = 1 << 20;

/// Buffer size per direction for [`CopyMode::Buffered`].
pub const BUFFERED_COPY_SIZE: usize = 64 * 1024;

/// How bytes are moved between the two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// Zero-copy through a pipe per direction with `splice(2)`.
    #[default]
    Splice,
    /// User-space copy through a 64 KiB buffer per direction.
    Buffered,
}

/// Per-connection forwarding settings.
#[derive(Debug, Clone)]
pub struct ForwardOptions {
    /// Where the connection is registered, to be closed when idle for the
    /// registry's timeout or cut at shutdown. `None`: neither.
    pub conns: Option<Connections>,
    /// Copy strategy.
    pub mode: CopyMode,
    /// Requested pipe size per direction for [`CopyMode::Splice`].
    pub pipe_size: usize,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self {
            conns: None,
            mode: CopyMode::Splice,
            pipe_size: DEFAULT_PIPE_SIZE,
        }
    }
}

/// Bytes delivered in each direction (written to the destination socket).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes read from the client and written to the upstream.
    pub client_to_upstream: u64,
    /// Bytes read from the upstream and written to the client.
    pub upstream_to_client: u64,
}

impl fmt::Display for Transferred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes client->upstream, {} bytes upstream->client",
            self.client_to_upstream, self.upstream_to_client
        )
    }
}

/// One of the two sockets of a forwarded connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The accepted, downstream connection.
    Client,
    /// The connection to the backend.
    Upstream,
}

impl Side {
    fn other(self) -> Self {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        })
    }
}

/// Why a forwarded connection ended other than by both sides finishing.
///
/// In every case both sockets have been closed by the time this is returned.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// No byte moved in either direction for `timeout`.
    #[error("idle for {timeout:?}, closed both sides ({transferred})")]
    IdleTimeout {
        timeout: Duration,
        transferred: Transferred,
    },
    /// Cut at the end of a shutdown's grace period.
    #[error("cut at shutdown ({transferred})")]
    Cut { transferred: Transferred },
    /// The peer on `side` reset or aborted the connection
    /// (`ECONNRESET`, `ECONNABORTED`, `EPIPE`).
    #[error("{side} connection reset ({transferred})")]
    Reset {
        side: Side,
        transferred: Transferred,
        #[source]
        source: io::Error,
    },
    /// Any other I/O error on `side`.
    #[error("I/O error on {side} side ({transferred})")]
    Io {
        side: Side,
        transferred: Transferred,
        #[source]
        source: io::Error,
    },
}

impl ForwardError {
    /// Bytes delivered in each direction before the connection ended.
    pub fn transferred(&self) -> Transferred {
        match self {
            ForwardError::IdleTimeout { transferred, .. }
            | ForwardError::Cut { transferred }
            | ForwardError::Reset { transferred, .. }
            | ForwardError::Io { transferred, .. } => *transferred,
        }
    }

    /// The side whose socket failed, if the error came from a socket.
    pub fn side(&self) -> Option<Side> {
        match self {
            ForwardError::IdleTimeout { .. } | ForwardError::Cut { .. } => None,
            ForwardError::Reset { side, .. } | ForwardError::Io { side, .. } => Some(*side),
        }
    }

    /// Whether a peer reset or abandoned the connection, an ordinary way
    /// for a proxied connection to end.
    pub fn is_reset(&self) -> bool {
        matches!(self, ForwardError::Reset { .. })
    }

    fn from_io(side: Side, source: io::Error, transferred: Transferred) -> Self {
        match source.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => ForwardError::Reset {
                side,
                transferred,
                source,
            },
            _ => ForwardError::Io {
                side,
                transferred,
                source,
            },
        }
    }
}

/// Sets `TCP_NODELAY` and configures TCP keepalive on `s`.
///
/// With `Some(idle)`, keepalive is enabled: the first probe goes out after
/// `idle` without traffic (at least 1 s), further probes every `idle / 3`
/// (at least 1 s), and the connection is declared dead after 3 unanswered
/// probes. With `None`, keepalive is disabled.
/// Works on a listening socket too: on Linux, sockets it accepts inherit
/// both settings, which saves two syscalls per option per connection.
pub fn tune_stream<S: AsFd>(s: &S, keepalive: Option<Duration>) -> io::Result<()> {
    let sock = socket2::SockRef::from(s);
    sock.set_tcp_nodelay(true)?;
    match keepalive {
        Some(idle) => {
            let min = Duration::from_secs(1);
            let params = socket2::TcpKeepalive::new()
                .with_time(idle.max(min))
                .with_interval((idle / 3).max(min))
                .with_retries(3);
            sock.set_tcp_keepalive(&params)
        }
        None => sock.set_keepalive(false),
    }
}

/// Forwards bytes between `client` and `upstream` in both directions until
/// both directions reached end-of-stream, one side failed, or the connection
/// was ended by `opts.conns` (idle timeout or cut). Both sockets are
/// closed on return.
///
/// Not an `async fn`, here and in the forwarding layers above: an `async
/// fn` keeps its by-value arguments twice in its future (rust-lang/rust
/// #62958), and every byte of the future is memory an idle connection holds.
pub fn forward(
    client: TcpStream,
    upstream: TcpStream,
    opts: &ForwardOptions,
) -> impl Future<Output = Result<Transferred, ForwardError>> {
    forward_with(client, upstream, opts, &take_pipe)
}

/// Connections that asked for splicing but were copied through buffers
/// because their pipes could not be created.
static SPLICE_FALLBACKS: AtomicU64 = AtomicU64::new(0);
static FALLBACK_WARNED: AtomicBool = AtomicBool::new(false);

/// How many times a direction of a connection fell back from
/// [`CopyMode::Splice`] to a user-space buffer because no pipe could be
/// created, since the process started.
pub fn splice_fallback_count() -> u64 {
    SPLICE_FALLBACKS.load(Ordering::Relaxed)
}

fn note_fallback(err: &io::Error) {
    SPLICE_FALLBACKS.fetch_add(1, Ordering::Relaxed);
    if FALLBACK_WARNED.swap(true, Ordering::Relaxed) {
        tracing::debug!(error = %err, "cannot create a splice pipe, using a buffer");
    } else {
        tracing::warn!(
            error = %err,
            "cannot create a splice pipe, copying through a buffer instead \
             (reported once; see splice_fallback_count)"
        );
    }
}

/// Where pipes come from: [`take_pipe`], or a failing source in tests.
type PipeSource = dyn Fn(usize) -> io::Result<Pipe> + Sync;

#[expect(
    clippy::manual_async_fn,
    reason = "an async fn stores by-value arguments twice (rust-lang/rust#62958)"
)]
fn forward_with(
    client: TcpStream,
    upstream: TcpStream,
    opts: &ForwardOptions,
    pipes: &PipeSource,
) -> impl Future<Output = Result<Transferred, ForwardError>> {
    async move {
        let counters = Counters::default();
        // A local, so dropped (unwatched) before the captured sockets close.
        let watch = opts.conns.as_ref().map(|c| c.watch(&client, &upstream));
        let outcome = {
            let shared = Shared {
                opts,
                pipes,
                counters: &counters,
            };
            let mut to_upstream = Direction::new(Side::Client);
            let mut to_client = Direction::new(Side::Upstream);
            // Both directions are polled by hand from one future: waiting uses
            // the sockets' own reader/writer waker slots, so a connection's task
            // stays small (idle connections are mostly task memory). The first
            // error ends both directions; the sockets close when this returns.
            std::future::poll_fn(|cx| {
                let a = to_upstream.poll(cx, &client, &upstream, &shared)?;
                let b = to_client.poll(cx, &upstream, &client, &shared)?;
                match (a, b) {
                    (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok(())),
                    _ => Poll::Pending,
                }
            })
            .await
        };
        // A connection shut down from outside ends as if both peers closed (or
        // with an error from a socket already shut down): report why instead.
        let ended = watch.and_then(Watch::finish);
        drop(client);
        drop(upstream);
        let transferred = counters.snapshot();
        match (ended, outcome) {
            (Some(Ended::Idle(timeout)), _) => Err(ForwardError::IdleTimeout {
                timeout,
                transferred,
            }),
            (Some(Ended::Cut), _) => Err(ForwardError::Cut { transferred }),
            (None, Ok(())) => Ok(transferred),
            (None, Err((side, err))) => Err(ForwardError::from_io(side, err, transferred)),
        }
    }
}

#[derive(Default)]
struct Counters {
    client_to_upstream: AtomicU64,
    upstream_to_client: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> Transferred {
        Transferred {
            client_to_upstream: self.client_to_upstream.load(Ordering::Relaxed),
            upstream_to_client: self.upstream_to_client.load(Ordering::Relaxed),
        }
    }

    /// Counter of bytes delivered *to* `dst`.
    fn delivered_to(&self, dst: Side) -> &AtomicU64 {
        match dst {
            Side::Client => &self.upstream_to_client,
            Side::Upstream => &self.client_to_upstream,
        }
    }
}

type DirResult = Result<(), (Side, io::Error)>;

/// What both directions of a connection share.
struct Shared<'a> {
    opts: &'a ForwardOptions,
    pipes: &'a PipeSource,
    counters: &'a Counters,
}

/// Bytes read into a stack buffer before a direction commits to a pipe.
/// A read that returns fewer is a complete message (the socket is drained),
/// relayed with one `send` and no pipe; a read that fills it marks the
/// direction as bulk, which splices from then on.
const PROBE: usize = 16 * 1024;

/// Progress steps one direction takes per poll before yielding, so a fast
/// connection can't starve the worker.
const STEPS_PER_POLL: u32 = 32;

/// One direction of a connection: source -> stage -> destination.
///
/// The stage (a pipe, or a buffer as the fallback) is taken only once the
/// source is readable and given back whenever it is empty and the direction
/// is about to wait, so an idle connection holds no pipe, no buffer and no
/// descriptor besides its two sockets.
struct Direction {
    src_side: Side,
    stage: Option<Stage>,
    /// Bytes sitting in the stage.
    held: usize,
    eof: bool,
    done: bool,
    /// A read into a non-empty pipe said EAGAIN. That may mean the pipe ran
    /// out of slots rather than the socket being empty, so readiness was not
    /// cleared; don't read (or wait for readability) until the pipe drained
    /// a little.
    read_stalled: bool,
    /// The current burst started large: read straight into a pipe.
    bulk: bool,
    /// Bytes read since the direction last waited.
    burst: usize,
}

impl Direction {
    fn new(src_side: Side) -> Self {
        Self {
            src_side,
            stage: None,
            held: 0,
            eof: false,
            done: false,
            read_stalled: false,
            bulk: false,
            burst: 0,
        }
    }

    fn room(&self) -> usize {
        self.stage
            .as_ref()
            .map_or(usize::MAX, |s| s.capacity() - self.held)
    }

    /// Moves bytes until `src` reaches end-of-stream and everything read
    /// was delivered, then half-closes `dst`.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        sh: &Shared<'_>,
    ) -> Poll<DirResult> {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        let dst_side = self.src_side.other();
        let mut steps = 0;
        loop {
            let mut progress = false;

            if !self.eof && !self.read_stalled && self.room() > 0 {
                progress |= if self.stage.is_none() && !self.bulk {
                    self.relay_small(src, dst, sh)?
                } else {
                    self.read_into_stage(src, sh)?
                };
            }

            if self.held > 0 {
                progress |= self.write_from_stage(dst, sh)?;
            }

            if self.held == 0 && (self.eof || !progress) {
                if let Some(st) = self.stage.take() {
                    st.give_back();
                }
                if !progress {
                    // The burst is over; a small one ends bulk mode.
                    self.bulk &= self.burst >= PROBE;
                    self.burst = 0;
                }
            }

            if self.eof && self.held == 0 {
                self.done = true;
                return Poll::Ready(
                    match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
                        // The peer is already gone entirely; the other direction
                        // will find out on its own.
                        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err((dst_side, e)),
                        _ => Ok(()),
                    },
                );
            }

            if progress {
                steps += 1;
                if steps >= STEPS_PER_POLL {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                continue;
            }

            // Nothing moved: wait for whichever readiness would let it.
            if self.held > 0 {
                match dst.poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((dst_side, e))),
                    Poll::Pending => {}
                }
            }
            if !self.eof && !self.read_stalled && self.room() > 0 {
                match src.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((self.src_side, e))),
                    Poll::Pending => {}
                }
            } else if self.held == 0 {
                return Poll::Ready(Err((
                    self.src_side,
                    io::Error::other("forwarder has nothing to wait for"),
                )));
            }
            return Poll::Pending;
        }
    }

    /// With no stage held: one `recv` into a stack buffer and, if that
    /// drained the socket, one `send`. Only what `dst` doesn't take goes to
    /// a buffer stage. Returns whether anything moved.
    fn relay_small(
        &mut self,
        src: &TcpStream,
        dst: &TcpStream,
        sh: &Shared<'_>,
    ) -> Result<bool, (Side, io::Error)> {
        let mut probe = [0u8; PROBE];
        let mut got = 0usize;
        let res = src.try_io(Interest::READABLE, || {
            let n = (&*socket2::SockRef::from(src)).read(&mut probe)?;
            got = n;
            if n > 0 && n < PROBE {
                // A short read took everything queued: report WouldBlock so
                // try_io clears read readiness now, sparing the recv that
                // would only say EAGAIN. Data arriving later is a new edge.
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(n)
            }
        });
        match res {
            Ok(0) => {
                self.eof = true;
                return Ok(true);
            }
            Ok(_) => self.bulk = true,
            Err(e) if is_retry(&e) && got > 0 => {}
            Err(e) if is_retry(&e) => return Ok(false),
            Err(e) => return Err((self.src_side, e)),
        }
        self.burst += got;
        let dst_side = self.src_side.other();
        let delivered = sh.counters.delivered_to(dst_side);
        let mut sent = 0usize;
        while sent < got {
            let chunk = probe.get(sent..got).unwrap_or_default();
            match dst.try_io(Interest::WRITABLE, || {
                (&*socket2::SockRef::from(dst)).write(chunk)
            }) {
                Ok(0) => return Err((dst_side, io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    sent += n;
                    delivered.fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
                }
                Err(e) if is_retry(&e) => break,
                Err(e) => return Err((dst_side, e)),
            }
        }
        if sent < got {
            let rest = probe.get(sent..got).unwrap_or_default();
            self.stage = Some(Stage::buffer_with(rest));
            self.held = rest.len();
        }
        Ok(true)
    }

    /// Reads into the stage, taking one first if needed. Returns whether
    /// anything moved.
    fn read_into_stage(
        &mut self,
        src: &TcpStream,
        sh: &Shared<'_>,
    ) -> Result<bool, (Side, io::Error)> {
        let was_empty = self.held == 0;
        let held = self.held;
        let stage = &mut self.stage;
        // The closure only runs while tokio believes `src` is readable,
        // which is what makes taking the stage lazy.
        let res = src.try_io(Interest::READABLE, || {
            let st = stage.get_or_insert_with(|| Stage::take(sh.opts, sh.pipes));
            let room = st.capacity() - held;
            match st.fill(src, room) {
                // With an empty stage (or a buffer) EAGAIN can only come from
                // the socket: let try_io clear its read readiness.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && !was_empty && st.is_pipe() => {
                    Ok(None)
                }
                other => other.map(Some),
            }
        });
        match res {
            Ok(Some(0)) => {
                self.eof = true;
                Ok(true)
            }
            Ok(Some(n)) => {
                self.held += n;
                self.burst += n;
                Ok(true)
            }
            Ok(None) => {
                self.read_stalled = true;
                Ok(false)
            }
            Err(e) if is_retry(&e) => Ok(false),
            Err(e) => Err((self.src_side, e)),
        }
    }

    /// Writes held bytes to `dst`. Returns whether anything moved.
    fn write_from_stage(
        &mut self,
        dst: &TcpStream,
        sh: &Shared<'_>,
    ) -> Result<bool, (Side, io::Error)> {
        let dst_side = self.src_side.other();
        let Some(st) = self.stage.as_mut() else {
            return Ok(false);
        };
        let held = self.held;
        // The stage holds data, so EAGAIN here means the socket's send
        // buffer is full and clearing its write readiness is correct.
        match dst.try_io(Interest::WRITABLE, || st.drain(dst, held)) {
            Ok(0) => Err((dst_side, io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                self.held = self.held.saturating_sub(n);
                sh.counters
                    .delivered_to(dst_side)
                    .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
                self.read_stalled = false;
                Ok(true)
            }
            Err(e) if is_retry(&e) => Ok(false),
            Err(e) => Err((dst_side, e)),
        }
    }
}

fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Where one direction's bytes wait between the two sockets: a pipe the
/// kernel splices through, or a user-space buffer when no pipe can be had
/// (or [`CopyMode::Buffered`] asked for one).
enum Stage {
    Pipe(Pipe),
    /// Bytes `start..end` of `buf` are held.
    Buffer {
        buf: Box<[u8]>,
        start: usize,
        end: usize,
    },
}

impl Stage {
    fn take(opts: &ForwardOptions, pipes: &PipeSource) -> Stage {
        if opts.mode == CopyMode::Splice {
            match pipes(opts.pipe_size) {
                Ok(p) => return Stage::Pipe(p),
                Err(e) => note_fallback(&e),
            }
        }
        Stage::Buffer {
            buf: vec![0u8; BUFFERED_COPY_SIZE].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// A buffer stage holding `data`.
    fn buffer_with(data: &[u8]) -> Stage {
        let mut buf = vec![0u8; BUFFERED_COPY_SIZE.max(data.len())].into_boxed_slice();
        buf[..data.len()].copy_from_slice(data);
        Stage::Buffer {
            buf,
            start: 0,
            end: data.len(),
        }
    }

    /// Returns an empty stage: a pipe to the pool, a buffer to the allocator.
    fn give_back(self) {
        if let Stage::Pipe(p) = self {
            PIPE_POOL.put(p);
        }
    }

    fn is_pipe(&self) -> bool {
        matches!(self, Stage::Pipe(_))
    }

    fn capacity(&self) -> usize {
        match self {
            Stage::Pipe(p) => p.capacity,
            Stage::Buffer { buf, .. } => buf.len(),
        }
    }

    /// Reads up to `max` bytes from `src` into the stage; `Ok(0)` is
    /// end-of-stream.
    fn fill(&mut self, src: &TcpStream, max: usize) -> io::Result<usize> {
        match self {
            Stage::Pipe(p) => splice(src.as_fd(), p.write.as_fd(), max),
            Stage::Buffer { buf, start, end } => {
                if *start > 0 {
                    buf.copy_within(*start..*end, 0);
                    *end -= *start;
                    *start = 0;
                }
                let free = buf.get_mut(*end..).unwrap_or_default();
                let limit = max.min(free.len());
                let n = (&*socket2::SockRef::from(src)).read(&mut free[..limit])?;
                *end += n;
                Ok(n)
            }
        }
    }

    /// Writes up to `len` held bytes to `dst`.
    fn drain(&mut self, dst: &TcpStream, len: usize) -> io::Result<usize> {
        match self {
            Stage::Pipe(p) => splice(p.read.as_fd(), dst.as_fd(), len),
            Stage::Buffer { buf, start, end } => {
                let held = buf.get(*start..*end).unwrap_or_default();
                // socket2 sends with MSG_NOSIGNAL.
                let n = (&*socket2::SockRef::from(dst)).write(&held[..len.min(held.len())])?;
                *start += n;
                Ok(n)
            }
        }
    }
}

/// Most empty pipes kept for reuse.
const PIPE_POOL_MAX: usize = 64;

/// Empty pipes kept for the next direction that turns readable: creating a
/// pipe and sizing it costs three syscalls and closing it two, per
/// direction, which a connection-per-request workload would pay each time.
static PIPE_POOL: PipePool = PipePool(Mutex::new(Vec::new()));

struct PipePool(Mutex<Vec<Pipe>>);

impl PipePool {
    fn get(&self, size: usize) -> Option<Pipe> {
        let mut spare = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Pipes of another requested size (only tests mix sizes) are closed.
        while let Some(p) = spare.pop() {
            if p.requested == size {
                return Some(p);
            }
        }
        None
    }

    /// Keeps `p`, which must be empty, unless the pool is full.
    fn put(&self, p: Pipe) {
        let mut spare = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.len() < PIPE_POOL_MAX {
            spare.push(p);
        }
    }
}

/// A pipe of `size` bytes from the pool, or a new one.
fn take_pipe(size: usize) -> io::Result<Pipe> {
    match PIPE_POOL.get(size) {
        Some(p) => Ok(p),
        None => Pipe::new(size),
    }
}

/// A pipe used as the in-kernel buffer of one direction.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes the pipe can hold.
    capacity: usize,
    /// The size it was created for.
    requested: usize,
}

impl Pipe {
    /// Creates a non-blocking, close-on-exec pipe and tries to grow it to
    /// `size` bytes, keeping the kernel's default size if that is refused.
    fn new(size: usize) -> io::Result<Self> {
        let mut fds: [libc::c_int; 2] = [-1, -1];
        // SAFETY: `fds` is a writable array of two `c_int`s, exactly what
        // pipe2(2) writes to; the flags are valid constants.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and nothing
        // else owns them; each is wrapped exactly once and closed on drop.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };

        let requested = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        let capacity = match fcntl_int(write.as_fd(), libc::F_SETPIPE_SZ, requested) {
            Ok(granted) => granted,
            // Refused (EPERM over pipe-max-size or the per-user limit, ...):
            // keep whatever size the pipe has.
            Err(_) => fcntl_int(write.as_fd(), libc::F_GETPIPE_SZ, 0)?,
        };
        let capacity = usize::try_from(capacity)
            .ok()
            .filter(|&c| c > 0)
            .ok_or_else(|| io::Error::other("pipe reports no capacity"))?;
        Ok(Self {
            read,
            write,
            capacity,
            requested: size,
        })
    }
}

/// `fcntl(fd, cmd, arg)` for commands taking and returning an `int`.
fn fcntl_int(fd: BorrowedFd<'_>, cmd: libc::c_int, arg: libc::c_int) -> io::Result<libc::c_int> {
    // SAFETY: `fd` is a live descriptor for the duration of the borrow, and
    // the commands used here (F_SETPIPE_SZ, F_GETPIPE_SZ) take an int
    // argument and touch no memory of ours.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// One non-blocking `splice(2)` of up to `len` bytes; one of the two
/// descriptors must be a pipe. `Ok(0)` means end-of-stream on `from`.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: both descriptors stay open for the duration of the borrows;
        // null offsets are required for pipes and sockets and mean "use the
        // current position", so the kernel reads or writes no memory of ours.
        let n = unsafe {
            libc::splice(
                from.as_raw_fd(),
                std::ptr::null_mut(),
                to.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        match usize::try_from(n) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
    use tokio::task::JoinHandle;

    const MIB: usize = 1 << 20;
    const CHUNK: usize = 64 * 1024;
    /// Upper bound for anything to happen; only reached when a test fails.
    const DEADLINE: Duration = Duration::from_secs(120);

    type Forwarder = JoinHandle<Result<Transferred, ForwardError>>;

    /// client app <-> [proxy: forward()] <-> server app, all on loopback.
    async fn proxied_pair(
        opts: ForwardOptions,
        pipes: Option<fn(usize) -> io::Result<Pipe>>,
    ) -> (TcpStream, TcpStream, Forwarder) {
        let front = TcpListener::bind("127.0.0.1:0").await.expect("bind front");
        let back = TcpListener::bind("127.0.0.1:0").await.expect("bind back");
        let client_app = TcpStream::connect(front.local_addr().expect("front addr"))
            .await
            .expect("connect front");
        let (proxy_client, _) = front.accept().await.expect("accept front");
        let proxy_upstream = TcpStream::connect(back.local_addr().expect("back addr"))
            .await
            .expect("connect back");
        let (server_app, _) = back.accept().await.expect("accept back");
        tune_stream(&proxy_client, Some(Duration::from_secs(30))).expect("tune client");
        tune_stream(&proxy_upstream, Some(Duration::from_secs(30))).expect("tune upstream");
        let handle = tokio::spawn(async move {
            match pipes {
                Some(make) => forward_with(proxy_client, proxy_upstream, &opts, &make).await,
                None => forward(proxy_client, proxy_upstream, &opts).await,
            }
        });
        (client_app, server_app, handle)
    }

    async fn finish(handle: Forwarder) -> Result<Transferred, ForwardError> {
        tokio::time::timeout(DEADLINE, handle)
            .await
            .expect("forward() did not finish in time")
            .expect("forward() task panicked")
    }

    fn opts(mode: CopyMode) -> ForwardOptions {
        ForwardOptions {
            mode,
            ..ForwardOptions::default()
        }
    }

    /// xorshift64*: deterministic pseudo-random stream, cheap even unoptimized.
    struct Prng(u64);

    impl Prng {
        fn fill(&mut self, out: &mut [u8]) {
            for word in out.chunks_exact_mut(8) {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                word.copy_from_slice(&self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
            }
        }
    }

    async fn send_stream(mut w: OwnedWriteHalf, seed: u64, total: usize) -> io::Result<()> {
        let mut rng = Prng(seed);
        let mut chunk = vec![0u8; CHUNK];
        for _ in 0..total / CHUNK {
            rng.fill(&mut chunk);
            w.write_all(&chunk).await?;
        }
        w.shutdown().await
    }

    async fn check_stream(mut r: OwnedReadHalf, seed: u64, total: usize) -> io::Result<()> {
        let mut rng = Prng(seed);
        let mut expected = vec![0u8; CHUNK];
        let mut got = vec![0u8; CHUNK];
        for i in 0..total / CHUNK {
            rng.fill(&mut expected);
            r.read_exact(&mut got).await?;
            assert!(got == expected, "data mismatch in chunk {i}");
        }
        assert_eq!(
            r.read(&mut got).await?,
            0,
            "expected EOF after {total} bytes"
        );
        Ok(())
    }

    async fn bulk_both_directions(
        opts: ForwardOptions,
        pipes: Option<fn(usize) -> io::Result<Pipe>>,
        total: usize,
    ) {
        let (client_app, server_app, handle) = proxied_pair(opts, pipes).await;
        let (cr, cw) = client_app.into_split();
        let (sr, sw) = server_app.into_split();
        let apps = async {
            tokio::try_join!(
                send_stream(cw, 1, total),
                check_stream(sr, 1, total),
                send_stream(sw, 2, total),
                check_stream(cr, 2, total),
            )
        };
        tokio::time::timeout(DEADLINE, apps)
            .await
            .expect("transfer did not finish in time")
            .expect("transfer failed");
        let total = u64::try_from(total).expect("size fits u64");
        assert_eq!(
            finish(handle).await.expect("forward() failed"),
            Transferred {
                client_to_upstream: total,
                upstream_to_client: total,
            }
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn splice_mode_moves_64mib_each_way_intact() {
        bulk_both_directions(opts(CopyMode::Splice), None, 64 * MIB).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn buffered_mode_moves_64mib_each_way_intact() {
        bulk_both_directions(opts(CopyMode::Buffered), None, 64 * MIB).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_pipes_still_move_data_intact() {
        // A one-page pipe exercises the pipe-full paths constantly.
        let opts = ForwardOptions {
            pipe_size: 4096,
            ..opts(CopyMode::Splice)
        };
        bulk_both_directions(opts, None, 8 * MIB).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn falls_back_to_buffered_when_pipes_fail() {
        let before = splice_fallback_count();
        let emfile: fn(usize) -> io::Result<Pipe> =
            |_| Err(io::Error::from_raw_os_error(libc::EMFILE));
        bulk_both_directions(opts(CopyMode::Splice), Some(emfile), 4 * MIB).await;
        assert!(splice_fallback_count() > before);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_messages_take_no_pipe_and_bulk_ones_do() {
        static TAKEN: AtomicU64 = AtomicU64::new(0);
        let counting: fn(usize) -> io::Result<Pipe> = |size| {
            TAKEN.fetch_add(1, Ordering::SeqCst);
            Pipe::new(size)
        };
        let (client_app, server_app, handle) =
            proxied_pair(opts(CopyMode::Splice), Some(counting)).await;
        let (mut cr, mut cw) = client_app.into_split();
        let (mut sr, mut sw) = server_app.into_split();
        let mut buf = [0u8; 4];
        for _ in 0..10 {
            cw.write_all(b"ping").await.expect("client write");
            sr.read_exact(&mut buf).await.expect("server read");
            sw.write_all(b"pong").await.expect("server write");
            cr.read_exact(&mut buf).await.expect("client read");
        }
        assert_eq!(TAKEN.load(Ordering::SeqCst), 0, "ping-pong took a pipe");
        // A bulk transfer splices, through pipes taken as it goes.
        let total = 8 * MIB;
        tokio::try_join!(send_stream(cw, 3, total), check_stream(sr, 3, total))
            .expect("bulk transfer");
        assert!(TAKEN.load(Ordering::SeqCst) >= 1, "bulk took no pipe");
        drop((cr, sw));
        let _ = finish(handle).await;
    }

    async fn half_close(mode: CopyMode) {
        let (mut client_app, mut server_app, handle) = proxied_pair(opts(mode), None).await;
        let exchange = async {
            client_app
                .write_all(b"request")
                .await
                .expect("client write");
            client_app.shutdown().await.expect("client shutdown(Write)");

            // read_to_end only returns once the server saw EOF.
            let mut req = Vec::new();
            server_app.read_to_end(&mut req).await.expect("server read");
            assert_eq!(req, b"request");

            // The other direction still works after the half-close.
            server_app
                .write_all(b"the reply")
                .await
                .expect("server write");
            server_app.shutdown().await.expect("server shutdown(Write)");

            let mut reply = Vec::new();
            client_app
                .read_to_end(&mut reply)
                .await
                .expect("client read");
            assert_eq!(reply, b"the reply");
        };
        tokio::time::timeout(DEADLINE, exchange)
            .await
            .expect("half-close exchange did not finish in time");
        assert_eq!(
            finish(handle).await.expect("forward() failed"),
            Transferred {
                client_to_upstream: 7,
                upstream_to_client: 9,
            }
        );
    }

    #[tokio::test]
    async fn splice_mode_propagates_half_close() {
        half_close(CopyMode::Splice).await;
    }

    #[tokio::test]
    async fn buffered_mode_propagates_half_close() {
        half_close(CopyMode::Buffered).await;
    }

    /// Asserts that `s`'s peer closed: a read yields EOF or an error.
    async fn assert_closed(s: &mut TcpStream, what: &str) {
        let mut buf = [0u8; 64];
        loop {
            let read = tokio::time::timeout(DEADLINE, s.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("{what} was not closed in time"));
            match read {
                Ok(0) | Err(_) => return,
                // Leftover bytes in flight; keep reading until the close.
                Ok(_) => {}
            }
        }
    }

    async fn idle_timeout(mode: CopyMode) {
        let opts = ForwardOptions {
            conns: Some(Connections::start(Some(Duration::from_millis(200))).expect("registry")),
            ..opts(mode)
        };
        let (mut client_app, mut server_app, handle) = proxied_pair(opts, None).await;
        // One round trip, then silence.
        client_app.write_all(b"ping").await.expect("client write");
        let mut buf = [0u8; 4];
        server_app.read_exact(&mut buf).await.expect("server read");
        assert_eq!(&buf, b"ping");

        match finish(handle).await {
            Err(ForwardError::IdleTimeout { transferred, .. }) => {
                assert_eq!(transferred.client_to_upstream, 4);
            }
            other => panic!("expected idle timeout, got {other:?}"),
        }
        assert_closed(&mut client_app, "client").await;
        assert_closed(&mut server_app, "server").await;
    }

    #[tokio::test]
    async fn splice_mode_closes_idle_connection() {
        idle_timeout(CopyMode::Splice).await;
    }

    #[tokio::test]
    async fn buffered_mode_closes_idle_connection() {
        idle_timeout(CopyMode::Buffered).await;
    }

    async fn upstream_reset(mode: CopyMode) {
        let (mut client_app, mut server_app, handle) = proxied_pair(opts(mode), None).await;
        client_app.write_all(b"ping").await.expect("client write");
        let mut buf = [0u8; 4];
        server_app.read_exact(&mut buf).await.expect("server read");
        // SO_LINGER 0 + close sends RST instead of FIN.
        server_app.set_zero_linger().expect("SO_LINGER");
        drop(server_app);

        let err = finish(handle)
            .await
            .expect_err("forward() should report the reset");
        assert!(err.is_reset(), "expected a reset, got {err:?}");
        assert_eq!(err.side(), Some(Side::Upstream));
        assert_eq!(err.transferred().client_to_upstream, 4);
        assert_closed(&mut client_app, "client").await;
    }

    #[tokio::test]
    async fn splice_mode_survives_upstream_reset() {
        upstream_reset(CopyMode::Splice).await;
    }

    #[tokio::test]
    async fn buffered_mode_survives_upstream_reset() {
        upstream_reset(CopyMode::Buffered).await;
    }

    async fn client_reset_mid_stream(mode: CopyMode) {
        let (mut client_app, server_app, handle) = proxied_pair(opts(mode), None).await;
        let (_server_read, mut server_write) = server_app.into_split();
        // The server streams until the proxy closes the upstream connection.
        let server = tokio::spawn(async move {
            let chunk = vec![7u8; CHUNK];
            loop {
                if let Err(e) = server_write.write_all(&chunk).await {
                    return e;
                }
            }
        });
        let mut buf = vec![0u8; CHUNK];
        client_app.read_exact(&mut buf).await.expect("client read");
        client_app.set_zero_linger().expect("SO_LINGER");
        drop(client_app);

        // Any outcome is fine as long as it is reported, not a panic or hang.
        let _ = finish(handle).await;
        // The server's writes fail once the proxy closed the upstream side.
        tokio::time::timeout(DEADLINE, server)
            .await
            .expect("upstream was not closed in time")
            .expect("server task panicked");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn splice_mode_survives_client_reset() {
        client_reset_mid_stream(CopyMode::Splice).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn buffered_mode_survives_client_reset() {
        client_reset_mid_stream(CopyMode::Buffered).await;
    }

    #[tokio::test]
    async fn tune_stream_sets_nodelay_and_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let s = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        tune_stream(&s, Some(Duration::from_secs(20))).expect("tune");
        let sock = socket2::SockRef::from(&s);
        assert!(sock.tcp_nodelay().expect("nodelay"));
        assert!(sock.keepalive().expect("keepalive"));
        assert_eq!(
            sock.tcp_keepalive_time().expect("keepidle"),
            Duration::from_secs(20)
        );
        tune_stream(&s, None).expect("tune off");
        assert!(!sock.keepalive().expect("keepalive"));
    }

    #[test]
    fn pipe_gets_requested_size_or_falls_back() {
        let pipe = Pipe::new(DEFAULT_PIPE_SIZE).expect("pipe");
        assert!(pipe.capacity >= 4096);
        // Far beyond any pipe-max-size: refused, silently keeps its size.
        let pipe = Pipe::new(usize::MAX).expect("pipe");
        assert!(pipe.capacity >= 4096);
    }
}
