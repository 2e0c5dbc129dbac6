//! The replicated state: every stored object, the revision, and the
//! allocators derived from them. `apply` carries out a write and everything
//! it implies (defaulting, validation, allocation, EndpointSlice
//! re-derivation) in one revision; it is deterministic, so every replica
//! that applies the same log reaches the same state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;
use serde::{Deserialize, Serialize};
use strait_proto::Kind;
use strait_proto::v1::{EndpointSlice, EventType, Node, Object, Pod, object};

use crate::alloc::fnv1a;
use crate::endpoints::{self, MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL};
use crate::field::{self, Errors, FieldError};
use crate::objects;
use crate::service::{self, Allocators};

/// Largest object accepted (etcd's default request limit is 1.5 MiB).
pub const MAX_OBJECT_BYTES: usize = 1 << 20;

/// A write, as it travels through the Raft log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Command {
    /// Create or update; `object` is a prost-encoded `Object`.
    Apply {
        #[serde(with = "base64_bytes")]
        object: Vec<u8>,
        now_unix_nanos: i64,
    },
    /// Delete, optionally only at a given resourceVersion. A Pod is first
    /// marked terminating for its grace period (`grace_seconds` overrides
    /// `terminationGracePeriodSeconds`; 0 removes it at once).
    Delete {
        kind: String,
        namespace: String,
        name: String,
        resource_version: String,
        now_unix_nanos: i64,
        #[serde(default)]
        grace_seconds: Option<i64>,
    },
}

/// Object bytes in Raft log entries and messages: raw bytes in binary
/// formats (postcard, the log and the wire), base64 in JSON (a JSON array of
/// numbers would be ~3.5 times larger).
mod base64_bytes {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&STANDARD.encode(bytes))
        } else {
            s.serialize_bytes(bytes)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        if !d.is_human_readable() {
            return <serde_bytes_buf::Buf>::deserialize(d).map(|b| b.0);
        }
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }

    /// `Vec<u8>` deserialized from serde bytes (serde's own `Vec<u8>` impl
    /// expects a sequence).
    mod serde_bytes_buf {
        use std::fmt;

        use serde::de::{Deserialize, Deserializer, Error, Visitor};

        pub struct Buf(pub Vec<u8>);

        impl<'de> Deserialize<'de> for Buf {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = Buf;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("bytes")
                    }
                    fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Buf, E> {
                        Ok(Buf(v.to_vec()))
                    }
                    fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Buf, E> {
                        Ok(Buf(v))
                    }
                }
                d.deserialize_byte_buf(V)
            }
        }
    }
}

/// A write's result, as the state machine answers it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Outcome {
    /// prost-encoded `Object` as stored (or as it was, for a delete).
    #[serde(with = "base64_bytes")]
    pub object: Vec<u8>,
    /// kubectl's word: created, configured, unchanged, deleted.
    pub result: String,
    pub revision: u64,
}

/// Why a request was refused, in the apiserver's words.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Field validation failed (HTTP 422).
    #[error("The {kind} {name:?} is invalid: {}", field::aggregate(errors))]
    Invalid {
        kind: String,
        name: String,
        errors: Vec<FieldError>,
    },
    /// Optimistic concurrency failed (HTTP 409).
    #[error("Operation cannot be fulfilled on {resource} {name:?}: {reason}")]
    Conflict {
        resource: String,
        name: String,
        reason: String,
    },
    /// No such object (HTTP 404).
    #[error("{resource} {name:?} not found")]
    NotFound { resource: String, name: String },
    /// The object is over the size limit (HTTP 413).
    #[error("Request entity too large: {kind} {name:?} is {size} bytes, limit is {limit}")]
    TooLarge {
        kind: String,
        name: String,
        size: usize,
        limit: usize,
    },
    /// The writer may not change this object (HTTP 403).
    #[error("{resource} {name:?} is forbidden: {reason}")]
    Forbidden {
        resource: String,
        name: String,
        reason: String,
    },
    /// The request itself is malformed (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
}

