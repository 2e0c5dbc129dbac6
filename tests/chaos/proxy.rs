//! A fault-injecting TCP proxy in front of each replica, like etcd's
//! robustness tests use: every peer and client connection to replica `j`
//! goes through proxy `j`, which knows the caller by its source address and
//! cuts the blocked (from, to) pairs — including connections already open
//! when the partition starts — in one of two ways:
//! - [`Cut::Reset`]: connections are dropped, and new ones closed at once,
//!   so the callers see errors right away;
//! - [`Cut::Silent`]: nothing moves and nothing fails, as when a network
//!   drops packets: open connections stall (the bytes in flight arrive
//!   after the heal) and new ones are accepted but not passed on, so the
//!   callers hang until their own timeouts.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Blocked directions: `(from, to)` replica ids.
pub type Blocked = BTreeSet<(u64, u64)>;

/// How a blocked link fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    Reset,
    Silent,
}

/// The links cut right now, and how.
#[derive(Clone, Debug)]
struct Partition {
    blocked: Blocked,
    cut: Cut,
}

/// Controls every proxy of a cluster.
#[derive(Clone)]
pub struct Faults {
    tx: Arc<watch::Sender<Partition>>,
}

impl Faults {
    pub fn new() -> Self {
        Self {
            tx: Arc::new(
                watch::channel(Partition {
                    blocked: Blocked::new(),
                    cut: Cut::Reset,
                })
                .0,
            ),
        }
    }

    /// Cuts every link between `group` and the other `ids`, both ways,
    /// resetting connections.
    pub fn isolate(&self, group: &[u64], ids: &[u64]) {
        self.cut_off(group, ids, Cut::Reset);
    }

    /// Cuts every link between `group` and the other `ids`, both ways, as
    /// `cut` says.
    pub fn cut_off(&self, group: &[u64], ids: &[u64], cut: Cut) {
        let mut blocked = Blocked::new();
        for a in group {
            for o in ids.iter().filter(|o| !group.contains(o)) {
                blocked.insert((*a, *o));
                blocked.insert((*o, *a));
            }
        }
        self.tx.send_replace(Partition { blocked, cut });
    }

    /// Cuts only `from` → `to`, resetting connections.
    pub fn block_one_way(&self, from: u64, to: u64) {
        self.tx.send_replace(Partition {
            blocked: Blocked::from([(from, to)]),
            cut: Cut::Reset,
        });
    }

    pub fn heal(&self) {
        self.tx.send_modify(|p| p.blocked.clear());
    }

    /// Starts the proxy for replica `to` on `listen`, forwarding to `target`.
    /// `who` maps a source IP to a replica id (clients map to none).
    pub async fn spawn(
        &self,
        to: u64,
        listen: SocketAddr,
        target: SocketAddr,
        who: Arc<dyn Fn(IpAddr) -> Option<u64> + Send + Sync>,
    ) -> tokio::task::JoinHandle<()> {
        let listener = TcpListener::bind(listen).await.expect("bind proxy");
        let rx = self.tx.subscribe();
        tokio::spawn(async move {
            loop {
                let Ok((client, peer)) = listener.accept().await else {
                    continue;
                };
                let link = Link {
                    rx: rx.clone(),
                    from: who(peer.ip()),
                    to,
                };
                tokio::spawn(link.carry(client, target));
            }
        })
    }
}

/// One connection's (from, to) pair and the partitions to come.
#[derive(Clone)]
struct Link {
    rx: watch::Receiver<Partition>,
    from: Option<u64>,
    to: u64,
}

impl Link {
    /// How this link is cut right now, if it is.
    fn cut(&self) -> Option<Cut> {
        let p = self.rx.borrow();
        self.from
            .is_some_and(|f| p.blocked.contains(&(f, self.to)))
            .then_some(p.cut)
    }

    /// Returns once the link passes bytes; false if it is reset instead.
    async fn open(&mut self) -> bool {
        loop {
            match self.cut() {
                None => return true,
                Some(Cut::Reset) => return false,
                Some(Cut::Silent) => {
                    if self.rx.changed().await.is_err() {
                        return false;
                    }
                }
            }
        }
    }

    /// Returns when the link is reset.
    async fn reset(&mut self) {
        loop {
            if self.cut() == Some(Cut::Reset) {
                return;
            }
            if self.rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Passes `client` on to `target` while the link allows.
    async fn carry(mut self, client: TcpStream, target: SocketAddr) {
        // A new connection over a silent cut waits, as a SYN would be
        // retransmitted until the network heals.
        if !self.open().await {
            return;
        }
        let Ok(upstream) = TcpStream::connect(target).await else {
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (cr, cw) = client.into_split();
        let (ur, uw) = upstream.into_split();
        let mut watcher = self.clone();
        tokio::select! {
            _ = async {
                tokio::join!(self.clone().pump(cr, uw), self.pump(ur, cw))
            } => {}
            () = watcher.reset() => {}
        }
    }

    /// One direction: read, then deliver once the link is open.
    async fn pump(mut self, mut r: impl AsyncReadExt + Unpin, mut w: impl AsyncWriteExt + Unpin) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    // The end of the stream crosses only an open link.
                    if self.open().await {
                        let _ = w.shutdown().await;
                    }
                    return;
                }
                Ok(n) => n,
            };
            if !self.open().await || w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
}
