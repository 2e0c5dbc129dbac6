//! mTLS shared by every side of Strait's gRPC: SPIFFE identities carried in
//! certificate SANs (`spiffe://<trust-domain>/<control|node|admin>/<name>`),
//! PEM files that are reloaded when they change, and the client connector
//! the CLI, the node agent and control-plane peers dial with.
//!
//! A client verifies that the server chains to the cluster CA bundle and
//! carries a *control* identity of the same trust domain; addresses are not
//! names (replicas are dialled by IP), so the SAN identity is what is
//! checked, as SPIFFE prescribes. The server side (client-certificate
//! verification, the acceptor) lives in the control crate.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::SystemTime;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::{TcpSocket, TcpStream};
use tonic::transport::{Channel, Endpoint, Uri};

/// What a certificate holder is to the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A control-plane replica: serves the API, replicates Raft.
    Control,
    /// A node agent: reads state, writes its own Node and its Pods' status.
    Node,
    /// An operator: writes any object.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Control => "control",
            Role::Node => "node",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "control" => Ok(Role::Control),
            "node" => Ok(Role::Node),
            "admin" => Ok(Role::Admin),
            _ => Err(TlsError::BadIdentity {
                uri: s.to_string(),
                reason: "the role must be control, node or admin",
            }),
        }
    }
}

/// A SPIFFE identity of the cluster: trust domain, role and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub trust_domain: String,
    pub role: Role,
    pub name: String,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/{}/{}",
            self.trust_domain, self.role, self.name
        )
    }
}

/// Trust domains and names: lowercase letters, digits, `.`, `-`, `_`
/// (SPIFFE's trust-domain alphabet; names reuse it so an identity is also
/// a safe file name).
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
        })
}

/// Checks a trust domain name (`strait certs init --trust-domain`).
pub fn check_trust_domain(td: &str) -> Result<(), TlsError> {
    if valid_segment(td) {
        Ok(())
    } else {
        Err(TlsError::BadIdentity {
            uri: td.to_string(),
            reason: "a trust domain is lowercase letters, digits, '.', '-' and '_'",
        })
    }
}

impl Identity {
    pub fn new(trust_domain: &str, role: Role, name: &str) -> Result<Self, TlsError> {
        let id = Identity {
            trust_domain: trust_domain.to_string(),
            role,
            name: name.to_string(),
        };
        if !valid_segment(trust_domain) || !valid_segment(name) {
            return Err(TlsError::BadIdentity {
                uri: id.to_string(),
                reason: "trust domain and name are lowercase letters, digits, '.', '-' and '_'",
            });
        }
        Ok(id)
    }

    /// Parses `spiffe://<trust-domain>/<role>/<name>`.
    pub fn parse(uri: &str) -> Result<Self, TlsError> {
        let bad = |reason| TlsError::BadIdentity {
            uri: uri.to_string(),
            reason,
        };
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| bad("not a spiffe:// URI"))?;
        let mut parts = rest.split('/');
        let (Some(td), Some(role), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad("expected spiffe://<trust-domain>/<role>/<name>"));
        };
        let role: Role = role
            .parse()
            .map_err(|_| bad("the role must be control, node or admin"))?;
        Identity::new(td, role, name).map_err(|_| {
            bad("trust domain and name are lowercase letters, digits, '.', '-' and '_'")
        })
    }

    /// The one SPIFFE identity in a certificate's URI SANs.
    pub fn of_cert(cert: &CertificateDer<'_>) -> Result<Self, TlsError> {
        let uris = spiffe_uris(cert)?;
        match uris.as_slice() {
            [one] => Identity::parse(one),
            [] => Err(TlsError::NoIdentity),
            _ => Err(TlsError::BadIdentity {
                uri: uris.join(", "),
                reason: "a certificate must carry exactly one spiffe:// URI SAN",
            }),
        }
    }
}

