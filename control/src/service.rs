//! Service defaulting, validation and allocation, with the apiserver's rules
//! and wording. `plan` is pure: it returns the Service exactly as it will be
//! stored (ClusterIP, NodePorts and LoadBalancer IP filled in) or every field
//! error at once, and never touches the allocators, so a rejected write
//! changes nothing and a leader can dry-run a write before proposing it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use strait_proto::v1::{
    ClientIpConfig, IntOrString, LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort,
    ServiceSpec, ServiceStatus, SessionAffinityConfig, int_or_string,
};

use crate::alloc::{AllocError, IpRange, LbPool, PortRange};
use crate::field::{self, Errors};

/// The ranges Services draw from.
#[derive(Debug, Clone)]
pub struct Allocators {
    pub cluster_ips: IpRange,
    pub node_ports: PortRange,
    pub lb_ips: LbPool,
}

pub const TYPES: [&str; 4] = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];
const DEFAULT_AFFINITY_TIMEOUT: i32 = 10800;
const MAX_AFFINITY_TIMEOUT: i32 = 86400;

/// What a Service holds from the allocators.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Held {
    pub cluster_ip: Option<IpAddr>,
    pub node_ports: BTreeSet<u16>,
    pub lb_ip: Option<IpAddr>,
}

/// The allocations a stored Service holds.
pub fn held(svc: &Service) -> Held {
    let spec = svc.spec.clone().unwrap_or_default();
    let mut h = Held {
        cluster_ip: spec.cluster_ip.parse().ok(),
        ..Held::default()
    };
    for p in &spec.ports {
        if let Ok(port) = u16::try_from(p.node_port)
            && port != 0
        {
            h.node_ports.insert(port);
        }
    }
    if let Ok(port) = u16::try_from(spec.health_check_node_port)
        && port != 0
    {
        h.node_ports.insert(port);
    }
    h.lb_ip = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.first())
        .and_then(|i| i.ip.parse().ok());
    h
}

fn is_headless(spec: &ServiceSpec) -> bool {
    spec.cluster_ip == "None"
}

fn exposes_node_ports(spec: &ServiceSpec) -> bool {
    match spec.r#type.as_str() {
        "NodePort" => true,
        "LoadBalancer" => spec.allocate_load_balancer_node_ports.unwrap_or(true),
        _ => false,
    }
}

/// Fills in what a user may leave out, keeping what `old` was given.
fn default(svc: &mut Service, old: Option<&Service>) {
    let old_spec = old.and_then(|o| o.spec.as_ref());
    let spec = svc.spec.get_or_insert_default();
    if spec.r#type.is_empty() {
        spec.r#type = "ClusterIP".into();
    }
    let external_name = spec.r#type == "ExternalName";
    if spec.session_affinity.is_empty() {
        spec.session_affinity = "None".into();
    }
    if spec.session_affinity == "ClientIP" {
        let cfg = spec
            .session_affinity_config
            .get_or_insert_with(SessionAffinityConfig::default)
            .client_ip
            .get_or_insert_with(ClientIpConfig::default);
        cfg.timeout_seconds.get_or_insert(DEFAULT_AFFINITY_TIMEOUT);
    }
    for p in &mut spec.ports {
        if p.protocol.is_empty() {
            p.protocol = "TCP".into();
        }
        let unset = match &p.target_port {
            None => true,
            Some(t) => matches!(t.value, None | Some(int_or_string::Value::IntVal(0))),
        };
        if unset {
            p.target_port = Some(IntOrString::int(p.port));
        }
    }
    if matches!(spec.r#type.as_str(), "NodePort" | "LoadBalancer")
        && spec.external_traffic_policy.is_empty()
    {
        spec.external_traffic_policy = "Cluster".into();
    }
    if !external_name && spec.internal_traffic_policy.is_empty() {
        spec.internal_traffic_policy = "Cluster".into();
    }
    if spec.r#type == "LoadBalancer" && spec.allocate_load_balancer_node_ports.is_none() {
        spec.allocate_load_balancer_node_ports = Some(true);
    }
    // Allocated values survive an apply that leaves them out (kubectl apply
    // never sends them back).
    if let Some(old) = old_spec {
        if spec.cluster_ip.is_empty() && !external_name && old.r#type != "ExternalName" {
            spec.cluster_ip = old.cluster_ip.clone();
        }
        if exposes_node_ports(spec) {
            for p in spec.ports.iter_mut().filter(|p| p.node_port == 0) {
                if let Some(prev) = old
                    .ports
                    .iter()
                    .find(|q| q.port == p.port && q.protocol == p.protocol && q.node_port != 0)
                {
                    p.node_port = prev.node_port;
                }
            }
        }
        // Kept only while still needed: switching to externalTrafficPolicy
        // Cluster (or another type) releases it, as the apiserver does.
        if spec.health_check_node_port == 0
            && spec.r#type == "LoadBalancer"
            && spec.external_traffic_policy == "Local"
        {
            spec.health_check_node_port = old.health_check_node_port;
        }
    }
}

