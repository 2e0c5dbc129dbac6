//! Validation and defaulting for Pods, Nodes and operator-written
//! EndpointSlices (Services have their own module: they also allocate).

use std::collections::BTreeSet;
use std::net::IpAddr;

use strait_proto::v1::{Condition, EndpointSlice, Node, Pod, Probe, int_or_string};

use crate::field::{self, Errors};

/// Probe defaults (Kubernetes' core/v1 defaults).
fn default_probe(p: &mut Probe) {
    if p.period_seconds == 0 {
        p.period_seconds = 10;
    }
    if p.timeout_seconds == 0 {
        p.timeout_seconds = 1;
    }
    if p.success_threshold == 0 {
        p.success_threshold = 1;
    }
    if p.failure_threshold == 0 {
        p.failure_threshold = 3;
    }
}

/// Defaults a Pod; `old` keeps status written earlier (by its node agent)
/// when an operator re-applies the spec.
pub fn default_pod(pod: &mut Pod, old: Option<&Pod>) {
    let spec = pod.spec.get_or_insert_default();
    for c in &mut spec.containers {
        for p in &mut c.ports {
            if p.protocol.is_empty() {
                p.protocol = "TCP".into();
            }
        }
        if let Some(probe) = c.readiness_probe.as_mut() {
            default_probe(probe);
        }
        if let Some(http) = c.readiness_probe.as_mut().and_then(|p| p.http_get.as_mut()) {
            if http.path.is_empty() {
                http.path = "/".into();
            }
            if http.scheme.is_empty() {
                http.scheme = "HTTP".into();
            }
        }
    }
    if spec.termination_grace_period_seconds.is_none() {
        spec.termination_grace_period_seconds = Some(30);
    }
    let has_probe = spec.containers.iter().any(|c| c.readiness_probe.is_some());
    if pod.status.is_none() {
        pod.status = old.and_then(|o| o.status.clone());
    }
    let status = pod.status.get_or_insert_default();
    if status.phase.is_empty() {
        status.phase = "Running".into();
    }
    if !status.conditions.iter().any(|c| c.r#type == "Ready") {
        // Without a probe a Pod is ready once registered; with one it waits
        // for its node agent's first success.
        status.conditions.push(Condition {
            r#type: "Ready".into(),
            status: if has_probe { "False" } else { "True" }.into(),
            reason: if has_probe { "ProbePending" } else { "NoProbe" }.into(),
            ..Default::default()
        });
    }
    if status.pod_ips.is_empty() && !status.pod_ip.is_empty() {
        status.pod_ips = vec![strait_proto::v1::PodIp {
            ip: status.pod_ip.clone(),
        }];
    }
}

fn check_port(errs: &mut Errors, path: String, port: Option<&strait_proto::v1::IntOrString>) {
    match port.and_then(|p| p.value.as_ref()) {
        None => errs.required(path, ""),
        Some(int_or_string::Value::IntVal(v)) if !(1..=65535).contains(v) => {
            errs.invalid(path, *v, "must be between 1 and 65535, inclusive")
        }
        Some(int_or_string::Value::StrVal(s)) => {
            for e in field::iana_svc_name(s) {
                errs.invalid(path.clone(), s, e);
            }
        }
        _ => {}
    }
}

fn validate_probe(errs: &mut Errors, path: &str, p: &Probe) {
    let handlers = [
        p.tcp_socket.is_some(),
        p.http_get.is_some(),
        p.exec.is_some(),
    ]
    .iter()
    .filter(|h| **h)
    .count();
    match handlers {
        0 => errs.required(path, "must specify a handler type"),
        1 => {}
        _ => errs.forbidden(path, "may not specify more than 1 handler type"),
    }
    if let Some(t) = &p.tcp_socket {
        check_port(errs, format!("{path}.tcpSocket.port"), t.port.as_ref());
    }
    if let Some(h) = &p.http_get {
        check_port(errs, format!("{path}.httpGet.port"), h.port.as_ref());
        if !matches!(h.scheme.as_str(), "HTTP" | "HTTPS") {
            errs.not_supported(
                format!("{path}.httpGet.scheme"),
                &h.scheme,
                &["HTTP", "HTTPS"],
            );
        }
    }
    if let Some(e) = &p.exec
        && e.command.is_empty()
    {
        errs.required(format!("{path}.exec.command"), "");
    }
    for (name, v, min) in [
        ("initialDelaySeconds", p.initial_delay_seconds, 0),
        ("periodSeconds", p.period_seconds, 1),
        ("timeoutSeconds", p.timeout_seconds, 1),
        ("successThreshold", p.success_threshold, 1),
        ("failureThreshold", p.failure_threshold, 1),
    ] {
        if v < min {
            let rule = if min == 0 {
                "must be greater than or equal to 0".to_string()
            } else {
                format!("must be greater than or equal to {min}")
            };
            errs.invalid(format!("{path}.{name}"), v, rule);
        }
    }
}

