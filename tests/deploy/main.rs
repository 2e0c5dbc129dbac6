//! What the deployment files rely on, through the real binary: systemd's
//! notify protocol (`READY=1`, `WATCHDOG=1` at half of `WATCHDOG_USEC`,
//! `STOPPING=1`) read from a Unix datagram socket standing in for systemd,
//! and `strait demo backend` / `strait demo probe` — the workloads and the
//! client of the compose cluster — reaching a Service by its DNS name; and
//! the unit and environment files as systemd and the binary read them.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_strait");
const DEADLINE: Duration = Duration::from_secs(60);

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }
}

/// The messages systemd would receive, one datagram each.
struct NotifySocket {
    sock: UnixDatagram,
}

impl NotifySocket {
    fn bind(path: &Path) -> Self {
        let sock = UnixDatagram::bind(path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        Self { sock }
    }

    /// Reads datagrams until one has a line equal to `want`; returns how
    /// many datagrams carried `count` meanwhile (that one included).
    fn wait_for(&self, want: &str, count: &str) -> usize {
        let start = Instant::now();
        let mut seen = 0;
        let mut buf = [0u8; 4096];
        loop {
            assert!(start.elapsed() < DEADLINE, "no {want} notification");
            let Ok(n) = self.sock.recv(&mut buf) else {
                continue;
            };
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.lines().any(|l| l == count) {
                seen += 1;
            }
            if msg.lines().any(|l| l == want) {
                return seen;
            }
        }
    }
}

fn spawn(args: &[&str], notify: Option<&Path>) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("STRAIT_INSECURE", "1")
        .env("STRAIT_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(p) = notify {
        cmd.env("NOTIFY_SOCKET", p).env("WATCHDOG_USEC", "200000");
    }
    Proc(cmd.spawn().expect("spawn strait"))
}

/// READY once serving, several watchdog pings (every 100 ms for a 200 ms
/// WatchdogSec), STOPPING on SIGTERM.
fn check_notify_protocol(proc: Proc, sock: &NotifySocket) {
    sock.wait_for("READY=1", "READY=1");
    let mut pings = 0;
    while pings < 3 {
        pings += sock.wait_for("WATCHDOG=1", "WATCHDOG=1");
    }
    proc.sigterm();
    sock.wait_for("STOPPING=1", "STOPPING=1");
}

#[test]
fn control_speaks_the_systemd_notify_protocol() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let sock = NotifySocket::bind(&path);
    let data = dir.path().join("data");
    let proc = spawn(
        &[
            "control",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf-8"),
        ],
        Some(&path),
    );
    check_notify_protocol(proc, &sock);
}

#[test]
fn node_speaks_the_systemd_notify_protocol() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let sock = NotifySocket::bind(&path);
    let manifest = dir.path().join("services.yaml");
    std::fs::write(&manifest, "").expect("write manifest");
    let data = dir.path().join("data");
    let proc = spawn(
        &[
            "node",
            "--name",
            "node-1",
            "--node-ip",
            "127.0.0.1",
            "--dns-listen",
            "off",
            "--config-file",
            manifest.to_str().expect("utf-8"),
            "--data-dir",
            data.to_str().expect("utf-8"),
        ],
        Some(&path),
    );
    check_notify_protocol(proc, &sock);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

fn probe(args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("demo")
        .arg("probe")
        .args(args)
        .output()
        .expect("run strait demo probe")
}

/// Spawns `strait ARGS` and returns it once it printed a line starting with `prefix`.
fn spawn_until(args: &[&str], prefix: &str) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("STRAIT_INSECURE", "1")
        .env("STRAIT_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn strait");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let proc = Proc(child);
    let start = Instant::now();
    loop {
        let line = rx
            .recv_timeout(DEADLINE.saturating_sub(start.elapsed()))
            .unwrap_or_else(|_| panic!("strait {args:?} never printed {prefix:?}"));
        if let Some(rest) = line.strip_prefix(prefix) {
            return (proc, rest.trim().to_string());
        }
    }
}

