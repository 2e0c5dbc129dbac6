//! Authorization by role, from the caller's verified SPIFFE identity:
//!
//! - `RaftPeersOnly`: only control identities call the `Raft` service
//!   (replication, votes, snapshots, forwarded writes).
//! - `AdminWrites`: admins (and control replicas) write any object and
//!   change the membership.
//! - `NodeRestriction` (Kubernetes' admission rule of that name): a node
//!   reads and watches everything, writes its own Node object, changes only
//!   the status of Pods bound to it, and creates or deletes only its own
//!   static (mirror) Pods; it heartbeats only as itself.
//!
//! The checks are pure functions of the identity, the object written and
//! the object stored; the API calls them at the replica that received the
//! client's call, before a write is forwarded to the leader (the forwarding
//! replica is a control identity). A refusal is a `PermissionDenied` naming
//! the identity and the rule, and is logged.

use std::fmt;

use strait_proto::Kind;
use strait_proto::tls::{Identity, Role};
use strait_proto::v1::{Object, object};
use tonic::{Request, Status};

use crate::tls::PeerInfo;

/// Kubernetes' annotation marking a static Pod's API mirror.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Who made a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A plaintext server (`--insecure`, `strait dev`): no identity, no checks.
    Insecure,
    /// A verified certificate's identity.
    Peer(Identity),
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Insecure => f.write_str("insecure client"),
            Caller::Peer(id) => id.fmt(f),
        }
    }
}

impl Caller {
    /// The caller of `req`, from the connection's [`PeerInfo`]. A request
    /// that did not come through the server's accept loop is refused.
    pub fn of<T>(req: &Request<T>) -> Result<Caller, Status> {
        match req.extensions().get::<PeerInfo>() {
            Some(PeerInfo {
                identity: Some(id), ..
            }) => Ok(Caller::Peer(id.clone())),
            Some(PeerInfo { identity: None, .. }) => Ok(Caller::Insecure),
            None => Err(Status::unauthenticated("no connection identity")),
        }
    }

    /// The node name, when the caller is a node.
    pub fn node(&self) -> Option<&str> {
        match self {
            Caller::Peer(id) if id.role == Role::Node => Some(&id.name),
            _ => None,
        }
    }
}

/// A refused request: who, which rule, and what was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{identity} may not {what}: {rule}: {explanation}")]
pub struct Denied {
    pub identity: String,
    pub rule: &'static str,
    pub what: String,
    pub explanation: &'static str,
}

impl Denied {
    /// Logs the refusal and turns it into the status the caller sees.
    pub fn status(self, method: &str) -> Status {
        tracing::warn!(
            identity = %self.identity,
            rule = self.rule,
            method,
            what = %self.what,
            "request refused"
        );
        Status::permission_denied(self.to_string())
    }
}

pub const RAFT_PEERS_ONLY: &str = "RaftPeersOnly";
pub const ADMIN_WRITES: &str = "AdminWrites";
pub const NODE_RESTRICTION: &str = "NodeRestriction";

fn deny(caller: &Caller, rule: &'static str, what: String, explanation: &'static str) -> Denied {
    Denied {
        identity: caller.to_string(),
        rule,
        what,
        explanation,
    }
}

fn role(caller: &Caller) -> Option<Role> {
    match caller {
        Caller::Insecure => None,
        Caller::Peer(id) => Some(id.role),
    }
}

/// `RaftPeersOnly`.
pub fn raft(caller: &Caller, method: &str) -> Result<(), Denied> {
    match role(caller) {
        None | Some(Role::Control) => Ok(()),
        Some(_) => Err(deny(
            caller,
            RAFT_PEERS_ONLY,
            format!("call Raft {method}"),
            "only control-plane replicas may call the Raft service",
        )),
    }
}

/// `AdminWrites` for membership changes.
pub fn membership(caller: &Caller) -> Result<(), Denied> {
    match role(caller) {
        None | Some(Role::Control) | Some(Role::Admin) => Ok(()),
        Some(Role::Node) => Err(deny(
            caller,
            ADMIN_WRITES,
            "change the cluster membership".into(),
            "only admins change the membership",
        )),
    }
}

/// `NodeRestriction` for heartbeats: a node reports only itself.
pub fn heartbeat(caller: &Caller, node_name: &str) -> Result<(), Denied> {
    match caller.node() {
        Some(me) if me != node_name => Err(deny(
            caller,
            NODE_RESTRICTION,
            format!("heartbeat as node {node_name:?}"),
            "a node sends heartbeats only for itself",
        )),
        _ => Ok(()),
    }
}

