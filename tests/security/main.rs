//! mTLS and authorization through the real binary: certificates from
//! `strait certs`, replicas and a node agent with `--tls-*`, and every way
//! in that must be refused — each refusal checked to leave the state (every
//! object and the revision) exactly as it was. Then CA rotation without a
//! restart.

mod harness;

use std::time::{Duration, Instant};

use harness::*;
use prost::Message;
use strait_proto::v1::raft_client::RaftClient;
use strait_proto::v1::resources_client::ResourcesClient;
use strait_proto::v1::{
    ApplyRequest, Object, ObjectMeta, RaftPayload, Service, ServicePort, ServiceSpec,
};

const SEED: &str = "\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata:
  name: pod-a
  labels: {app: web}
spec:
  nodeName: a
  containers:
  - name: demo
    ports: [{name: http, containerPort: 8080}]
status:
  podIP: 10.1.0.1
---
apiVersion: v1
kind: Pod
metadata:
  name: pod-b
  labels: {app: web}
spec:
  nodeName: b
  containers:
  - name: demo
    ports: [{name: http, containerPort: 8080}]
status:
  podIP: 10.1.0.2
";

const INTRUDER: &str = "\
apiVersion: v1
kind: Service
metadata: {name: intruder}
spec:
  ports: [{port: 81}]
";

