//! The node's view of the cluster: an immutable snapshot of Services and
//! their EndpointSlices, with each service port's endpoints already
//! resolved, so the forwarder answers "where does this connection go" with a
//! lookup. Only the watch client builds new snapshots; everyone else reads
//! the latest one from a `tokio::sync::watch` channel.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use strait_proto::v1::{
    EndpointSlice, EventType, ListResponse, Object, Service, ServicePort, WatchResponse, object,
};

/// The label tying an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Kubernetes' default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10800);

/// Errors applying a watch response.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An event without an object.
    #[error("revision {revision}: {event} event without an object")]
    MissingObject { revision: u64, event: &'static str },
    /// A change arrived before any full state it could apply to.
    #[error("revision {revision}: incremental change before the initial state")]
    NotSynced { revision: u64 },
}

/// A Service's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One backend of a service port, after slices were merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Takes new connections (already true for every endpoint when the
    /// Service sets `publishNotReadyAddresses`).
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
}

/// One TCP/UDP/SCTP port of a Service and where it leads.
#[derive(Debug, Clone)]
pub struct PortInfo {
    pub name: String,
    /// Upper-case, defaulted to `TCP`.
    pub protocol: String,
    pub port: u16,
    /// For NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
    /// Deduplicated across slices, sorted by address.
    pub endpoints: Arc<[Endpoint]>,
}

impl PortInfo {
    pub fn is_tcp(&self) -> bool {
        self.protocol == "TCP"
    }
}

/// One endpoint address of a Service as DNS sees it: deduplicated across
/// slices and ports (a headless Service may have no ports at all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointAddress {
    pub ip: IpAddr,
    /// From the slice's `endpoints[].hostname` (a Pod's `spec.hostname`
    /// when its `spec.subdomain` names the Service).
    pub hostname: Option<String>,
    /// Ready, or the Service publishes not-ready addresses.
    pub ready: bool,
}

