//! `strait dev` through the real binary: the README's first command brings
//! up a cluster whose ClusterIP, NodePort and LoadBalancer paths forward.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::harness::*;

fn fetch(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.lines().last().map(str::to_string)
}

#[test]
fn dev_cluster_forwards_cluster_ip_node_port_and_load_balancer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Killed(
        Command::new(BIN)
            .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .env("STRAIT_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn strait dev"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut urls = Vec::new();
    while urls.len() < 3 {
        let line = rx
            .recv_timeout(DEADLINE)
            .expect("strait dev printed its instructions");
        if let Some(rest) = line.trim().strip_prefix("curl http://") {
            urls.push(rest.split('/').next().expect("addr").to_string());
        }
    }
    let (cluster_ip, node_port, lb) = (&urls[0], &urls[1], &urls[2]);
    assert!(node_port.ends_with(":31000"), "{node_port}");
    // The ClusterIP balances over both backends.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        if let Some(body) = fetch(cluster_ip) {
            seen.insert(body);
        }
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "expected both backends, saw {seen:?}");
    assert!(
        seen.iter().all(|b| b.starts_with("hello from backend-")),
        "{seen:?}"
    );
    // NodePort and LoadBalancer reach the demo frontends (root can bind :80).
    let np = eventually("NodePort answers", || fetch(node_port));
    assert!(np.starts_with("hello from frontend-"), "{np}");
    let lbb = eventually("LoadBalancer IP answers", || fetch(lb));
    assert!(lbb.starts_with("hello from frontend-"), "{lbb}");
    drop(child);
}

/// Kills the dev cluster however the test ends, so a failed run leaves no
/// process holding the demo ports.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