/// Every `spiffe://` URI SAN of a certificate.
pub fn spiffe_uris(cert: &CertificateDer<'_>) -> Result<Vec<String>, TlsError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, x509) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| TlsError::Parse(format!("certificate: {e}")))?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::Parse(format!("subjectAltName: {e}")))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// A certificate's notAfter, as Unix seconds.
pub fn not_after(cert: &CertificateDer<'_>) -> Result<i64, TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, x509) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| TlsError::Parse(format!("certificate: {e}")))?;
    Ok(x509.validity().not_after.timestamp())
}

/// Errors loading TLS material or checking an identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file holds no usable PEM of the expected kind.
    #[error("{path}: {what}")]
    Pem { path: PathBuf, what: String },
    /// A certificate does not parse.
    #[error("cannot parse {0}")]
    Parse(String),
    /// A certificate carries no `spiffe://` URI SAN.
    #[error("the certificate carries no spiffe:// identity in its subjectAltName")]
    NoIdentity,
    /// A SPIFFE identity that is malformed for Strait.
    #[error("identity {uri:?}: {reason}")]
    BadIdentity { uri: String, reason: &'static str },
    /// The certificate is for another role than this process needs.
    #[error("{path}: identity {identity} is not a {expected} identity")]
    WrongRole {
        path: PathBuf,
        identity: Identity,
        expected: Role,
    },
    /// rustls refused the key, certificate or configuration.
    #[error("{context}: {source}")]
    Rustls {
        context: &'static str,
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier cannot be built from the CA bundle.
    #[error("CA bundle: {0}")]
    Verifier(String),
}

/// Where a process's certificate, key and CA bundle are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: this process's certificate (then any intermediates).
    pub cert: PathBuf,
    /// PEM: its private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// PEM: every CA certificate to trust; during a rotation, the old and the new.
    pub ca: PathBuf,
}

impl TlsFiles {
    fn paths(&self) -> [&Path; 3] {
        [&self.cert, &self.key, &self.ca]
    }
}

/// The contents of a [`TlsFiles`], parsed and checked.
pub struct Loaded {
    pub identity: Identity,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
    pub provider: Arc<CryptoProvider>,
}

impl Loaded {
    /// Reads and checks the three files: certificate and key must match, the
    /// certificate must carry one identity, the bundle at least one CA.
    pub fn read(files: &TlsFiles) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let pem_err = |path: &Path, what: String| TlsError::Pem {
            path: path.to_path_buf(),
            what,
        };
        let cert_pem = read(&files.cert)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(&files.cert, format!("bad certificate PEM: {e}")))?;
        let leaf = chain
            .first()
            .ok_or_else(|| pem_err(&files.cert, "no certificate in the file".into()))?;
        let identity = Identity::of_cert(leaf).map_err(|e| pem_err(&files.cert, e.to_string()))?;
        let key_pem = read(&files.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| pem_err(&files.key, format!("no usable private key: {e}")))?;
        let ca_pem = read(&files.ca)?;
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca_pem) {
            let c = c.map_err(|e| pem_err(&files.ca, format!("bad certificate PEM: {e}")))?;
            roots.add(c).map_err(|source| TlsError::Rustls {
                context: "adding a CA certificate",
                source,
            })?;
        }
        if roots.is_empty() {
            return Err(pem_err(&files.ca, "no CA certificate in the bundle".into()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Refuses a key that does not belong to the certificate.
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(
            |source| TlsError::Rustls {
                context: "certificate and key",
                source,
            },
        )?;
        Ok(Loaded {
            identity,
            chain,
            key,
            roots: Arc::new(roots),
            provider,
        })
    }

    /// Fails unless this is a `role` identity.
    pub fn expect_role(&self, files: &TlsFiles, role: Role) -> Result<(), TlsError> {
        if self.identity.role == role {
            Ok(())
        } else {
            Err(TlsError::WrongRole {
                path: files.cert.clone(),
                identity: self.identity.clone(),
                expected: role,
            })
        }
    }
}

/// Identifies a version of the three files: a replaced (renamed over) or
/// rewritten file changes its inode, size or mtime.
type Stamp = [Option<(SystemTime, u64, u64)>; 3];

fn stamp(files: &TlsFiles) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    files.paths().map(|p| {
        std::fs::metadata(p).ok().map(|m| {
            (
                m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                m.len(),
                m.ino(),
            )
        })
    })
}

