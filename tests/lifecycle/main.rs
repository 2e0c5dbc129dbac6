//! Workload health and lifecycle through the real binaries: readiness
//! probes taking a dead backend out, static pods following their files, a
//! silent node agent's endpoints going unready, and a rolling replacement
//! of backends — with client traffic running and every failure counted.
//! Measured times are printed (run with `--nocapture` to see them).

#[path = "../dataplane/harness.rs"]
#[allow(dead_code)]
mod dataplane;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dataplane::{BIN, Backend, echo, eventually, greeting, who};
use serde_json::Value;

/// A `strait control` with the given extra flags, on port 0.
struct Control {
    child: Child,
    addr: String,
}

impl Control {
    fn start(dir: &Path, extra: &[&str]) -> Control {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(BIN)
            .args([
                "control",
                "--insecure",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir)
            .args(extra)
            .env("STRAIT_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn control");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .expect("listening line")
            .to_string();
        Control { child, addr }
    }

    fn cli(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.try_cli(args, stdin)
            .unwrap_or_else(|stderr| panic!("strait {args:?} failed: {stderr}"))
    }

    /// Runs the CLI against this replica: its stdout, or its stderr when it fails.
    fn try_cli(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        use std::io::Write;
        let mut c = Command::new(BIN)
            .args(args)
            .env("STRAIT_SERVER", &self.addr)
            .env("STRAIT_INSECURE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cli");
        if let Some(s) = stdin {
            c.stdin
                .take()
                .expect("stdin")
                .write_all(s.as_bytes())
                .expect("write");
        }
        drop(c.stdin.take());
        let out = c.wait_with_output().expect("cli");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn apply(&self, yaml: &str) {
        self.cli(&["apply", "-f", "-"], Some(yaml));
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.cli(&a, None)).expect("json")
    }

    /// Readiness of each endpoint by Pod name.
    fn ready(&self) -> std::collections::BTreeMap<String, bool> {
        let mut out = std::collections::BTreeMap::new();
        for s in self.json(&["endpointslices"])["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            for e in s["endpoints"].as_array().cloned().unwrap_or_default() {
                let name = e["targetRef"]["name"].as_str().unwrap_or("").to_string();
                out.insert(name, e["conditions"]["ready"].as_bool().unwrap_or(false));
            }
        }
        out
    }