/// Validates the defaulted spec; `old` is the stored version on update.
fn validate(svc: &Service, old: Option<&Service>, a: &Allocators, errs: &mut Errors) {
    let Some(spec) = svc.spec.as_ref() else {
        return;
    };
    let ty = spec.r#type.as_str();
    if !TYPES.contains(&ty) {
        errs.not_supported("spec.type", ty, &TYPES);
        return;
    }
    let external_name = ty == "ExternalName";

    if external_name {
        if !spec.cluster_ip.is_empty() {
            errs.forbidden("spec.clusterIP", "may not be set for ExternalName services");
        }
        if !spec.cluster_ips.is_empty() {
            errs.forbidden(
                "spec.clusterIPs",
                "may not be set for ExternalName services",
            );
        }
        if !spec.ip_families.is_empty() {
            errs.forbidden(
                "spec.ipFamilies",
                "may not be set for ExternalName services",
            );
        }
        if spec.ip_family_policy.is_some() {
            errs.forbidden(
                "spec.ipFamilyPolicy",
                "may not be set for ExternalName services",
            );
        }
        let name = spec.external_name.trim_end_matches('.');
        if spec.external_name.is_empty() {
            errs.required("spec.externalName", "");
        } else {
            for e in field::dns1123_subdomain(name) {
                errs.invalid("spec.externalName", &spec.external_name, e);
            }
        }
    } else if !spec.external_name.is_empty() && ty != "ExternalName" {
        // Kubernetes clears it silently on type change; a user who writes it
        // for another type most likely meant ExternalName.
        errs.forbidden(
            "spec.externalName",
            "may only be set when `type` is 'ExternalName'",
        );
    }

    if is_headless(spec) && matches!(ty, "NodePort" | "LoadBalancer") {
        errs.invalid(
            "spec.clusterIP",
            "None",
            format!("may not be set to 'None' for {ty} services"),
        );
    }
    if !external_name && !spec.cluster_ip.is_empty() && !is_headless(spec) {
        match spec.cluster_ip.parse::<IpAddr>() {
            Err(_) => errs.invalid(
                "spec.clusterIP",
                &spec.cluster_ip,
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            ),
            Ok(ip) => {
                let unchanged = old
                    .and_then(|o| o.spec.as_ref())
                    .is_some_and(|o| o.cluster_ip == spec.cluster_ip);
                if !unchanged && let Err(e) = a.cluster_ips.check(ip) {
                    errs.invalid(
                        "spec.clusterIP",
                        &spec.cluster_ip,
                        format!("failed to allocate IP {ip}: {e}"),
                    );
                }
            }
        }
    }
    if let Some(o) = old.and_then(|o| o.spec.as_ref()) {
        let was_allocated = !o.cluster_ip.is_empty() && o.r#type != "ExternalName";
        if was_allocated && !external_name && o.cluster_ip != spec.cluster_ip {
            errs.invalid("spec.clusterIP", &spec.cluster_ip, "field is immutable");
        }
    }
    for (i, ip) in spec.cluster_ips.iter().enumerate() {
        if i == 0 && *ip != spec.cluster_ip && !spec.cluster_ip.is_empty() {
            errs.invalid("spec.clusterIPs[0]", ip, "must match `spec.clusterIP`");
        }
        if i > 0 {
            errs.invalid(
                format!("spec.clusterIPs[{i}]"),
                ip,
                "dual-stack Services are not supported: only one cluster IP may be set",
            );
        }
    }
    for (i, fam) in spec.ip_families.iter().enumerate() {
        if !matches!(fam.as_str(), "IPv4" | "IPv6") {
            errs.not_supported(format!("spec.ipFamilies[{i}]"), fam, &["IPv4", "IPv6"]);
        } else if fam != family_of(a.cluster_ips.net().addr()) {
            errs.invalid(
                format!("spec.ipFamilies[{i}]"),
                fam,
                format!(
                    "not configured on this cluster (the service CIDR is {})",
                    a.cluster_ips.net()
                ),
            );
        }
    }

    validate_ports(spec, ty, a, old, errs);

    for (k, v) in &spec.selector {
        for e in field::label_key(k) {
            errs.invalid("spec.selector", k, e);
        }
        for e in field::label_value(v) {
            errs.invalid(format!("spec.selector[{k}]"), v, e);
        }
    }

    match spec.session_affinity.as_str() {
        "None" => {
            if spec.session_affinity_config.is_some() {
                errs.invalid(
                    "spec.sessionAffinityConfig",
                    field::Shown::Raw("{...}".into()),
                    "must not be set when `sessionAffinity` is None",
                );
            }
        }
        "ClientIP" => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
            if !(1..=MAX_AFFINITY_TIMEOUT).contains(&t) {
                errs.invalid(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    t,
                    format!("must be greater than 0 and less than {MAX_AFFINITY_TIMEOUT}"),
                );
            }
        }
        other => errs.not_supported("spec.sessionAffinity", other, &["ClientIP", "None"]),
    }

    let externally_reachable =
        matches!(ty, "NodePort" | "LoadBalancer") || !spec.external_ips.is_empty();
    match spec.external_traffic_policy.as_str() {
        "" => {}
        p if !externally_reachable => errs.invalid(
            "spec.externalTrafficPolicy",
            p,
            "may only be set for externally-accessible services",
        ),
        "Cluster" | "Local" => {}
        p => errs.not_supported("spec.externalTrafficPolicy", p, &["Cluster", "Local"]),
    }
    match spec.internal_traffic_policy.as_str() {
        "" | "Cluster" | "Local" => {}
        p => errs.not_supported("spec.internalTrafficPolicy", p, &["Cluster", "Local"]),
    }
    if spec.health_check_node_port != 0 {
        if !(ty == "LoadBalancer" && spec.external_traffic_policy == "Local") {
            errs.invalid(
                "spec.healthCheckNodePort",
                spec.health_check_node_port,
                "may only be set when `type` is 'LoadBalancer' and `externalTrafficPolicy` is 'Local'",
            );
        } else if let Some(o) = old.and_then(|o| o.spec.as_ref())
            && o.health_check_node_port != 0
            && o.health_check_node_port != spec.health_check_node_port
        {
            errs.invalid(
                "spec.healthCheckNodePort",
                spec.health_check_node_port,
                "field is immutable",
            );
        }
    }

    let lb_only: [(&str, bool); 4] = [
        ("spec.loadBalancerIP", !spec.load_balancer_ip.is_empty()),
        (
            "spec.loadBalancerSourceRanges",
            !spec.load_balancer_source_ranges.is_empty(),
        ),
        ("spec.loadBalancerClass", spec.load_balancer_class.is_some()),
        (
            "spec.allocateLoadBalancerNodePorts",
            spec.allocate_load_balancer_node_ports.is_some(),
        ),
    ];
    for (path, set) in lb_only {
        if set && ty != "LoadBalancer" {
            errs.forbidden(path, "may only be used when `type` is 'LoadBalancer'");
        }
    }
    if ty == "LoadBalancer" && !spec.load_balancer_ip.is_empty() {
        match spec.load_balancer_ip.parse::<IpAddr>() {
            Err(_) => errs.invalid(
                "spec.loadBalancerIP",
                &spec.load_balancer_ip,
                "must be a valid IP address",
            ),
            Ok(ip) => {
                let mine = old.map(held).and_then(|h| h.lb_ip) == Some(ip);
                if !mine && let Err(e) = a.lb_ips.check(ip) {
                    errs.invalid("spec.loadBalancerIP", &spec.load_balancer_ip, e.to_string());
                }
            }
        }
    }
    for (i, r) in spec.load_balancer_source_ranges.iter().enumerate() {
        if r.trim().parse::<ipnet::IpNet>().is_err() {
            errs.invalid(
                format!("spec.loadBalancerSourceRanges[{i}]"),
                r,
                "must be a list of IP ranges. For example, 10.240.0.0/16,10.250.0.0/16 ",
            );
        }
    }
    for (i, ip) in spec.external_ips.iter().enumerate() {
        if ip.parse::<IpAddr>().is_err() {
            errs.invalid(
                format!("spec.externalIPs[{i}]"),
                ip,
                "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)",
            );
        }
    }
}