struct Current<T> {
    stamp: Stamp,
    /// The stamp a reload last failed at: not retried until the files change again.
    failed: Option<Stamp>,
    identity: Identity,
    value: T,
}

/// A value built from [`TlsFiles`] (a rustls config) and rebuilt when the
/// files change: checked at each use (a new connection), so new handshakes
/// use new certificates without a restart. A reload that fails (a file half
/// written, a key that does not match yet) keeps the previous value and is
/// retried once the files change again.
pub struct Reloading<T> {
    files: TlsFiles,
    build: fn(&Loaded) -> Result<T, TlsError>,
    current: Mutex<Current<T>>,
}

impl<T: Clone> Reloading<T> {
    /// Loads the files once; they must be valid now.
    pub fn new(
        files: TlsFiles,
        build: fn(&Loaded) -> Result<T, TlsError>,
    ) -> Result<Self, TlsError> {
        let st = stamp(&files);
        let loaded = Loaded::read(&files)?;
        let value = build(&loaded)?;
        Ok(Reloading {
            files,
            build,
            current: Mutex::new(Current {
                stamp: st,
                failed: None,
                identity: loaded.identity,
                value,
            }),
        })
    }

    /// The current value, reloaded first if the files changed.
    pub fn get(&self) -> T {
        let st = stamp(&self.files);
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if st != cur.stamp && cur.failed != Some(st) {
            match Loaded::read(&self.files).and_then(|l| Ok(((self.build)(&l)?, l.identity))) {
                Ok((value, identity)) => {
                    tracing::info!(
                        cert = %self.files.cert.display(),
                        ca = %self.files.ca.display(),
                        %identity,
                        "TLS certificate and CA bundle reloaded"
                    );
                    *cur = Current {
                        stamp: st,
                        failed: None,
                        identity,
                        value,
                    };
                }
                Err(e) => {
                    tracing::warn!(
                        cert = %self.files.cert.display(),
                        error = %e,
                        "TLS files changed but cannot be loaded; keeping the previous ones"
                    );
                    cur.failed = Some(st);
                }
            }
        }
        cur.value.clone()
    }

