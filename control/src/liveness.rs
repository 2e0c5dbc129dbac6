//! Node liveness and Pod termination, driven by the leader: agents send
//! heartbeats to every replica, and followers relay the ones they hear to
//! the leader once a second, so a node that reaches any replica the leader
//! reaches counts as alive (as a kubelet's lease renewal through any
//! apiserver does); the leader marks a node silent for the grace
//! period Ready=False (its Pods' endpoints turn unready in the same
//! revision), marks it Ready again when heartbeats return, and removes
//! terminating Pods whose grace period has ended. Every decision is written
//! through Raft, so the state stays deterministic. A replica that is
//! stopping ends these duties before it stops taking heartbeats, so it never
//! judges a node by heartbeats it refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use prost::Message;
use strait_proto::Kind;
use strait_proto::v1::{
    Condition, HeartbeatRequest, HeartbeatResponse, Object, nodes_server, object,
};
use tonic::{Request, Response, Status};

use crate::api::{WRITE_DEADLINE, Writer};
use crate::raft::Raft;
use crate::raft_net::Peers;
use crate::state::{Command, now_unix_nanos};
use crate::watch::{self, Shared};

/// How often a follower relays the heartbeats it heard to the leader.
pub const RELAY_EVERY: Duration = Duration::from_secs(1);

/// Last heartbeat per node name, as this replica received them or had them
/// relayed, with the revision the node reported as programmed.
#[derive(Clone, Default)]
pub struct Heartbeats {
    heard: Arc<Mutex<HashMap<String, (Instant, u64)>>>,
    /// Received directly since the last relay to the leader.
    unrelayed: Arc<Mutex<HashMap<String, (Instant, u64)>>>,
}

/// One relayed heartbeat: the node, the revision it reported, and how long
/// before the relay the follower received it, so relaying does not make a
/// node look more recently alive than it was.
pub type Relayed = (String, u64, Duration);

impl Heartbeats {
    fn record(&self, node: &str, applied_revision: u64) {
        let heard = (Instant::now(), applied_revision);
        self.heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), heard);
        self.unrelayed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node.to_string(), heard);
    }

    /// Heartbeats another replica received and relayed here; not relayed
    /// again. Each counts from when that replica received it, and only if
    /// it is newer than the last one heard here.
    pub fn record_relayed(&self, relayed: &[Relayed]) {
        let now = Instant::now();
        let mut map = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        for (node, applied_revision, age) in relayed {
            // An age older than this clock can express is no news.
            let Some(at) = now.checked_sub(*age) else {
                continue;
            };
            if map.get(node).is_none_or(|(last, _)| *last < at) {
                map.insert(node.clone(), (at, *applied_revision));
            }
        }
    }

    /// The heartbeats received directly since the last call, each with its
    /// age now. The relay's own transit (at most its 1 s timeout) is not
    /// counted, far inside any grace period.
    fn take_unrelayed(&self) -> Vec<Relayed> {
        let taken = std::mem::take(&mut *self.unrelayed.lock().unwrap_or_else(|p| p.into_inner()));
        taken
            .into_iter()
            .map(|(node, (at, revision))| (node, revision, at.elapsed()))
            .collect()
    }

    fn last(&self, node: &str) -> Option<Instant> {
        self.heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(node)
            .map(|(t, _)| *t)
    }

    /// Every node heard from: name, time of the last heartbeat, applied
    /// revision; sorted by name.
    pub fn all(&self) -> Vec<(String, Instant, u64)> {
        let mut v: Vec<_> = self
            .heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, (t, r))| (n.clone(), *t, *r))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// The `Nodes` gRPC service.
pub struct NodesApi {
    heartbeats: Heartbeats,
    raft: Arc<Raft>,
}

impl NodesApi {
    pub fn new(heartbeats: Heartbeats, raft: Arc<Raft>) -> Self {
        Self { heartbeats, raft }
    }
}

#[tonic::async_trait]
impl nodes_server::Nodes for NodesApi {
    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let caller = crate::authz::Caller::of(&req)?;
        let req = req.into_inner();
        crate::authz::heartbeat(&caller, &req.node_name)
            .map_err(|d| d.status("Nodes.Heartbeat"))?;
        if req.node_name.is_empty() {
            return Err(Status::invalid_argument("node_name is required"));
        }
        self.heartbeats.record(&req.node_name, req.applied_revision);
        let m = self.raft.metrics().borrow_watched().clone();
        Ok(Response::new(HeartbeatResponse {
            leader: m.current_leader == Some(m.id),
        }))
    }
}

fn ready_condition(node: &Object) -> Option<String> {
    match &node.kind {
        Some(object::Kind::Node(n)) => n
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.r#type == "Ready"))
            .map(|c| c.status.clone()),
        _ => None,
    }
}

/// The node with its Ready condition set, carrying its resourceVersion so a
/// concurrent update wins and this one is retried next round.
fn with_ready(node: &Object, ready: bool, now: i64) -> Option<Object> {
    let Some(object::Kind::Node(n)) = &node.kind else {
        return None;
    };
    let mut n = n.clone();
    let status = n.status.get_or_insert_default();
    let when = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_nanos(now.max(0) as u64),
    )
    .to_string();
    let cond = Condition {
        r#type: "Ready".into(),
        status: if ready { "True" } else { "False" }.into(),
        last_heartbeat_time: when.clone(),
        last_transition_time: when,
        reason: if ready {
            "AgentReady"
        } else {
            "NodeStatusUnknown"
        }
        .into(),
        message: if ready {
            "strait node agent is sending heartbeats".into()
        } else {
            "strait node agent stopped sending heartbeats".into()
        },
    };
    status.conditions.retain(|c| c.r#type != "Ready");
    status.conditions.push(cond);
    Some(n.into())
}