#[test]
fn demo_probe_reaches_a_demo_backend_through_a_service_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let backend_port = free_port();
    let backend = format!("127.0.0.1:{backend_port}");
    let (_backend, _) = spawn_until(
        &["demo", "backend", "--listen", &backend, "--name", "b-1"],
        "demo backend b-1 listening on",
    );
    // A static node agent: ClusterIP 127.77.0.10 (local without routes)
    // in front of the backend, and its cluster DNS on a free port.
    let service_port = free_port();
    let manifest = dir.path().join("services.yaml");
    std::fs::write(
        &manifest,
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: 127.77.0.10\n  ports: [{{name: http, port: {service_port}, targetPort: {backend_port}}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: {backend_port}, protocol: TCP}}]\nendpoints:\n- addresses: [127.0.0.1]\n"
        ),
    )
    .expect("write manifest");
    let data = dir.path().join("data");
    let (_node, dns) = spawn_until(
        &[
            "node",
            "--name",
            "node-1",
            "--node-ip",
            "127.0.0.1",
            "--dns-listen",
            "127.0.0.1:0",
            "--dns-upstream",
            "none",
            "--config-file",
            manifest.to_str().expect("utf-8"),
            "--data-dir",
            data.to_str().expect("utf-8"),
        ],
        "dns listening on",
    );
    let target = format!("web.default.svc.cluster.local:{service_port}");
    let start = Instant::now();
    let out = loop {
        let out = probe(&[&target, "--dns", &dns, "--count", "20", "--quiet"]);
        if out.status.success() {
            break out;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "probe through the Service never succeeded: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("attempts=20 ok=20 failed=0") && stdout.contains("responders=b-1:20"),
        "{stdout}"
    );

    // One attempt, printing who answered.
    let out = probe(&[&format!("127.77.0.10:{service_port}")]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("b-1\n"));

    // A name the cluster DNS does not know, and a closed port: each attempt
    // fails, is reported, and the exit status says so.
    let out = probe(&[
        &format!("nope.default.svc.cluster.local:{service_port}"),
        "--dns",
        &dns,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Non-Existent Domain"));
    let out = probe(&[&format!("127.0.0.1:{}", free_port()), "--count", "2"]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("attempts=2 ok=0 failed=2"), "{stdout}");
}

/// The unit files as systemd itself parses them: `systemd-analyze verify`
/// reports unknown keys, bad values and a missing `ExecStart` binary on
/// stderr (its exit status stays 0 for most of them), so any output fails.
/// The binary path is pointed at the one under test.
#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    for name in ["strait-control.service", "strait-node.service"] {
        let text = std::fs::read_to_string(units.join(name)).expect("read unit");
        assert!(
            text.contains("ExecStart=/usr/local/bin/strait "),
            "{name}: ExecStart is not /usr/local/bin/strait"
        );
        let unit = dir.path().join(name);
        std::fs::write(&unit, text.replace("/usr/local/bin/strait", BIN)).expect("write unit");
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no", "--recursive-errors=no"])
            .arg(&unit)
            .output()
            .expect("run systemd-analyze (Debian package systemd; .ci/run installs it)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{name}: systemd-analyze verify: {}\n{stderr}",
            out.status
        );
    }
}

/// Every variable the example environment files set is one the binary
/// reads (`[env: …]` in its `--help`), so the examples cannot drift from
/// the flags.
#[test]
fn systemd_env_examples_only_set_variables_the_binary_reads() {
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/systemd");
    for (file, command) in [("control.env", "control"), ("node.env", "node")] {
        let help = Command::new(BIN)
            .args([command, "--help"])
            .output()
            .expect("run strait --help");
        let help = String::from_utf8_lossy(&help.stdout);
        let text = std::fs::read_to_string(units.join(file)).expect("read env file");
        let vars: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .collect();
        assert!(!vars.is_empty(), "{file} sets nothing");
        for var in vars {
            assert!(
                help.contains(&format!("[env: {var}=")),
                "{file} sets {var}, which `strait {command}` does not read"
            );
        }
    }
}
