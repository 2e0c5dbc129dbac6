//! EndpointSlice derivation: for a Service with a selector, the slices that
//! describe its matching Pods (address, readiness, node, zone and the target
//! port resolved per Pod). Pure and deterministic, so the state machine can
//! re-derive inside the write that changed a Pod or a Service.

use std::collections::BTreeMap;

use strait_proto::v1::{
    Endpoint, EndpointConditions, EndpointPort, EndpointSlice, Node, ObjectMeta, ObjectReference,
    Pod, Service,
};

use crate::alloc::fnv1a;
use crate::service::resolve_target_port;

/// Label naming the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label naming the controller that manages a slice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// Strait's controller name in `MANAGED_BY_LABEL`.
pub const MANAGED_BY: &str = "endpointslice-controller.strait.dev";
/// Node label carrying the zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Endpoints per slice (the Kubernetes controller's default).
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

/// A Service port as one Pod serves it: (name, protocol, target port).
type ResolvedPort = (String, String, Option<i32>);

/// Does `selector` (non-empty) select `labels`?
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A Pod's readiness as its Ready condition says.
pub fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.r#type == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// A Node counts as ready unless its Ready condition says otherwise (the
/// leader writes False when its heartbeats stop).
pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.r#type == "Ready"))
        .is_none_or(|c| c.status == "True")
}

/// The address a Pod is reached at: its podIP, else its node's InternalIP
/// (a host-network workload).
pub fn pod_address(pod: &Pod, nodes: &BTreeMap<String, &Node>) -> Option<String> {
    let ip = pod.status.as_ref().map(|s| s.pod_ip.as_str()).unwrap_or("");
    if !ip.is_empty() {
        return Some(ip.to_string());
    }
    let node = nodes.get(pod.spec.as_ref()?.node_name.as_str())?;
    let addrs = &node.status.as_ref()?.addresses;
    addrs
        .iter()
        .find(|a| a.r#type == "InternalIP")
        .or_else(|| addrs.iter().find(|a| a.r#type == "ExternalIP"))
        .map(|a| a.address.clone())
}

/// The slices `svc` should have given the Pods of its namespace. Slices are
/// named `<service>-<hash of the port set>[-<n>]` so the same inputs always
/// give the same names.
pub fn derive(svc: &Service, pods: &[&Pod], nodes: &BTreeMap<String, &Node>) -> Vec<EndpointSlice> {
    let meta = svc.metadata.clone().unwrap_or_default();
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    if spec.selector.is_empty() || spec.r#type == "ExternalName" {
        return Vec::new();
    }
    let address_type = if spec.cluster_ip.contains(':') {
        "IPv6"
    } else {
        "IPv4"
    };

    // Group endpoints by the port numbers they resolve to.
    let mut groups: BTreeMap<Vec<ResolvedPort>, Vec<Endpoint>> = BTreeMap::new();
    for pod in pods {
        let pm = pod.metadata.clone().unwrap_or_default();
        if !selects(&spec.selector, &pm.labels) {
            continue;
        }
        let Some(addr) = pod_address(pod, nodes) else {
            continue;
        };
        if addr.contains(':') != (address_type == "IPv6") {
            continue;
        }
        let pspec = pod.spec.clone().unwrap_or_default();
        let named: BTreeMap<(String, String), i32> = pspec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter())
            .filter(|p| !p.name.is_empty())
            .map(|p| {
                let proto = if p.protocol.is_empty() {
                    "TCP"
                } else {
                    p.protocol.as_str()
                };
                ((p.name.clone(), proto.to_string()), p.container_port)
            })
            .collect();
        let ports: Vec<ResolvedPort> = spec
            .ports
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.protocol.clone(),
                    resolve_target_port(p, &named),
                )
            })
            .collect();
        if !spec.ports.is_empty() && ports.iter().all(|(_, _, n)| n.is_none()) {
            continue;
        }
        let terminating = !pm.deletion_timestamp.is_empty();
        let node_up = nodes
            .get(pspec.node_name.as_str())
            .is_none_or(|n| node_ready(n));
        let serving = pod_ready(pod) && node_up;
        let ready = spec.publish_not_ready_addresses || (serving && !terminating);
        let node_name = pspec.node_name.clone();
        let zone = nodes
            .get(node_name.as_str())
            .and_then(|n| n.metadata.as_ref())
            .and_then(|m| m.labels.get(ZONE_LABEL).cloned());
        let hostname = (!pspec.hostname.is_empty() && pspec.subdomain == meta.name)
            .then(|| pspec.hostname.clone());
        groups.entry(ports).or_default().push(Endpoint {
            addresses: vec![addr],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(serving || spec.publish_not_ready_addresses),
                terminating: Some(terminating),
            }),
            hostname,
            node_name: (!node_name.is_empty()).then_some(node_name),
            zone,
            target_ref: Some(ObjectReference {
                kind: "Pod".into(),
                namespace: pm.namespace.clone(),
                name: pm.name.clone(),
                uid: pm.uid.clone(),
            }),
        });
    }

    let mut slices = Vec::new();
    for (ports, mut endpoints) in groups {
        endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
        let sig = format!("{ports:?}");
        let base = format!("{}-{:08x}", meta.name, fnv1a(sig.as_bytes()) as u32);
        let eports: Vec<EndpointPort> = ports
            .into_iter()
            .filter_map(|(name, protocol, port)| {
                Some(EndpointPort {
                    name: Some(name),
                    protocol: Some(protocol),
                    port: Some(port?),
                    app_protocol: None,
                })
            })
            .collect();
        for (n, chunk) in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE).enumerate() {
            let name = if n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            slices.push(slice(
                &meta,
                name,
                address_type,
                chunk.to_vec(),
                eports.clone(),
            ));
        }
    }
    slices
}

fn slice(
    svc: &ObjectMeta,
    name: String,
    address_type: &str,
    endpoints: Vec<Endpoint>,
    ports: Vec<EndpointPort>,
) -> EndpointSlice {
    let labels = BTreeMap::from([
        (SERVICE_NAME_LABEL.to_string(), svc.name.clone()),
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
    ]);
    EndpointSlice {
        api_version: "discovery.k8s.io/v1".into(),
        kind: "EndpointSlice".into(),
        metadata: Some(ObjectMeta {
            name,
            namespace: svc.namespace.clone(),
            labels,
            ..Default::default()
        }),
        address_type: address_type.into(),
        endpoints,
        ports,
    }
}