pub fn validate_pod(pod: &Pod, errs: &mut Errors) {
    let Some(spec) = pod.spec.as_ref() else {
        return;
    };
    if !spec.node_name.is_empty() {
        for e in field::dns1123_subdomain(&spec.node_name) {
            errs.invalid("spec.nodeName", &spec.node_name, e);
        }
    }
    if !spec.hostname.is_empty() {
        for e in field::dns1123_label(&spec.hostname) {
            errs.invalid("spec.hostname", &spec.hostname, e);
        }
    }
    if !spec.subdomain.is_empty() {
        for e in field::dns1123_label(&spec.subdomain) {
            errs.invalid("spec.subdomain", &spec.subdomain, e);
        }
    }
    if spec.termination_grace_period_seconds.is_some_and(|g| g < 0) {
        errs.invalid(
            "spec.terminationGracePeriodSeconds",
            spec.termination_grace_period_seconds.unwrap_or_default(),
            "must be greater than or equal to 0",
        );
    }
    let mut container_names = BTreeSet::new();
    let mut port_names = BTreeSet::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let path = format!("spec.containers[{i}]");
        if c.name.is_empty() {
            errs.required(format!("{path}.name"), "");
        } else {
            for e in field::dns1123_label(&c.name) {
                errs.invalid(format!("{path}.name"), &c.name, e);
            }
            if !container_names.insert(c.name.clone()) {
                errs.duplicate(format!("{path}.name"), &c.name);
            }
        }
        for (j, p) in c.ports.iter().enumerate() {
            let pp = format!("{path}.ports[{j}]");
            if !(1..=65535).contains(&p.container_port) {
                errs.invalid(
                    format!("{pp}.containerPort"),
                    p.container_port,
                    "must be between 1 and 65535, inclusive",
                );
            }
            if !matches!(p.protocol.as_str(), "TCP" | "UDP" | "SCTP") {
                errs.not_supported(
                    format!("{pp}.protocol"),
                    &p.protocol,
                    &["SCTP", "TCP", "UDP"],
                );
            }
            if !p.name.is_empty() {
                for e in field::iana_svc_name(&p.name) {
                    errs.invalid(format!("{pp}.name"), &p.name, e);
                }
                if !port_names.insert(p.name.clone()) {
                    errs.duplicate(format!("{pp}.name"), &p.name);
                }
            }
        }
        if let Some(p) = &c.readiness_probe {
            validate_probe(errs, &format!("{path}.readinessProbe"), p);
        }
    }
    if let Some(status) = &pod.status {
        if !status.pod_ip.is_empty() && status.pod_ip.parse::<IpAddr>().is_err() {
            errs.invalid("status.podIP", &status.pod_ip, "must be a valid IP address");
        }
        for c in &status.conditions {
            if !matches!(c.status.as_str(), "True" | "False" | "Unknown") {
                errs.not_supported(
                    "status.conditions.status",
                    &c.status,
                    &["False", "True", "Unknown"],
                );
            }
        }
    }
}

pub fn validate_node(node: &Node, errs: &mut Errors) {
    let Some(status) = node.status.as_ref() else {
        return;
    };
    for (i, a) in status.addresses.iter().enumerate() {
        let path = format!("status.addresses[{i}]");
        match a.r#type.as_str() {
            "InternalIP" | "ExternalIP" => {
                if a.address.parse::<IpAddr>().is_err() {
                    errs.invalid(
                        format!("{path}.address"),
                        &a.address,
                        "must be a valid IP address",
                    );
                }
            }
            "Hostname" | "InternalDNS" | "ExternalDNS" => {}
            other => errs.not_supported(
                format!("{path}.type"),
                other,
                &[
                    "ExternalDNS",
                    "ExternalIP",
                    "Hostname",
                    "InternalDNS",
                    "InternalIP",
                ],
            ),
        }
    }
}

pub fn validate_slice(s: &EndpointSlice, errs: &mut Errors) {
    if !matches!(s.address_type.as_str(), "IPv4" | "IPv6" | "FQDN") {
        if s.address_type.is_empty() {
            errs.required("addressType", "");
        } else {
            errs.not_supported("addressType", &s.address_type, &["FQDN", "IPv4", "IPv6"]);
        }
    }
    if s.endpoints.len() > 1000 {
        errs.0.push(field::FieldError::Invalid(
            "endpoints".into(),
            field::Shown::Int(s.endpoints.len() as i64),
            "must have at most 1000 items".into(),
        ));
    }
    if s.ports.len() > 100 {
        errs.invalid("ports", s.ports.len() as i64, "must have at most 100 items");
    }
    for (i, e) in s.endpoints.iter().enumerate() {
        if e.addresses.is_empty() {
            errs.required(format!("endpoints[{i}].addresses"), "");
        }
        for (j, a) in e.addresses.iter().enumerate() {
            let ok = match s.address_type.as_str() {
                "IPv4" => a.parse::<std::net::Ipv4Addr>().is_ok(),
                "IPv6" => a.parse::<std::net::Ipv6Addr>().is_ok(),
                _ => field::dns1123_subdomain(a).is_empty(),
            };
            if !ok {
                errs.invalid(
                    format!("endpoints[{i}].addresses[{j}]"),
                    a,
                    format!("must be a valid {} address", s.address_type),
                );
            }
        }
    }
    for (i, p) in s.ports.iter().enumerate() {
        if let Some(port) = p.port
            && !(1..=65535).contains(&port)
        {
            errs.invalid(
                format!("ports[{i}].port"),
                port,
                "must be between 1 and 65535, inclusive",
            );
        }
        if let Some(proto) = &p.protocol
            && !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP")
        {
            errs.not_supported(
                format!("ports[{i}].protocol"),
                proto,
                &["SCTP", "TCP", "UDP"],
            );
        }
    }
}
