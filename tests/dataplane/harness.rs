//! Processes and peers for the data-plane suite: `strait control` and
//! `strait node` started from the real binary (killed on drop), backends
//! that greet with their name and echo, a sink that hashes what it receives,
//! and an `eventually` that polls with a generous deadline instead of
//! sleeping.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_strait");
/// Upper bound for anything to happen; only reached when a test fails.
pub const DEADLINE: Duration = Duration::from_secs(120);
/// Socket timeouts, so a broken forwarder fails a test instead of hanging it.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

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

/// Address ranges of one test, disjoint from every other test's (and from
/// `strait dev`'s), all inside 127.0.0.0/8 so nothing needs a route.
#[derive(Debug, Clone)]
pub struct Net {
    pub service_cidr: String,
    pub lb_pool: String,
    pub node_ip: String,
}

impl Net {
    pub fn new(n: u8) -> Net {
        Net {
            service_cidr: format!("127.120.{n}.0/24"),
            lb_pool: format!("127.121.{n}.0/24"),
            node_ip: format!("127.122.{n}.1"),
        }
    }
}

/// One `strait control` replica.
pub struct Control {
    child: Child,
    pub addr: String,
    data_dir: PathBuf,
    net: Net,
}

impl Control {
    pub fn start(data_dir: &Path, net: &Net) -> Control {
        Self::start_on(data_dir, net, "127.0.0.1:0")
    }

    fn start_on(data_dir: &Path, net: &Net, listen: &str) -> Control {
        let mut child = Command::new(BIN)
            .env("STRAIT_INSECURE", "1") // plaintext: this suite does not test TLS
            .args(["control", "--data-dir"])
            .arg(data_dir)
            .args(["--listen", listen])
            .args(["--service-cidr", &net.service_cidr])
            .args(["--lb-pool", &net.lb_pool])
            .env("STRAIT_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn strait control");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let c = Control {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
            net: net.clone(),
        };
        eventually("the control plane to serve", || {
            c.cli(&["get", "svc"]).status.success().then_some(())
        });
        c
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .env("STRAIT_INSECURE", "1") // plaintext: this suite does not test TLS
            .args(args)
            .env("STRAIT_SERVER", &self.addr)
            .stdin(Stdio::null())
            .output()
            .expect("run strait")
    }

    /// `strait apply -f` of a manifest; panics on failure.
    pub fn apply(&self, yaml: &str) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("manifest.yaml");
        std::fs::write(&path, yaml).expect("write manifest");
        let path = path.to_str().expect("utf-8 path");
        let out = self.cli(&["apply", "-f", path]);
        assert!(
            out.status.success(),
            "apply failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `strait get svc NAME -o json`.
    pub fn service(&self, name: &str) -> serde_json::Value {
        let out = self.cli(&["get", "svc", name, "-o", "json"]);
        assert!(out.status.success(), "get svc {name} failed");
        serde_json::from_slice(&out.stdout).expect("json")
    }

    /// SIGKILL, no clean shutdown.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts again on the same address and data, after `kill`.
    pub fn restart(&mut self) {
        self.kill();
        let addr = self.addr.clone();
        let (dir, net) = (self.data_dir.clone(), self.net.clone());
        // The port may linger briefly; retry the bind.
        *self = eventually("the control plane to restart on its port", || {
            std::panic::catch_unwind(|| Control::start_on(&dir, &net, &addr)).ok()
        });
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `strait node` agent following a control plane.
pub struct Node {
    child: Child,
    args: Vec<String>,
}

impl Node {
    pub fn start(name: &str, net: &Net, control: &str, data_dir: &Path) -> Node {
        Self::start_with(name, net, control, data_dir, &[])
    }

    /// [`Node::start`] with `extra` flags.
    pub fn start_with(
        name: &str,
        net: &Net,
        control: &str,
        data_dir: &Path,
        extra: &[&str],
    ) -> Node {
        let mut args = vec![
            "node".to_string(),
            "--name".into(),
            name.into(),
            "--node-ip".into(),
            net.node_ip.clone(),
            "--control".into(),
            control.into(),
            "--data-dir".into(),
            data_dir.to_str().expect("utf-8 path").into(),
        ];
        args.extend(extra.iter().map(ToString::to_string));
        Node {
            child: Self::spawn(&args),
            args,
        }
    }

    fn spawn(args: &[String]) -> Child {
        Command::new(BIN)
            .env("STRAIT_INSECURE", "1") // plaintext: this suite does not test TLS
            .args(args)
            .env("STRAIT_LOG", "error")
            // The forwarding paths are under test, not cluster DNS.
            .env("STRAIT_DNS_LISTEN", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn strait node")
    }

    /// SIGKILL and start again with the same flags.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.args);
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a backend does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behaviour {
    /// Writes `name\n`, then echoes until end-of-stream, then closes.
    Greet,
    /// Reads to end-of-stream, hashing, then writes `"<bytes> <hash>\n"`
    /// and closes.
    Sink,
}

/// A TCP server on 127.0.0.1, a thread per connection.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Backend {
    pub fn greeter(name: &str) -> Backend {
        Self::start(name, Behaviour::Greet)
    }

    pub fn sink(name: &str) -> Backend {
        Self::start(name, Behaviour::Sink)
    }

    fn start(name: &str, behaviour: Behaviour) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let acceptor = {
            let (stop, conns, name) = (stop.clone(), conns.clone(), name.to_string());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    if let Ok(c) = stream.try_clone() {
                        conns.lock().unwrap_or_else(PoisonError::into_inner).push(c);
                    }
                    let name = name.clone();
                    std::thread::spawn(move || {
                        let _ = serve(stream, &name, behaviour);
                    });
                }
            })
        };
        Backend {
            name: name.to_string(),
            addr,
            stop,
            conns,
            acceptor: Some(acceptor),
        }
    }

