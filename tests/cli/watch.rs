//! Watch semantics over gRPC against the real binary: list-then-changes,
//! resume from a revision with no gap or duplicate, and "compacted".

use futures::StreamExt;
use strait_proto::v1::resources_client::ResourcesClient;
use strait_proto::v1::{WatchRequest, WatchResponse};

use crate::harness::*;

fn svc(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  ports:\n  - port: 80\n"
    )
}

async fn next_change(stream: &mut tonic::Streaming<WatchResponse>) -> WatchResponse {
    loop {
        let r = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("watch delivered nothing before the deadline")
            .expect("stream ended")
            .expect("watch error");
        if !r.events.is_empty() || r.initial {
            return r;
        }
    }
}

fn names(r: &WatchResponse) -> Vec<String> {
    r.events
        .iter()
        .filter_map(|e| e.object.as_ref())
        .map(|o| o.name().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_lists_resumes_and_reports_compaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &["--watch-history", "3"]);
    ok(c.cli_stdin(&["apply", "-f", "-"], &svc("a")));
    let mut client = ResourcesClient::connect(format!("http://{}", c.addr))
        .await
        .expect("connect");

    // Revision 0: the full state first, marked initial.
    let mut w = client
        .watch(WatchRequest {
            kinds: vec!["Service".into()],
            revision: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    let first = next_change(&mut w).await;
    assert!(first.initial);
    assert_eq!(names(&first), vec!["a"]);
    let r0 = first.revision;

    ok(c.cli_stdin(&["apply", "-f", "-"], &svc("b")));
    let b = next_change(&mut w).await;
    assert!(!b.initial && b.revision > r0);
    assert_eq!(names(&b), vec!["b"]);

    // Resume after r0 from another stream: exactly b, then live changes.
    let mut resumed = client
        .watch(WatchRequest {
            kinds: vec!["Service".into()],
            revision: r0,
        })
        .await
        .expect("resume")
        .into_inner();
    let again = next_change(&mut resumed).await;
    assert_eq!(
        (again.revision, names(&again)),
        (b.revision, vec!["b".to_string()])
    );
    ok(c.cli_stdin(&["apply", "-f", "-"], &svc("c")));
    let live = next_change(&mut resumed).await;
    assert_eq!(names(&live), vec!["c"]);
    let first_live = next_change(&mut w).await;
    assert_eq!(first_live.revision, live.revision);

    // Push r0 out of the 3-revision history.
    for n in ["d", "e", "f", "g"] {
        ok(c.cli_stdin(&["apply", "-f", "-"], &svc(n)));
    }
    let err = client
        .watch(WatchRequest {
            kinds: vec![],
            revision: r0,
        })
        .await
        .expect_err("compacted");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().starts_with("compacted"), "{}", err.message());

    // Deletions arrive as DELETED events.
    ok(c.cli(&["delete", "svc", "a"]));
    let mut seen = Vec::new();
    while !seen.contains(&"a".to_string()) {
        let r = next_change(&mut w).await;
        if r.events
            .iter()
            .any(|e| e.r#type == strait_proto::v1::EventType::Deleted as i32)
        {
            seen.extend(names(&r));
        }
    }
}
