//! The four kinds Strait stores, and uniform access to any stored object's
//! kind and metadata, so the store, the watch and the CLI handle them alike.

use std::fmt;
use std::str::FromStr;

use crate::v1::{EndpointSlice, Node, Object, ObjectMeta, Pod, Service, object};

/// A resource kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    Pod,
    Node,
    EndpointSlice,
}

/// A kind name that names none of Strait's kinds.
#[derive(Debug)]
pub struct UnknownKind(pub String);

impl fmt::Display for UnknownKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the server doesn't have a resource type \"{}\" (known: services, pods, nodes, endpointslices)",
            self.0
        )
    }
}

impl std::error::Error for UnknownKind {}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Service, Kind::Pod, Kind::Node, Kind::EndpointSlice];

    /// The Kubernetes kind, as in a manifest's `kind:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Pod => "Pod",
            Kind::Node => "Node",
            Kind::EndpointSlice => "EndpointSlice",
        }
    }

    /// The apiVersion objects of this kind carry.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    /// The lower-case plural used in `kind/name` references (`service/web`).
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Pod => "pod",
            Kind::Node => "node",
            Kind::EndpointSlice => "endpointslice.discovery.k8s.io",
        }
    }

    /// Nodes are cluster-scoped; everything else lives in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Node)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = UnknownKind;

    /// Accepts the kind and kubectl's singular, plural and short names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "service" | "services" | "svc" => Ok(Kind::Service),
            "pod" | "pods" | "po" => Ok(Kind::Pod),
            "node" | "nodes" | "no" => Ok(Kind::Node),
            "endpointslice"
            | "endpointslices"
            | "endpointslice.discovery.k8s.io"
            | "endpointslices.discovery.k8s.io" => Ok(Kind::EndpointSlice),
            _ => Err(UnknownKind(s.to_string())),
        }
    }
}

impl Object {
    pub fn kind(&self) -> Option<Kind> {
        Some(match self.kind.as_ref()? {
            object::Kind::Service(_) => Kind::Service,
            object::Kind::Pod(_) => Kind::Pod,
            object::Kind::Node(_) => Kind::Node,
            object::Kind::EndpointSlice(_) => Kind::EndpointSlice,
        })
    }

    pub fn metadata(&self) -> Option<&ObjectMeta> {
        match self.kind.as_ref()? {
            object::Kind::Service(o) => o.metadata.as_ref(),
            object::Kind::Pod(o) => o.metadata.as_ref(),
            object::Kind::Node(o) => o.metadata.as_ref(),
            object::Kind::EndpointSlice(o) => o.metadata.as_ref(),
        }
    }

    /// The metadata, created empty if the object has none.
    pub fn metadata_mut(&mut self) -> Option<&mut ObjectMeta> {
        Some(match self.kind.as_mut()? {
            object::Kind::Service(o) => o.metadata.get_or_insert_default(),
            object::Kind::Pod(o) => o.metadata.get_or_insert_default(),
            object::Kind::Node(o) => o.metadata.get_or_insert_default(),
            object::Kind::EndpointSlice(o) => o.metadata.get_or_insert_default(),
        })
    }

    /// Name, or "" when the object has no metadata.
    pub fn name(&self) -> &str {
        self.metadata().map(|m| m.name.as_str()).unwrap_or("")
    }

    /// Namespace, or "" when the object has no metadata (or is a Node).
    pub fn namespace(&self) -> &str {
        self.metadata().map(|m| m.namespace.as_str()).unwrap_or("")
    }

    /// Sets `apiVersion` and `kind` to their canonical values.
    pub fn set_type_meta(&mut self) {
        let Some(kind) = self.kind() else { return };
        let (api, k) = match self.kind.as_mut() {
            Some(object::Kind::Service(o)) => (&mut o.api_version, &mut o.kind),
            Some(object::Kind::Pod(o)) => (&mut o.api_version, &mut o.kind),
            Some(object::Kind::Node(o)) => (&mut o.api_version, &mut o.kind),
            Some(object::Kind::EndpointSlice(o)) => (&mut o.api_version, &mut o.kind),
            None => return,
        };
        *api = kind.api_version().to_string();
        *k = kind.as_str().to_string();
    }

    /// The object as Kubernetes JSON (the manifest form).
    pub fn to_json(&self) -> serde_json::Value {
        let v = match self.kind.as_ref() {
            Some(object::Kind::Service(o)) => serde_json::to_value(o),
            Some(object::Kind::Pod(o)) => serde_json::to_value(o),
            Some(object::Kind::Node(o)) => serde_json::to_value(o),
            Some(object::Kind::EndpointSlice(o)) => serde_json::to_value(o),
            None => return serde_json::Value::Null,
        };
        v.unwrap_or(serde_json::Value::Null)
    }
}

impl From<Service> for Object {
    fn from(o: Service) -> Self {
        Object {
            kind: Some(object::Kind::Service(o)),
        }
    }
}

impl From<Pod> for Object {
    fn from(o: Pod) -> Self {
        Object {
            kind: Some(object::Kind::Pod(o)),
        }
    }
}

impl From<Node> for Object {
    fn from(o: Node) -> Self {
        Object {
            kind: Some(object::Kind::Node(o)),
        }
    }
}

impl From<EndpointSlice> for Object {
    fn from(o: EndpointSlice) -> Self {
        Object {
            kind: Some(object::Kind::EndpointSlice(o)),
        }
    }
}
