//! End-to-end tests of the control plane through the real `strait` binary:
//! apply/get/delete, validation wording, allocation, endpoint derivation,
//! persistence across restarts, watch resume and compaction, concurrency.

mod harness;

use harness::*;
use serde_json::Value;

fn svc(name: &str, body: &str) -> String {
    format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n{body}")
}

#[test]
fn examples_apply_unchanged_and_show_in_get_svc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &["--lb-pool", "192.0.2.0/28"]);
    let out = ok(c.cli(&["apply", "-f", examples_dir().to_str().expect("path")]));
    for line in [
        "pod/backend-1 created",
        "pod/backend-2 created",
        "service/backend-svc created",
        "service/db-svc created",
        "service/frontend-svc created",
        "service/web-lb created",
    ] {
        assert!(out.contains(line), "missing {line:?} in {out}");
    }
    let table = ok(c.cli(&["get", "svc"]));
    let header = table.lines().next().expect("header");
    assert!(header.starts_with("NAME") && header.contains("TYPE") && header.contains("CLUSTER-IP"));
    assert!(header.contains("EXTERNAL-IP") && header.contains("PORT(S)") && header.contains("AGE"));
    let row = |n: &str| {
        table
            .lines()
            .find(|l| l.starts_with(n))
            .unwrap_or_else(|| panic!("no row {n}: {table}"))
            .to_string()
    };
    assert!(row("frontend-svc ").contains("80:31000/TCP"), "{table}");
    assert!(row("db-svc ").contains("mydb.amazonaws.com"), "{table}");
    assert!(row("web-lb ").contains("192.0.2.1"), "{table}");
    assert!(row("backend-svc ").contains("9090/TCP"), "{table}");
    // ClusterIPs come from the default service CIDR 10.96.0.0/12.
    let ip = get_json(&c, &["svc", "backend-svc"])["spec"]["clusterIP"]
        .as_str()
        .expect("ip")
        .to_string();
    let octets: Vec<u8> = ip.split('.').map(|o| o.parse().expect("octet")).collect();
    assert_eq!(octets[0], 10);
    assert!((96..112).contains(&octets[1]), "{ip}");
    // Re-applying the same files changes nothing.
    let again = ok(c.cli(&["apply", "-f", examples_dir().to_str().expect("path")]));
    assert!(again.contains("service/backend-svc unchanged"), "{again}");
}

