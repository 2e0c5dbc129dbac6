//! Observability through the real binary: `/metrics` of a control replica
//! and a node agent scraped and parsed with a Prometheus text-format
//! parser while real traffic flows, the node's `/healthz` going stale,
//! `strait get nodes` showing applied revisions, and the spans of an apply
//! received by an OTLP/gRPC receiver running in the test.

#[allow(dead_code)]
#[path = "../dataplane/harness.rs"]
mod harness;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::{BIN, Backend, Net, eventually, pod, service, who};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::trace::v1::Span;

/// A `strait` process killed on drop, with the addresses it printed.
struct Proc {
    child: Child,
    printed: HashMap<String, String>,
}

impl Proc {
    /// Starts `strait args...` and reads stdout until every prefix in
    /// `wait_for` has printed its address.
    fn start(args: &[&str], envs: &[(&str, &str)], wait_for: &[&str]) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.env("STRAIT_INSECURE", "1")
            .env("STRAIT_LOG", "warn")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn strait");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut printed = HashMap::new();
        while wait_for.iter().any(|p| !printed.contains_key(*p)) {
            let line = lines
                .next()
                .expect("the process printed its addresses")
                .expect("read stdout");
            for p in wait_for {
                if let Some(addr) = line.strip_prefix(p) {
                    printed.insert(p.to_string(), addr.trim().to_string());
                }
            }
        }
        // Keep draining so later output never blocks the process.
        std::thread::spawn(move || for _ in lines {});
        Proc { child, printed }
    }

    fn addr(&self, prefix: &str) -> String {
        self.printed[prefix].clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn control(dir: &std::path::Path, net: &Net, envs: &[(&str, &str)]) -> Proc {
    let dir = dir.to_str().expect("utf-8 path");
    let p = Proc::start(
        &[
            "control",
            "--data-dir",
            dir,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--service-cidr",
            &net.service_cidr,
            "--lb-pool",
            &net.lb_pool,
        ],
        envs,
        &["listening on ", "metrics on "],
    );
    eventually("the control plane to serve", || {
        cli(&p, &["get", "svc"]).status.success().then_some(())
    });
    p
}

fn cli(control: &Proc, args: &[&str]) -> Output {
    Command::new(BIN)
        .env("STRAIT_INSECURE", "1")
        .env("STRAIT_SERVER", control.addr("listening on "))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run strait")
}

fn apply(control: &Proc, yaml: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.yaml");
    std::fs::write(&path, yaml).expect("write manifest");
    let out = cli(control, &["apply", "-f", path.to_str().expect("utf-8")]);
    assert!(
        out.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A plain HTTP/1.1 GET: status code and body.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// The samples of `/metrics`, parsed by `prometheus-parse`.
fn scrape(addr: &str) -> Vec<prometheus_parse::Sample> {
    let (code, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .expect("valid Prometheus text format")
        .samples
}

/// Sum of the samples named `metric` whose labels include `labels`
/// (a histogram counts its observations).
fn value(samples: &[prometheus_parse::Sample], metric: &str, labels: &[(&str, &str)]) -> f64 {
    use prometheus_parse::Value;
    samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(b) => b.iter().map(|h| h.count).fold(0.0, f64::max),
            Value::Summary(_) => 0.0,
        })
        .sum()
}

/// A DNS query for `name` type A; the reply's rcode.
fn dns_query(server: &str, name: &str) -> u8 {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("udp");
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(u8::try_from(label.len()).expect("short label"));
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    sock.send_to(&q, server).expect("send");
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf).expect("dns reply");
    assert!(n >= 12);
    buf[3] & 0x0f
}

fn cluster_ip(control: &Proc, name: &str) -> String {
    let out = cli(control, &["get", "svc", name, "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    v["spec"]["clusterIP"]
        .as_str()
        .expect("clusterIP")
        .to_string()
}

#[test]
fn metrics_move_with_real_traffic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new(41);
    let c = control(&dir.path().join("control"), &net, &[]);
    let node = Proc::start(
        &[
            "node",
            "--name",
            "node-1",
            "--node-ip",
            &net.node_ip,
            "--control",
            &c.addr("listening on "),
            "--data-dir",
            dir.path().join("node").to_str().expect("utf-8"),
            "--dns-listen",
            "127.0.0.1:0",
            "--dns-upstream",
            "none",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        &[],
        &["dns listening on ", "metrics on "],
    );
    let node_metrics = node.addr("metrics on ");
    let control_metrics = c.addr("metrics on ");

    // One good backend, and one endpoint nobody listens on.
    let good = Backend::greeter("good-1");
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        port
    };
    let dead_pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: dead-1, labels: {{app: web}}}}\n\
         spec:\n  nodeName: node-1\n  containers:\n  - name: c\n    ports: [{{name: app, containerPort: {dead}}}]\n\
         status: {{podIP: 127.0.0.1}}\n---\n"
    );
    apply(
        &c,
        &format!(
            "{}{}{}",
            service("web", "ClusterIP", "app: web"),
            pod(&good, "app: web"),
            dead_pod
        ),
    );
    let addr = format!("{}:8080", cluster_ip(&c, "web"));
    eventually("forwarding through the ClusterIP", || {
        who(&addr).ok().filter(|n| n == "good-1")
    });
    let before = scrape(&node_metrics);
    let endpoint = good.addr.to_string();
    let ep = [
        ("namespace", "default"),
        ("service", "web"),
        ("port", "app"),
        ("endpoint", endpoint.as_str()),
    ];
    let opened_before = value(&before, "strait_proxy_connections_opened_total", &ep);
    const N: usize = 20;
    for _ in 0..N {
        let name = who(&addr).expect("forwarded connection");
        assert_eq!(name, "good-1");
    }
    let after = eventually("every connection counted closed", || {
        let s = scrape(&node_metrics);
        (value(&s, "strait_proxy_connections_active", &ep) == 0.0
            && value(&s, "strait_proxy_connections_opened_total", &ep) >= opened_before + N as f64)
            .then_some(s)
    });
    let opened = value(&after, "strait_proxy_connections_opened_total", &ep);
    assert!(opened >= opened_before + N as f64, "opened {opened}");
    assert_eq!(
        value(&after, "strait_proxy_connections_closed_total", &ep),
        opened
    );
    let to_client = value(
        &after,
        "strait_proxy_bytes_total",
        &[
            ("service", "web"),
            ("endpoint", endpoint.as_str()),
            ("direction", "to_client"),
        ],
    );
    assert!(
        to_client >= ("good-1\n".len() * N) as f64,
        "bytes to client {to_client}"
    );
    // The dead endpoint: failures, retries on the good one, an ejection.
    let web = [("service", "web")];
    assert!(value(&after, "strait_proxy_connect_failures_total", &web) >= 2.0);
    assert!(value(&after, "strait_proxy_connect_retries_total", &web) >= 2.0);
    assert!(value(&after, "strait_proxy_endpoint_ejections_total", &web) >= 1.0);
    assert!(value(&after, "strait_listeners", &[]) >= 1.0);
    let applied = value(&after, "strait_applied_revision", &[]);
    assert!(applied > 0.0);
    assert!(
        value(&after, "strait_network_programming_duration_seconds", &[]) >= 1.0,
        "the Service and its endpoints were programmed after their commit"
    );

    // DNS: a hit and a miss, by type and rcode.
    let dns = node.addr("dns listening on ");
    assert_eq!(dns_query(&dns, "web.default.svc.cluster.local"), 0);
    assert_eq!(dns_query(&dns, "nope.default.svc.cluster.local"), 3);
    let s = scrape(&node_metrics);
    assert!(
        value(
            &s,
            "strait_dns_queries_total",
            &[("type", "A"), ("rcode", "NOERROR")]
        ) >= 1.0
    );
    assert!(
        value(
            &s,
            "strait_dns_queries_total",
            &[("type", "A"), ("rcode", "NXDOMAIN")]
        ) >= 1.0
    );

    // Health: programmed recently.
    let (code, body) = http_get(&node_metrics, "/healthz").expect("healthz");
    assert_eq!(code, 200, "{body}");
    let h: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(h["appliedRevision"].as_u64().is_some_and(|r| r > 0), "{h}");
    assert_eq!(http_get(&node_metrics, "/livez").map(|r| r.0), Some(200));

    // The control replica.
    let s = scrape(&control_metrics);
    assert_eq!(value(&s, "strait_raft_is_leader", &[]), 1.0);
    assert!(value(&s, "strait_raft_term", &[]) >= 1.0);
    assert!(value(&s, "strait_raft_applied_index", &[]) >= 1.0);
    assert!(value(&s, "strait_raft_commit_index", &[]) >= 1.0);
    assert_eq!(value(&s, "strait_objects", &[("kind", "Service")]), 1.0);
    assert_eq!(value(&s, "strait_objects", &[("kind", "Pod")]), 2.0);
    assert!(value(&s, "strait_watchers", &[]) >= 1.0);
    assert!(value(&s, "strait_allocator_used", &[("allocator", "cluster_ip")]) >= 1.0);
    assert_eq!(
        value(&s, "strait_allocator_size", &[("allocator", "cluster_ip")]),
        254.0
    );
    assert!(
        value(
            &s,
            "strait_writes_total",
            &[("op", "apply"), ("result", "created")]
        ) >= 3.0
    );
    assert!(value(&s, "strait_apply_duration_seconds", &[]) >= 3.0);
    assert!(value(&s, "strait_watch_delivery_duration_seconds", &[]) >= 1.0);
    let writes_before = value(&s, "strait_writes_total", &[("op", "apply")]);
    let batches_before = value(&s, "strait_raft_proposal_batch_size", &[]);
    assert!(batches_before >= 1.0, "{batches_before} proposals");
    apply(&c, &service("other", "ClusterIP", "app: other"));
    let s = scrape(&control_metrics);
    assert_eq!(
        value(&s, "strait_writes_total", &[("op", "apply")]),
        writes_before + 1.0
    );
    assert!(value(&s, "strait_raft_proposal_batch_size", &[]) > batches_before);
    assert_eq!(
        http_get(&control_metrics, "/readyz").map(|r| r.0),
        Some(200)
    );
    assert_eq!(http_get(&control_metrics, "/livez").map(|r| r.0), Some(200));

    // `get nodes`: the node's applied revision and lag, from heartbeats.
    let table = eventually("get nodes to show node-1's applied revision", || {
        let out = cli(&c, &["get", "nodes"]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let row = text.lines().find(|l| l.starts_with("node-1"))?.to_string();
        let cols: Vec<&str> = row.split_whitespace().collect();
        (cols.get(3)?.parse::<u64>().ok()? > 0 && cols.get(4)?.parse::<u64>().is_ok())
            .then_some(text)
    });
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|h| h.contains("APPLIED-REVISION") && h.contains("LAG")),
        "{table}"
    );
}

