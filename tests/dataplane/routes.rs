//! Route capture through the real binary: an agent given a service CIDR and
//! LB pool outside 127.0.0.0/8 makes them local, forwards on an address in
//! them, takes back the routes a killed run left and removes them when it
//! stops; without CAP_NET_ADMIN it refuses to start. Changing the kernel's
//! routes needs root (CI runs as root); elsewhere these tests say so and
//! pass without checking.

use std::process::{Child, Command, Stdio};

use crate::harness::*;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether the local table has a `local` route for exactly `cidr`.
fn local_route(cidr: &str) -> bool {
    let out = Command::new("ip")
        .args([
            "route", "show", "table", "local", "type", "local", "exact", cidr,
        ])
        .output()
        .expect("run ip");
    assert!(out.status.success(), "ip route show failed: {out:?}");
    !out.stdout.trim_ascii().is_empty()
}

/// A static-mode agent: one Service at `cluster_ip:80` forwarding to `backend`.
fn static_agent(
    dir: &std::path::Path,
    ranges: &[&str],
    cluster_ip: &str,
    backend: &Backend,
    privileged: bool,
) -> Child {
    let manifest = dir.join("services.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\n\
             spec:\n  clusterIP: {cluster_ip}\n  ports: [{{port: 80}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata:\n  name: web-1\n  labels: {{kubernetes.io/service-name: web}}\n\
             addressType: IPv4\nports: [{{port: {port}}}]\n\
             endpoints:\n- addresses: [\"127.0.0.1\"]\n",
            port = backend.addr.port()
        ),
    )
    .expect("write manifest");
    let mut cmd = if privileged {
        Command::new(BIN)
    } else {
        // Root without CAP_NET_ADMIN, for the agent and the `ip` it runs.
        let mut c = Command::new("setpriv");
        c.args(["--bounding-set=-net_admin", "--inh-caps=-net_admin", BIN]);
        c
    };
    cmd.args([
        "node",
        "--name",
        "n1",
        "--node-ip",
        "127.0.0.1",
        "--config-file",
    ])
    .arg(&manifest)
    .arg("--data-dir")
    .arg(dir.join("data"))
    .args(["--service-cidr", ranges[0], "--lb-pool", ranges[1]])
    .env("STRAIT_LOG", "error")
    .env("STRAIT_DNS_LISTEN", "off")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd.spawn().expect("spawn strait node")
}

fn stop(mut child: Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert!(status.success(), "agent exited with {status}");
}

#[test]
fn the_agent_makes_its_ranges_local_and_takes_its_routes_back() {
    if !is_root() {
        eprintln!("skipped: changing routes needs root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (cidr, pool) = ("10.253.77.0/24", "10.253.78.0/28");
    assert!(!local_route(cidr) && !local_route(pool), "a leftover route");
    let backend = Backend::greeter("b1");
    let addr = "10.253.77.10:80";

    let mut agent = static_agent(dir.path(), &[cidr, pool], "10.253.77.10", &backend, true);
    // Before the route, a connect would go out the default route and hang.
    eventually("the routes", || {
        (local_route(cidr) && local_route(pool)).then_some(())
    });
    eventually("forwarding on an address of the captured range", || {
        who(addr).ok().filter(|n| n == "b1")
    });
    assert!(local_route(cidr) && local_route(pool));

    // Killed, it cannot clean up; the record lets the next run take the
    // routes back instead of leaving them as someone else's.
    agent.kill().expect("kill");
    agent.wait().expect("wait");
    assert!(local_route(cidr) && local_route(pool));
    let record = std::fs::read_to_string(dir.path().join("data/captured-routes")).expect("record");
    assert_eq!(record, format!("{cidr}\n{pool}\n"));

    let agent = static_agent(dir.path(), &[cidr, pool], "10.253.77.10", &backend, true);
    eventually("forwarding again after the restart", || {
        who(addr).ok().filter(|n| n == "b1")
    });
    stop(agent);
    assert!(!local_route(cidr), "{cidr} left behind after a clean stop");
    assert!(!local_route(pool), "{pool} left behind after a clean stop");
    assert!(!dir.path().join("data/captured-routes").exists());
}

#[test]
fn without_the_privilege_a_range_that_is_not_local_stops_the_agent() {
    if !is_root() {
        eprintln!("skipped: dropping CAP_NET_ADMIN is tested as root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (cidr, pool) = ("10.253.79.0/24", "10.253.80.0/28");
    let backend = Backend::greeter("b1");
    let agent = static_agent(dir.path(), &[cidr, pool], "10.253.79.10", &backend, false);
    let out = agent.wait_with_output().expect("wait");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started without the privilege: {stderr}"
    );
    assert!(
        stderr.contains(&format!("{cidr} is not local on this node"))
            && stderr.contains("CAP_NET_ADMIN"),
        "{stderr}"
    );
    assert!(!local_route(cidr));
}
