//! Wiring of one control-plane replica: storage, state machine, Raft, and
//! the gRPC server, from a parsed `Config`. `build` returns the bound
//! address and handles so tests and `strait dev` can start it on port 0;
//! `Bound::shutdown` stops it in an order that keeps the data plane whole
//! (leader duties first, then leadership, then watches and the server).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use openraft::async_runtime::WatchReceiver;
use strait_proto::fanout::resources_server::ResourcesServer;
use strait_proto::v1::{
    cluster_server::ClusterServer, nodes_server::NodesServer, raft_server::RaftServer,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::alloc::{IpRange, LbPool, PortRange};
use crate::api::{ClusterApi, ResourcesApi, Writer};
use crate::liveness::{self, Heartbeats, NodesApi};
use crate::log_store::LogStore;
use crate::metrics::Metrics;
use crate::raft::{Raft, SnapshotPolicy, StateMachine, TypeConfig, run_snapshot_trigger};
use crate::raft_net::{Network, Peers, RaftService};
use crate::service::Allocators;
use crate::state::State;
use crate::watch::{Shared, Store};

/// Largest gRPC message (a full-state watch response or list).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
/// Streams a connection may reset before they are accepted (see `build`).
const PENDING_RESET_LIMIT: usize = 10_000;

/// Everything a replica is started with.
#[derive(Debug, Clone)]
pub struct Config {
    pub id: u64,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// The address peers and clients reach this replica at (default: listen).
    pub advertise: Option<String>,
    /// Every voter of a new cluster, this one included; empty: just this one.
    pub peers: BTreeMap<u64, String>,
    /// Start without bootstrapping: this replica waits to be added to an
    /// existing cluster (`strait cluster add-member`).
    pub join: bool,
    pub service_cidr: IpNet,
    pub node_port_range: String,
    pub lb_pool: String,
    pub watch_history: usize,
    /// Log entries between snapshots.
    pub snapshot_every: u64,
    pub heartbeat_ms: u64,
    /// A node silent this long is marked Ready=False.
    pub node_grace: Duration,
    /// openraft's election timeout range. A follower stands for election
    /// after the leader's lease (the range's maximum) plus a random timeout
    /// from the range: with (100, 200), 300–400 ms of silence, six or more
    /// missed heartbeats.
    pub election_timeout_ms: (u64, u64),
    /// mTLS certificate, key and CA bundle (a control identity); `None`:
    /// plaintext (`--insecure`, `strait dev`), logged as a warning.
    pub tls: Option<strait_proto::tls::TlsFiles>,
    /// Where `/metrics`, `/livez` and `/readyz` are served; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            id: 1,
            data_dir: PathBuf::from("strait-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            advertise: None,
            peers: BTreeMap::new(),
            join: false,
            service_cidr: IpNet::V4(ipnet::Ipv4Net::new_assert(
                std::net::Ipv4Addr::new(10, 96, 0, 0),
                12,
            )),
            node_port_range: "30000-32767".into(),
            lb_pool: String::new(),
            watch_history: 10_000,
            snapshot_every: 10_000,
            heartbeat_ms: 50,
            node_grace: Duration::from_secs(10),
            election_timeout_ms: (100, 200),
            tls: None,
            metrics_listen: None,
        }
    }
}

/// Errors starting a replica.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A range flag is wrong.
    #[error("invalid {flag}")]
    Range {
        flag: &'static str,
        source: crate::alloc::AllocError,
    },
    /// The data directory cannot be used.
    #[error("data directory {path}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The log store cannot be opened.
    #[error("opening the raft log in {path}")]
    LogStore {
        path: PathBuf,
        source: Box<crate::log_store::LogStoreError>,
    },
    /// Raft refused the configuration or failed to start.
    #[error("raft: {0}")]
    Raft(String),
    /// The listen address cannot be bound.
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The TLS certificate, key or CA bundle cannot be used.
    #[error("TLS: {0}")]
    Tls(#[from] strait_proto::tls::TlsError),
    /// The metrics address cannot be bound.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// `--peers` does not include this replica.
    #[error("--peers must include this replica's id {0}")]
    PeersWithoutSelf(u64),
}

/// A running replica.
pub struct Bound {
    pub addr: SocketAddr,
    pub raft: Arc<Raft>,
    pub shared: Shared,
    /// Where `/metrics`, `/livez` and `/readyz` answer, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    shutdown: Option<oneshot::Sender<()>>,
    metrics_shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    /// Set first when shutting down: the liveness loop ends.
    duties_stop: tokio::sync::watch::Sender<bool>,
    liveness: JoinHandle<()>,
    /// Set once leadership is handed off: open watches end.
    watches_stop: tokio::sync::watch::Sender<bool>,
}