#[test]
fn invalid_services_are_refused_with_apiserver_wording_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &[]);
    let cases: &[(&str, &str)] = &[
        (
            "  type: NodePort\n  ports:\n  - port: 80\n    nodePort: 80\n",
            "The Service \"web\" is invalid: spec.ports[0].nodePort: Invalid value: 80: provided port is not in the valid range. The range of valid ports is 30000-32767",
        ),
        (
            "  ports:\n  - port: 0\n",
            "spec.ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive",
        ),
        (
            "  ports:\n  - port: 80\n  - port: 81\n",
            "spec.ports[0].name: Required value",
        ),
        (
            "  ports:\n  - {name: a, port: 80}\n  - {name: a, port: 81}\n",
            "spec.ports[1].name: Duplicate value: \"a\"",
        ),
        (
            "  ports:\n  - {name: a, port: 80}\n  - {name: b, port: 80}\n",
            "spec.ports[1]: Duplicate value",
        ),
        (
            "  ports:\n  - port: 80\n    targetPort: 8080x--y\n",
            "spec.ports[0].targetPort: Invalid value: \"8080x--y\"",
        ),
        (
            "  ports:\n  - port: 80\n    nodePort: 30001\n",
            "spec.ports[0].nodePort: Forbidden: may not be used when `type` is 'ClusterIP'",
        ),
        (
            "  type: NodePort\n  clusterIP: None\n  ports:\n  - port: 80\n",
            "spec.clusterIP: Invalid value: \"None\": may not be set to 'None' for NodePort services",
        ),
        (
            "  type: ExternalName\n  externalName: Bad_Name\n",
            "spec.externalName: Invalid value: \"Bad_Name\"",
        ),
        (
            "  type: ExternalName\n  externalName: a.example.com\n  clusterIP: 10.96.0.9\n",
            "spec.clusterIP: Forbidden: may not be set for ExternalName services",
        ),
        (
            "  ports:\n  - port: 80\n  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: 86401\n",
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds: Invalid value: 86401: must be greater than 0 and less than 86400",
        ),
        (
            "  ports:\n  - port: 80\n  externalTrafficPolicy: Local\n",
            "spec.externalTrafficPolicy: Invalid value: \"Local\": may only be set for externally-accessible services",
        ),
        (
            "  clusterIP: 10.0.0.1\n  ports:\n  - port: 80\n",
            "failed to allocate IP 10.0.0.1: provided IP is not in the valid range. The range of valid IPs is 10.96.0.0/12",
        ),
        (
            "  type: Foo\n  ports:\n  - port: 80\n",
            "spec.type: Unsupported value: \"Foo\": supported values: \"ClusterIP\", \"NodePort\", \"LoadBalancer\", \"ExternalName\"",
        ),
        ("  ports: []\n", "spec.ports: Required value"),
    ];
    let before = ok(c.cli(&["cluster", "status"]));
    for (body, want) in cases {
        let err = fails(c.cli_stdin(&["apply", "-f", "-"], &svc("web", body)));
        assert!(
            err.contains(want),
            "for spec\n{body}\nwant {want:?}\ngot {err}"
        );
        assert!(err.contains("Error from server (Invalid)"), "{err}");
    }
    // A bad name is reported on metadata.name with the DNS-1035 rule.
    let err = fails(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc("1web", "  ports:\n  - port: 80\n"),
    ));
    assert!(err.contains("metadata.name: Invalid value: \"1web\": a DNS-1035 label must consist of lower case alphanumeric characters"), "{err}");
    // Annotations: keys are qualified names (case aside), 256 KiB in all.
    let annotated = |annotations: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  annotations:\n{annotations}spec:\n  ports:\n  - port: 80\n"
        )
    };
    let err = fails(c.cli_stdin(&["apply", "-f", "-"], &annotated("    \"bad key\": x\n")));
    assert!(err.contains("The Service \"web\" is invalid: metadata.annotations: Invalid value: \"bad key\": name part must consist of alphanumeric characters"), "{err}");
    let big = "x".repeat(256 * 1024);
    let err = fails(c.cli_stdin(
        &["apply", "-f", "-"],
        &annotated(&format!("    a: {big}\n")),
    ));
    assert!(err.contains("The Service \"web\" is invalid: metadata.annotations: Too long: may not be more than 262144 bytes"), "{err}");
    // Nothing was stored and the revision did not move.
    assert_eq!(
        ok(c.cli(&["cluster", "status"])).lines().next(),
        before.lines().next()
    );
    assert!(
        get_json(&c, &["svc"])["items"]
            .as_array()
            .is_none_or(Vec::is_empty)
    );
    // Upper case is allowed in annotation keys (the rule ignores case).
    ok(c.cli_stdin(
        &["apply", "-f", "-"],
        &annotated("    Example.COM/Owner: team-a\n"),
    ));
}

#[test]
fn malformed_manifests_are_reported_with_position_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &[]);
    let err = fails(c.cli_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: [\n",
    ));
    assert!(err.contains("line"), "{err}");
    let err = fails(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc("web", "  ports:\n  - port: 80\n    protocl: TCP\n"),
    ));
    assert!(
        err.contains("spec.ports[0]") && err.contains("protocl"),
        "{err}"
    );
    let err = fails(c.cli_stdin(
        &["apply", "-f", "-"],
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\n",
    ));
    assert!(
        err.contains("no matches for kind \"Deployment\" in version \"apps/v1\""),
        "{err}"
    );
    let big = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: big\n  annotations:\n    a: \"{}\"\nspec:\n  ports:\n  - port: 80\n",
        "x".repeat(1_100_000)
    );
    let err = fails(c.cli_stdin(&["apply", "-f", "-"], &big));
    assert!(err.contains("limit"), "{err}");
}