fn describe(kind: Option<Kind>, namespace: &str, name: &str) -> String {
    match kind {
        Some(k) if k.namespaced() && namespace.is_empty() => format!("{k} default/{name}"),
        Some(k) if k.namespaced() => format!("{k} {namespace}/{name}"),
        Some(k) => format!("{k} {name}"),
        None => format!("object {name:?}"),
    }
}

fn pod(o: &Object) -> Option<&strait_proto::v1::Pod> {
    match &o.kind {
        Some(object::Kind::Pod(p)) => Some(p),
        _ => None,
    }
}

fn node_name_of(o: &Object) -> Option<&str> {
    pod(o)
        .and_then(|p| p.spec.as_ref())
        .map(|s| s.node_name.as_str())
}

fn is_mirror(o: &Object) -> bool {
    o.metadata()
        .is_some_and(|m| m.annotations.contains_key(MIRROR_ANNOTATION))
}

/// What a node may not change on a Pod bound to it: everything but its
/// status and server-managed metadata.
type PodFixed<'a> = (
    &'a strait_proto::v1::PodSpec,
    &'a std::collections::BTreeMap<String, String>,
    &'a std::collections::BTreeMap<String, String>,
);

fn pod_fixed(o: &Object) -> Option<PodFixed<'_>> {
    let p = pod(o)?;
    let meta = p.metadata.as_ref()?;
    Some((p.spec.as_ref()?, &meta.labels, &meta.annotations))
}

const NODE_WRITES: &str =
    "a node writes only its own Node object, the status of Pods bound to it and its static Pods";

/// `AdminWrites` / `NodeRestriction` for a create or update of `object`;
/// `stored` is the object as the replica has it now.
pub fn apply(caller: &Caller, object: &Object, stored: Option<&Object>) -> Result<(), Denied> {
    let Some(me) = caller.node() else {
        return Ok(());
    };
    let kind = object.kind();
    let what = || {
        format!(
            "write {}",
            describe(kind, object.namespace(), object.name())
        )
    };
    match kind {
        Some(Kind::Node) if object.name() == me => Ok(()),
        Some(Kind::Pod) => {
            if node_name_of(object) != Some(me) {
                return Err(deny(
                    caller,
                    NODE_RESTRICTION,
                    what(),
                    "the Pod is not bound to this node (spec.nodeName)",
                ));
            }
            match stored {
                None if is_mirror(object) => Ok(()),
                None => Err(deny(
                    caller,
                    NODE_RESTRICTION,
                    what(),
                    "a node creates only static Pods (annotated kubernetes.io/config.mirror) bound to itself",
                )),
                Some(old) if node_name_of(old) != Some(me) => Err(deny(
                    caller,
                    NODE_RESTRICTION,
                    what(),
                    "the stored Pod is bound to another node",
                )),
                Some(old) if is_mirror(old) && is_mirror(object) => Ok(()),
                Some(old) if pod_fixed(old) == pod_fixed(object) => Ok(()),
                Some(_) => Err(deny(
                    caller,
                    NODE_RESTRICTION,
                    what(),
                    "a node changes only the status of a Pod bound to it, not its spec, labels or annotations",
                )),
            }
        }
        _ => Err(deny(caller, NODE_RESTRICTION, what(), NODE_WRITES)),
    }
}

/// `AdminWrites` / `NodeRestriction` for a delete.
pub fn delete(
    caller: &Caller,
    kind: Kind,
    namespace: &str,
    name: &str,
    stored: Option<&Object>,
) -> Result<(), Denied> {
    let Some(me) = caller.node() else {
        return Ok(());
    };
    let what = || format!("delete {}", describe(Some(kind), namespace, name));
    match (kind, stored) {
        (Kind::Node, _) if name == me => Ok(()),
        (Kind::Pod, Some(old)) if node_name_of(old) == Some(me) && is_mirror(old) => Ok(()),
        (Kind::Pod, _) => Err(deny(
            caller,
            NODE_RESTRICTION,
            what(),
            "a node deletes only its own static Pods",
        )),
        _ => Err(deny(caller, NODE_RESTRICTION, what(), NODE_WRITES)),
    }
}