/// How long a stopping leader waits for a voter to take over.
const HAND_OFF_TIMEOUT: Duration = Duration::from_secs(3);
/// How long in-flight requests get once watches have ended.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long Raft gets to stop.
const RAFT_STOP_TIMEOUT: Duration = Duration::from_secs(3);

impl Bound {
    /// Stops the replica, each step bounded so it ends within seconds:
    ///
    /// 1. the replica stops standing for election (a follower that stops
    ///    hearing its leader while the server drains must not campaign and
    ///    push every term up), and the leader's duties (node liveness, pod
    ///    expiry) stop while heartbeats are still taken, so no node is
    ///    judged by heartbeats this replica refused;
    /// 2. a leader hands leadership to the most up-to-date voter
    ///    (openraft's leader transfer), so writes move on without waiting
    ///    for an election timeout;
    /// 3. open watches end with Unavailable (their clients resume from
    ///    their revision on another replica) and the gRPC server drains the
    ///    requests in flight, then stops (aborted if they take too long);
    /// 4. Raft shuts down. Every log write was fsynced when it returned.
    pub async fn shutdown(mut self) {
        let id = self.raft.metrics().borrow_watched().id;
        let started = tokio::time::Instant::now();
        let ms = || started.elapsed().as_millis() as u64;
        self.raft.runtime_config().elect(false);
        self.duties_stop.send_replace(true);
        if let Err(e) = (&mut self.liveness).await {
            tracing::warn!(error = %e, "liveness loop ended abnormally");
        }
        tracing::info!(id, elapsed_ms = ms(), "leader duties stopped");
        hand_off_leadership(&self.raft, HAND_OFF_TIMEOUT).await;
        self.watches_stop.send_replace(true);
        tracing::info!(id, elapsed_ms = ms(), "watches ended; draining requests");
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(tx) = self.metrics_shutdown.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(DRAIN_TIMEOUT, &mut self.server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server stopped with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server task failed"),
            Err(_) => {
                tracing::warn!(
                    timeout_ms = DRAIN_TIMEOUT.as_millis() as u64,
                    "gRPC requests still in flight; closing their connections"
                );
                self.server.abort();
            }
        }
        tracing::info!(id, elapsed_ms = ms(), "gRPC server stopped");
        match tokio::time::timeout(RAFT_STOP_TIMEOUT, self.raft.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "raft stopped with an error"),
            Err(_) => tracing::warn!(
                timeout_ms = RAFT_STOP_TIMEOUT.as_millis() as u64,
                "raft did not stop in time"
            ),
        }
        tracing::info!(id, elapsed_ms = ms(), "control replica stopped");
    }

    /// Resolves, with the reason, when the replica can no longer serve: the gRPC
    /// server stopped, or Raft stopped on a fatal error (a log or state
    /// machine write failed: a full disk, an I/O error). After such an error
    /// openraft takes no write and joins no election, so a replica that went
    /// on running would only answer with errors; its caller exits instead,
    /// and the supervisor (systemd, compose) restarts it once the cause is
    /// fixed, from what it had on disk.
    pub async fn wait(&mut self) -> String {
        // The server metrics (vote, role, leader, membership) change seldom,
        // unlike the full metrics, which change with every write: waiting
        // on them costs no wake-up per write. Their sender is dropped when
        // the core task ends; the full metrics then say why.
        let mut server = self.raft.server_metrics();
        let all = self.raft.metrics();
        let fatal = async move {
            while server.changed().await.is_ok() {}
            match &all.borrow_watched().running_state {
                Err(fatal) => fatal.to_string(),
                Ok(()) => "the raft core task ended".to_string(),
            }
        };
        tokio::select! {
            server = &mut self.server => match server {
                Ok(Ok(())) => "the gRPC server stopped".into(),
                Ok(Err(e)) => format!("the gRPC server stopped: {e}"),
                Err(e) => format!("the gRPC server task failed: {e}"),
            },
            reason = fatal => format!("raft stopped: {reason}"),
        }
    }
}

/// The allocators a config describes.
pub fn allocators(cfg: &Config) -> Result<Allocators, StartError> {
    Ok(Allocators {
        cluster_ips: IpRange::new(cfg.service_cidr),
        node_ports: cfg.node_port_range.parse::<PortRange>().map_err(|source| {
            StartError::Range {
                flag: "--node-port-range",
                source,
            }
        })?,
        lb_ips: cfg
            .lb_pool
            .parse::<LbPool>()
            .map_err(|source| StartError::Range {
                flag: "--lb-pool",
                source,
            })?,
    })
}