/// The plural resource name used in error messages (`services "web" not found`).
pub fn plural(kind: Kind) -> &'static str {
    match kind {
        Kind::Service => "services",
        Kind::Pod => "pods",
        Kind::Node => "nodes",
        Kind::EndpointSlice => "endpointslices.discovery.k8s.io",
    }
}

/// One change inside a revision.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub event: EventType,
    pub object: Object,
}

/// What `apply` did: the answer, and the changes to publish to watchers.
#[derive(Debug)]
pub struct Applied {
    pub outcome: Result<Outcome, ApiError>,
    pub changes: Vec<Change>,
}

type Key = (String, String);

/// Every stored object, by kind and then namespace and name. The maps are
/// persistent (`imbl`): a copy costs O(1) and shares structure with the
/// original, so a snapshot can be encoded from a copy on another thread
/// while applies go on.
#[derive(Debug, Clone, Default)]
pub struct Objects(BTreeMap<Kind, imbl::OrdMap<Key, Arc<Object>>>);

impl Objects {
    fn get(&self, kind: Kind, key: &Key) -> Option<&Object> {
        self.0.get(&kind)?.get(key).map(|o| &**o)
    }

    fn insert(&mut self, kind: Kind, key: Key, o: Object) {
        self.0.entry(kind).or_default().insert(key, Arc::new(o));
    }

    fn remove(&mut self, kind: Kind, key: &Key) {
        if let Some(m) = self.0.get_mut(&kind) {
            m.remove(key);
        }
    }

    /// Objects of `kind`, or of every kind when `None`.
    fn iter(&self, kind: Option<Kind>) -> impl Iterator<Item = &Object> {
        self.0
            .iter()
            .filter(move |(k, _)| kind.is_none_or(|want| **k == want))
            .flat_map(|(_, m)| m.values().map(|o| &**o))
    }

    /// Encodes these objects at `revision` for a Raft snapshot: a
    /// `ListResponse`, written field by field so no object is copied.
    pub fn encode(&self, revision: u64) -> Vec<u8> {
        use prost::encoding::{message, uint64};
        let mut buf = Vec::new();
        for o in self.iter(None) {
            message::encode(1, o, &mut buf);
        }
        if revision != 0 {
            uint64::encode(2, &revision, &mut buf);
        }
        buf
    }
}

/// Every stored object plus derived indexes.
#[derive(Debug, Clone)]
pub struct State {
    objects: Objects,
    revision: u64,
    alloc: Allocators,
}