/// A process that cannot start exits non-zero with one line naming what
/// failed and why, each cause once (some errors' messages carry their
/// source, which the chain must not repeat).
#[test]
fn startup_errors_name_the_cause_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").expect("file");
    let file = file.to_str().expect("path");
    let data = dir.path().join("data");
    let data = data.to_str().expect("path");
    let missing = dir.path().join("missing.yaml");
    let missing = missing.to_str().expect("path");
    let control = ["control", "--metrics-listen", "off", "--data-dir"];
    for (args, cause) in [
        (
            [&control[..], &[data, "--node-port-range", "32000-31000"]].concat(),
            "error: starting the control plane: invalid --node-port-range: invalid range \"32000-31000\": need 1 <= LOW <= HIGH <= 65535".to_string(),
        ),
        (
            [&control[..], &[data, "--listen", &taken]].concat(),
            format!("error: starting the control plane: binding {taken}: Address already in use (os error 98)"),
        ),
        (
            [&control[..], &[file]].concat(),
            format!("error: starting the control plane: data directory {file}: File exists (os error 17)"),
        ),
        (
            vec!["node", "--name", "n1", "--node-ip", "127.0.0.1", "--metrics-listen", "off", "--data-dir", data, "--config-file", missing],
            format!("error: starting the node agent: reading {missing}: No such file or directory (os error 2)"),
        ),
    ] {
        let out = std::process::Command::new(BIN)
            .env("STRAIT_INSECURE", "1")
            .env("STRAIT_LOG", "off")
            .args(&args)
            .output()
            .expect("run strait");
        let err = fails(out);
        assert_eq!(err.trim_end(), cause, "{args:?}");
    }
}

#[test]
fn allocators_exhaust_and_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A /29 holds 6 assignable addresses; the NodePort range holds 2 ports.
    let c = Control::start(
        dir.path(),
        &[
            "--service-cidr",
            "10.200.0.0/29",
            "--node-port-range",
            "30000-30001",
        ],
    );
    for i in 0..6 {
        ok(c.cli_stdin(
            &["apply", "-f", "-"],
            &svc(&format!("s{i}"), "  ports:\n  - port: 80\n"),
        ));
    }
    let err = fails(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc("s6", "  ports:\n  - port: 80\n"),
    ));
    assert!(err.contains("range is full"), "{err}");
    ok(c.cli(&["delete", "svc", "s3"]));
    ok(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc("s6", "  ports:\n  - port: 80\n"),
    ));

    // NodePorts: a requested port is honoured, a taken one refused, then full.
    ok(c.cli(&["delete", "svc", "s0"]));
    ok(c.cli(&["delete", "svc", "s1"]));
    ok(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc(
            "np1",
            "  type: NodePort\n  ports:\n  - port: 80\n    nodePort: 30001\n",
        ),
    ));
    let err = fails(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc(
            "np2",
            "  type: NodePort\n  ports:\n  - port: 80\n    nodePort: 30001\n",
        ),
    ));
    assert!(
        err.contains(
            "spec.ports[0].nodePort: Invalid value: 30001: provided port is already allocated"
        ),
        "{err}"
    );
    ok(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc("np2", "  type: NodePort\n  ports:\n  - port: 80\n"),
    ));
    assert_eq!(
        get_json(&c, &["svc", "np2"])["spec"]["ports"][0]["nodePort"],
        30000
    );
    ok(c.cli(&["delete", "svc", "np1"]));
    let err = fails(
        c.cli_stdin(
            &["apply", "-f", "-"],
            &svc(
                "np3",
                "  type: NodePort\n  ports:\n  - port: 80\n  - {name: b, port: 81}\n",
            )
            .replace("- port: 80", "- {name: a, port: 80}"),
        ),
    );
    assert!(err.contains("range is full"), "{err}");
    // The refused write leaked nothing: one port is still free.
    ok(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc("np3", "  type: NodePort\n  ports:\n  - port: 80\n"),
    ));
}

#[test]
fn cluster_ip_is_immutable_and_kept_across_applies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &[]);
    ok(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc("web", "  ports:\n  - port: 80\n"),
    ));
    let first = get_json(&c, &["svc", "web"]);
    let ip = first["spec"]["clusterIP"].as_str().expect("ip").to_string();
    let out = ok(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc("web", "  ports:\n  - port: 81\n"),
    ));
    assert!(out.contains("service/web configured"), "{out}");
    assert_eq!(
        get_json(&c, &["svc", "web"])["spec"]["clusterIP"],
        Value::String(ip.clone())
    );
    let err = fails(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc("web", "  clusterIP: 10.96.0.77\n  ports:\n  - port: 81\n"),
    ));
    assert!(
        err.contains("spec.clusterIP: Invalid value: \"10.96.0.77\": field is immutable"),
        "{err}"
    );
    // A requested free address is honoured.
    ok(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc(
            "pinned",
            "  clusterIP: 10.96.0.77\n  ports:\n  - port: 80\n",
        ),
    ));
    let err = fails(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc(
            "pinned2",
            "  clusterIP: 10.96.0.77\n  ports:\n  - port: 80\n",
        ),
    ));
    assert!(err.contains("provided IP is already allocated"), "{err}");
}

