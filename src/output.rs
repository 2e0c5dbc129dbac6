//! How objects are shown: kubectl-like tables, `describe`, and YAML/JSON in
//! the manifest form (empty fields left out, as the apiserver does).

use std::time::SystemTime;

use serde_json::Value;
use strait_proto::Kind;
use strait_proto::v1::{EndpointSlice, Node, Object, Pod, Service, int_or_string, object};

/// `-o` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Wide,
    Yaml,
    Json,
}

/// Drops nulls, empty strings, zero numbers and empty collections.
pub fn prune(v: Value) -> Option<Value> {
    match v {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::Number(n) if n.as_f64() == Some(0.0) => None,
        Value::Array(a) => {
            let a: Vec<Value> = a.into_iter().filter_map(prune).collect();
            (!a.is_empty()).then_some(Value::Array(a))
        }
        Value::Object(m) => {
            let m: serde_json::Map<String, Value> = m
                .into_iter()
                .filter_map(|(k, v)| prune(v).map(|v| (k, v)))
                .collect();
            (!m.is_empty()).then_some(Value::Object(m))
        }
        other => Some(other),
    }
}

/// The object as a manifest value.
pub fn manifest(o: &Object) -> Value {
    prune(o.to_json()).unwrap_or(Value::Null)
}

pub fn to_yaml(v: &Value) -> anyhow::Result<String> {
    Ok(serde_saphyr::to_string(v)?)
}