/// The interceptor in front of the `Raft` service.
pub fn raft_interceptor(req: Request<()>) -> Result<Request<()>, Status> {
    let caller = Caller::of(&req)?;
    raft(&caller, "service").map_err(|d| d.status("Raft"))?;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_proto::v1::{Node, ObjectMeta, Pod, PodSpec, PodStatus, Service};

    fn who(role: Role, name: &str) -> Caller {
        Caller::Peer(Identity::new("test.local", role, name).expect("identity"))
    }

    fn pod_on(name: &str, node: &str, mirror: bool) -> Object {
        let mut meta = ObjectMeta {
            name: name.into(),
            namespace: "default".into(),
            ..Default::default()
        };
        meta.labels.insert("app".into(), "web".into());
        if mirror {
            meta.annotations
                .insert(MIRROR_ANNOTATION.into(), "x".into());
        }
        Object::from(Pod {
            api_version: "v1".into(),
            kind: "Pod".into(),
            metadata: Some(meta),
            spec: Some(PodSpec {
                node_name: node.into(),
                ..Default::default()
            }),
            status: None,
        })
    }

    fn with_status(mut o: Object, ip: &str) -> Object {
        if let Some(object::Kind::Pod(p)) = &mut o.kind {
            p.status = Some(PodStatus {
                pod_ip: ip.into(),
                ..Default::default()
            });
        }
        o
    }

    fn node_obj(name: &str) -> Object {
        Object::from(Node {
            api_version: "v1".into(),
            kind: "Node".into(),
            metadata: Some(ObjectMeta {
                name: name.into(),
                ..Default::default()
            }),
            spec: None,
            status: None,
        })
    }

    fn service() -> Object {
        Object::from(Service {
            api_version: "v1".into(),
            kind: "Service".into(),
            metadata: Some(ObjectMeta {
                name: "web".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn raft_is_for_control_only() {
        assert!(raft(&who(Role::Control, "1"), "Vote").is_ok());
        assert!(raft(&Caller::Insecure, "Vote").is_ok());
        for r in [Role::Admin, Role::Node] {
            let d = raft(&who(r, "x"), "ForwardWrite").expect_err("refused");
            assert_eq!(d.rule, RAFT_PEERS_ONLY);
            assert!(d.to_string().contains("spiffe://test.local/"), "{d}");
        }
    }

    #[test]
    fn admins_write_anything() {
        let admin = who(Role::Admin, "alice");
        assert!(apply(&admin, &service(), None).is_ok());
        assert!(apply(&admin, &pod_on("p", "a", false), None).is_ok());
        assert!(delete(&admin, Kind::Service, "default", "web", None).is_ok());
        assert!(membership(&admin).is_ok());
        assert!(membership(&who(Role::Node, "a")).is_err());
    }

    #[test]
    fn node_restriction() {
        let a = who(Role::Node, "a");
        // Its own Node object only.
        assert!(apply(&a, &node_obj("a"), None).is_ok());
        let d = apply(&a, &node_obj("b"), None).expect_err("other node");
        assert_eq!(d.rule, NODE_RESTRICTION);
        assert!(d.to_string().contains("spiffe://test.local/node/a"), "{d}");
        // No Services.
        assert!(apply(&a, &service(), None).is_err());
        assert!(delete(&a, Kind::Service, "default", "web", None).is_err());
        // Status of a Pod bound to it, not its spec or labels.
        let stored = pod_on("p", "a", false);
        assert!(apply(&a, &with_status(stored.clone(), "10.0.0.1"), Some(&stored)).is_ok());
        let mut relabelled = stored.clone();
        if let Some(m) = relabelled.metadata_mut() {
            m.labels.insert("app".into(), "db".into());
        }
        assert!(apply(&a, &relabelled, Some(&stored)).is_err());
        // Not a Pod bound to node b, nor rebinding it.
        let b_pod = pod_on("q", "b", false);
        assert!(apply(&a, &with_status(b_pod.clone(), "10.0.0.2"), Some(&b_pod)).is_err());
        assert!(apply(&a, &pod_on("q", "a", false), Some(&b_pod)).is_err());
        // Creates and deletes only its own static Pods.
        assert!(apply(&a, &pod_on("s", "a", false), None).is_err());
        assert!(apply(&a, &pod_on("s", "a", true), None).is_ok());
        assert!(apply(&a, &pod_on("s", "b", true), None).is_err());
        let mirror = pod_on("s", "a", true);
        assert!(delete(&a, Kind::Pod, "default", "s", Some(&mirror)).is_ok());
        assert!(delete(&a, Kind::Pod, "default", "p", Some(&stored)).is_err());
        assert!(delete(&a, Kind::Pod, "default", "s", None).is_err());
        assert!(delete(&a, Kind::Node, "", "a", None).is_ok());
        assert!(delete(&a, Kind::Node, "", "b", None).is_err());
        // Heartbeats as itself.
        assert!(heartbeat(&a, "a").is_ok());
        assert!(heartbeat(&a, "b").is_err());
    }
}