#[test]
fn healthz_turns_503_when_nothing_is_programmed_in_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new(42);
    // No control plane answers and no state was persisted: nothing can be
    // programmed, so the agent turns unhealthy after --healthz-timeout.
    let node = Proc::start(
        &[
            "node",
            "--name",
            "lonely",
            "--node-ip",
            &net.node_ip,
            "--control",
            "127.0.0.1:1",
            "--data-dir",
            dir.path().to_str().expect("utf-8"),
            "--dns-listen",
            "off",
            "--metrics-listen",
            "127.0.0.1:0",
            "--healthz-timeout",
            "1s",
        ],
        &[],
        &["metrics on "],
    );
    let addr = node.addr("metrics on ");
    for path in ["/healthz", "/livez"] {
        let (code, body) = eventually(&format!("{path} to answer 503"), || {
            http_get(&addr, path).filter(|(c, _)| *c == 503)
        });
        let h: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(h["healthy"], false, "{code} {h}");
    }
    let s = scrape(&addr);
    assert!(value(&s, "strait_watch_reconnects_total", &[]) >= 1.0);
    assert_eq!(value(&s, "strait_applied_revision", &[]), 0.0);
}

#[test]
fn metrics_listen_off_serves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new(43);
    let dir = dir.path().to_str().expect("utf-8");
    let p = Proc::start(
        &[
            "control",
            "--data-dir",
            dir,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--service-cidr",
            &net.service_cidr,
        ],
        &[],
        &["listening on "],
    );
    assert!(!p.printed.contains_key("metrics on "));
    // An explicit address that cannot be bound stops the start.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();
    let out = Command::new(BIN)
        .env("STRAIT_INSECURE", "1")
        .args(["control", "--data-dir", dir, "--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", &taken])
        .output()
        .expect("run strait");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("metrics address"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An OTLP/gRPC trace receiver keeping every span it gets, with its
/// resource's service name.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push((service.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attr(span: &Span, key: &str) -> Option<String> {
    let v = span
        .attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .as_ref()?;
    match v.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

#[test]
fn apply_spans_arrive_over_otlp() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let receiver = Receiver::default();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let svc = TraceServiceServer::new(receiver.clone());
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });

    let dir = tempfile::tempdir().expect("tempdir");
    let net = Net::new(44);
    let endpoint = format!("http://127.0.0.1:{port}");
    let c = control(
        dir.path(),
        &net,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("STRAIT_LOG", "info"),
        ],
    );
    apply(&c, &service("traced", "ClusterIP", "app: traced"));

    let (apply_span, service_name) = eventually("the apply span", || {
        let spans = receiver.spans.lock().unwrap_or_else(|p| p.into_inner());
        spans
            .iter()
            .find(|(_, s)| {
                s.name == "Resources.Apply" && attr(s, "strait.name").as_deref() == Some("traced")
            })
            .map(|(svc, s)| (s.clone(), svc.clone()))
    });
    assert_eq!(service_name, "strait-control");
    assert_eq!(attr(&apply_span, "strait.kind").as_deref(), Some("Service"));
    assert_eq!(
        attr(&apply_span, "strait.namespace").as_deref(),
        Some("default")
    );
    assert_eq!(
        attr(&apply_span, "strait.result").as_deref(),
        Some("created")
    );
    let revision = attr(&apply_span, "strait.revision").expect("revision attribute");
    assert!(revision.parse::<u64>().is_ok_and(|r| r > 0), "{revision}");
    assert_eq!(
        apply_span.kind,
        opentelemetry_proto::tonic::trace::v1::span::SpanKind::Server as i32
    );

    // The Raft commit, a child of the request; the state machine's apply
    // of the same revision.
    let commit = eventually("the raft.commit span", || {
        let spans = receiver.spans.lock().unwrap_or_else(|p| p.into_inner());
        spans
            .iter()
            .find(|(_, s)| s.name == "raft.commit" && s.parent_span_id == apply_span.span_id)
            .map(|(_, s)| s.clone())
    });
    assert_eq!(commit.trace_id, apply_span.trace_id);
    assert_eq!(attr(&commit, "strait.revision"), Some(revision.clone()));
    assert_eq!(attr(&commit, "strait.forwarded").as_deref(), Some("false"));
    eventually("the state_machine.apply span", || {
        let spans = receiver.spans.lock().unwrap_or_else(|p| p.into_inner());
        spans
            .iter()
            .any(|(_, s)| {
                s.name == "state_machine.apply"
                    && attr(s, "strait.revision").as_deref() == Some(revision.as_str())
            })
            .then_some(())
    });
    drop(c);
    drop(rt);
}
