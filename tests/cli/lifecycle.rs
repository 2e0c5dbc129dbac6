//! Pod graceful termination and node liveness through the real binary:
//! a deleted Pod drains as a terminating endpoint for its grace period, and
//! a node whose heartbeats stop has its endpoints marked unready.

use std::time::Duration;

use strait_proto::v1::HeartbeatRequest;
use strait_proto::v1::nodes_client::NodesClient;

use crate::harness::*;

const NODE_POD_SVC: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status:
  addresses: [{type: InternalIP, address: 10.0.0.1}]
---
apiVersion: v1
kind: Pod
metadata: {name: p1, labels: {app: web}}
spec:
  nodeName: n1
  terminationGracePeriodSeconds: 2
  containers: [{name: c, ports: [{containerPort: 8080}]}]
status: {podIP: 10.1.0.1}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"#;

/// (ready, serving, terminating) of the first endpoint, if any.
fn conditions(c: &Control) -> Option<(bool, bool, bool)> {
    let slices = get_json(c, &["endpointslices"]);
    let e = slices["items"].as_array()?.first()?["endpoints"]
        .as_array()?
        .first()?
        .clone();
    let cond = &e["conditions"];
    Some((
        cond["ready"].as_bool().unwrap_or(false),
        cond["serving"].as_bool().unwrap_or(false),
        cond["terminating"].as_bool().unwrap_or(false),
    ))
}

#[test]
fn deleted_pods_drain_for_their_grace_period_then_go() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &["--node-grace", "1h"]);
    ok(c.cli_stdin(&["apply", "-f", "-"], NODE_POD_SVC));
    assert_eq!(conditions(&c), Some((true, true, false)));
    let out = ok(c.cli(&["delete", "pod", "p1"]));
    assert!(out.contains("pod \"p1\" deleted"), "{out}");
    // Terminating: not ready for new connections, still serving, still listed.
    assert_eq!(conditions(&c), Some((false, true, true)));
    let pods = ok(c.cli(&["get", "pods"]));
    assert!(pods.contains("Terminating"), "{pods}");
    // After the 2 s grace the leader removes it, and its endpoint with it.
    eventually("the pod to be removed", || {
        let v = get_json(&c, &["pods"]);
        v["items"]
            .as_array()
            .is_none_or(Vec::is_empty)
            .then_some(())
    });
    assert_eq!(conditions(&c), None);
}

#[test]
fn silent_nodes_turn_not_ready_and_come_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &["--node-grace", "1s"]);
    ok(c.cli_stdin(&["apply", "-f", "-"], NODE_POD_SVC));
    // No heartbeat: after the grace the node is NotReady and its endpoint unready.
    eventually("node n1 NotReady", || {
        ok(c.cli(&["get", "nodes"]))
            .contains("NotReady")
            .then_some(())
    });
    assert_eq!(conditions(&c), Some((false, false, false)));
    // Heartbeats resume: Ready again, and the endpoint with it.
    let addr = c.addr.clone();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let beat = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            rt.block_on(async {
                let mut client = NodesClient::connect(format!("http://{addr}"))
                    .await
                    .expect("connect");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = client
                        .heartbeat(HeartbeatRequest {
                            node_name: "n1".into(),
                            applied_revision: 0,
                        })
                        .await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        })
    };
    eventually("node n1 Ready", || {
        let t = ok(c.cli(&["get", "nodes"]));
        (t.contains(" Ready") && !t.contains("NotReady")).then_some(())
    });
    eventually("endpoint ready again", || {
        (conditions(&c) == Some((true, true, false))).then_some(())
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    beat.join().expect("heartbeat thread");
}