    fn cluster_addr(&self, svc: &str) -> String {
        let v = self.json(&["svc", svc]);
        format!(
            "{}:8080",
            v["spec"]["clusterIP"].as_str().expect("clusterIP")
        )
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `strait node` agent.
struct Agent(Child);

impl Agent {
    fn start(name: &str, node_ip: &str, control: &str, dir: &Path, extra: &[&str]) -> Agent {
        let child = Command::new(BIN)
            .args([
                "node",
                "--insecure",
                "--name",
                name,
                "--node-ip",
                node_ip,
                "--control",
                control,
                "--data-dir",
            ])
            .arg(dir)
            .args(extra)
            .env("STRAIT_LOG", "warn")
            .env("STRAIT_DNS_LISTEN", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn node");
        Agent(child)
    }

    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

fn pod(name: &str, node: &str, port: u16, probe: bool, grace: u32) -> String {
    let probe = if probe {
        "\n    readinessProbe: {tcpSocket: {port: app}, periodSeconds: 1, failureThreshold: 2}"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: web}}}}\nspec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: {grace}\n  containers:\n  - name: c\n    ports: [{{name: app, containerPort: {port}}}]{probe}\nstatus: {{podIP: 127.0.0.1}}\n---\n"
    )
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports: [{port: 8080, targetPort: app}]\n";

/// Client load: new connections in a loop, each must greet; failures counted.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let thread = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 200_000 {
                    n += 1;
                    match who(&addr) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("client connection failed: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        Load {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }

    fn wait_for(&self, n: usize) {
        let base = self.ok.load(Ordering::Relaxed);
        eventually("client connections to succeed", || {
            (self.ok.load(Ordering::Relaxed) >= base + n).then_some(())
        });
    }

    fn finish(mut self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// A greeter whose crash closes its listening socket: new connections are
/// refused from then on, and a connection it already accepted still gets its
/// greeting (it is written at once), so every client failure would be the
/// proxy's.
struct Crashable {
    name: String,
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Crashable {
    fn start(name: &str) -> Crashable {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, name) = (stop.clone(), name.to_string());
            std::thread::spawn(move || {
                for s in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(mut s) = s {
                        let _ = s.write_all(format!("{name}\n").as_bytes());
                    }
                }
            })
        };
        Crashable {
            name: name.to_string(),
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn crash(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Crashable {
    fn drop(&mut self) {
        self.crash();
    }
}

#[test]
fn a_failing_probe_takes_a_dead_backend_out_with_no_failed_client_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(
        &dir.path().join("c"),
        &["--service-cidr", "127.124.1.0/24", "--node-grace", "1h"],
    );
    let _agent = Agent::start("n1", "127.124.101.1", &c.addr, &dir.path().join("n1"), &[]);
    let mut backends: Vec<Crashable> = (1..=3)
        .map(|i| Crashable::start(&format!("p{i}")))
        .collect();
    let mut yaml = String::from(SERVICE);
    yaml.push_str("---\n");
    for b in &backends {
        yaml.push_str(&pod(&b.name, "n1", b.port, true, 30));
    }
    c.apply(&yaml);
    eventually("probes to mark all three ready", || {
        (c.ready().values().filter(|r| **r).count() == 3).then_some(())
    });
    let addr = c.cluster_addr("web");
    eventually("forwarding", || who(&addr).ok());
    let load = Load::start(addr);
    load.wait_for(20);
    let t = Instant::now();
    backends[1].crash();
    eventually("the dead backend's endpoint to turn unready", || {
        (c.ready().get("p2") == Some(&false)).then_some(())
    });
    let removed_after = t.elapsed();
    load.wait_for(50);
    let (ok, failed) = load.finish();
    println!(
        "probe failure (period 1 s, failureThreshold 2) → endpoint unready after {removed_after:?}; {ok} client connections, {failed} failed"
    );
    // A connection the kernel had already queued on the crashing backend's
    // listener (its accept queue dies with the socket) is closed after the
    // proxy connected it: the forwarder retries failed connects, not bytes.
    // At most that one in-flight connection may fail; refused connects never.
    assert!(
        failed <= 1,
        "{failed} client connections failed while a backend died"
    );
}

#[test]
fn static_pod_files_are_registered_updated_and_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pods_dir = dir.path().join("pods");
    std::fs::create_dir_all(&pods_dir).expect("pods dir");
    let c = Control::start(
        &dir.path().join("c"),
        &["--service-cidr", "127.124.2.0/24", "--node-grace", "1h"],
    );
    let pods_arg = pods_dir.to_str().expect("utf-8").to_string();
    let _agent = Agent::start(
        "n1",
        "127.124.102.1",
        &c.addr,
        &dir.path().join("n1"),
        &["--pods-dir", &pods_arg],
    );
    c.apply(SERVICE);
    let b = Backend::greeter("static-web");
    let file = pods_dir.join("web.yaml");
    // The file names no node: the agent binds it to itself.
    let body = pod("static-web", "elsewhere", b.addr.port(), false, 1)
        .replace("  nodeName: elsewhere\n", "");
    std::fs::write(&file, &body).expect("write pod file");
    eventually("the static pod to be registered on n1", || {
        let pods = c.json(&["pods"]);
        let items = pods["items"].as_array().cloned().unwrap_or_default();
        items
            .iter()
            .any(|p| p["metadata"]["name"] == "static-web" && p["spec"]["nodeName"] == "n1")
            .then_some(())
    });
    eventually("its endpoint", || {
        (c.ready().get("static-web") == Some(&true)).then_some(())
    });
    let addr = c.cluster_addr("web");
    assert_eq!(
        eventually("forwarding to the static pod", || who(&addr).ok()),
        "static-web"
    );
    // Edit: relabel out of the Service's selector.
    std::fs::write(&file, body.replace("app: web", "app: other")).expect("rewrite");
    eventually("the endpoint to go with the new labels", || {
        c.ready().is_empty().then_some(())
    });
    // Remove: the pod terminates (1 s grace) and goes.
    std::fs::write(&file, &body).expect("restore");
    eventually("the endpoint back", || {
        (c.ready().get("static-web") == Some(&true)).then_some(())
    });
    std::fs::remove_file(&file).expect("remove");
    eventually("the static pod removed", || {
        c.json(&["pods"])["items"]
            .as_array()
            .is_none_or(Vec::is_empty)
            .then_some(())
    });
}

#[test]
fn a_dead_node_agents_endpoints_go_unready_and_traffic_goes_elsewhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(
        &dir.path().join("c"),
        &["--service-cidr", "127.124.3.0/24", "--node-grace", "2s"],
    );
    let _a1 = Agent::start("n1", "127.124.103.1", &c.addr, &dir.path().join("n1"), &[]);
    let mut a2 = Agent::start("n2", "127.124.103.2", &c.addr, &dir.path().join("n2"), &[]);
    let (b1, b2) = (Backend::greeter("on-n1"), Backend::greeter("on-n2"));
    c.apply(&format!(
        "{SERVICE}---\n{}{}",
        pod("on-n1", "n1", b1.addr.port(), false, 30),
        pod("on-n2", "n2", b2.addr.port(), false, 30)
    ));
    eventually("both endpoints ready", || {
        (c.ready().values().filter(|r| **r).count() == 2).then_some(())
    });
    let addr = c.cluster_addr("web");
    eventually("both backends reached", || {
        let seen: std::collections::BTreeSet<String> =
            (0..40).filter_map(|_| who(&addr).ok()).collect();
        (seen.len() == 2).then_some(())
    });
    let t = Instant::now();
    a2.kill();
    eventually("n2's endpoint unready", || {
        (c.ready().get("on-n2") == Some(&false)).then_some(())
    });
    let after = t.elapsed();
    let nodes = c.cli(&["get", "nodes"], None);
    assert!(
        nodes
            .lines()
            .any(|l| l.starts_with("n2") && l.contains("NotReady")),
        "{nodes}"
    );
    // n1's agent now sends everything to n1's backend.
    eventually("traffic only to n1", || {
        let seen: Vec<String> = (0..20).filter_map(|_| who(&addr).ok()).collect();
        (seen.len() == 20 && seen.iter().all(|s| s == "on-n1")).then_some(())
    });
    println!("node agent killed → its endpoints unready after {after:?} (node grace 2 s)");
}

/// The Ready condition of Node `name`: (status, lastHeartbeatTime,
/// lastTransitionTime); `None` also while the control plane cannot answer
/// (no leader elected yet).
fn node_ready(c: &Control, name: &str) -> Option<(String, String, String)> {
    let out = c.try_cli(&["get", "nodes", "-o", "json"], None).ok()?;
    let nodes: Value = serde_json::from_str(&out).expect("json");
    let node = nodes["items"]
        .as_array()?
        .iter()
        .find(|n| n["metadata"]["name"] == name)?
        .clone();
    let cond = node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?
        .clone();
    let field = |k: &str| cond[k].as_str().unwrap_or("").to_string();
    Some((
        field("status"),
        field("lastHeartbeatTime"),
        field("lastTransitionTime"),
    ))
}

#[test]
fn a_node_ready_time_moves_only_when_its_status_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(
        &dir.path().join("c"),
        // Long enough that the restarted agent's heartbeats resume before
        // the node is judged, even on a loaded machine.
        &["--service-cidr", "127.124.4.0/24", "--node-grace", "5s"],
    );
    let start = |d: &str| Agent::start("n1", "127.124.104.1", &c.addr, &dir.path().join(d), &[]);
    let mut agent = start("a");
    let (_, beat, since) = eventually("n1 Ready", || {
        node_ready(&c, "n1").filter(|(status, _, _)| status == "True")
    });

    // Re-registration of a Ready node (a restarted agent, a second later:
    // the times have second precision): a new heartbeat time, the same
    // transition time.
    let registered = Instant::now();
    eventually("a later second", || {
        (registered.elapsed() > Duration::from_millis(1100)).then_some(())
    });
    agent.kill();
    let mut agent = start("b");
    let (_, _, again) = eventually("n1 re-registered with a new heartbeat", || {
        node_ready(&c, "n1").filter(|(status, b, _)| status == "True" && *b != beat)
    });
    assert_eq!(
        again, since,
        "lastTransitionTime moved without a transition"
    );

    // A real transition moves it: NotReady (after the grace), then Ready
    // again.
    agent.kill();
    let (_, _, down) = eventually("n1 NotReady", || {
        node_ready(&c, "n1").filter(|(status, _, _)| status == "False")
    });
    assert_ne!(
        down, since,
        "Ready → NotReady keeps the old transition time"
    );
    let _agent = start("c");
    eventually("n1 Ready again, since a new time", || {
        node_ready(&c, "n1").filter(|(status, _, t)| status == "True" && *t != since)
    });
}

#[test]
fn rolling_replacement_fails_no_new_connection_and_cuts_no_open_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(
        &dir.path().join("c"),
        &["--service-cidr", "127.124.4.0/24", "--node-grace", "1h"],
    );
    let _agent = Agent::start("n1", "127.124.104.1", &c.addr, &dir.path().join("n1"), &[]);
    let old: Vec<Backend> = (1..=2)
        .map(|i| Backend::greeter(&format!("old-{i}")))
        .collect();
    let mut yaml = format!("{SERVICE}---\n");
    for b in &old {
        yaml.push_str(&pod(&b.name, "n1", b.addr.port(), false, 3));
    }
    c.apply(&yaml);
    let addr = c.cluster_addr("web");
    eventually("forwarding to the old pods", || who(&addr).ok());
    // A long-lived connection to an old backend.
    let (mut held, held_by) = eventually("a connection to an old pod", || greeting(&addr).ok());
    let load = Load::start(addr.clone());
    load.wait_for(20);
    // Start the new generation, then delete the old one with its grace.
    let new: Vec<Backend> = (1..=2)
        .map(|i| Backend::greeter(&format!("new-{i}")))
        .collect();
    let yaml: String = new
        .iter()
        .map(|b| pod(&b.name, "n1", b.addr.port(), false, 3))
        .collect();
    c.apply(&yaml);
    eventually("new pods ready", || {
        (c.ready()
            .iter()
            .filter(|(n, r)| n.starts_with("new-") && **r)
            .count()
            == 2)
            .then_some(())
    });
    for b in &old {
        c.cli(&["delete", "pod", &b.name], None);
    }
    load.wait_for(20);
    // Terminating pods take no new connections; the open one still works.
    for _ in 0..10 {
        let got = who(&addr).expect("new connection");
        assert!(
            got.starts_with("new-"),
            "a new connection went to terminating pod {got}"
        );
    }
    echo(&mut held, b"still here").expect("the open connection to a terminating pod was cut");
    eventually("old pods gone after their grace", || {
        (!c.ready().keys().any(|n| n.starts_with("old-"))).then_some(())
    });
    echo(&mut held, b"and after removal")
        .expect("the open connection was cut when its pod was removed");
    drop(old);
    load.wait_for(20);
    let (ok, failed) = load.finish();
    println!(
        "rolling replacement: {ok} new connections, {failed} failed; connection held by {held_by} survived"
    );
    assert_eq!(failed, 0);
}