/// Runs the leader's periodic duties until `stop` turns true (the replica
/// is shutting down). A round in progress is abandoned there: it was
/// decided on heartbeats this replica did receive, and a write already
/// proposed may still commit.
pub fn spawn(
    raft: Arc<Raft>,
    shared: Shared,
    writer: Writer,
    peers: Peers,
    heartbeats: Heartbeats,
    grace: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let duties = async {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut leader_since: Option<Instant> = None;
            loop {
                round(
                    &raft,
                    &shared,
                    &writer,
                    &heartbeats,
                    grace,
                    &mut leader_since,
                    &mut tick,
                )
                .await;
            }
        };
        tokio::select! {
            () = crate::api::until_stopping(&mut stop) => {}
            () = duties => {}
            () = relay(&raft, &peers, &heartbeats) => {}
        }
    })
}

/// A follower's part: every [`RELAY_EVERY`], the heartbeats it heard go to
/// the leader. A relay that fails is dropped; the next carries newer ones.
async fn relay(raft: &Raft, peers: &Peers, heartbeats: &Heartbeats) {
    let mut tick = tokio::time::interval(RELAY_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Taken on the leader too, where they need no relay, so the map
        // does not grow.
        let heard = heartbeats.take_unrelayed();
        let crate::raft::Leader::Other {
            addr: Some(leader), ..
        } = crate::raft::leader(raft)
        else {
            continue;
        };
        if heard.is_empty() {
            continue;
        }
        if let Err(e) = peers.relay_heartbeats(&leader, &heard).await {
            tracing::debug!(leader = %leader, error = %e, "heartbeat relay not delivered");
        }
    }
}

/// One round of the leader's duties: waits for the next tick, then acts if
/// this replica leads.
async fn round(
    raft: &Raft,
    shared: &Shared,
    writer: &Writer,
    heartbeats: &Heartbeats,
    grace: Duration,
    leader_since: &mut Option<Instant>,
    tick: &mut tokio::time::Interval,
) {
    tick.tick().await;
    let m = raft.metrics().borrow_watched().clone();
    if m.current_leader != Some(m.id) {
        *leader_since = None;
        return;
    }
    // A new leader gives every node a full grace period.
    let since = *leader_since.get_or_insert_with(Instant::now);
    let now = now_unix_nanos();
    let (expired, nodes) = {
        let store = watch::read(shared);
        let nodes: Vec<Object> = store.state().list(Some(Kind::Node), "").cloned().collect();
        (store.state().expired_pods(now), nodes)
    };
    for (namespace, name) in expired {
        let cmd = Command::Delete {
            kind: "Pod".into(),
            namespace,
            name: name.clone(),
            resource_version: String::new(),
            now_unix_nanos: now,
            grace_seconds: Some(0),
        };
        if let Err(e) = writer
            .write_local(cmd, tokio::time::Instant::now() + WRITE_DEADLINE)
            .await
        {
            tracing::warn!(pod = %name, error = %e, "removing a terminated pod failed; will retry");
        }
    }
    for node in nodes {
        let name = node.name().to_string();
        let seen = heartbeats.last(&name).map_or(since, |t| t.max(since));
        let silent = seen.elapsed() >= grace;
        let ready = ready_condition(&node).is_none_or(|s| s == "True");
        let next = match (ready, silent) {
            (true, true) => with_ready(&node, false, now),
            (false, false) if heartbeats.last(&name).is_some_and(|t| t >= since) => {
                with_ready(&node, true, now)
            }
            _ => None,
        };
        let Some(next) = next else { continue };
        let cmd = Command::Apply {
            object: next.encode_to_vec(),
            now_unix_nanos: now,
        };
        match writer
            .write_local(cmd, tokio::time::Instant::now() + WRITE_DEADLINE)
            .await
        {
            Ok(r) if r.0.is_ok() => {
                tracing::info!(node = %name, ready = !ready, "node readiness changed")
            }
            Ok(r) => {
                tracing::debug!(node = %name, result = ?r.0, "node readiness update refused; will retry")
            }
            Err(e) => {
                tracing::warn!(node = %name, error = %e, "node readiness update failed; will retry")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relayed heartbeat counts from when the follower received it, and
    /// never replaces a newer one.
    #[test]
    fn relayed_heartbeats_keep_their_age() {
        let h = Heartbeats::default();
        h.record("direct", 7);
        let direct = h.last("direct").expect("recorded");
        h.record_relayed(&[
            ("direct".into(), 5, Duration::from_secs(2)),
            ("relayed".into(), 9, Duration::from_secs(2)),
        ]);
        assert_eq!(h.last("direct"), Some(direct), "an older relay replaced it");
        let relayed = h.last("relayed").expect("relayed recorded");
        assert!(relayed.elapsed() >= Duration::from_secs(2));
        let all = h.all();
        assert_eq!(all[0].2, 7);
        assert_eq!(all[1].2, 9);
        // Only what this replica heard itself is relayed on, once.
        let out = h.take_unrelayed();
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].0.as_str(), out[0].1), ("direct", 7));
        assert!(h.take_unrelayed().is_empty());
    }
}