/// The derived, forwarding-relevant view of one Service.
#[derive(Debug, Clone)]
pub struct ServiceInfo {
    pub key: ServiceKey,
    /// `ClusterIP` (default), `NodePort`, `LoadBalancer` or `ExternalName`.
    pub service_type: String,
    /// `None` for headless and ExternalName Services.
    pub cluster_ip: Option<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` (LoadBalancer only).
    pub lb_ips: Vec<IpAddr>,
    pub ports: Vec<PortInfo>,
    /// ClientIP affinity and its timeout.
    pub affinity: Option<Duration>,
    /// externalTrafficPolicy Local: NodePort/LB traffic to local endpoints only.
    pub external_local: bool,
    /// internalTrafficPolicy Local: ClusterIP traffic to local endpoints only.
    pub internal_local: bool,
    /// `clusterIPs` (both families when dual-stack); empty for headless and
    /// ExternalName Services.
    pub cluster_ips: Vec<IpAddr>,
    /// `clusterIP: None`: DNS answers with the endpoints themselves.
    pub headless: bool,
    /// ExternalName Services: the CNAME target, without a trailing dot.
    pub external_name: Option<String>,
    /// Every endpoint address across the Service's slices, sorted by IP.
    pub addresses: Arc<[EndpointAddress]>,
    /// `loadBalancerSourceRanges` (LoadBalancer only): when set, only
    /// clients inside one of them may connect through a LoadBalancer IP.
    pub source_ranges: Option<Arc<[IpNet]>>,
    /// `healthCheckNodePort` (LoadBalancer with externalTrafficPolicy Local).
    pub health_check_node_port: Option<u16>,
}

impl ServiceInfo {
    pub fn has_node_ports(&self) -> bool {
        matches!(self.service_type.as_str(), "NodePort" | "LoadBalancer")
    }

    /// Whether `client` may connect through a LoadBalancer IP.
    pub fn allows_source(&self, client: IpAddr) -> bool {
        self.source_ranges
            .as_ref()
            .is_none_or(|ranges| ranges.iter().any(|r| r.contains(&client)))
    }

    /// Ready endpoint addresses on node `node_name`, across all ports: the
    /// `localEndpoints` of kube-proxy's service health check.
    pub fn local_ready_endpoints(&self, node_name: &str) -> usize {
        let local: BTreeSet<IpAddr> = self
            .ports
            .iter()
            .flat_map(|p| p.endpoints.iter())
            .filter(|e| e.ready && e.node_name.as_deref() == Some(node_name))
            .map(|e| e.addr.ip())
            .collect();
        local.len()
    }
}

/// One immutable snapshot of the node's state.
#[derive(Debug, Clone, Default)]
pub struct NodeState {
    synced: bool,
    revision: u64,
    services: BTreeMap<ServiceKey, Arc<Service>>,
    /// By (namespace, slice name).
    slices: BTreeMap<(String, String), Arc<EndpointSlice>>,
    /// Slice names per Service, from the service-name label.
    slices_by_service: BTreeMap<ServiceKey, BTreeSet<String>>,
    derived: BTreeMap<ServiceKey, Arc<ServiceInfo>>,
}

impl NodeState {
    /// The placeholder before any full state arrived: not synced, so
    /// listeners keep waiting.
    pub fn unsynced() -> Self {
        Self::default()
    }

    /// A full state (a watch's initial response, the persisted file or a
    /// static manifest). Kinds other than Service and EndpointSlice are ignored.
    pub fn from_objects(objects: impl IntoIterator<Item = Object>, revision: u64) -> Self {
        let mut s = Self {
            synced: true,
            revision,
            ..Self::default()
        };
        let mut touched = BTreeSet::new();
        for o in objects {
            s.upsert(o, &mut touched);
        }
        s.rederive(touched);
        s
    }

    /// The state after one watch response: a replacement when `initial`,
    /// otherwise this state with the events applied.
    pub fn apply(&self, resp: &WatchResponse) -> Result<Self, StateError> {
        if resp.initial {
            let objects = resp.events.iter().filter_map(|e| e.object.clone());
            return Ok(Self::from_objects(objects, resp.revision));
        }
        if !self.synced {
            return Err(StateError::NotSynced {
                revision: resp.revision,
            });
        }
        let mut s = self.clone();
        s.revision = resp.revision.max(self.revision);
        let mut touched = BTreeSet::new();
        for ev in &resp.events {
            let kind = EventType::try_from(ev.r#type).unwrap_or(EventType::Modified);
            let Some(obj) = ev.object.clone() else {
                return Err(StateError::MissingObject {
                    revision: resp.revision,
                    event: kind.as_str_name(),
                });
            };
            match kind {
                EventType::Added | EventType::Modified => s.upsert(obj, &mut touched),
                EventType::Deleted => s.remove(&obj, &mut touched),
            }
        }
        s.rederive(touched);
        Ok(s)
    }

    /// Whether this is a full state (listeners wait for one).
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// The control-plane revision this state reflects (0 in static mode).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&Arc<ServiceInfo>> {
        self.derived.get(key)
    }

    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceInfo>> {
        self.derived.values()
    }

    /// The stored objects, as persisted to `state.pb`.
    pub fn to_list_response(&self) -> ListResponse {
        let services = self.services.values().map(|s| Object {
            kind: Some(object::Kind::Service(Service::clone(s))),
        });
        let slices = self.slices.values().map(|s| Object {
            kind: Some(object::Kind::EndpointSlice(EndpointSlice::clone(s))),
        });
        ListResponse {
            items: services.chain(slices).collect(),
            revision: self.revision,
        }
    }

    fn upsert(&mut self, obj: Object, touched: &mut BTreeSet<ServiceKey>) {
        match obj.kind {
            Some(object::Kind::Service(svc)) => {
                let key = service_key(&svc);
                touched.insert(key.clone());
                self.services.insert(key, Arc::new(svc));
            }
            Some(object::Kind::EndpointSlice(slice)) => {
                let (ns, name) = slice_id(&slice);
                self.unlink_slice(&ns, &name, touched);
                if let Some(owner) = slice_owner(&slice) {
                    self.slices_by_service
                        .entry(owner.clone())
                        .or_default()
                        .insert(name.clone());
                    touched.insert(owner);
                }
                self.slices.insert((ns, name), Arc::new(slice));
            }
            _ => {}
        }
    }

    fn remove(&mut self, obj: &Object, touched: &mut BTreeSet<ServiceKey>) {
        match &obj.kind {
            Some(object::Kind::Service(svc)) => {
                let key = service_key(svc);
                self.services.remove(&key);
                touched.insert(key);
            }
            Some(object::Kind::EndpointSlice(slice)) => {
                let (ns, name) = slice_id(slice);
                self.unlink_slice(&ns, &name, touched);
                self.slices.remove(&(ns, name));
            }
            _ => {}
        }
    }

    /// Forgets which Service a stored slice belonged to (its label may
    /// change or the slice may go).
    fn unlink_slice(&mut self, ns: &str, name: &str, touched: &mut BTreeSet<ServiceKey>) {
        let Some(old) = self.slices.get(&(ns.to_string(), name.to_string())) else {
            return;
        };
        let Some(owner) = slice_owner(old) else {
            return;
        };
        if let Some(set) = self.slices_by_service.get_mut(&owner) {
            set.remove(name);
            if set.is_empty() {
                self.slices_by_service.remove(&owner);
            }
        }
        touched.insert(owner);
    }

    fn rederive(&mut self, touched: BTreeSet<ServiceKey>) {
        for key in touched {
            match self.services.get(&key) {
                Some(svc) => {
                    let slices: Vec<&EndpointSlice> = self
                        .slices_by_service
                        .get(&key)
                        .into_iter()
                        .flatten()
                        .filter_map(|n| self.slices.get(&(key.namespace.clone(), n.clone())))
                        .map(|s| s.as_ref())
                        .collect();
                    let info = derive(key.clone(), svc, &slices);
                    self.derived.insert(key, Arc::new(info));
                }
                None => {
                    self.derived.remove(&key);
                }
            }
        }
    }
}

fn service_key(svc: &Service) -> ServiceKey {
    let meta = svc.metadata.as_ref();
    ServiceKey::new(
        namespace_or_default(meta.map(|m| m.namespace.as_str()).unwrap_or("")),
        meta.map(|m| m.name.as_str()).unwrap_or(""),
    )
}

fn slice_id(slice: &EndpointSlice) -> (String, String) {
    let meta = slice.metadata.as_ref();
    (
        namespace_or_default(meta.map(|m| m.namespace.as_str()).unwrap_or("")),
        meta.map(|m| m.name.clone()).unwrap_or_default(),
    )
}

fn slice_owner(slice: &EndpointSlice) -> Option<ServiceKey> {
    let meta = slice.metadata.as_ref()?;
    let svc = meta.labels.get(SERVICE_NAME_LABEL)?;
    Some(ServiceKey::new(namespace_or_default(&meta.namespace), svc))
}

fn namespace_or_default(ns: &str) -> String {
    if ns.is_empty() {
        "default".to_string()
    } else {
        ns.to_string()
    }
}

fn protocol_or_tcp(p: &str) -> String {
    if p.is_empty() {
        "TCP".to_string()
    } else {
        p.to_ascii_uppercase()
    }
}

fn derive(key: ServiceKey, svc: &Service, slices: &[&EndpointSlice]) -> ServiceInfo {
    let spec = svc.spec.clone().unwrap_or_default();
    let service_type = if spec.r#type.is_empty() {
        "ClusterIP".to_string()
    } else {
        spec.r#type.clone()
    };
    let cluster_ip = if service_type == "ExternalName" {
        None
    } else {
        spec.cluster_ip.parse::<IpAddr>().ok()
    };
    let lb_ips = if service_type == "LoadBalancer" {
        svc.status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .map(|lb| {
                lb.ingress
                    .iter()
                    .filter_map(|i| i.ip.parse::<IpAddr>().ok())
                    .collect()
            })
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let affinity = (spec.session_affinity == "ClientIP").then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u64::try_from(t).ok())
            .filter(|t| *t > 0)
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let ports = spec
        .ports
        .iter()
        .filter_map(|p| port_info(p, slices, spec.publish_not_ready_addresses))
        .collect();
    let headless = service_type != "ExternalName" && spec.cluster_ip == "None";
    let mut cluster_ips: Vec<IpAddr> = Vec::new();
    if service_type != "ExternalName" {
        for ip in std::iter::once(&spec.cluster_ip).chain(spec.cluster_ips.iter()) {
            if let Ok(ip) = ip.parse::<IpAddr>()
                && !cluster_ips.contains(&ip)
            {
                cluster_ips.push(ip);
            }
        }
    }
    let external_name = (service_type == "ExternalName")
        .then(|| spec.external_name.trim_end_matches('.').to_string())
        .filter(|n| !n.is_empty());
    let addresses = endpoint_addresses(slices, spec.publish_not_ready_addresses);
    let is_lb = service_type == "LoadBalancer";
    // The control plane validated the ranges; one that still fails to parse
    // (a state persisted by another version) is dropped: it admits nobody.
    let source_ranges = (is_lb && !spec.load_balancer_source_ranges.is_empty()).then(|| {
        spec.load_balancer_source_ranges
            .iter()
            .filter_map(|r| r.trim().parse::<IpNet>().ok())
            .collect()
    });
    let external_local = spec.external_traffic_policy == "Local";
    let health_check_node_port = u16::try_from(spec.health_check_node_port)
        .ok()
        .filter(|p| *p != 0 && is_lb && external_local);
    ServiceInfo {
        key,
        service_type,
        cluster_ip,
        lb_ips,
        ports,
        affinity,
        external_local,
        internal_local: spec.internal_traffic_policy == "Local",
        cluster_ips,
        headless,
        external_name,
        addresses,
        source_ranges,
        health_check_node_port,
    }
}

fn endpoint_addresses(slices: &[&EndpointSlice], all_ready: bool) -> Arc<[EndpointAddress]> {
    let mut by_ip: BTreeMap<IpAddr, EndpointAddress> = BTreeMap::new();
    for slice in slices {
        for ep in &slice.endpoints {
            let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let ready = all_ready || ep.conditions.unwrap_or_default().ready.unwrap_or(true);
            let e = EndpointAddress {
                ip,
                hostname: ep.hostname.clone().filter(|h| !h.is_empty()),
                ready,
            };
            match by_ip.get(&ip) {
                Some(old) if old.ready || !e.ready => {}
                _ => {
                    by_ip.insert(ip, e);
                }
            }
        }
    }
    by_ip.into_values().collect()
}

fn port_info(p: &ServicePort, slices: &[&EndpointSlice], all_ready: bool) -> Option<PortInfo> {
    let port = u16::try_from(p.port).ok().filter(|p| *p != 0)?;
    let protocol = protocol_or_tcp(&p.protocol);
    let node_port = u16::try_from(p.node_port).ok().filter(|p| *p != 0);
    let mut by_addr: BTreeMap<SocketAddr, Endpoint> = BTreeMap::new();
    for slice in slices {
        let Some(target) = slice.ports.iter().find_map(|sp| {
            let name = sp.name.as_deref().unwrap_or("");
            let proto = protocol_or_tcp(sp.protocol.as_deref().unwrap_or(""));
            (name == p.name && proto == protocol)
                .then_some(sp.port)
                .flatten()
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0)
        }) else {
            continue;
        };
        for ep in &slice.endpoints {
            // Addresses of one endpoint are fungible; kube-proxy uses the first.
            let Some(ip) = ep.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let cond = ep.conditions.unwrap_or_default();
            let ready = all_ready || cond.ready.unwrap_or(true);
            let e = Endpoint {
                addr: SocketAddr::new(ip, target),
                ready,
                serving: all_ready || cond.serving.unwrap_or(ready),
                terminating: cond.terminating.unwrap_or(false),
                node_name: ep.node_name.clone(),
            };
            match by_addr.get(&e.addr) {
                // The same endpoint can sit in two slices while it moves:
                // keep the most usable copy.
                Some(old) if old.ready || !e.ready => {}
                _ => {
                    by_addr.insert(e.addr, e);
                }
            }
        }
    }
    Some(PortInfo {
        name: p.name.clone(),
        protocol,
        port,
        node_port,
        endpoints: by_addr.into_values().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait_proto::v1::WatchEvent;

    const MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  type: NodePort
  sessionAffinity: ClientIP
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-a
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
- addresses: [10.0.0.1]
  nodeName: n1
- addresses: [10.0.0.2]
  conditions: {ready: false, serving: true, terminating: true}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-b
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.1]
- addresses: [10.0.0.3]
"#;

    fn state() -> NodeState {
        NodeState::from_objects(
            strait_proto::manifest::parse(MANIFEST).expect("manifest"),
            7,
        )
    }

    #[test]
    fn derives_endpoints_per_port() {
        let s = state();
        assert!(s.is_synced());
        let web = s.service(&ServiceKey::new("default", "web")).expect("web");
        assert_eq!(web.cluster_ip, Some("10.96.0.10".parse().expect("ip")));
        assert_eq!(web.affinity, Some(DEFAULT_AFFINITY_TIMEOUT));
        let http = &web.ports[0];
        assert!(http.is_tcp());
        assert_eq!(http.node_port, Some(30080));
        let addrs: Vec<String> = http.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]);
        assert!(http.endpoints[0].ready);
        assert_eq!(http.endpoints[0].node_name.as_deref(), Some("n1"));
        assert!(
            !http.endpoints[1].ready && http.endpoints[1].serving && http.endpoints[1].terminating
        );
        let dns = &web.ports[1];
        assert_eq!(dns.protocol, "UDP");
        assert_eq!(dns.endpoints.len(), 2);
        assert_eq!(dns.endpoints[0].addr.port(), 5353);
    }

    #[test]
    fn applies_events_and_persists_round_trip() {
        let s = state();
        let slice_b = s
            .to_list_response()
            .items
            .into_iter()
            .find(|o| o.name() == "web-b")
            .expect("web-b");
        let next = s
            .apply(&WatchResponse {
                revision: 8,
                events: vec![WatchEvent {
                    r#type: EventType::Deleted as i32,
                    object: Some(slice_b),
                }],
                initial: false,
                commit_time_unix_nanos: 0,
            })
            .expect("apply");
        assert_eq!(next.revision(), 8);
        let web = next
            .service(&ServiceKey::new("default", "web"))
            .expect("web");
        assert_eq!(web.ports[0].endpoints.len(), 2);
        // The old snapshot is untouched.
        let old = s.service(&ServiceKey::new("default", "web")).expect("web");
        assert_eq!(old.ports[0].endpoints.len(), 3);

        let list = next.to_list_response();
        let again = NodeState::from_objects(list.items, list.revision);
        assert_eq!(again.revision(), 8);
        let web = again
            .service(&ServiceKey::new("default", "web"))
            .expect("web");
        assert_eq!(web.ports[0].endpoints.len(), 2);

        let replaced = again
            .apply(&WatchResponse {
                revision: 20,
                events: vec![],
                initial: true,
                commit_time_unix_nanos: 0,
            })
            .expect("initial");
        assert_eq!(replaced.services().count(), 0);
    }

    #[test]
    fn incremental_before_initial_is_refused() {
        let r = NodeState::unsynced().apply(&WatchResponse {
            revision: 3,
            ..Default::default()
        });
        assert!(matches!(r, Err(StateError::NotSynced { revision: 3 })));
    }
}