/// Starts a replica: storage, Raft, gRPC server; bootstraps a new cluster
/// once (the lowest id among `peers` does it; a second call is a no-op).
pub async fn build(cfg: Config) -> Result<Bound, StartError> {
    let alloc = allocators(&cfg)?;
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    let (server_tls, transport) = match &cfg.tls {
        Some(files) => {
            let server = crate::tls::server_tls(files.clone())?;
            let client = strait_proto::tls::client_tls(files.clone())?;
            tracing::info!(identity = %server.identity(), cert = %files.cert.display(), ca = %files.ca.display(), "mTLS on: clients, nodes and peers must present a certificate of the cluster CA");
            (Some(server), strait_proto::tls::Transport::Tls(client))
        }
        None => {
            tracing::warn!(
                "TLS is off (--insecure): any client that reaches the listen address can read and write the cluster"
            );
            (None, strait_proto::tls::Transport::Insecure)
        }
    };
    let dir = |e| StartError::DataDir {
        path: cfg.data_dir.clone(),
        source: e,
    };
    std::fs::create_dir_all(&cfg.data_dir).map_err(dir)?;
    let log_path = cfg.data_dir.join("raft-log");
    let log = LogStore::<TypeConfig>::open(&log_path).map_err(|source| StartError::LogStore {
        path: log_path.clone(),
        source: Box::new(source),
    })?;

    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: cfg.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: cfg.listen,
        source,
    })?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| addr.to_string());

    let shared: Shared = Arc::new(RwLock::new(Store::new(
        State::new(alloc.clone()),
        cfg.watch_history,
    )));
    let snapshot_due = Arc::new(tokio::sync::Notify::new());
    let sm = StateMachine::open(
        &cfg.data_dir.join("snapshots"),
        alloc,
        shared.clone(),
        SnapshotPolicy {
            every: cfg.snapshot_every,
            due: snapshot_due.clone(),
        },
        log.written(),
    )
    .map_err(dir)?;

    let local_ip = Some(cfg.listen.ip()).filter(|ip| !ip.is_unspecified());
    let peers_net = Peers::new(local_ip).with_transport(transport);
    let raft_config = openraft::Config {
        cluster_name: "strait".into(),
        heartbeat_interval: cfg.heartbeat_ms,
        election_timeout_min: cfg.election_timeout_ms.0,
        election_timeout_max: cfg.election_timeout_ms.1,
        // The state machine decides when (`SnapshotPolicy`): openraft's
        // policy counts entries only.
        snapshot_policy: openraft::SnapshotPolicy::Never,
        // Keep one snapshot interval of log for followers that lag a little;
        // anything further behind is caught up by snapshot install.
        max_in_snapshot_log_to_keep: cfg.snapshot_every.min(1000),
        install_snapshot_timeout: 10_000,
        ..Default::default()
    };
    let raft_config = Arc::new(
        raft_config
            .validate()
            .map_err(|e| StartError::Raft(e.to_string()))?,
    );
    let raft = Arc::new(
        Raft::new(
            cfg.id,
            raft_config,
            Network {
                peers: peers_net.clone(),
            },
            log,
            sm,
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?,
    );

    tokio::spawn(run_snapshot_trigger(Arc::downgrade(&raft), snapshot_due));
    let metrics = Arc::new(Metrics::new());
    let writer = Writer::new(
        raft.clone(),
        shared.clone(),
        peers_net.clone(),
        metrics.clone(),
    );
    let (watches_stop, watches_stop_rx) = tokio::sync::watch::channel(false);
    let resources = ResourcesServer::new(
        ResourcesApi::new(
            writer.clone(),
            raft.clone(),
            shared.clone(),
            metrics.clone(),
        )
        .with_shutdown(watches_stop_rx),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let heartbeats = Heartbeats::default();
    let cluster = ClusterServer::new(ClusterApi::new(
        raft.clone(),
        shared.clone(),
        heartbeats.clone(),
        peers_net.clone(),
    ));
    let (duties_stop, duties_stop_rx) = tokio::sync::watch::channel(false);
    let liveness = liveness::spawn(
        raft.clone(),
        shared.clone(),
        writer.clone(),
        peers_net,
        heartbeats.clone(),
        cfg.node_grace,
        duties_stop_rx,
    );
    let nodes = NodesServer::new(NodesApi::new(heartbeats.clone(), raft.clone()));
    let raft_svc = tonic::service::interceptor::InterceptedService::new(
        RaftServer::new(RaftService::new(raft.clone(), writer, heartbeats.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        crate::authz::raft_interceptor,
    );
    let (metrics_tx, metrics_rx) = oneshot::channel::<()>();
    let metrics_addr = metrics_listener.map(|(listener, bound)| {
        crate::metrics::serve(
            listener,
            metrics.clone(),
            raft.clone(),
            shared.clone(),
            async {
                let _ = metrics_rx.await;
            },
        );
        bound
    });
    let (tx, rx) = oneshot::channel::<()>();
    let incoming = crate::tls::incoming(listener, server_tls);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            // Peers cancel requests that outlive their deadline (a vote gets
            // the election timeout); on a loaded replica many are reset before
            // they are accepted. h2's rapid-reset guard would then tear down
            // the peer's connection at 20, and reconnecting under load costs
            // more than the deadline: elections would never finish. Every
            // caller is authenticated (mTLS), so the guard is set far higher.
            .http2_max_pending_accept_reset_streams(Some(PENDING_RESET_LIMIT))
            .add_service(resources)
            .add_service(cluster)
            .add_service(nodes)
            .add_service(raft_svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            }),
    );

    let mut peers = cfg.peers.clone();
    if peers.is_empty() {
        peers.insert(cfg.id, advertise.clone());
    }
    if !peers.contains_key(&cfg.id) {
        return Err(StartError::PeersWithoutSelf(cfg.id));
    }
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;
    if !cfg.join && !initialized && peers.keys().next() == Some(&cfg.id) {
        let members: BTreeMap<u64, openraft::BasicNode> = peers
            .iter()
            .map(|(id, a)| (*id, openraft::BasicNode { addr: a.clone() }))
            .collect();
        match raft.initialize(members).await {
            Ok(()) => tracing::info!(id = cfg.id, voters = peers.len(), "cluster bootstrapped"),
            Err(e) => {
                tracing::info!(id = cfg.id, error = %e, "bootstrap skipped: already initialized")
            }
        }
    }
    tracing::info!(id = cfg.id, %addr, advertise = %advertise, data_dir = %cfg.data_dir.display(), metrics = ?metrics_addr, "control replica serving");
    Ok(Bound {
        addr,
        raft,
        shared,
        metrics_addr,
        metrics,
        shutdown: Some(tx),
        metrics_shutdown: Some(metrics_tx),
        server,
        duties_stop,
        liveness,
        watches_stop,
    })
}

/// If this replica leads, asks the voter with the most of the log matched
/// to take over (openraft's leader transfer: the leader stops proposing,
/// the target elects itself at once when its log is complete) and waits up
/// to `timeout` until this replica follows the new leader: requests still
/// in flight here (a write being retried) are then forwarded to it instead
/// of waiting for a leader this replica would never hear of once its server
/// stops. Without such a voter (a single replica) or in time, the replica
/// stops anyway: the others elect a leader after their election timeout.
pub async fn hand_off_leadership(raft: &Raft, timeout: Duration) {
    let m = raft.metrics().borrow_watched().clone();
    if m.current_leader != Some(m.id) {
        return;
    }
    let matched = |v: &u64| {
        m.replication
            .as_ref()
            .and_then(|r| r.get(v).cloned().flatten())
            .map(|l| l.index)
    };
    let Some(to) = m
        .membership_config
        .membership()
        .voter_ids()
        .filter(|v| *v != m.id)
        .max_by_key(|v| (matched(v), std::cmp::Reverse(*v)))
    else {
        tracing::info!(
            id = m.id,
            "stopping leader has no other voter to hand off to"
        );
        return;
    };
    tracing::info!(
        id = m.id,
        to,
        matched = ?matched(&to),
        last_log_index = ?m.last_log_index,
        "stopping leader hands leadership off"
    );
    if let Err(e) = raft.trigger().transfer_leader(to).await {
        tracing::warn!(to, error = %e, "leader transfer not started");
        return;
    }
    let mut rx = raft.metrics();
    let moved = tokio::time::timeout(timeout, async {
        loop {
            let leader = rx.borrow_watched().current_leader;
            if leader.is_some_and(|l| l != m.id) {
                return leader;
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    })
    .await;
    match moved {
        Ok(leader) => tracing::info!(id = m.id, leader = ?leader, "leadership handed off"),
        Err(_) => tracing::warn!(
            id = m.id,
            to,
            timeout_ms = timeout.as_millis() as u64,
            "leadership not handed off in time; the others elect after their timeout"
        ),
    }
}

/// Waits until some replica is leader (as this one sees it), up to `timeout`.
pub async fn wait_for_leader(raft: &Raft, timeout: Duration) -> Option<u64> {
    let mut rx = raft.metrics();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let leader = rx.borrow_watched().current_leader;
        if leader.is_some() {
            return leader;
        }
        if tokio::time::timeout_at(deadline, rx.changed())
            .await
            .is_err()
        {
            return None;
        }
    }
}
