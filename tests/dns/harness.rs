//! Starts the real `strait` binary for the DNS tests — `strait control` and
//! `strait node` on port 0, killed on drop — and runs the real `dig`
//! against it. Waiting is polling with a generous deadline, never a bare
//! sleep or a timing threshold.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_strait");
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `f` until it returns Some, or panics after `DEADLINE`.
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed on drop.
pub struct Proc {
    child: Child,
    /// The address it printed (`listening on` / `dns listening on`).
    pub addr: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `strait ARGS` and waits for a stdout line starting with `prefix`.
fn spawn_reading(args: &[&str], prefix: &str) -> Proc {
    let child = Command::new(BIN)
        .env("STRAIT_INSECURE", "1") // plaintext: this suite does not test TLS
        .args(args)
        .env("STRAIT_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn strait");
    // Owned by a Proc from here on, so a panic below still kills and reaps it.
    let mut proc = Proc {
        child,
        addr: String::new(),
    };
    let stdout = proc.child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    loop {
        let left = DEADLINE.saturating_sub(start.elapsed());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("strait {args:?} never printed {prefix:?}"));
        if let Some(addr) = line.trim().strip_prefix(prefix) {
            proc.addr = addr.trim().to_string();
            return proc;
        }
    }
}

/// `strait control` on port 0, serving.
pub fn control(data_dir: &Path) -> Proc {
    let dir = data_dir.to_str().expect("utf-8 path");
    let c = spawn_reading(
        &["control", "--data-dir", dir, "--listen", "127.0.0.1:0"],
        "listening on ",
    );
    eventually("the control plane to serve", || {
        cli(&c.addr, &["get", "svc"], None)
            .status
            .success()
            .then_some(())
    });
    c
}

/// `strait node` with DNS on a free loopback port; `extra` adds flags
/// (`--config-file F` or `--control ADDR`, `--dns-upstream ...`).
pub fn node(data_dir: &Path, extra: &[&str]) -> Proc {
    let dir = data_dir.to_str().expect("utf-8 path");
    let mut args = vec![
        "node",
        "--name",
        "node-1",
        "--node-ip",
        "127.0.0.1",
        "--data-dir",
        dir,
        "--dns-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    spawn_reading(&args, "dns listening on ")
}

pub fn cli(server: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(BIN)
        .env("STRAIT_INSECURE", "1") // plaintext: this suite does not test TLS
        .args(args)
        .env("STRAIT_SERVER", server)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strait");
    if let Some(s) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(s.as_bytes())
            .expect("write stdin");
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().expect("wait strait")
}

/// Asserts success and returns stdout.
pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "command failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs `dig @ADDR -p PORT ARGS` (retries and timeouts generous enough for
/// a loaded machine) and returns its output.
pub fn dig(server: &str, args: &[&str]) -> String {
    let (host, port) = server.rsplit_once(':').expect("host:port");
    let out = Command::new("dig")
        .arg(format!("@{host}"))
        .args(["-p", port, "+tries=3", "+timeout=10"])
        .args(args)
        .output()
        .expect("run dig (apt-get install bind9-dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The answer section as sorted `NAME TYPE DATA` lines (TTL left out).
pub fn answers(server: &str, args: &[&str]) -> Vec<String> {
    let mut a = vec!["+noall", "+answer"];
    a.extend_from_slice(args);
    let mut v: Vec<String> = dig(server, &a)
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // NAME TTL CLASS TYPE DATA...
            let mut s = vec![f[0].to_string(), f[3].to_string()];
            s.extend(f[4..].iter().map(|x| x.to_string()));
            s.join(" ")
        })
        .collect();
    v.sort();
    v
}

/// The `status:` of a full dig output (`NOERROR`, `NXDOMAIN`, ...).
pub fn status(out: &str) -> String {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no status in dig output:\n{out}"))
        .to_string()
}

/// The header flags of a full dig output, e.g. `qr aa rd`.
pub fn flags(out: &str) -> String {
    out.split(";; flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or_else(|| panic!("no flags in dig output:\n{out}"))
        .to_string()
}
