//! Echo backends, manifests and polling helpers for the data-plane suite.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Generous: the suite must pass on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `f` until it is true, or panics after [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let give_up = tokio::time::Instant::now() + DEADLINE;
    loop {
        if f().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `fut` or panics after [`DEADLINE`] (a hang is a failure, not a wait).
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {DEADLINE:?}"))
}

/// A TCP echo server on 127.0.0.1 counting the connections it accepted.
pub struct Echo {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Echo {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
        let addr = listener.local_addr().expect("echo addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Self {
            addr,
            accepted,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes the listening socket; connections already accepted go on.
    pub async fn close_listener(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A port on 127.0.0.1 where nothing listens (connects are refused).
pub async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

/// Writes `msg` and expects it back.
pub async fn roundtrip(s: &mut TcpStream, msg: &[u8]) {
    within("echo round trip", async {
        s.write_all(msg).await.expect("write");
        let mut buf = vec![0u8; msg.len()];
        s.read_exact(&mut buf).await.expect("read echo");
        assert_eq!(buf, msg);
    })
    .await
}

/// Connects and checks one echo round trip.
pub async fn connect_echo(addr: SocketAddr) -> TcpStream {
    let mut s = within("connect", TcpStream::connect(addr))
        .await
        .expect("connect to service");
    roundtrip(&mut s, b"hello strait\n").await;
    s
}

/// Whether the connection is closed by the peer without any data (RST or
/// FIN), as a listener does when there is no endpoint.
pub async fn closed_without_data(addr: SocketAddr) -> bool {
    // The reset can beat the end of the client's connect on loopback.
    let mut s = match within("connect", TcpStream::connect(addr)).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
        Err(e) => panic!("connect to {addr}: {e}"),
    };
    let _ = s.write_all(b"x").await;
    let mut buf = [0u8; 16];
    match within("read after no-endpoint connect", s.read(&mut buf)).await {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
    }
}

/// A Service and, when `endpoints` is not empty, one EndpointSlice.
pub fn manifest(name: &str, cluster_ip: &str, port: u16, endpoints: &[SocketAddr]) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  clusterIP: {cluster_ip}\n  ports:\n  - {{name: echo, port: {port}, protocol: TCP}}\n"
    );
    // Slice ports carry one number, so each endpoint gets its own slice.
    for (i, ep) in endpoints.iter().enumerate() {
        y.push_str(&format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: {name}-{i}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\n\
             addressType: IPv4\nports: [{{name: echo, port: {}, protocol: TCP}}]\n\
             endpoints:\n- addresses: [\"{}\"]\n  conditions: {{ready: true}}\n  nodeName: test-node\n",
            ep.port(),
            ep.ip()
        ));
    }
    y
}
