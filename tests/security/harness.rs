//! Certificates made with the real `strait certs`, `strait control` and
//! `strait node` started with mTLS (killed on drop), the CLI run with a
//! chosen identity, and gRPC clients with any certificate — or none.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use strait_proto::tls::{TlsFiles, Transport};
use strait_proto::v1::resources_client::ResourcesClient;
use strait_proto::v1::{ListRequest, Object};
use tonic::transport::{Channel, Uri};

pub const BIN: &str = env!("CARGO_BIN_EXE_strait");
pub const DEADLINE: Duration = Duration::from_secs(90);

/// Polls `f` until Some, panicking after `DEADLINE`.
pub fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run strait")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "command failed:\nstdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

pub fn fails(o: Output) -> String {
    assert!(
        !o.status.success(),
        "command unexpectedly succeeded:\nstdout: {}",
        stdout(&o)
    );
    stderr(&o)
}

/// A CA directory made by `strait certs init`.
pub struct Pki {
    pub dir: PathBuf,
}

/// One identity's files.
#[derive(Debug, Clone)]
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl Cert {
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
            "--tls-ca".into(),
            self.ca.display().to_string(),
        ]
    }

    pub fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
            ca: self.ca.clone(),
        }
    }

    /// The same certificate trusting another CA bundle.
    pub fn with_ca(&self, ca: &Path) -> Cert {
        Cert {
            ca: ca.to_path_buf(),
            ..self.clone()
        }
    }
}

impl Pki {
    pub fn init(dir: &Path, trust_domain: &str) -> Pki {
        let d = dir.display().to_string();
        ok(run(&[
            "certs",
            "init",
            "--trust-domain",
            trust_domain,
            "--out",
            &d,
        ]));
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// `strait certs issue ROLE NAME --lifetime LIFETIME`.
    pub fn issue_for(&self, role: &str, name: &str, lifetime: &str) -> Cert {
        let d = self.dir.display().to_string();
        ok(run(&[
            "certs",
            "issue",
            role,
            name,
            "--out",
            &d,
            "--lifetime",
            lifetime,
        ]));
        Cert {
            cert: self.dir.join(format!("{role}-{name}.crt")),
            key: self.dir.join(format!("{role}-{name}.key")),
            ca: self.ca(),
        }
    }

    pub fn issue(&self, role: &str, name: &str) -> Cert {
        self.issue_for(role, name, "24h")
    }
}

/// A `strait` server process (control or node), killed on drop.
pub struct Proc {
    child: Child,
}

impl Proc {
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `strait control ARGS` and returns it with the address it prints.
pub fn control(args: &[String]) -> (Proc, String) {
    let mut child = Command::new(BIN)
        .arg("control")
        .args(args)
        .env("STRAIT_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn strait control");
    let out = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(out)
        .read_line(&mut line)
        .expect("listening line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    (Proc { child }, addr)
}

/// A single TLS replica on port 0 with `cert` and a fresh data directory.
pub fn control_tls(data: &Path, cert: &Cert) -> (Proc, String) {
    let mut args = vec![
        "--data-dir".to_string(),
        data.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(cert.flags());
    control(&args)
}

pub fn node(args: &[String]) -> Proc {
    let child = Command::new(BIN)
        .arg("node")
        .args(args)
        .env("STRAIT_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn strait node");
    Proc { child }
}

/// The CLI against `server` as `who` (`None`: `--insecure`).
pub fn cli(server: &str, who: Option<&Cert>, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    match who {
        Some(c) => cmd.args(c.flags()),
        None => cmd.arg("--insecure"),
    };
    cmd.args(["--server", server])
        .args(args)
        .env("HOME", "/nonexistent")
        .stdin(Stdio::null())
        .output()
        .expect("run strait")
}

/// `strait apply -f -` of `yaml` as `who`.
pub fn apply(server: &str, who: Option<&Cert>, yaml: &str) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(BIN);
    match who {
        Some(c) => cmd.args(c.flags()),
        None => cmd.arg("--insecure"),
    };
    let mut child = cmd
        .args(["--server", server, "apply", "-f", "-"])
        .env("HOME", "/nonexistent")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn strait apply");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait strait")
}

/// A gRPC channel to `addr` presenting `who`'s certificate.
pub async fn channel(addr: &str, who: &Cert) -> Channel {
    let tls = strait_proto::tls::client_tls(who.files()).expect("client tls");
    let ep = strait_proto::tls::endpoint(addr)
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    Transport::Tls(tls).lazy(ep, None)
}

/// Every object and the revision, as an admin sees them.
pub async fn state(addr: &str, admin: &Cert) -> (u64, Vec<Object>) {
    let mut c = ResourcesClient::new(channel(addr, admin).await);
    let r = c
        .list(ListRequest {
            kind: String::new(),
            namespace: String::new(),
            consistency: 0,
        })
        .await
        .expect("list as admin")
        .into_inner();
    (r.revision, r.items)
}

/// A TLS client with no certificate of its own (and trusting any server):
/// what a client without credentials can do.
pub fn channel_without_client_cert(addr: &str) -> Channel {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    strait_proto::tls::endpoint(addr)
        .expect("endpoint")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .connect_with_connector_lazy(NoCertConnector(Arc::new(cfg)))
}

#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Clone)]
struct NoCertConnector(Arc<rustls::ClientConfig>);

type Io = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower_service::Service<Uri> for NoCertConnector {
    type Response = Io;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Io>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let cfg = self.0.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or("127.0.0.1").to_string();
            let port = uri.port_u16().unwrap_or(7700);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            let name = ServerName::try_from(host)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let s = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(s))
        })
    }
}