const NODES_AND_PODS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: node-1, labels: {topology.kubernetes.io/zone: z1}}
status:
  addresses: [{type: InternalIP, address: 10.0.0.1}]
---
apiVersion: v1
kind: Pod
metadata: {name: a, labels: {app: web}}
spec:
  nodeName: node-1
  containers:
  - name: c
    ports: [{name: http, containerPort: 8080}]
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, labels: {app: web}}
spec:
  nodeName: node-1
  containers:
  - name: c
    ports: [{name: http, containerPort: 9090}]
status: {podIP: 10.1.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: host, labels: {app: web}}
spec:
  nodeName: node-1
  containers:
  - name: c
    ports: [{name: http, containerPort: 7070}]
---
apiVersion: v1
kind: Pod
metadata: {name: other, labels: {app: db}}
spec:
  containers:
  - name: c
status: {podIP: 10.1.0.9}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
"#;

fn endpoints(c: &Control) -> Vec<(String, i64, bool)> {
    let slices = get_json(c, &["endpointslices"]);
    let mut out = Vec::new();
    for s in slices["items"].as_array().cloned().unwrap_or_default() {
        assert_eq!(s["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        let port = s["ports"][0]["port"].as_i64().expect("port");
        for e in s["endpoints"].as_array().cloned().unwrap_or_default() {
            let ready = e["conditions"]["ready"].as_bool().unwrap_or(false);
            out.push((
                e["addresses"][0].as_str().expect("addr").to_string(),
                port,
                ready,
            ));
        }
    }
    out.sort();
    out
}

#[test]
fn endpoint_slices_follow_pods_with_named_ports_and_readiness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &[]);
    ok(c.cli_stdin(&["apply", "-f", "-"], NODES_AND_PODS));
    // Named port resolved per pod; the pod without podIP takes its node's address.
    assert_eq!(
        endpoints(&c),
        vec![
            ("10.0.0.1".into(), 7070, true),
            ("10.1.0.1".into(), 8080, true),
            ("10.1.0.2".into(), 9090, true),
        ]
    );
    let slices = get_json(&c, &["endpointslices"]);
    let e = &slices["items"][0]["endpoints"][0];
    assert_eq!(e["nodeName"], "node-1");
    assert_eq!(e["zone"], "z1");
    // A pod turning unready changes its Service's endpoints in the same write.
    let unready = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: web}}\nspec:\n  nodeName: node-1\n  containers:\n  - name: c\n    ports: [{name: http, containerPort: 8080}]\nstatus:\n  podIP: 10.1.0.1\n  conditions: [{type: Ready, status: \"False\"}]\n";
    ok(c.cli_stdin(&["apply", "-f", "-"], unready));
    assert!(endpoints(&c).contains(&("10.1.0.1".into(), 8080, false)));
    // Relabel a pod out of the selector; delete another.
    ok(c.cli_stdin(
        &["apply", "-f", "-"],
        &unready.replace("app: web", "app: gone"),
    ));
    ok(c.cli(&["delete", "pod", "b", "--grace-period", "0"]));
    assert_eq!(endpoints(&c), vec![("10.0.0.1".into(), 7070, true)]);
    // Derived slices may not be written or deleted by hand.
    let name = get_json(&c, &["endpointslices"])["items"][0]["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    let err = fails(c.cli(&["delete", "endpointslice", &name]));
    assert!(err.contains("Forbidden"), "{err}");
    // Deleting the Service removes its slices.
    ok(c.cli(&["delete", "svc", "web"]));
    assert!(endpoints(&c).is_empty());
}

/// `describe pod` and `describe node` in kubectl's layout: the Pod's node,
/// labels, IP, containers with their ports and readiness probe, and
/// conditions; the Node's labels, conditions and addresses.
#[test]
fn describe_shows_pods_and_nodes_like_kubectl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &[]);
    ok(c.cli_stdin(&["apply", "-f", "-"], NODES_AND_PODS));
    ok(c.cli_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata: {name: probed, labels: {app: web}}\nspec:\n  nodeName: node-1\n  containers:\n  - name: c\n    image: demo\n    ports: [{name: http, containerPort: 8080}]\n    readinessProbe:\n      httpGet: {path: /healthz, port: http}\n      periodSeconds: 1\n      failureThreshold: 2\nstatus: {podIP: 10.1.0.7}\n",
    ));
    let pod = ok(c.cli(&["describe", "pod", "probed"]));
    for want in [
        "Name:                      probed\n",
        "Namespace:                 default\n",
        "Node:                      node-1\n",
        "Labels:                    app=web\n",
        "IP:                        10.1.0.7\n",
        "Containers:\n  c:\n    Image:      demo\n    Port:       8080/TCP (http)\n",
        "    Readiness:  http-get http://:http/healthz delay=0s timeout=1s period=1s #success=1 #failure=2\n",
        "Conditions:\n  Type    Status",
    ] {
        assert!(pod.contains(want), "missing {want:?} in\n{pod}");
    }
    let node = ok(c.cli(&["describe", "node", "node-1"]));
    for want in [
        "Name:                    node-1\n",
        "Labels:                  topology.kubernetes.io/zone=z1\n",
        "Addresses:\n  InternalIP:  10.0.0.1\n",
    ] {
        assert!(node.contains(want), "missing {want:?} in\n{node}");
    }
}