fn intruder() -> Object {
    Object::from(Service {
        api_version: "v1".into(),
        kind: "Service".into(),
        metadata: Some(ObjectMeta {
            name: "intruder".into(),
            namespace: "default".into(),
            ..Default::default()
        }),
        spec: Some(ServiceSpec {
            ports: vec![ServicePort {
                port: 81,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// pod-b as stored, with another podIP: a status-only write.
fn pod_b_with_new_status(addr: &str, reader: &Cert) -> String {
    let out = ok(cli(
        addr,
        Some(reader),
        &["get", "pods", "pod-b", "-o", "json"],
    ));
    let mut pod: serde_json::Value = serde_json::from_str(&out).expect("pod json");
    pod["status"]["podIP"] = "10.1.0.99".into();
    pod.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_leaves_the_state_unchanged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::init(&tmp.path().join("pki"), "test.local");
    let control_cert = pki.issue("control", "1");
    let admin = pki.issue("admin", "alice");
    let node_a = pki.issue("node", "a");
    let node_b = pki.issue("node", "b");
    let expiring = pki.issue_for("admin", "late", "1s");
    let issued_at = Instant::now();
    for key in [&admin.key, &node_a.key, &control_cert.key] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{} is {mode:o}", key.display());
    }
    let (_control, addr) = control_tls(&tmp.path().join("data"), &control_cert);
    eventually("the replica to serve an admin", || {
        cli(&addr, Some(&admin), &["get", "svc"])
            .status
            .success()
            .then_some(())
    });
    ok(apply(&addr, Some(&admin), SEED));
    let before = state(&addr, &admin).await;
    let unchanged = |what: &'static str| {
        let before = before.clone();
        let addr = addr.clone();
        let admin = admin.clone();
        async move {
            let now = state(&addr, &admin).await;
            assert_eq!(now.0, before.0, "{what}: the revision moved");
            assert_eq!(now.1, before.1, "{what}: objects changed");
        }
    };

    // 1. No client certificate: the handshake is refused, no RPC runs.
    let mut anon = ResourcesClient::new(channel_without_client_cert(&addr));
    let r = anon
        .apply(ApplyRequest {
            object: Some(intruder()),
        })
        .await;
    assert!(r.is_err(), "a client without a certificate wrote: {r:?}");
    unchanged("no client certificate").await;

    // 2. A certificate from another CA (same trust domain, same name).
    let rogue_pki = Pki::init(&tmp.path().join("rogue"), "test.local");
    let rogue = rogue_pki.issue("admin", "alice").with_ca(&pki.ca());
    fails(apply(&addr, Some(&rogue), INTRUDER));
    unchanged("certificate of another CA").await;

    // 3. An expired certificate.
    eventually("the 1s certificate to expire", || {
        (issued_at.elapsed() > Duration::from_secs(3)).then_some(())
    });
    fails(apply(&addr, Some(&expiring), INTRUDER));
    unchanged("expired certificate").await;

    // 4. A plaintext client against the TLS port.
    fails(apply(&addr, None, INTRUDER));
    unchanged("plaintext client").await;

    // 5. A node certificate used for an admin write.
    let err = fails(apply(&addr, Some(&node_a), INTRUDER));
    assert!(err.contains("Forbidden"), "{err}");
    assert!(err.contains("spiffe://test.local/node/a"), "{err}");
    assert!(err.contains("NodeRestriction"), "{err}");
    let err = fails(cli(&addr, Some(&node_a), &["delete", "svc", "web"]));
    assert!(err.contains("NodeRestriction"), "{err}");
    unchanged("node writing a Service").await;

    // 6. Node a writing the status of node b's Pod.
    let status_b = pod_b_with_new_status(&addr, &node_a);
    let err = fails(apply(&addr, Some(&node_a), &status_b));
    assert!(err.contains("spiffe://test.local/node/a"), "{err}");
    assert!(err.contains("NodeRestriction"), "{err}");
    unchanged("node a writing node b's Pod").await;

    // 7. Non-control identities calling the Raft service.
    let cmd = strait_control::state::Command::Apply {
        object: intruder().encode_to_vec(),
        now_unix_nanos: 1,
    };
    let payload = RaftPayload {
        data: serde_json::to_vec(&cmd).expect("command json"),
    };
    for who in [&admin, &node_a] {
        let mut raft = RaftClient::new(channel(&addr, who).await);
        let status = raft
            .forward_write(payload.clone())
            .await
            .expect_err("Raft call by a non-control identity");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
        assert!(status.message().contains("RaftPeersOnly"), "{status}");
        assert!(
            status.message().contains("spiffe://test.local/"),
            "{status}"
        );
        let status = raft
            .vote(RaftPayload::default())
            .await
            .expect_err("vote by a non-control identity");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    }
    unchanged("Raft calls by admin and node").await;

    // The rule is not a blanket refusal: node b may write its Pod's status
    // and its own Node, and reads like everyone.
    ok(apply(&addr, Some(&node_b), &status_b));
    ok(apply(
        &addr,
        Some(&node_b),
        "apiVersion: v1\nkind: Node\nmetadata: {name: b}\n",
    ));
    let pod = ok(cli(
        &addr,
        Some(&node_a),
        &["get", "pods", "pod-b", "-o", "json"],
    ));
    assert!(pod.contains("10.1.0.99"), "{pod}");
}

/// Writes `data` to `path` through a rename, as an operator's tooling would.
fn replace(path: &std::path::Path, data: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_without_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let old = Pki::init(&tmp.path().join("old"), "test.local");
    let new = Pki::init(&tmp.path().join("new"), "test.local");
    let read = |p: &std::path::Path| std::fs::read(p).expect("read");
    let both_path = tmp.path().join("both.crt");
    let mut both = read(&old.ca());
    both.extend(read(&new.ca()));
    std::fs::write(&both_path, &both).expect("bundle");

    // The replica's live files start as the old CA's.
    let live = tmp.path().join("live");
    std::fs::create_dir_all(&live).expect("live dir");
    let old_server = old.issue("control", "1");
    let new_server = new.issue("control", "1");
    let server = Cert {
        cert: live.join("server.crt"),
        key: live.join("server.key"),
        ca: live.join("ca.crt"),
    };
    replace(&server.cert, &read(&old_server.cert));
    replace(&server.key, &read(&old_server.key));
    replace(&server.ca, &read(&old.ca()));
    let (mut control, addr) = control_tls(&tmp.path().join("data"), &server);

    let old_admin = old.issue("admin", "one");
    let new_admin = new.issue("admin", "two").with_ca(&both_path);
    let serves = |who: &Cert| cli(&addr, Some(who), &["get", "svc"]).status.success();
    eventually("the old admin to be served", || {
        serves(&old_admin).then_some(())
    });
    assert!(
        !serves(&new_admin),
        "a certificate of the new CA before the rotation"
    );

    // 1. The bundle holds both CAs: new clients are accepted, old ones still.
    replace(&server.ca, &both);
    eventually("the new CA's admin to be accepted", || {
        serves(&new_admin).then_some(())
    });
    assert!(serves(&old_admin));

    // 2. The server certificate moves to the new CA (cert, then key: the
    // mismatched moment in between keeps the previous pair).
    replace(&server.cert, &read(&new_server.cert));
    replace(&server.key, &read(&new_server.key));
    let trusts_new_only = new_admin.with_ca(&new.ca());
    eventually("the server to present the new certificate", || {
        serves(&trusts_new_only).then_some(())
    });
    assert!(
        !serves(&old_admin),
        "a client trusting only the old CA still accepts the server"
    );

    // 3. The old CA leaves the bundle: its certificates are refused.
    replace(&server.ca, &read(&new.ca()));
    let old_admin_both = old_admin.with_ca(&both_path);
    eventually("the old CA's certificates to be refused", || {
        (!serves(&old_admin_both)).then_some(())
    });
    assert!(serves(&trusts_new_only));
    assert!(control.is_running(), "the replica restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secured_three_replicas_and_a_node_agent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::init(&tmp.path().join("pki"), "test.local");
    let admin = pki.issue("admin", "alice");
    let addr = |id: u64| format!("127.61.1.{}:7000", 10 + id);
    let peers = (1..=3)
        .map(|id| format!("{id}={}", addr(id)))
        .collect::<Vec<_>>()
        .join(",");
    let mut replicas = Vec::new();
    for id in 1..=3u64 {
        let cert = pki.issue("control", &id.to_string());
        let mut args = vec![
            "--id".to_string(),
            id.to_string(),
            "--data-dir".into(),
            tmp.path().join(format!("r{id}")).display().to_string(),
            "--listen".into(),
            addr(id),
            "--peers".into(),
            peers.clone(),
            "--service-cidr".into(),
            "127.62.0.0/16".into(),
        ];
        args.extend(cert.flags());
        replicas.push(control(&args).0);
    }
    let all = (1..=3).map(addr).collect::<Vec<_>>().join(",");
    eventually("a leader elected over mTLS", || {
        let out = cli(&addr(1), Some(&admin), &["cluster", "status"]);
        let text = stdout(&out);
        (out.status.success() && !text.starts_with("leader: 0")).then_some(())
    });
    // A write through every replica: followers forward to the leader over
    // the Raft service with their control identity.
    for id in 1..=3 {
        let svc = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web-{id}}}\nspec:\n  ports: [{{port: 80}}]\n"
        );
        eventually("a write through each replica", || {
            apply(&addr(id), Some(&admin), &svc)
                .status
                .success()
                .then_some(())
        });
    }
    for id in 1..=3 {
        let out = ok(cli(&addr(id), Some(&admin), &["get", "svc"]));
        for n in 1..=3 {
            assert!(out.contains(&format!("web-{n}")), "replica {id}: {out}");
        }
    }

    // A node agent registers itself with its node certificate.
    let node_cert = pki.issue("node", "edge-1");
    let mut args = vec![
        "--name".to_string(),
        "edge-1".into(),
        "--node-ip".into(),
        "127.61.1.50".into(),
        "--control".into(),
        all.clone(),
        "--data-dir".into(),
        tmp.path().join("node").display().to_string(),
        "--dns-listen".into(),
        "off".into(),
    ];
    args.extend(node_cert.flags());
    let _node = node(&args);
    eventually("the node agent to register over mTLS", || {
        cli(&addr(2), Some(&admin), &["get", "nodes", "edge-1"])
            .status
            .success()
            .then_some(())
    });
    drop(replicas);
}
