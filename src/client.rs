//! The CLI's connection to the control plane: a list of replicas, tried in
//! turn, so one replica being down does not stop an operator; and the TLS
//! flags every process shares (`--tls-cert`, `--tls-key`, `--tls-ca`,
//! `--insecure`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use strait_proto::tls::{TlsFiles, Transport};
use strait_proto::v1::cluster_client::ClusterClient;
use strait_proto::v1::resources_client::ResourcesClient;
use strait_proto::v1::{GetRequest, GetResponse, ListRequest, ListResponse};
use tonic::transport::Channel;

/// mTLS material, or the explicit choice of plaintext.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This process's certificate (PEM), from `strait certs issue`.
    #[arg(long, global = true, env = "STRAIT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, global = true, env = "STRAIT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA bundle (PEM; old and new CA during a rotation).
    #[arg(long, global = true, env = "STRAIT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Plaintext gRPC, no certificates: anyone who reaches the port can read
    /// and write the cluster. For trials only.
    #[arg(long, global = true, env = "STRAIT_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    pub insecure: bool,
}

impl TlsArgs {
    /// The files for a server process (control, node): all three flags, or
    /// `--insecure` (`None`).
    pub fn files(&self) -> anyhow::Result<Option<TlsFiles>> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca, self.insecure) {
            (None, None, None, true) => Ok(None),
            (Some(_), _, _, true) | (_, Some(_), _, true) | (_, _, Some(_), true) => {
                bail!("--insecure conflicts with --tls-cert/--tls-key/--tls-ca: choose one")
            }
            (Some(cert), Some(key), Some(ca), false) => Ok(Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                ca: ca.clone(),
            })),
            (None, None, None, false) => bail!(
                "no TLS certificate: pass --tls-cert, --tls-key and --tls-ca \
                 (or STRAIT_TLS_CERT, STRAIT_TLS_KEY, STRAIT_TLS_CA; create them with `strait certs`), \
                 or --insecure for plaintext"
            ),
            _ => bail!("--tls-cert, --tls-key and --tls-ca go together: one is missing"),
        }
    }

    /// The CLI's transport: the flags, else `~/.strait/{admin.crt,admin.key,ca.crt}`
    /// when all three exist, else `--insecure`.
    pub fn cli_transport(&self) -> anyhow::Result<Transport> {
        let given = self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_ca.is_some();
        let files = if given || self.insecure {
            self.files()?
        } else {
            match home_files() {
                Some(f) => Some(f),
                None => bail!(
                    "no TLS certificate: pass --tls-cert, --tls-key and --tls-ca \
                     (or STRAIT_TLS_CERT, STRAIT_TLS_KEY, STRAIT_TLS_CA), put admin.crt, admin.key \
                     and ca.crt in ~/.strait/, or pass --insecure for a plaintext control plane"
                ),
            }
        };
        Ok(match files {
            None => Transport::Insecure,
            Some(files) => Transport::Tls(
                strait_proto::tls::client_tls(files).context("loading the TLS certificate")?,
            ),
        })
    }
}

fn home_files() -> Option<TlsFiles> {
    let dir = PathBuf::from(std::env::var_os("HOME")?).join(".strait");
    let files = TlsFiles {
        cert: dir.join("admin.crt"),
        key: dir.join("admin.key"),
        ca: dir.join("ca.crt"),
    };
    (files.cert.exists() && files.key.exists() && files.ca.exists()).then_some(files)
}

/// Replica addresses; see the module doc.
pub struct Client {
    servers: Vec<String>,
    tls: TlsArgs,
    /// How long a call waits for its answer (`--request-timeout`); zero:
    /// no limit.
    request_timeout: Duration,
}

const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// HTTP/2 PING interval on the CLI's connections.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(2);

/// How long a PING may go unanswered before the connection is taken as
/// dead: generous, so a replica slowed by a loaded machine is not mistaken
/// for a stopped one.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

impl Client {
    pub fn new(servers: Vec<String>, tls: TlsArgs, request_timeout: Duration) -> Self {
        Self {
            servers,
            tls,
            request_timeout,
        }
    }

    /// The same credentials and timeout towards other replicas.
    pub fn with_servers(&self, servers: Vec<String>) -> Self {
        Self::new(servers, self.tls.clone(), self.request_timeout)
    }