#[test]
fn selectorless_services_take_operator_written_slices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &[]);
    let manifest = "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec:\n  ports: [{port: 80}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: ext-1\n  labels: {kubernetes.io/service-name: ext}\naddressType: IPv4\nendpoints:\n- addresses: [192.0.2.10]\nports:\n- port: 8080\n";
    let out = ok(c.cli_stdin(&["apply", "-f", "-"], manifest));
    assert!(
        out.contains("endpointslice.discovery.k8s.io/ext-1 created"),
        "{out}"
    );
    let desc = ok(c.cli(&["describe", "svc", "ext"]));
    assert!(desc.contains("192.0.2.10"), "{desc}");
    // The same for a Service with a selector is refused.
    ok(c.cli_stdin(&["apply", "-f", "-"], "apiVersion: v1\nkind: Service\nmetadata: {name: sel}\nspec:\n  selector: {app: x}\n  ports: [{port: 80}]\n"));
    let err = fails(
        c.cli_stdin(
            &["apply", "-f", "-"],
            &manifest
                .replace("service-name: ext", "service-name: sel")
                .split("---")
                .nth(1)
                .expect("slice")
                .replace("ext-1", "sel-1"),
        ),
    );
    assert!(
        err.contains("Forbidden") && err.contains("has a selector"),
        "{err}"
    );
}

#[test]
fn state_and_revision_survive_a_kill_9_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = Control::start(
        dir.path(),
        &["--lb-pool", "192.0.2.0/28", "--snapshot-every", "5"],
    );
    ok(c.cli(&["apply", "-f", examples_dir().to_str().expect("path")]));
    for i in 0..8 {
        ok(c.cli_stdin(
            &["apply", "-f", "-"],
            &svc(&format!("extra{i}"), "  ports:\n  - port: 80\n"),
        ));
    }
    let before = get_json(&c, &["svc", "-A"]);
    let rev_before = ok(c.cli(&["cluster", "status"]))
        .lines()
        .next()
        .expect("line")
        .to_string();
    c.restart();
    eventually("state restored", || {
        (get_json(&c, &["svc", "-A"]) == before).then_some(())
    });
    let rev_after = ok(c.cli(&["cluster", "status"]));
    let rev = |s: &str| {
        s.split("revision:")
            .nth(1)
            .map(|r| r.split_whitespace().next().unwrap_or("").to_string())
    };
    assert_eq!(
        rev(&rev_before),
        rev(rev_after.lines().next().expect("line"))
    );
    // Allocations were rebuilt: the same ClusterIP cannot be taken again.
    let ip = before["items"][0]["spec"]["clusterIP"]
        .as_str()
        .expect("ip")
        .to_string();
    let err = fails(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc(
            "dup",
            &format!("  clusterIP: {ip}\n  ports:\n  - port: 80\n"),
        ),
    ));
    assert!(err.contains("already allocated"), "{err}");
}

#[test]
fn stale_resource_version_is_a_conflict() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &[]);
    ok(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc("web", "  ports:\n  - port: 80\n"),
    ));
    let rv = get_json(&c, &["svc", "web"])["metadata"]["resourceVersion"]
        .as_str()
        .expect("rv")
        .to_string();
    let with_rv = |port: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  resourceVersion: \"{rv}\"\nspec:\n  ports:\n  - port: {port}\n"
        )
    };
    ok(c.cli_stdin(&["apply", "-f", "-"], &with_rv(81)));
    let err = fails(c.cli_stdin(&["apply", "-f", "-"], &with_rv(82)));
    assert!(
        err.contains("Error from server (Conflict)")
            && err.contains("the object has been modified"),
        "{err}"
    );
}