fn rfc3339(unix_nanos: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(u64::try_from(unix_nanos).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Current wall-clock time, for a leader stamping a command.
pub fn now_unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn key_of(o: &Object) -> Key {
    (o.namespace().to_string(), o.name().to_string())
}

/// The object without the fields the server stamps, to tell "unchanged".
fn comparable(o: &Object) -> Object {
    let mut c = o.clone();
    if let Some(m) = c.metadata_mut() {
        m.resource_version.clear();
        m.creation_timestamp.clear();
        m.uid.clear();
        m.generation = 0;
    }
    c
}

impl State {
    pub fn new(alloc: Allocators) -> Self {
        Self {
            objects: Objects::default(),
            revision: 0,
            alloc,
        }
    }

    /// The revision of the last change.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn allocators(&self) -> &Allocators {
        &self.alloc
    }

    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<&Object> {
        self.objects
            .get(kind, &(namespace.to_string(), name.to_string()))
    }

    /// Objects of `kind` (all kinds when None) in `namespace` ("" = all).
    pub fn list<'a>(
        &'a self,
        kind: Option<Kind>,
        namespace: &'a str,
    ) -> impl Iterator<Item = &'a Object> + 'a {
        self.objects
            .iter(kind)
            .filter(move |o| namespace.is_empty() || o.namespace() == namespace)
    }

    pub fn count(&self, kind: Kind) -> usize {
        self.objects.0.get(&kind).map_or(0, imbl::OrdMap::len)
    }

    // ---- snapshots ----

    /// An O(1) copy of every object and the revision they are at, for a
    /// snapshot encoded away from the state machine (`Objects::encode`).
    pub fn snapshot(&self) -> (Objects, u64) {
        (self.objects.clone(), self.revision)
    }

    /// Rebuilds a state (allocators included) from `Objects::encode`'s output.
    pub fn decode(bytes: &[u8], alloc: Allocators) -> Result<Self, prost::DecodeError> {
        let snap = strait_proto::v1::ListResponse::decode(bytes)?;
        let mut s = State::new(alloc);
        s.revision = snap.revision;
        for o in snap.items {
            if let Some(kind) = o.kind() {
                if let Some(object::Kind::Service(svc)) = &o.kind {
                    let held = service::held(svc);
                    s.reserve(&held);
                }
                s.objects.insert(kind, key_of(&o), o);
            }
        }
        Ok(s)
    }

    fn reserve(&mut self, h: &service::Held) {
        if let Some(ip) = h.cluster_ip {
            self.alloc.cluster_ips.reserve(ip);
        }
        for p in &h.node_ports {
            self.alloc.node_ports.reserve(*p);
        }
        if let Some(ip) = h.lb_ip {
            self.alloc.lb_ips.reserve(ip);
        }
    }

    fn release(&mut self, h: &service::Held) {
        if let Some(ip) = h.cluster_ip {
            self.alloc.cluster_ips.release(ip);
        }
        for p in &h.node_ports {
            self.alloc.node_ports.release(*p);
        }
        if let Some(ip) = h.lb_ip {
            self.alloc.lb_ips.release(ip);
        }
    }

    // ---- writes ----

    /// Rules a write must pass before it is proposed that are not part of
    /// the replicated apply. An entry must apply on every replica, and on
    /// every replay of the log, as it did when it was acknowledged, so a
    /// rule added after entries may have been written without it is
    /// checked here, at the API, and not in [`State::apply`]. Today: the
    /// annotation rules (qualified-name keys, 256 KiB in all).
    pub fn admit(o: &Object) -> Result<(), ApiError> {
        let (Some(kind), Some(meta)) = (o.kind(), o.metadata()) else {
            return Ok(()); // the apply's own checks name what is missing
        };
        let mut errs = Errors::default();
        field::annotations(&mut errs, "metadata.annotations", &meta.annotations);
        if errs.is_empty() {
            return Ok(());
        }
        Err(ApiError::Invalid {
            kind: kind.to_string(),
            name: meta.name.clone(),
            errors: errs.0,
        })
    }

    /// Checks a command against the current state without changing it: the
    /// leader's dry run before proposing.
    pub fn check(&self, cmd: &Command) -> Result<(), ApiError> {
        match cmd {
            Command::Apply {
                object,
                now_unix_nanos,
            } => {
                let o = decode_object(object)?;
                self.plan_apply(o, *now_unix_nanos, self.revision + 1)
                    .map(|_| ())
            }
            Command::Delete { .. } => self.plan_delete(cmd).map(|_| ()),
        }
    }

    /// Applies a committed command at log index `index`.
    pub fn apply(&mut self, cmd: &Command, index: u64) -> Applied {
        let planned = match cmd {
            Command::Apply {
                object,
                now_unix_nanos,
            } => decode_object(object).and_then(|o| self.plan_apply(o, *now_unix_nanos, index)),
            Command::Delete { .. } => self.plan_delete(cmd),
        };
        let plan = match planned {
            Ok(p) => p,
            Err(e) => {
                return Applied {
                    outcome: Err(e),
                    changes: Vec::new(),
                };
            }
        };
        let result = plan.result;
        if !plan.changed {
            return Applied {
                outcome: Ok(Outcome {
                    object: plan.object.encode_to_vec(),
                    result: result.into(),
                    revision: self.revision,
                }),
                changes: Vec::new(),
            };
        }
        let changes = self.commit(plan, index);
        Applied {
            outcome: Ok(Outcome {
                object: changes
                    .first()
                    .map(|c| c.object.encode_to_vec())
                    .unwrap_or_default(),
                result: result.into(),
                revision: index,
            }),
            changes,
        }
    }

    fn plan_apply(&self, mut o: Object, now: i64, index: u64) -> Result<Plan, ApiError> {
        let kind = o
            .kind()
            .ok_or_else(|| ApiError::BadRequest("object has no kind".into()))?;
        let size = o.encoded_len();
        if size > MAX_OBJECT_BYTES {
            return Err(ApiError::TooLarge {
                kind: kind.to_string(),
                name: o.name().to_string(),
                size,
                limit: MAX_OBJECT_BYTES,
            });
        }
        o.set_type_meta();
        let meta = o
            .metadata_mut()
            .ok_or_else(|| ApiError::BadRequest("object has no kind".into()))?;
        let mut errs = Errors::default();
        if kind.namespaced() {
            if meta.namespace.is_empty() {
                meta.namespace = "default".into();
            }
            for e in field::dns1123_label(&meta.namespace) {
                errs.invalid("metadata.namespace", &meta.namespace, e);
            }
        } else {
            meta.namespace.clear();
        }
        if meta.name.is_empty() {
            errs.required("metadata.name", "name or generateName is required");
        } else {
            let problems = match kind {
                Kind::Service => field::dns1035_label(&meta.name),
                _ => field::dns1123_subdomain(&meta.name),
            };
            for e in problems {
                errs.invalid("metadata.name", &meta.name, e);
            }
        }
        field::labels(&mut errs, "metadata.labels", &meta.labels);
        let name = meta.name.clone();
        let rv = meta.resource_version.clone();
        let invalid = |errs: Errors| ApiError::Invalid {
            kind: kind.to_string(),
            name: name.clone(),
            errors: errs.0,
        };
        if !errs.is_empty() {
            return Err(invalid(errs));
        }
        let old = self.get(kind, o.namespace(), &name);
        if !rv.is_empty()
            && old.map(|x| x.metadata().map(|m| m.resource_version.as_str()))
                != Some(Some(rv.as_str()))
        {
            return Err(ApiError::Conflict {
                resource: plural(kind).into(),
                name,
                reason: "the object has been modified; please apply your changes to the latest version and try again".into(),
            });
        }
        // Kind-specific defaulting, validation and allocation.
        o = match (o.kind, old.and_then(|x| x.kind.as_ref())) {
            (Some(object::Kind::Service(svc)), old) => {
                let old = match old {
                    Some(object::Kind::Service(s)) => Some(s),
                    _ => None,
                };
                service::plan(svc, old, &self.alloc)
                    .map_err(invalid)?
                    .into()
            }
            (Some(object::Kind::Pod(mut pod)), old) => {
                let old = match old {
                    Some(object::Kind::Pod(p)) => Some(p),
                    _ => None,
                };
                objects::default_pod(&mut pod, old);
                objects::validate_pod(&pod, &mut errs);
                if let (Some(old), Some(new)) =
                    (old.and_then(|p| p.spec.as_ref()), pod.spec.as_ref())
                    && !old.node_name.is_empty()
                    && old.node_name != new.node_name
                {
                    errs.invalid("spec.nodeName", &new.node_name, "field is immutable");
                }
                pod.into()
            }
            (Some(object::Kind::Node(mut node)), old) => {
                if node.status.is_none()
                    && let Some(object::Kind::Node(n)) = old
                {
                    node.status = n.status.clone();
                }
                objects::validate_node(&node, &mut errs);
                node.into()
            }
            (Some(object::Kind::EndpointSlice(slice)), _) => {
                objects::validate_slice(&slice, &mut errs);
                self.check_slice_owner(&slice)?;
                slice.into()
            }
            (None, _) => return Err(ApiError::BadRequest("object has no kind".into())),
        };
        if !errs.is_empty() {
            return Err(invalid(errs));
        }
        let meta = o
            .metadata_mut()
            .ok_or_else(|| ApiError::BadRequest("object has no kind".into()))?;
        match old.and_then(|x| x.metadata()) {
            Some(prev) => {
                meta.uid = prev.uid.clone();
                meta.creation_timestamp = prev.creation_timestamp.clone();
                meta.generation = prev.generation;
            }
            None => {
                meta.uid = uid(kind, &meta.namespace, &meta.name, index);
                meta.creation_timestamp = rfc3339(now);
                meta.generation = 1;
            }
        }
        let changed = old.is_none_or(|x| comparable(x) != comparable(&o));
        let result = match (old, changed) {
            (None, _) => "created",
            (Some(_), true) => "configured",
            (Some(_), false) => "unchanged",
        };
        if !changed {
            return Ok(Plan {
                object: old.cloned().unwrap_or(o),
                now,
                result,
                changed,
                delete: false,
                old: None,
            });
        }
        if old.is_some()
            && let Some(m) = o.metadata_mut()
        {
            m.generation += 1;
        }
        Ok(Plan {
            object: o,
            now,
            result,
            changed,
            delete: false,
            old: old.cloned(),
        })
    }

    /// Operators may write slices only for Services without a selector.
    fn check_slice_owner(&self, slice: &EndpointSlice) -> Result<(), ApiError> {
        let meta = slice.metadata.clone().unwrap_or_default();
        let forbidden = |reason: String| ApiError::Forbidden {
            resource: plural(Kind::EndpointSlice).into(),
            name: meta.name.clone(),
            reason,
        };
        if meta.labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY) {
            return Err(forbidden(format!(
                "{MANAGED_BY_LABEL}={MANAGED_BY} is reserved for slices Strait derives"
            )));
        }
        let Some(svc_name) = meta.labels.get(SERVICE_NAME_LABEL) else {
            return Ok(());
        };
        let ns = if meta.namespace.is_empty() {
            "default"
        } else {
            meta.namespace.as_str()
        };
        if let Some(Object {
            kind: Some(object::Kind::Service(svc)),
        }) = self.get(Kind::Service, ns, svc_name)
            && svc.spec.as_ref().is_some_and(|s| !s.selector.is_empty())
        {
            return Err(forbidden(format!(
                "Service {svc_name:?} has a selector, so its EndpointSlices are derived from its Pods"
            )));
        }
        Ok(())
    }

    fn plan_delete(&self, cmd: &Command) -> Result<Plan, ApiError> {
        let Command::Delete {
            kind,
            namespace,
            name,
            resource_version: rv,
            now_unix_nanos: now,
            grace_seconds,
        } = cmd
        else {
            return Err(ApiError::BadRequest("not a delete".into()));
        };
        let (now, name) = (*now, name.as_str());
        let kind: Kind = kind
            .parse()
            .map_err(|e: strait_proto::UnknownKind| ApiError::BadRequest(e.to_string()))?;
        let ns = if kind.namespaced() && namespace.is_empty() {
            "default"
        } else {
            namespace
        };
        let ns = if kind.namespaced() { ns } else { "" };
        let old = self.get(kind, ns, name).ok_or_else(|| ApiError::NotFound {
            resource: plural(kind).into(),
            name: name.into(),
        })?;
        if !rv.is_empty() && old.metadata().map(|m| m.resource_version.as_str()) != Some(rv) {
            return Err(ApiError::Conflict {
                resource: plural(kind).into(),
                name: name.into(),
                reason: format!(
                    "the ResourceVersion in the precondition ({rv}) does not match the ResourceVersion in record. The object might have been modified"
                ),
            });
        }
        if let Some(object::Kind::EndpointSlice(s)) = &old.kind {
            let managed = s
                .metadata
                .as_ref()
                .and_then(|m| m.labels.get(MANAGED_BY_LABEL))
                .map(String::as_str)
                == Some(MANAGED_BY);
            if managed {
                return Err(ApiError::Forbidden {
                    resource: plural(kind).into(),
                    name: name.into(),
                    reason: "it is derived from its Service's Pods; delete the Service or the Pods instead".into(),
                });
            }
        }
        if let Some(object::Kind::Pod(pod)) = &old.kind {
            // Graceful termination: mark the Pod terminating (its endpoints
            // stop taking new connections) and let the leader remove it
            // when the grace period ends.
            let grace = grace_seconds
                .or_else(|| {
                    pod.spec
                        .as_ref()
                        .and_then(|s| s.termination_grace_period_seconds)
                })
                .unwrap_or(30)
                .max(0);
            let meta = pod.metadata.clone().unwrap_or_default();
            let terminating = !meta.deletion_timestamp.is_empty();
            if grace > 0 && terminating {
                return Ok(Plan {
                    object: old.clone(),
                    now,
                    result: "deleted",
                    changed: false,
                    delete: false,
                    old: None,
                });
            }
            if grace > 0 {
                let mut marked = pod.clone();
                let m = marked.metadata.get_or_insert_default();
                m.deletion_timestamp =
                    rfc3339(now.saturating_add(grace.saturating_mul(1_000_000_000)));
                m.deletion_grace_period_seconds = Some(grace);
                return Ok(Plan {
                    object: marked.into(),
                    now,
                    result: "deleted",
                    changed: true,
                    delete: false,
                    old: Some(old.clone()),
                });
            }
        }
        Ok(Plan {
            object: old.clone(),
            now,
            result: "deleted",
            changed: true,
            delete: true,
            old: Some(old.clone()),
        })
    }

    /// Pods whose grace period ended by `now`: the leader removes them.
    pub fn expired_pods(&self, now_unix_nanos: i64) -> Vec<(String, String)> {
        let now = UNIX_EPOCH + Duration::from_nanos(u64::try_from(now_unix_nanos).unwrap_or(0));
        self.list(Some(Kind::Pod), "")
            .filter_map(|o| {
                let m = o.metadata()?;
                let at = humantime::parse_rfc3339(&m.deletion_timestamp).ok()?;
                (at <= now).then(|| (m.namespace.clone(), m.name.clone()))
            })
            .collect()
    }

    /// Makes a checked plan real: store, allocators, derived slices, events.
    fn commit(&mut self, plan: Plan, index: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        let mut o = plan.object;
        let Some(kind) = o.kind() else { return changes };
        let key = key_of(&o);
        if let Some(object::Kind::Service(old)) = plan.old.as_ref().and_then(|x| x.kind.as_ref()) {
            let h = service::held(old);
            self.release(&h);
        }
        let mut affected: BTreeSet<Key> = BTreeSet::new();
        let mut namespaces_with_node_change = false;
        if plan.delete {
            self.objects.remove(kind, &key);
            changes.push(Change {
                event: EventType::Deleted,
                object: o,
            });
        } else {
            if let Some(m) = o.metadata_mut() {
                m.resource_version = index.to_string();
            }
            if let Some(object::Kind::Service(svc)) = &o.kind {
                let h = service::held(svc);
                self.reserve(&h);
            }
            let event = if plan.old.is_some() {
                EventType::Modified
            } else {
                EventType::Added
            };
            self.objects.insert(kind, key.clone(), o.clone());
            changes.push(Change { event, object: o });
        }
        // The object itself is the first change, in both branches.
        let o = &changes[0].object;
        match kind {
            Kind::Service => {
                affected.insert(key.clone());
            }
            Kind::Pod => {
                for p in [plan.old.as_ref(), (!plan.delete).then_some(o)]
                    .into_iter()
                    .flatten()
                {
                    affected.extend(self.services_selecting(p));
                }
            }
            Kind::Node => namespaces_with_node_change = true,
            Kind::EndpointSlice => {}
        }
        if namespaces_with_node_change {
            let node = o.name().to_string();
            let pods: Vec<Object> = self
                .list(Some(Kind::Pod), "")
                .filter(|p| matches!(&p.kind, Some(object::Kind::Pod(pod)) if pod.spec.as_ref().is_some_and(|s| s.node_name == node)))
                .cloned()
                .collect();
            for p in &pods {
                affected.extend(self.services_selecting(p));
            }
        }
        for (ns, name) in affected {
            changes.extend(self.reconcile_slices(&ns, &name, index, plan.now));
        }
        self.revision = index;
        changes
    }

    fn services_selecting(&self, pod: &Object) -> Vec<Key> {
        let Some(object::Kind::Pod(p)) = &pod.kind else {
            return Vec::new();
        };
        let labels = p
            .metadata
            .as_ref()
            .map(|m| m.labels.clone())
            .unwrap_or_default();
        self.list(Some(Kind::Service), pod.namespace())
            .filter_map(|o| match &o.kind {
                Some(object::Kind::Service(s))
                    if s.spec
                        .as_ref()
                        .is_some_and(|sp| endpoints::selects(&sp.selector, &labels)) =>
                {
                    Some(key_of(o))
                }
                _ => None,
            })
            .collect()
    }

    /// Brings the derived slices of one Service in line with its Pods.
    fn reconcile_slices(&mut self, ns: &str, name: &str, index: u64, now: i64) -> Vec<Change> {
        let want: Vec<EndpointSlice> = match self.get(Kind::Service, ns, name) {
            Some(Object {
                kind: Some(object::Kind::Service(svc)),
            }) => {
                let pods: Vec<&Pod> = self
                    .list(Some(Kind::Pod), ns)
                    .filter_map(|o| match &o.kind {
                        Some(object::Kind::Pod(p)) => Some(p),
                        _ => None,
                    })
                    .collect();
                let nodes: BTreeMap<String, &Node> = self
                    .list(Some(Kind::Node), "")
                    .filter_map(|o| match &o.kind {
                        Some(object::Kind::Node(n)) => Some((o.name().to_string(), n)),
                        _ => None,
                    })
                    .collect();
                endpoints::derive(svc, &pods, &nodes)
            }
            _ => Vec::new(),
        };
        let have: Vec<Object> = self
            .list(Some(Kind::EndpointSlice), ns)
            .filter(|o| {
                let labels = o.metadata().map(|m| &m.labels);
                labels
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    .map(String::as_str)
                    == Some(name)
                    && labels
                        .and_then(|l| l.get(MANAGED_BY_LABEL))
                        .map(String::as_str)
                        == Some(MANAGED_BY)
            })
            .cloned()
            .collect();
        let mut changes = Vec::new();
        let wanted: BTreeSet<String> = want
            .iter()
            .filter_map(|s| s.metadata.as_ref().map(|m| m.name.clone()))
            .collect();
        for stale in have.iter().filter(|o| !wanted.contains(o.name())) {
            self.objects.remove(Kind::EndpointSlice, &key_of(stale));
            changes.push(Change {
                event: EventType::Deleted,
                object: stale.clone(),
            });
        }
        for slice in want {
            let mut o: Object = slice.into();
            let existing = self.get(Kind::EndpointSlice, ns, o.name()).cloned();
            if let Some(prev) = &existing {
                let mut cmp = o.clone();
                if let (Some(m), Some(pm)) = (cmp.metadata_mut(), prev.metadata()) {
                    m.uid = pm.uid.clone();
                    m.creation_timestamp = pm.creation_timestamp.clone();
                    m.generation = pm.generation;
                }
                if comparable(&cmp) == comparable(prev) {
                    continue;
                }
            }
            if let Some(m) = o.metadata_mut() {
                match existing.as_ref().and_then(|p| p.metadata()) {
                    Some(pm) => {
                        m.uid = pm.uid.clone();
                        m.creation_timestamp = pm.creation_timestamp.clone();
                        m.generation = pm.generation + 1;
                    }
                    None => {
                        m.uid = uid(Kind::EndpointSlice, ns, &m.name, index);
                        m.creation_timestamp = rfc3339(now);
                        m.generation = 1;
                    }
                }
                m.resource_version = index.to_string();
            }
            let event = if existing.is_some() {
                EventType::Modified
            } else {
                EventType::Added
            };
            self.objects
                .insert(Kind::EndpointSlice, key_of(&o), o.clone());
            changes.push(Change { event, object: o });
        }
        changes
    }
}