fn family_of(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

fn validate_ports(
    spec: &ServiceSpec,
    ty: &str,
    a: &Allocators,
    old: Option<&Service>,
    errs: &mut Errors,
) {
    let headless = is_headless(spec);
    if spec.ports.is_empty() && !headless && ty != "ExternalName" {
        errs.required("spec.ports", "");
    }
    let many = spec.ports.len() > 1;
    let mut names = BTreeSet::new();
    let mut keys = BTreeSet::new();
    let mut node_ports = BTreeSet::new();
    let old_ports: BTreeSet<u16> = old.map(held).map(|h| h.node_ports).unwrap_or_default();
    let node_ports_allowed = matches!(ty, "NodePort" | "LoadBalancer");
    for (i, p) in spec.ports.iter().enumerate() {
        let path = format!("spec.ports[{i}]");
        if p.name.is_empty() {
            if many {
                errs.required(format!("{path}.name"), "");
            }
        } else {
            for e in field::dns1123_label(&p.name) {
                errs.invalid(format!("{path}.name"), &p.name, e);
            }
            if !names.insert(p.name.clone()) {
                errs.duplicate(format!("{path}.name"), &p.name);
            }
        }
        if !PROTOCOLS.contains(&p.protocol.as_str()) {
            errs.not_supported(format!("{path}.protocol"), &p.protocol, &PROTOCOLS);
        }
        if !(1..=65535).contains(&p.port) {
            errs.invalid(
                format!("{path}.port"),
                p.port,
                "must be between 1 and 65535, inclusive",
            );
        }
        if !keys.insert((p.protocol.clone(), p.port)) {
            errs.duplicate(
                path.clone(),
                field::Shown::Raw(format!(
                    "map[string]interface {{}}{{\"port\":{}, \"protocol\":\"{}\"}}",
                    p.port, p.protocol
                )),
            );
        }
        match p.target_port.as_ref().and_then(|t| t.value.as_ref()) {
            Some(int_or_string::Value::IntVal(v)) if !(1..=65535).contains(v) => {
                errs.invalid(
                    format!("{path}.targetPort"),
                    *v,
                    "must be between 1 and 65535, inclusive",
                );
            }
            Some(int_or_string::Value::StrVal(s)) => {
                for e in field::iana_svc_name(s) {
                    errs.invalid(format!("{path}.targetPort"), s, e);
                }
            }
            _ => {}
        }
        if p.node_port != 0 {
            if !node_ports_allowed {
                errs.forbidden(
                    format!("{path}.nodePort"),
                    format!("may not be used when `type` is '{ty}'"),
                );
            } else if !node_ports.insert((p.protocol.clone(), p.node_port)) {
                errs.duplicate(format!("{path}.nodePort"), p.node_port);
            } else {
                match u16::try_from(p.node_port) {
                    Ok(np) if old_ports.contains(&np) => {}
                    Ok(np) if np != 0 => {
                        // The same port may serve TCP and UDP of one Service.
                        let shared = spec.ports[..i].iter().any(|q| q.node_port == p.node_port);
                        if !shared
                            && let Err(e) = a.node_ports.check(np) {
                                errs.invalid(format!("{path}.nodePort"), p.node_port, e.to_string());
                            }
                    }
                    _ => errs.invalid(
                        format!("{path}.nodePort"),
                        p.node_port,
                        format!("provided port is not in the valid range. The range of valid ports is {}", a.node_ports),
                    ),
                }
            }
        }
    }
}

/// Defaults, validates and allocates: the Service as it will be stored.
pub fn plan(mut svc: Service, old: Option<&Service>, a: &Allocators) -> Result<Service, Errors> {
    default(&mut svc, old);
    let mut errs = Errors::default();
    validate(&svc, old, a, &mut errs);
    if !errs.is_empty() {
        return Err(errs);
    }
    let key = {
        let m = svc.metadata.clone().unwrap_or_default();
        format!("{}/{}", m.namespace, m.name)
    };
    let spec = svc.spec.get_or_insert_default();
    let external_name = spec.r#type == "ExternalName";

    if !external_name && spec.cluster_ip.is_empty() {
        match a.cluster_ips.next_free(&key, &[]) {
            Ok(ip) => spec.cluster_ip = ip.to_string(),
            Err(e) => errs.invalid(
                "spec.clusterIP",
                "",
                format!("failed to allocate a serviceIP: {e}"),
            ),
        }
    }
    if external_name {
        spec.cluster_ips.clear();
        spec.ip_families.clear();
        spec.ip_family_policy = None;
        spec.internal_traffic_policy.clear();
    } else {
        spec.cluster_ips = vec![spec.cluster_ip.clone()];
        spec.ip_families = vec![family_of(a.cluster_ips.net().addr()).into()];
        spec.ip_family_policy
            .get_or_insert_with(|| "SingleStack".into());
    }

    if exposes_node_ports(spec) {
        let mut taken: Vec<u16> = Vec::new();
        let held_before: BTreeSet<u16> = old.map(held).map(|h| h.node_ports).unwrap_or_default();
        for (i, p) in spec.ports.iter_mut().enumerate() {
            if p.node_port == 0 {
                match a
                    .node_ports
                    .next_free(&format!("{key}/{}/{}", p.protocol, p.port), &taken)
                {
                    Ok(np) => p.node_port = i32::from(np),
                    Err(e) => errs.invalid(format!("spec.ports[{i}].nodePort"), 0, e.to_string()),
                }
            }
            if let Ok(np) = u16::try_from(p.node_port) {
                taken.push(np);
            }
        }
        if spec.r#type == "LoadBalancer"
            && spec.external_traffic_policy == "Local"
            && spec.health_check_node_port == 0
        {
            // Ports this Service already held are free for it to reuse.
            let taken: Vec<u16> = taken
                .into_iter()
                .filter(|p| !held_before.contains(p))
                .collect();
            match a.node_ports.next_free(&format!("{key}/health"), &taken) {
                Ok(np) => spec.health_check_node_port = i32::from(np),
                Err(e) => errs.invalid("spec.healthCheckNodePort", 0, e.to_string()),
            }
        }
    } else {
        for p in &mut spec.ports {
            p.node_port = 0;
        }
    }
    if !(spec.r#type == "LoadBalancer" && spec.external_traffic_policy == "Local") {
        spec.health_check_node_port = 0;
    }

    let lb_ip = if spec.r#type == "LoadBalancer" && spec.load_balancer_class.is_none() {
        let previous = old.map(held).and_then(|h| h.lb_ip);
        let requested = spec.load_balancer_ip.parse::<IpAddr>().ok();
        match (requested, previous) {
            (Some(ip), _) => Some(ip),
            (None, Some(ip)) => Some(ip),
            (None, None) if a.lb_ips.is_empty() => None,
            (None, None) => match a.lb_ips.next_free() {
                Ok(ip) => Some(ip),
                Err(AllocError::Full) => {
                    // Kubernetes leaves the Service pending (EXTERNAL-IP
                    // <pending>) rather than refusing it.
                    None
                }
                Err(e) => {
                    errs.invalid("spec.loadBalancerIP", "", e.to_string());
                    None
                }
            },
        }
    } else {
        None
    };
    svc.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: lb_ip
                .map(|ip| LoadBalancerIngress {
                    ip: ip.to_string(),
                    ip_mode: Some("VIP".into()),
                    ..Default::default()
                })
                .into_iter()
                .collect(),
        }),
    });
    if errs.is_empty() { Ok(svc) } else { Err(errs) }
}