    /// The identity of the certificate currently in use.
    pub fn identity(&self) -> Identity {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .identity
            .clone()
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

/// A client's TLS: its certificate and the CA bundle, reloaded on change.
pub type ClientTls = Arc<Reloading<Arc<ClientConfig>>>;

/// Loads a client configuration from `files`.
pub fn client_tls(files: TlsFiles) -> Result<ClientTls, TlsError> {
    Ok(Arc::new(Reloading::new(files, client_config)?))
}

fn client_config(l: &Loaded) -> Result<Arc<ClientConfig>, TlsError> {
    let verifier = Arc::new(ControlServerVerifier {
        roots: l.roots.clone(),
        provider: l.provider.clone(),
        trust_domain: l.identity.trust_domain.clone(),
    });
    let mut cfg = ClientConfig::builder_with_provider(l.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            context: "client protocol versions",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(l.chain.clone(), l.key.clone_key())
        .map_err(|source| TlsError::Rustls {
            context: "client certificate",
            source,
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// An error carried inside a rustls certificate error, so a refusal tells
/// which identity was refused and why.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IdentityRefused(pub String);

/// `rustls::Error` for a certificate refused on identity grounds.
pub fn refuse(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(IdentityRefused(msg)),
    )))
}

/// Verifies a server: chains to the CA bundle (validity period, serverAuth
/// usage), and carries a control identity of our trust domain.
#[derive(Debug)]
struct ControlServerVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    trust_domain: String,
}

impl ServerCertVerifier for ControlServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id = Identity::of_cert(end_entity).map_err(|e| refuse(format!("server: {e}")))?;
        if id.trust_domain != self.trust_domain || id.role != Role::Control {
            return Err(refuse(format!(
                "server identity {id} is not a control replica of trust domain {}",
                self.trust_domain
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// How a process reaches the control plane: mTLS, or plaintext when
/// `--insecure` was asked for.
#[derive(Clone)]
pub enum Transport {
    Insecure,
    Tls(ClientTls),
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Insecure => f.write_str("Insecure"),
            Transport::Tls(t) => write!(f, "Tls({})", t.identity()),
        }
    }
}

/// The `http://host:port` endpoint for a `host:port` (or URL) address; the
/// scheme stays `http` because TLS is done by the connector.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    let uri = match addr.split_once("://") {
        Some((_, rest)) => format!("http://{rest}"),
        None => format!("http://{addr}"),
    };
    Endpoint::from_shared(uri)
}

impl Transport {
    /// A lazily connected channel; outbound connections leave from
    /// `local_ip` when set.
    pub fn lazy(&self, ep: Endpoint, local_ip: Option<IpAddr>) -> Channel {
        match self {
            Transport::Insecure => ep.local_address(local_ip).connect_lazy(),
            Transport::Tls(tls) => ep.connect_with_connector_lazy(Connector {
                tls: tls.clone(),
                local_ip,
            }),
        }
    }

    /// A channel connected now (the CLI tries replicas in turn).
    pub async fn connect(&self, ep: Endpoint) -> Result<Channel, tonic::transport::Error> {
        match self {
            Transport::Insecure => ep.connect().await,
            Transport::Tls(tls) => {
                ep.connect_with_connector(Connector {
                    tls: tls.clone(),
                    local_ip: None,
                })
                .await
            }
        }
    }
}

/// Dials TCP (from `local_ip` when set) and runs the TLS handshake with the
/// current client configuration.
#[derive(Clone)]
struct Connector {
    tls: ClientTls,
    local_ip: Option<IpAddr>,
}

type ConnectFuture = Pin<
    Box<
        dyn Future<Output = Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, io::Error>>
            + Send,
    >,
>;

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let local_ip = self.local_ip;
        Box::pin(async move {
            let host = uri
                .host()
                .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "address without a host")
                })?;
            let port = uri.port_u16().unwrap_or(7700);
            let tcp = dial(&host, port, local_ip).await?;
            let name = ServerName::try_from(host.clone())
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
            let stream = tokio_rustls::TlsConnector::from(tls.get())
                .connect(name, tcp)
                .await
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("TLS handshake with {host}:{port}: {e}"))
                })?;
            Ok(TokioIo::new(stream))
        })
    }
}

async fn dial(host: &str, port: u16, local_ip: Option<IpAddr>) -> io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match dial_one(addr, local_ip).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        )
    }))
}

async fn dial_one(addr: SocketAddr, local_ip: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = local_ip.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Whether a client-side status comes from a connection that could not be
/// made (tonic keeps the transport error as its source): the request never
/// left, so it may be sent elsewhere whatever it was.
pub fn connect_failed(status: &tonic::Status) -> bool {
    use std::error::Error;
    let mut cause = status.source();
    while let Some(c) = cause {
        if c.downcast_ref::<tonic::ConnectError>().is_some() {
            return true;
        }
        cause = c.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_parse_strictly() {
        let id = Identity::parse("spiffe://prod.example/node/node-1").expect("valid");
        assert_eq!(id.role, Role::Node);
        assert_eq!(id.name, "node-1");
        assert_eq!(id.to_string(), "spiffe://prod.example/node/node-1");
        for bad in [
            "spiffe://prod/node",
            "spiffe://prod/node/a/b",
            "spiffe://prod/root/a",
            "https://prod/node/a",
            "spiffe://Prod/node/a",
            "spiffe:///node/a",
            "spiffe://prod/node/",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