    /// A run of Resources calls that moves between replicas; see [`Session`].
    pub fn session(&self) -> anyhow::Result<Session<'_>> {
        self.session_of(resources_client)
    }

    /// The same for Cluster calls.
    pub fn cluster_session(&self) -> anyhow::Result<Session<'_, ClusterClient<Channel>>> {
        self.session_of(ClusterClient::new)
    }

    fn session_of<C>(&self, make: fn(Channel) -> C) -> anyhow::Result<Session<'_, C>> {
        Ok(Session {
            client: self,
            transport: self.tls.cli_transport()?,
            make,
            current: None,
            start: 0,
        })
    }
}

async fn connect(
    transport: &Transport,
    server: &str,
    request_timeout: Duration,
) -> anyhow::Result<Channel> {
    let mut ep = strait_proto::tls::endpoint(server)
        .with_context(|| format!("invalid server address {server:?}"))?
        .connect_timeout(Duration::from_secs(2))
        // A replica that accepts connections but no longer answers (a
        // stopped process, a machine gone silent) is noticed in seconds,
        // not at the end of the call's timeout.
        .http2_keep_alive_interval(KEEPALIVE_EVERY)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    if !request_timeout.is_zero() {
        ep = ep.timeout(request_timeout);
    }
    transport
        .connect(ep)
        .await
        .map_err(|e| anyhow!("{server}: {}", error_chain(&e)))
}

fn unreachable(last: Option<anyhow::Error>) -> anyhow::Error {
    last.unwrap_or_else(|| anyhow!("no server given"))
        .context("cannot reach any control-plane replica (set --server or STRAIT_SERVER)")
}

fn resources_client(ch: Channel) -> ResourcesClient<Channel> {
    ResourcesClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A run of calls to the Resources service. It stays with the replica that
/// answers and moves to the next (in `--server` order, each tried once per
/// call) when one cannot be reached or answers `UNAVAILABLE`, the control
/// plane's answer for what it did not do: no leader, cut off from the
/// leader, shutting down. A connection that broke after a call went out is
/// a reason to move on only for a read; a write may have been applied.
pub struct Session<'a, C = ResourcesClient<Channel>> {
    client: &'a Client,
    transport: Transport,
    /// The gRPC client for a new connection.
    make: fn(Channel) -> C,
    current: Option<(usize, C)>,
    /// Where the next call starts when no replica is current.
    start: usize,
}

impl<C: Clone> Session<'_, C> {
    /// Sends the next call to the replica after the current one, for a
    /// failure the call itself did not see: a watch stream that broke or
    /// went silent after it was opened.
    pub fn leave(&mut self) {
        if let Some((i, _)) = self.current.take() {
            self.start = (i + 1) % self.client.servers.len();
        }
    }

    /// A call that changes nothing, so may be sent again anywhere.
    pub async fn read<T, F, Fut>(&mut self, call: F) -> anyhow::Result<Result<T, tonic::Status>>
    where
        F: FnMut(C) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call(true, call).await
    }

    /// A call that changes state: sent again only where it surely was not
    /// carried out.
    pub async fn write<T, F, Fut>(&mut self, call: F) -> anyhow::Result<Result<T, tonic::Status>>
    where
        F: FnMut(C) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call(false, call).await
    }

    /// `Err` when no replica could be reached; `Ok(Err)` is a replica's
    /// answer (the last one's, when every replica said `UNAVAILABLE`).
    async fn call<T, F, Fut>(
        &mut self,
        idempotent: bool,
        mut call: F,
    ) -> anyhow::Result<Result<T, tonic::Status>>
    where
        F: FnMut(C) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let servers = &self.client.servers;
        let first = self.current.as_ref().map_or(self.start, |(i, _)| *i);
        let (mut answer, mut unreached) = (None, None);
        for k in 0..servers.len() {
            let i = (first + k) % servers.len();
            let rpc = match &self.current {
                Some((j, rpc)) if *j == i => rpc.clone(),
                _ => match connect(&self.transport, &servers[i], self.client.request_timeout).await
                {
                    Ok(ch) => {
                        let rpc = (self.make)(ch);
                        self.current = Some((i, rpc.clone()));
                        rpc
                    }
                    Err(e) => {
                        unreached = Some(e);
                        continue;
                    }
                },
            };
            match call(rpc).await {
                Ok(resp) => return Ok(Ok(resp.into_inner())),
                Err(status) if try_elsewhere(&status, idempotent) => {
                    self.current = None;
                    answer = Some(status);
                }
                Err(status) => return Ok(Err(status)),
            }
        }
        match answer {
            Some(status) => Ok(Err(status)),
            None => Err(unreachable(unreached)),
        }
    }
}