/// kubectl's AGE column: 45s, 12m, 3h, 5d.
pub fn age(created: &str) -> String {
    let Ok(t) = humantime::parse_rfc3339(created) else {
        return "<unknown>".into();
    };
    let secs = SystemTime::now()
        .duration_since(t)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn created(o: &Object) -> &str {
    o.metadata()
        .map(|m| m.creation_timestamp.as_str())
        .unwrap_or("")
}

fn or_none(s: String) -> String {
    if s.is_empty() { "<none>".into() } else { s }
}

fn svc_ports(s: &Service) -> String {
    let spec = s.spec.clone().unwrap_or_default();
    let ports: Vec<String> = spec
        .ports
        .iter()
        .map(|p| {
            if p.node_port != 0 {
                format!("{}:{}/{}", p.port, p.node_port, p.protocol)
            } else {
                format!("{}/{}", p.port, p.protocol)
            }
        })
        .collect();
    or_none(ports.join(","))
}

fn svc_row(s: &Service, wide: bool) -> Vec<String> {
    let spec = s.spec.clone().unwrap_or_default();
    let ty = spec.r#type.clone();
    let cluster_ip = if ty == "ExternalName" {
        "<none>".into()
    } else {
        or_none(spec.cluster_ip.clone())
    };
    let ingress: Vec<String> = s
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .map(|lb| {
            lb.ingress
                .iter()
                .map(|i| {
                    if i.ip.is_empty() {
                        i.hostname.clone()
                    } else {
                        i.ip.clone()
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let external = match ty.as_str() {
        "ExternalName" => spec.external_name.clone(),
        "LoadBalancer" if ingress.is_empty() => "<pending>".into(),
        "LoadBalancer" => ingress.join(","),
        _ if !spec.external_ips.is_empty() => spec.external_ips.join(","),
        _ => "<none>".into(),
    };
    let mut row = vec![cluster_ip, external, svc_ports(s)];
    row.insert(0, ty);
    if wide {
        let sel: Vec<String> = spec
            .selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        row.push(String::new()); // AGE placeholder, replaced below
        row.push(or_none(sel.join(",")));
    }
    row
}

fn pod_row(p: &Pod) -> Vec<String> {
    let ready = strait_ready(p);
    let status = p.status.clone().unwrap_or_default();
    let terminating = p
        .metadata
        .as_ref()
        .is_some_and(|m| !m.deletion_timestamp.is_empty());
    vec![
        if ready { "1/1" } else { "0/1" }.into(),
        if terminating {
            "Terminating".into()
        } else {
            or_none(status.phase.clone())
        },
        or_none(status.pod_ip.clone()),
        or_none(
            p.spec
                .as_ref()
                .map(|s| s.node_name.clone())
                .unwrap_or_default(),
        ),
    ]
}

fn strait_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.r#type == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// Each node agent's programmed revision as the contacted replica last
/// heard it (heartbeats), and that replica's revision, for `get nodes`.
#[derive(Debug, Default)]
pub struct NodeProgress {
    pub applied: std::collections::HashMap<String, u64>,
    pub revision: u64,
}

fn node_row(n: &Node, progress: &NodeProgress) -> Vec<String> {
    let name = n.metadata.as_ref().map(|m| m.name.as_str()).unwrap_or("");
    let applied = progress.applied.get(name).copied().filter(|r| *r > 0);
    let status = n.status.clone().unwrap_or_default();
    let ready = status
        .conditions
        .iter()
        .find(|c| c.r#type == "Ready")
        .map(|c| c.status.as_str());
    let ip = status
        .addresses
        .iter()
        .find(|a| a.r#type == "InternalIP")
        .map(|a| a.address.clone())
        .unwrap_or_default();
    vec![
        match ready {
            Some("True") => "Ready".into(),
            Some(_) => "NotReady".into(),
            None => "Unknown".into(),
        },
        or_none(ip),
        applied.map_or_else(|| "<none>".into(), |r| r.to_string()),
        applied.map_or_else(
            || "<unknown>".into(),
            |r| progress.revision.saturating_sub(r).to_string(),
        ),
    ]
}

fn slice_row(s: &EndpointSlice) -> Vec<String> {
    let ports: Vec<String> = s
        .ports
        .iter()
        .filter_map(|p| p.port)
        .map(|p| p.to_string())
        .collect();
    let addrs: Vec<String> = s
        .endpoints
        .iter()
        .flat_map(|e| e.addresses.iter().cloned())
        .collect();
    let shown = if addrs.len() > 3 {
        format!("{} + {} more...", addrs[..3].join(","), addrs.len() - 3)
    } else {
        addrs.join(",")
    };
    vec![
        s.address_type.clone(),
        or_none(ports.join(",")),
        or_none(shown),
    ]
}

/// kubectl's note for an empty answer; `namespace` is empty for every
/// namespace and for cluster-scoped kinds.
pub fn no_resources(namespace: &str) {
    if namespace.is_empty() {
        eprintln!("No resources found");
    } else {
        eprintln!("No resources found in {namespace} namespace.");
    }
}

/// The table for `objects` of `kind`.
/// `progress` fills the APPLIED-REVISION and LAG columns of nodes.
pub fn table(
    kind: Kind,
    objects: &[Object],
    all_namespaces: bool,
    wide: bool,
    progress: &NodeProgress,
) -> String {
    let columns = Columns {
        kind,
        all_namespaces,
        wide,
    };
    let mut rows = vec![columns.header()];
    rows.extend(objects.iter().filter_map(|o| columns.row(o, progress)));
    let widths = widths(&rows, &[]);
    rows.iter().map(|r| line(r, &widths)).collect()
}

/// The columns `get` shows for a kind; `get -w` keeps them for every later
/// row.
#[derive(Clone, Copy, Debug)]
pub struct Columns {
    pub kind: Kind,
    pub all_namespaces: bool,
    pub wide: bool,
}

impl Columns {
    pub fn header(&self) -> Vec<String> {
        let mut header: Vec<&str> = match self.kind {
            Kind::Service => vec![
                "NAME",
                "TYPE",
                "CLUSTER-IP",
                "EXTERNAL-IP",
                "PORT(S)",
                "AGE",
            ],
            Kind::Pod => vec!["NAME", "READY", "STATUS", "IP", "NODE", "AGE"],
            Kind::Node => vec![
                "NAME",
                "STATUS",
                "INTERNAL-IP",
                "APPLIED-REVISION",
                "LAG",
                "AGE",
            ],
            Kind::EndpointSlice => vec!["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"],
        };
        if self.wide && self.kind == Kind::Service {
            header.push("SELECTOR");
        }
        if self.all_namespaces && self.kind.namespaced() {
            header.insert(0, "NAMESPACE");
        }
        header.iter().map(|s| s.to_string()).collect()
    }

    /// The cells of `o`'s row; `None` for an object without a kind.
    pub fn row(&self, o: &Object, progress: &NodeProgress) -> Option<Vec<String>> {
        let wide_service = self.wide && self.kind == Kind::Service;
        let mut cells = match &o.kind {
            Some(object::Kind::Service(s)) => svc_row(s, self.wide),
            Some(object::Kind::Pod(p)) => pod_row(p),
            Some(object::Kind::Node(n)) => node_row(n, progress),
            Some(object::Kind::EndpointSlice(s)) => slice_row(s),
            None => return None,
        };
        let age = age(created(o));
        if wide_service {
            // svc_row left a slot for AGE before SELECTOR.
            let n = cells.len();
            cells[n - 2] = age;
        } else {
            cells.push(age);
        }
        cells.insert(0, o.name().to_string());
        if self.all_namespaces && self.kind.namespaced() {
            cells.insert(0, o.namespace().to_string());
        }
        Some(cells)
    }
}

/// Each column's width: its widest cell in `rows`, at least `at_least`'s.
pub fn widths(rows: &[Vec<String>], at_least: &[usize]) -> Vec<usize> {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    (0..columns)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .chain(at_least.get(i).copied())
                .max()
                .unwrap_or(0)
        })
        .collect()
}

/// One row, cells padded to `widths` and three spaces apart.
pub fn line(cells: &[String], widths: &[usize]) -> String {
    let padded: Vec<String> = cells
        .iter()
        .enumerate()
        .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
        .collect();
    let mut out = padded.join("   ").trim_end().to_string();
    out.push('\n');
    out
}

/// `describe` text for a Pod, in kubectl's layout.
pub fn describe_pod(o: &Object, p: &Pod) -> String {
    let meta = p.metadata.clone().unwrap_or_default();
    let spec = p.spec.clone().unwrap_or_default();
    let status = p.status.clone().unwrap_or_default();
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{:<27}{}\n", format!("{k}:"), v));
    line("Name", meta.name.clone());
    line("Namespace", meta.namespace.clone());
    let node = match (spec.node_name.as_str(), status.host_ip.as_str()) {
        ("", _) => "<none>".to_string(),
        (n, "") => n.to_string(),
        (n, ip) => format!("{n}/{ip}"),
    };
    line("Node", node);
    line("Labels", or_none(pairs(&meta.labels)));
    line("Annotations", or_none(pairs(&meta.annotations)));
    line(
        "Status",
        if meta.deletion_timestamp.is_empty() {
            or_none(status.phase.clone())
        } else {
            format!("Terminating (since {})", meta.deletion_timestamp)
        },
    );
    line("IP", or_none(status.pod_ip.clone()));
    if let Some(grace) = spec.termination_grace_period_seconds {
        line("Termination Grace Period", format!("{grace}s"));
    }
    out.push_str("Containers:\n");
    for c in &spec.containers {
        out.push_str(&format!("  {}:\n", c.name));
        if !c.image.is_empty() {
            out.push_str(&format!("    Image:      {}\n", c.image));
        }
        for port in &c.ports {
            let protocol = if port.protocol.is_empty() {
                "TCP"
            } else {
                port.protocol.as_str()
            };
            let name = if port.name.is_empty() {
                String::new()
            } else {
                format!(" ({})", port.name)
            };
            out.push_str(&format!(
                "    Port:       {}/{protocol}{name}\n",
                port.container_port
            ));
        }
        if let Some(probe) = &c.readiness_probe {
            out.push_str(&format!("    Readiness:  {}\n", probe_text(probe)));
        }
    }
    out.push_str(&conditions(&status.conditions));
    out.push_str(&format!(
        "{:<27}{}\n",
        "Resource Version:", meta.resource_version
    ));
    out.push_str(&format!("{:<27}{} ago\n", "Created:", age(created(o))));
    out
}

/// `describe` text for a Node, in kubectl's layout, with the revision its
/// agent last reported programmed.
pub fn describe_node(o: &Object, n: &Node, progress: &NodeProgress) -> String {
    let meta = n.metadata.clone().unwrap_or_default();
    let status = n.status.clone().unwrap_or_default();
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{:<25}{}\n", format!("{k}:"), v));
    line("Name", meta.name.clone());
    line("Labels", or_none(pairs(&meta.labels)));
    line("Annotations", or_none(pairs(&meta.annotations)));
    let applied = progress.applied.get(&meta.name).copied().filter(|r| *r > 0);
    line(
        "Applied Revision",
        applied.map_or_else(
            || "<none>".into(),
            |r| format!("{r} (lag {})", progress.revision.saturating_sub(r)),
        ),
    );
    out.push_str(&conditions(&status.conditions));
    out.push_str("Addresses:\n");
    for a in &status.addresses {
        out.push_str(&format!("  {}:  {}\n", a.r#type, a.address));
    }
    out.push_str(&format!(
        "{:<25}{}\n",
        "Resource Version:", meta.resource_version
    ));
    out.push_str(&format!("{:<25}{} ago\n", "Created:", age(created(o))));
    out
}

/// `k=v` pairs, comma-separated.
fn pairs(map: &std::collections::BTreeMap<String, String>) -> String {
    map.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// kubectl's probe summary: `tcp-socket :8080 delay=0s timeout=1s
/// period=10s #success=1 #failure=3`, with Kubernetes' defaults for unset
/// fields.
fn probe_text(p: &strait_proto::v1::Probe) -> String {
    let port = |v: Option<&strait_proto::v1::IntOrString>| match v.and_then(|t| t.value.as_ref()) {
        Some(int_or_string::Value::IntVal(v)) => v.to_string(),
        Some(int_or_string::Value::StrVal(v)) => v.clone(),
        None => String::new(),
    };
    let action = if let Some(t) = &p.tcp_socket {
        format!("tcp-socket :{}", port(t.port.as_ref()))
    } else if let Some(h) = &p.http_get {
        let scheme = if h.scheme.is_empty() {
            "http".to_string()
        } else {
            h.scheme.to_lowercase()
        };
        format!(
            "http-get {scheme}://{}:{}{}",
            h.host,
            port(h.port.as_ref()),
            h.path
        )
    } else if let Some(e) = &p.exec {
        format!("exec [{}]", e.command.join(" "))
    } else {
        "<none>".into()
    };
    let or = |v: i32, default: i32| if v > 0 { v } else { default };
    format!(
        "{action} delay={}s timeout={}s period={}s #success={} #failure={}",
        p.initial_delay_seconds.max(0),
        or(p.timeout_seconds, 1),
        or(p.period_seconds, 10),
        or(p.success_threshold, 1),
        or(p.failure_threshold, 3)
    )
}

/// The Conditions block: one row per condition.
fn conditions(conds: &[strait_proto::v1::Condition]) -> String {
    let mut rows = vec![
        ["Type", "Status", "LastTransitionTime", "Reason", "Message"]
            .map(String::from)
            .to_vec(),
    ];
    rows.extend(conds.iter().map(|c| {
        vec![
            c.r#type.clone(),
            c.status.clone(),
            c.last_transition_time.clone(),
            c.reason.clone(),
            c.message.clone(),
        ]
    }));
    let widths = widths(&rows, &[]);
    let mut out = "Conditions:\n".to_string();
    for r in &rows {
        out.push_str("  ");
        out.push_str(&line(r, &widths));
    }
    out
}

/// `describe` text for a Service, with its endpoints from `slices`.
pub fn describe_service(o: &Object, s: &Service, slices: &[Object]) -> String {
    let meta = s.metadata.clone().unwrap_or_default();
    let spec = s.spec.clone().unwrap_or_default();
    let labels: Vec<String> = meta
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let sel: Vec<String> = spec
        .selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{:<25}{}\n", format!("{k}:"), v));
    line("Name", meta.name.clone());
    line("Namespace", meta.namespace.clone());
    line("Labels", or_none(labels.join(",")));
    line("Selector", or_none(sel.join(",")));
    line("Type", spec.r#type.clone());
    if spec.r#type == "ExternalName" {
        line("External Name", spec.external_name.clone());
    } else {
        line("IP", or_none(spec.cluster_ip.clone()));
    }
    if let Some(lb) = s.status.as_ref().and_then(|st| st.load_balancer.as_ref()) {
        for i in &lb.ingress {
            line("LoadBalancer Ingress", i.ip.clone());
        }
    }
    for p in &spec.ports {
        let name = if p.name.is_empty() {
            "<unset>".to_string()
        } else {
            p.name.clone()
        };
        line("Port", format!("{name}  {}/{}", p.port, p.protocol));
        let target = match p.target_port.as_ref().and_then(|t| t.value.as_ref()) {
            Some(int_or_string::Value::IntVal(v)) => format!("{v}/{}", p.protocol),
            Some(int_or_string::Value::StrVal(v)) => format!("{v}/{}", p.protocol),
            None => "<none>".into(),
        };
        line("TargetPort", target);
        if p.node_port != 0 {
            line(
                "NodePort",
                format!("{name}  {}/{}", p.node_port, p.protocol),
            );
        }
        let eps: Vec<String> = slices
            .iter()
            .filter_map(|o| match &o.kind {
                Some(object::Kind::EndpointSlice(es)) => Some(es),
                _ => None,
            })
            .flat_map(|es| {
                let port = es
                    .ports
                    .iter()
                    .find(|ep| ep.name.as_deref().unwrap_or("") == p.name)
                    .and_then(|ep| ep.port);
                es.endpoints
                    .iter()
                    .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
                    .flat_map(move |e| {
                        e.addresses.iter().map(move |a| match port {
                            Some(port) => format!("{a}:{port}"),
                            None => a.clone(),
                        })
                    })
            })
            .collect();
        if spec.r#type != "ExternalName" {
            line("Endpoints", or_none(eps.join(",")));
        }
    }
    line("Session Affinity", spec.session_affinity.clone());
    if !spec.external_traffic_policy.is_empty() {
        line(
            "External Traffic Policy",
            spec.external_traffic_policy.clone(),
        );
    }
    if !spec.internal_traffic_policy.is_empty() {
        line(
            "Internal Traffic Policy",
            spec.internal_traffic_policy.clone(),
        );
    }
    line("Resource Version", meta.resource_version.clone());
    line("Created", age(created(o)) + " ago");
    out
}
