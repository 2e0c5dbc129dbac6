//! A fault-injecting TCP proxy in front of each replica, like etcd's
//! robustness tests use: every peer and client connection to replica `j`
//! goes through proxy `j`, which knows the caller by its source address and
//! drops connections on blocked (from, to) pairs — including ones already
//! open when the partition starts.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Blocked directions: `(from, to)` replica ids.
pub type Blocked = BTreeSet<(u64, u64)>;

/// Controls every proxy of a cluster.
#[derive(Clone)]
pub struct Faults {
    tx: Arc<watch::Sender<Blocked>>,
}

impl Faults {
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::channel(Blocked::new()).0),
        }
    }

    /// Cuts every link between `group` and the other `ids`, both ways.
    pub fn isolate(&self, group: &[u64], ids: &[u64]) {
        let mut b = Blocked::new();
        for a in group {
            for o in ids.iter().filter(|o| !group.contains(o)) {
                b.insert((*a, *o));
                b.insert((*o, *a));
            }
        }
        self.tx.send_replace(b);
    }

    /// Cuts only `from` → `to`.
    pub fn block_one_way(&self, from: u64, to: u64) {
        self.tx.send_replace(Blocked::from([(from, to)]));
    }

    pub fn heal(&self) {
        self.tx.send_replace(Blocked::new());
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
                let from = who(peer.ip());
                let blocked = move |b: &Blocked| from.is_some_and(|f| b.contains(&(f, to)));
                if blocked(&rx.borrow()) {
                    drop(client);
                    continue;
                }
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let (mut c, mut u) = (client, upstream);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut c, &mut u) => {}
                        _ = async {
                            loop {
                                if rx.changed().await.is_err() {
                                    return std::future::pending::<()>().await;
                                }
                                if blocked(&rx.borrow()) {
                                    return;
                                }
                            }
                        } => {}
                    }
                });
            }
        })
    }
}
