//! Starts the real `strait` binary for tests: control replicas on port 0
//! (the bound address is read from its stdout), killed on drop, and a
//! `strait` CLI runner. Waiting is always polling with a generous deadline.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
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

/// One `strait control` process.
pub struct Control {
    child: Child,
    pub addr: String,
    pub data_dir: PathBuf,
    pub extra: Vec<String>,
}

impl Control {
    pub fn start(data_dir: &Path, extra: &[&str]) -> Control {
        Self::start_on(data_dir, "127.0.0.1:0", extra)
    }

    pub fn start_on(data_dir: &Path, listen: &str, extra: &[&str]) -> Control {
        let mut child = Command::new(BIN)
            .env("STRAIT_INSECURE", "1") // plaintext: this suite does not test TLS
            .args(["control", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", listen])
            .args(extra)
            .env("STRAIT_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn strait control");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let c = Control {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        eventually("the replica to serve", || {
            c.cli(&["get", "svc"]).status.success().then_some(())
        });
        c
    }

    /// Runs the CLI against this replica.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.addr, args, None)
    }

    pub fn cli_stdin(&self, args: &[&str], stdin: &str) -> Output {
        cli(&self.addr, args, Some(stdin))
    }

    /// Sends `signal` (SIGSTOP, SIGCONT) to the process.
    pub fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "kill({pid}, {signal})"
        );
    }

    /// SIGKILLs the process (no clean shutdown).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills and starts again on the same address and data.
    pub fn restart(&mut self) {
        self.kill();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let addr = self.addr.clone();
        // The port may linger briefly; retry the bind.
        *self = eventually("restart on the same port", || {
            std::panic::catch_unwind(|| Control::start_on(&self.data_dir, &addr, &extra)).ok()
        });
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.kill();
    }
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

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts success and returns stdout.
pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "command failed:\nstdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Asserts failure and returns stderr.
pub fn fails(o: Output) -> String {
    assert!(
        !o.status.success(),
        "command unexpectedly succeeded:\nstdout: {}",
        stdout(&o)
    );
    stderr(&o)
}

/// `strait get KIND NAME -o json` as a value.
pub fn get_json(c: &Control, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(&ok(c.cli(&a))).expect("json output")
}

/// The shared examples directory.
pub fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/examples")
}