impl Session<'_> {
    /// `Resources.Get`; a replica's refusal is the operator's error.
    pub async fn get(&mut self, req: GetRequest) -> anyhow::Result<GetResponse> {
        self.read(|mut rpc| {
            let req = req.clone();
            async move { rpc.get(req).await }
        })
        .await?
        .map_err(server_error)
    }

    /// `Resources.List`; a replica's refusal is the operator's error.
    pub async fn list(&mut self, req: ListRequest) -> anyhow::Result<ListResponse> {
        self.read(|mut rpc| {
            let req = req.clone();
            async move { rpc.list(req).await }
        })
        .await?
        .map_err(server_error)
    }
}

/// Whether a failed call may be sent to another replica: the replica's own
/// `UNAVAILABLE` (a status with no transport cause), a connection that
/// could not be made, or any broken connection for a read.
fn try_elsewhere(status: &tonic::Status, idempotent: bool) -> bool {
    use std::error::Error;
    let unavailable = status.code() == tonic::Code::Unavailable
        && (status.source().is_none() || idempotent || strait_proto::tls::connect_failed(status));
    unavailable || (idempotent && timed_out(status))
}

/// Whether the call's `--request-timeout` ran out: tonic's own status for
/// it, made on this side (`CANCELLED`, "Timeout expired"), not a replica's
/// answer.
fn timed_out(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Cancelled
        && status.message() == tonic::TimeoutExpired(()).to_string()
}

/// An error and its causes on one line (tonic's top level says only
/// "transport error"; the cause says which TLS check failed), each cause
/// once: one whose text the line already holds (an error whose message
/// includes its source) is not repeated.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
}

/// Whether a connection failed because the peer stopped answering (an
/// HTTP/2 keepalive PING went unanswered), not because it was refused or
/// closed.
fn stopped_answering(cause: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(cause), |e| e.source()).any(|e| {
        e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_timeout)
    })
}

/// kubectl's reason words for a gRPC status.
pub fn reason(status: &tonic::Status) -> &'static str {
    use tonic::Code;
    match status.code() {
        Code::InvalidArgument => "Invalid",
        Code::Aborted => "Conflict",
        Code::NotFound => "NotFound",
        Code::PermissionDenied => "Forbidden",
        Code::OutOfRange => "RequestEntityTooLarge",
        Code::AlreadyExists => "AlreadyExists",
        Code::Unavailable => "ServiceUnavailable",
        Code::FailedPrecondition => "Expired",
        Code::DeadlineExceeded => "Timeout",
        _ => "InternalError",
    }
}

/// An RPC error for the operator: `Error from server (Invalid): ...`.
/// A status made on this side for a broken connection (with its transport
/// cause) says what failed instead of posing as a server answer.
pub fn server_error(status: tonic::Status) -> anyhow::Error {
    use std::error::Error;
    if timed_out(&status) {
        return anyhow!(
            "the control plane gave no answer within --request-timeout. The replica accepted \
             the call and its connection is alive (it answers HTTP/2 PINGs), so it is \
             overloaded or stuck; its log may say why. A write sent to it may or may not have \
             been applied: read the object before retrying"
        );
    }
    if let Some(cause) = status.source() {
        if stopped_answering(cause) {
            return anyhow!(
                "the connection to the control plane failed: {}: {}. The replica accepted \
                 the connection but stopped answering (no reply to HTTP/2 keepalive PINGs \
                 within {KEEPALIVE_TIMEOUT:?}): a stopped process or a machine gone silent. A \
                 write sent on it may or may not have been applied: read the object before \
                 retrying",
                status.message(),
                error_chain(cause)
            );
        }
        return anyhow!(
            "the connection to the control plane failed: {}: {}. A TLS control plane \
             closes connections from plaintext clients and from certificates it does not \
             trust (another CA, expired); its log says why",
            status.message(),
            error_chain(cause)
        );
    }
    anyhow!(
        "Error from server ({}): {}",
        reason(&status),
        status.message()
    )
}