    /// Like a crashed process: the port refuses connections and every open
    /// connection is closed.
    pub fn kill(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept so the thread sees `stop` and drops the
        // listener.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        for c in self
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

fn serve(mut s: TcpStream, name: &str, behaviour: Behaviour) -> io::Result<()> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = vec![0u8; 64 * 1024];
    match behaviour {
        Behaviour::Greet => {
            s.write_all(format!("{name}\n").as_bytes())?;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n])?;
            }
        }
        Behaviour::Sink => {
            let mut hash = Hash::default();
            let mut total = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                total += n as u64;
            }
            s.write_all(format!("{total} {:016x}\n", hash.finish()).as_bytes())?;
        }
    }
    s.shutdown(Shutdown::Write)
}

/// FNV-1a over 64-bit little-endian words (a trailing partial word is
/// carried to the next update): cheap enough for a GiB in a debug build, and
/// any reordered, lost or changed word shows.
#[derive(Debug)]
pub struct Hash {
    state: u64,
    partial: [u8; 8],
    partial_len: usize,
}

impl Default for Hash {
    fn default() -> Self {
        Hash {
            state: 0xcbf2_9ce4_8422_2325,
            partial: [0; 8],
            partial_len: 0,
        }
    }
}

impl Hash {
    pub fn update(&mut self, mut data: &[u8]) {
        if self.partial_len > 0 {
            let take = (8 - self.partial_len).min(data.len());
            self.partial[self.partial_len..self.partial_len + take].copy_from_slice(&data[..take]);
            self.partial_len += take;
            data = &data[take..];
            if self.partial_len < 8 {
                return;
            }
            let word = u64::from_le_bytes(self.partial);
            self.word(word);
            self.partial_len = 0;
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            self.word(u64::from_le_bytes(b));
        }
        let rest = words.remainder();
        self.partial[..rest.len()].copy_from_slice(rest);
        self.partial_len = rest.len();
    }

    fn word(&mut self, w: u64) {
        self.state = (self.state ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }

    pub fn finish(&self) -> u64 {
        let mut h = Hash {
            state: self.state,
            partial: [0; 8],
            partial_len: 0,
        };
        for &b in &self.partial[..self.partial_len] {
            h.word(u64::from(b));
        }
        h.state
    }
}

/// Connects with the suite's timeouts.
pub fn connect(addr: &str) -> io::Result<TcpStream> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: {e}")))?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// Reads one `\n`-terminated line, byte by byte so nothing after it is
/// consumed.
pub fn read_line(s: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if b[0] == b'\n' {
            return String::from_utf8(line)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e));
        }
        line.push(b[0]);
    }
}

/// A new connection through `addr` and the name of the backend that took it.
pub fn greeting(addr: &str) -> io::Result<(TcpStream, String)> {
    let mut s = connect(addr)?;
    let name = read_line(&mut s)?;
    Ok((s, name))
}

/// Which backend a new, short connection through `addr` reaches.
pub fn who(addr: &str) -> io::Result<String> {
    greeting(addr).map(|(_, name)| name)
}

/// Sends `msg` on an open greeter connection and expects it echoed.
pub fn echo(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back == msg {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidData, "echo differs"))
    }
}

/// A Pod backed by `b`, reachable on 127.0.0.1 at its port (named `app`).
pub fn pod(b: &Backend, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n\
         spec:\n  nodeName: node-1\n  containers:\n  - name: c\n    ports: [{{name: app, containerPort: {port}}}]\n\
         status: {{podIP: 127.0.0.1}}\n---\n",
        name = b.name,
        port = b.addr.port(),
    )
}

/// A Service of `kind` selecting `selector`, port 8080 to the named port `app`.
pub fn service(name: &str, kind: &str, selector: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
         spec:\n  type: {kind}\n  selector: {{{selector}}}\n  ports: [{{name: app, port: 8080, targetPort: app}}]\n---\n"
    )
}

/// `clusterIP:port` of a Service.
pub fn cluster_addr(c: &Control, name: &str) -> String {
    let svc = c.service(name);
    let ip = svc["spec"]["clusterIP"].as_str().expect("clusterIP");
    format!("{ip}:8080")
}
