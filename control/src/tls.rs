//! The server side of mTLS: a rustls server configuration that requires a
//! client certificate chaining to the CA bundle and carrying a SPIFFE
//! identity of the cluster's trust domain, rebuilt when the certificate, key
//! or bundle files change; and the accept loop that hands tonic either
//! plaintext (`--insecure`) or TLS connections, each tagged with the peer's
//! identity ([`PeerInfo`]) for authorization.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use strait_proto::tls::{Identity, Loaded, Reloading, Role, TlsError, TlsFiles, refuse};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::Connected;
use tracing::{debug, warn};

/// A TLS handshake that takes longer than this is abandoned.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's TLS: its certificate and the CA bundle, reloaded on change.
pub type ServerTls = Arc<Reloading<Arc<ServerConfig>>>;

/// Loads the server configuration; the certificate must carry a control
/// identity (the same files serve as the client certificate towards peers).
pub fn server_tls(files: TlsFiles) -> Result<ServerTls, TlsError> {
    let loaded = Loaded::read(&files)?;
    loaded.expect_role(&files, Role::Control)?;
    Ok(Arc::new(Reloading::new(files, server_config)?))
}

fn server_config(l: &Loaded) -> Result<Arc<ServerConfig>, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(l.roots.clone(), l.provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let verifier = Arc::new(SpiffeClientVerifier {
        inner,
        trust_domain: l.identity.trust_domain.clone(),
    });
    let mut cfg = ServerConfig::builder_with_provider(l.provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            context: "server protocol versions",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(l.chain.clone(), l.key.clone_key())
        .map_err(|source| TlsError::Rustls {
            context: "server certificate",
            source,
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// WebPKI client verification (chain to the bundle, validity period,
/// clientAuth usage), then: exactly one SPIFFE identity, of our trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = Identity::of_cert(end_entity).map_err(|e| refuse(format!("client: {e}")))?;
        if id.trust_domain != self.trust_domain {
            return Err(refuse(format!(
                "client identity {id} is not of trust domain {}",
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Who is on the other end of a connection; in every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The verified identity; `None` on a plaintext (`--insecure`) server.
    pub identity: Option<Identity>,
}

/// An accepted connection: plaintext or TLS with a verified peer identity.
pub enum Conn {
    Plain(TcpStream),
    Tls {
        stream: Box<tokio_rustls::server::TlsStream<TcpStream>>,
        identity: Identity,
    },
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(s) => PeerInfo {
                remote: s.peer_addr().ok(),
                identity: None,
            },
            Conn::Tls { stream, identity } => PeerInfo {
                remote: stream.get_ref().0.peer_addr().ok(),
                identity: Some(identity.clone()),
            },
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls { stream, .. } => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls { stream, .. } => stream.is_write_vectored(),
        }
    }
}

/// Accepted connections for tonic. With TLS, each handshake runs in its own
/// task (a slow or hostile client does not hold up the others) with the
/// configuration current at accept time; failed handshakes are logged with
/// the peer address and the reason, and never reach the services.
pub fn incoming(
    listener: TcpListener,
    tls: Option<ServerTls>,
) -> impl Stream<Item = Result<Conn, io::Error>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Conn, io::Error>>(64);
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let Some(tls) = &tls else {
                if tx.send(Ok(Conn::Plain(tcp))).await.is_err() {
                    return;
                }
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.get());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(Identity::of_cert);
                        match identity {
                            Some(Ok(identity)) => {
                                debug!(%remote, %identity, "TLS connection accepted");
                                let _ = tx
                                    .send(Ok(Conn::Tls {
                                        stream: Box::new(stream),
                                        identity,
                                    }))
                                    .await;
                            }
                            // Unreachable past the verifier; refuse all the same.
                            _ => warn!(%remote, "TLS peer without an identity refused"),
                        }
                    }
                    Ok(Err(e)) => {
                        warn!(%remote, error = %e, "TLS handshake refused")
                    }
                    Err(_) => warn!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    AbortOnDrop {
        rx: tokio_stream::wrappers::ReceiverStream::new(rx),
        task: accept,
    }
}

/// The receiving end of the accept loop; dropping it (server shutdown) stops
/// the loop and closes the listener.
struct AbortOnDrop {
    rx: tokio_stream::wrappers::ReceiverStream<Result<Conn, io::Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream for AbortOnDrop {
    type Item = Result<Conn, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.rx).poll_next(cx)
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.task.abort();
    }
}
