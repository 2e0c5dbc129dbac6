//! Clients from outside the node, for the rules that tell them apart from
//! the node's own traffic: a network namespace joined to the host by a veth
//! pair stands for another machine. `externalTrafficPolicy: Local` serves
//! outside clients only from this node's endpoints, while the node itself
//! (and its Pods, which share its network) gets Cluster semantics, as under
//! kube-proxy. Namespaces need root (CI runs as root); elsewhere these tests
//! say so and pass without checking.

use std::io;
use std::os::fd::AsRawFd;
use std::process::Command;

use crate::harness::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {out:?}", args.join(" "));
}

/// A network namespace at `ns_ip`/30, reaching the host at `host_ip`;
/// removed on drop.
struct Outside {
    name: String,
    host_if: String,
}

impl Outside {
    fn new(host_ip: &str, ns_ip: &str) -> Outside {
        let pid = std::process::id();
        let o = Outside {
            name: format!("strait-out-{pid}"),
            host_if: format!("sto{}h", pid % 1_000_000),
        };
        let ns_if = format!("sto{}n", pid % 1_000_000);
        ip(&["netns", "add", &o.name]);
        ip(&[
            "link", "add", &o.host_if, "type", "veth", "peer", "name", &ns_if, "netns", &o.name,
        ]);
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &o.host_if]);
        ip(&["link", "set", &o.host_if, "up"]);
        ip(&[
            "-n",
            &o.name,
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_if,
        ]);
        ip(&["-n", &o.name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &o.name, "link", "set", "lo", "up"]);
        o
    }

    /// `who(addr)` from inside the namespace (on a thread moved into it).
    fn who(&self, addr: &str) -> io::Result<String> {
        let (path, addr) = (format!("/var/run/netns/{}", self.name), addr.to_string());
        std::thread::spawn(move || {
            let ns = std::fs::File::open(path)?;
            // SAFETY: setns on an open namespace file moves only this thread.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            who(&addr)
        })
        .join()
        .expect("namespace thread")
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        // Deleting one end of the pair deletes the other.
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

#[test]
fn external_local_serves_outside_clients_from_local_endpoints_only() {
    if !is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    // The node's address is the host end of the pair, so its NodePort is
    // reachable from the namespace.
    let outside = Outside::new("10.254.12.1", "10.254.12.2");
    let net = Net {
        node_ip: "10.254.12.1".into(),
        ..Net::new(12)
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let control = Control::start(&dir.path().join("control"), &net);
    let _node = Node::start("node-1", &net, &control.addr, &dir.path().join("node"));
    let local = Backend::greeter("local");
    let elsewhere = Backend::greeter("elsewhere");
    let svc = service("edge", "NodePort", "app: edge")
        .replace("  ports:", "  externalTrafficPolicy: Local\n  ports:");
    control.apply(&format!(
        "{svc}{}{}",
        pod(&local, "app: edge"),
        pod(&elsewhere, "app: edge").replace("nodeName: node-1", "nodeName: node-2"),
    ));
    let node_port = control.service("edge")["spec"]["ports"][0]["nodePort"]
        .as_i64()
        .expect("nodePort");
    let addr = format!("{}:{node_port}", net.node_ip);

    eventually("the NodePort to forward outside clients", || {
        outside.who(&addr).ok()
    });
    for i in 0..20 {
        let got = outside
            .who(&addr)
            .unwrap_or_else(|e| panic!("outside client {i}: {e}"));
        assert_eq!(got, "local", "outside connection {i} left the node");
    }
    // The node itself: Cluster semantics, both endpoints (two random
    // choices over two idle endpoints: 40 picks of the same one are 2^-39).
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..40 {
        seen.insert(who(&addr).unwrap_or_else(|e| panic!("node client {i}: {e}")));
    }
    assert_eq!(seen, ["elsewhere", "local"].map(String::from).into());

    // No local endpoint left: outside clients are refused, the node's own
    // traffic still reaches the other node's endpoint.
    let out = control.cli(&["delete", "pod", "local", "--grace-period", "0"]);
    assert!(out.status.success(), "{out:?}");
    eventually("outside clients to be refused", || {
        outside.who(&addr).is_err().then_some(())
    });
    for i in 0..10 {
        assert_eq!(
            who(&addr).unwrap_or_else(|e| panic!("node client {i}: {e}")),
            "elsewhere"
        );
    }
}