/// Resolves a Service port's target port for a Pod's container ports:
/// numbers pass through, names are looked up per Pod (same protocol).
pub fn resolve_target_port(
    port: &ServicePort,
    container_ports: &BTreeMap<(String, String), i32>,
) -> Option<i32> {
    match port.target_port.as_ref().and_then(|t| t.value.as_ref()) {
        Some(int_or_string::Value::IntVal(v)) => Some(*v),
        Some(int_or_string::Value::StrVal(name)) => container_ports
            .get(&(name.clone(), port.protocol.clone()))
            .copied(),
        None => Some(port.port),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use strait_proto::v1::{ObjectMeta, SessionAffinityConfig};

    use super::*;

    /// Allocators over test ranges, shared by the state machine's tests.
    pub(crate) fn alloc() -> Allocators {
        Allocators {
            cluster_ips: IpRange::new("10.96.0.0/12".parse().expect("cidr")),
            node_ports: "30000-32767".parse().expect("range"),
            lb_ips: "192.0.2.0/28".parse().expect("pool"),
        }
    }

    fn svc(spec: ServiceSpec) -> Service {
        Service {
            metadata: Some(ObjectMeta {
                name: "web".into(),
                namespace: "default".into(),
                ..Default::default()
            }),
            spec: Some(spec),
            ..Default::default()
        }
    }

    fn port(p: i32) -> ServicePort {
        ServicePort {
            port: p,
            ..Default::default()
        }
    }

    #[test]
    fn health_check_node_port_kept_while_local_released_when_cluster() {
        let lb = |policy: &str| {
            svc(ServiceSpec {
                r#type: "LoadBalancer".into(),
                external_traffic_policy: policy.into(),
                ports: vec![port(80)],
                ..Default::default()
            })
        };
        let first = plan(lb("Local"), None, &alloc()).expect("valid");
        let hc = first.spec.as_ref().expect("spec").health_check_node_port;
        assert_ne!(hc, 0);
        let again = plan(lb("Local"), Some(&first), &alloc()).expect("re-apply");
        assert_eq!(
            again.spec.as_ref().expect("spec").health_check_node_port,
            hc
        );
        let cluster = plan(lb("Cluster"), Some(&first), &alloc()).expect("to Cluster");
        assert_eq!(
            cluster.spec.as_ref().expect("spec").health_check_node_port,
            0
        );
    }

    #[test]
    fn defaults_and_allocations() {
        let s = plan(
            svc(ServiceSpec {
                r#type: "LoadBalancer".into(),
                external_traffic_policy: "Local".into(),
                session_affinity: "ClientIP".into(),
                ports: vec![port(80)],
                ..Default::default()
            }),
            None,
            &alloc(),
        )
        .expect("valid");
        let spec = s.spec.clone().expect("spec");
        assert_eq!(spec.ports[0].protocol, "TCP");
        assert_eq!(spec.ports[0].target_port, Some(IntOrString::int(80)));
        assert!(spec.ports[0].node_port >= 30000);
        assert!(spec.health_check_node_port >= 30000);
        assert_ne!(spec.health_check_node_port, spec.ports[0].node_port);
        assert_eq!(spec.allocate_load_balancer_node_ports, Some(true));
        assert_eq!(spec.internal_traffic_policy, "Cluster");
        assert_eq!(spec.ip_families, vec!["IPv4".to_string()]);
        assert_eq!(spec.cluster_ips, vec![spec.cluster_ip.clone()]);
        let timeout = spec
            .session_affinity_config
            .and_then(|c| c.client_ip)
            .and_then(|c| c.timeout_seconds);
        assert_eq!(timeout, Some(10800));
        assert_eq!(held(&s).lb_ip, Some("192.0.2.1".parse().expect("ip")));
    }

    #[test]
    fn external_name_has_no_cluster_ip() {
        let s = plan(
            svc(ServiceSpec {
                r#type: "ExternalName".into(),
                external_name: "db.example.com.".into(),
                ..Default::default()
            }),
            None,
            &alloc(),
        )
        .expect("valid");
        let spec = s.spec.expect("spec");
        assert!(spec.cluster_ip.is_empty() && spec.cluster_ips.is_empty());
        assert!(spec.internal_traffic_policy.is_empty());
    }

    #[test]
    fn table_of_invalid_specs() {
        let cases: Vec<(ServiceSpec, &str)> = vec![
            (
                ServiceSpec {
                    ports: vec![port(80)],
                    session_affinity_config: Some(SessionAffinityConfig::default()),
                    ..Default::default()
                },
                "spec.sessionAffinityConfig",
            ),
            (
                ServiceSpec {
                    ports: vec![port(80)],
                    load_balancer_ip: "192.0.2.5".into(),
                    ..Default::default()
                },
                "spec.loadBalancerIP: Forbidden: may only be used when `type` is 'LoadBalancer'",
            ),
            (
                ServiceSpec {
                    ports: vec![port(80)],
                    health_check_node_port: 30500,
                    ..Default::default()
                },
                "spec.healthCheckNodePort",
            ),
            (
                ServiceSpec {
                    ports: vec![ServicePort {
                        port: 80,
                        protocol: "HTTP".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                "spec.ports[0].protocol: Unsupported value: \"HTTP\"",
            ),
            (
                ServiceSpec {
                    r#type: "LoadBalancer".into(),
                    ports: vec![port(80)],
                    load_balancer_source_ranges: vec!["not-a-cidr".into()],
                    ..Default::default()
                },
                "spec.loadBalancerSourceRanges[0]",
            ),
            (
                ServiceSpec {
                    ports: vec![port(80)],
                    internal_traffic_policy: "Nearby".into(),
                    ..Default::default()
                },
                "spec.internalTrafficPolicy: Unsupported value",
            ),
        ];
        for (spec, want) in cases {
            let errs = plan(svc(spec.clone()), None, &alloc()).expect_err("invalid");
            let text = crate::field::aggregate(&errs.0);
            assert!(text.contains(want), "{spec:?}\nwant {want}\ngot {text}");
        }
    }

    #[test]
    fn type_change_keeps_and_releases_correctly() {
        let a = alloc();
        let np = plan(
            svc(ServiceSpec {
                r#type: "NodePort".into(),
                ports: vec![port(80)],
                ..Default::default()
            }),
            None,
            &a,
        )
        .expect("valid");
        // Back to ClusterIP: node ports dropped, cluster IP kept.
        let back = plan(
            svc(ServiceSpec {
                ports: vec![port(80)],
                ..Default::default()
            }),
            Some(&np),
            &a,
        )
        .expect("valid");
        let (h1, h2) = (held(&np), held(&back));
        assert_eq!(h1.cluster_ip, h2.cluster_ip);
        assert!(h2.node_ports.is_empty());
    }
}