#[test]
fn concurrent_applies_get_distinct_allocations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &[]);
    let addr = c.addr.clone();
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let body = svc(
                    &format!("c{i}"),
                    "  type: NodePort\n  ports:\n  - port: 80\n",
                );
                cli(&addr, &["apply", "-f", "-"], Some(&body))
            })
        })
        .collect();
    for h in handles {
        ok(h.join().expect("thread"));
    }
    let all = get_json(&c, &["svc"]);
    let items = all["items"].as_array().expect("items");
    assert_eq!(items.len(), 16);
    let ips: std::collections::BTreeSet<&str> = items
        .iter()
        .filter_map(|s| s["spec"]["clusterIP"].as_str())
        .collect();
    let ports: std::collections::BTreeSet<i64> = items
        .iter()
        .filter_map(|s| s["spec"]["ports"][0]["nodePort"].as_i64())
        .collect();
    assert_eq!(ips.len(), 16);
    assert_eq!(ports.len(), 16);
}

/// A replica that accepts connections but no longer answers (here
/// SIGSTOPped): the CLI gives up on it when HTTP/2 keepalive does, instead
/// of waiting out its 30 s call timeout, and says what happened — not that
/// TLS may have refused it — and that the write may or may not be applied.
#[test]
fn a_replica_that_stopped_answering_is_named_as_such() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &[]);
    c.signal(libc::SIGSTOP);
    let out = c.cli_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: asleep}\nspec:\n  ports: [{port: 80}]\n",
    );
    c.signal(libc::SIGCONT);
    let err = fails(out);
    assert!(
        err.contains("stopped answering") && err.contains("may or may not have been applied"),
        "{err}"
    );
}

/// A replica whose handlers never answer, though its connection is alive
/// (it answers HTTP/2 PINGs): a stuck or overloaded process.
fn stuck_replica() -> std::net::SocketAddr {
    use strait_proto::v1::resources_server::{Resources, ResourcesServer};
    use strait_proto::v1::*;
    use tonic::{Request, Response, Status};

    struct Stuck;

    #[tonic::async_trait]
    impl Resources for Stuck {
        async fn apply(&self, _: Request<ApplyRequest>) -> Result<Response<ApplyResponse>, Status> {
            std::future::pending().await
        }
        async fn get(&self, _: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
            std::future::pending().await
        }
        async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
            std::future::pending().await
        }
        async fn delete(
            &self,
            _: Request<DeleteRequest>,
        ) -> Result<Response<DeleteResponse>, Status> {
            std::future::pending().await
        }
        type WatchStream = futures::stream::Pending<Result<WatchResponse, Status>>;
        async fn watch(
            &self,
            _: Request<WatchRequest>,
        ) -> Result<Response<Self::WatchStream>, Status> {
            std::future::pending().await
        }
    }

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            tonic::transport::Server::builder()
                .add_service(ResourcesServer::new(Stuck))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
                .expect("serve");
        });
    });
    addr
}

/// A replica stuck in its handlers: `--request-timeout` bounds each call;
/// a read then moves to the next replica, and a write fails saying no
/// answer came and that it may or may not have been applied.
#[test]
fn a_replica_stuck_in_its_handlers_is_given_up_after_the_request_timeout() {
    let stuck = stuck_replica().to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &[]);
    ok(c.cli_stdin(&["apply", "-f", "-"], &svc("a", "  ports:\n  - port: 80\n")));
    let both = format!("{stuck},{}", c.addr);
    let got = ok(cli(
        &both,
        &["--request-timeout", "1s", "get", "svc", "a", "-o", "json"],
        None,
    ));
    assert!(got.contains("\"name\": \"a\""), "{got}");
    let err = fails(cli(
        &stuck,
        &["--request-timeout", "1s", "apply", "-f", "-"],
        Some(&svc("b", "  ports:\n  - port: 80\n")),
    ));
    assert!(
        err.contains("gave no answer within --request-timeout")
            && err.contains("may or may not have been applied"),
        "{err}"
    );
}

mod dev;
mod lifecycle;
mod watch;
mod writes;