struct Plan {
    object: Object,
    now: i64,
    result: &'static str,
    changed: bool,
    delete: bool,
    old: Option<Object>,
}

fn decode_object(bytes: &[u8]) -> Result<Object, ApiError> {
    Object::decode(bytes).map_err(|e| ApiError::BadRequest(format!("undecodable object: {e}")))
}

/// A stable unique id: replicas must agree, so no randomness.
fn uid(kind: Kind, ns: &str, name: &str, index: u64) -> String {
    let a = fnv1a(format!("{kind}/{ns}/{name}").as_bytes());
    let b = fnv1a(&index.to_le_bytes());
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use strait_proto::Kind;

    use super::{Command, State};
    use crate::service::tests::alloc;

    fn apply_service(state: &mut State, name: &str, index: u64) {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports:\n  - port: 80\n"
        );
        let object = strait_proto::manifest::parse(&yaml)
            .expect("manifest")
            .remove(0);
        let cmd = Command::Apply {
            object: object.encode_to_vec(),
            now_unix_nanos: 1_000,
        };
        let applied = state.apply(&cmd, index);
        assert!(applied.outcome.is_ok(), "{:?}", applied.outcome);
    }

    #[test]
    fn a_snapshot_is_a_point_in_time_copy_that_decodes_to_the_same_state() {
        let mut state = State::new(alloc());
        apply_service(&mut state, "a", 1);
        apply_service(&mut state, "b", 2);
        let (objects, revision) = state.snapshot();
        // Writes after the copy do not reach it.
        apply_service(&mut state, "c", 3);

        let bytes = objects.encode(revision);
        let list = strait_proto::v1::ListResponse::decode(bytes.as_slice()).expect("list");
        assert_eq!(list.revision, 2);
        let names: Vec<&str> = list.items.iter().map(|o| o.name()).collect();
        assert_eq!(names, ["a", "b"]);

        let restored = State::decode(&bytes, alloc()).expect("decode");
        assert_eq!(restored.revision(), 2);
        assert_eq!(restored.count(Kind::Service), 2);
        assert!(restored.get(Kind::Service, "default", "c").is_none());
        let ip = |s: &State, name: &str| {
            let svc = s.get(Kind::Service, "default", name).expect("service");
            match &svc.kind {
                Some(strait_proto::v1::object::Kind::Service(svc)) => {
                    svc.spec.as_ref().expect("spec").cluster_ip.clone()
                }
                _ => panic!("not a Service"),
            }
        };
        assert_eq!(ip(&restored, "a"), ip(&state, "a"));
        // The allocators were rebuilt from the snapshot: a new Service
        // gets an address none of the restored ones holds.
        let mut restored = restored;
        apply_service(&mut restored, "d", 3);
        let d = ip(&restored, "d");
        assert!(d != ip(&restored, "a") && d != ip(&restored, "b"), "{d}");
    }
}
