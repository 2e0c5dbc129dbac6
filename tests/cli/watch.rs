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

/// A running `strait get … -w`, its stdout read line by line.
struct Watching {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Watching {
    fn start(server: &str, args: &[&str]) -> Watching {
        use std::io::BufRead;
        let mut child = std::process::Command::new(BIN)
            .env("STRAIT_INSECURE", "1")
            .env("STRAIT_SERVER", server)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn strait get -w");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watching { child, lines }
    }

    /// The next line, waiting up to the deadline.
    fn next(&self) -> String {
        self.lines
            .recv_timeout(DEADLINE)
            .expect("get -w printed no line before the deadline")
    }

    /// The event word and name of the next `n` rows, in the order printed.
    fn rows(&self, n: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|_| {
                let line = self.next();
                let mut cells = line.split_whitespace();
                let event = cells.next().unwrap_or_default().to_string();
                let name = cells.next().unwrap_or_default().to_string();
                (event, name)
            })
            .collect()
    }

    fn signal(&self, signal: i32) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        assert_eq!(
            unsafe { libc::kill(pid, signal) },
            0,
            "kill({pid}, {signal})"
        );
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn row(event: &str, name: &str) -> (String, String) {
    (event.to_string(), name.to_string())
}

/// `get svc -w`: the table, then one row per change of the namespace's
/// Services as it is committed; after a restart of the control plane that
/// leaves the watcher too far behind to resume ("compacted"), it re-lists
/// and shows what changed meanwhile, so nothing is missed.
#[test]
fn get_w_shows_every_change_and_catches_up_after_compaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = Control::start(dir.path(), &["--watch-history", "3"]);
    ok(c.cli_stdin(&["apply", "-f", "-"], &svc("a")));
    ok(c.cli_stdin(&["apply", "-f", "-"], &svc("b")));
    let w = Watching::start(&c.addr, &["get", "svc", "-w", "--output-watch-events"]);
    let header = w.next();
    assert!(
        header.starts_with("EVENT") && header.contains("NAME") && header.contains("CLUSTER-IP"),
        "{header}"
    );
    assert_eq!(w.rows(2), vec![row("ADDED", "a"), row("ADDED", "b")]);

    ok(c.cli_stdin(&["apply", "-f", "-"], &svc("c")));
    assert_eq!(w.rows(1), vec![row("ADDED", "c")]);
    // Another namespace is not shown; a change and a deletion are.
    ok(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc("elsewhere").replace("name: elsewhere", "name: elsewhere\n  namespace: other"),
    ));
    ok(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc("c").replace("port: 80", "port: 81"),
    ));
    ok(c.cli(&["delete", "svc", "a"]));
    assert_eq!(w.rows(2), vec![row("MODIFIED", "c"), row("DELETED", "a")]);

    // The watcher stops; the control plane restarts and commits more
    // changes than its 3-revision history keeps.
    w.signal(libc::SIGSTOP);
    c.restart();
    for n in ["d", "e", "f"] {
        ok(c.cli_stdin(&["apply", "-f", "-"], &svc(n)));
    }
    ok(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc("b").replace("port: 80", "port: 82"),
    ));
    ok(c.cli(&["delete", "svc", "c"]));
    w.signal(libc::SIGCONT);
    // In the fresh state's order, deletions last: from the re-list, not
    // from a replay of the changes (which would come in commit order).
    assert_eq!(
        w.rows(5),
        vec![
            row("MODIFIED", "b"),
            row("ADDED", "d"),
            row("ADDED", "e"),
            row("ADDED", "f"),
            row("DELETED", "c"),
        ]
    );
    // And it follows live changes again.
    ok(c.cli(&["delete", "svc", "d"]));
    assert_eq!(w.rows(1), vec![row("DELETED", "d")]);

    // A control plane that is down for a while is waited for, not given up.
    c.restart();
    ok(c.cli_stdin(&["apply", "-f", "-"], &svc("g")));
    assert_eq!(w.rows(1), vec![row("ADDED", "g")]);
}

/// `get NAME -w` follows one object; a name that does not exist is
/// kubectl's NotFound error; --output-watch-events needs -w.
#[test]
fn get_w_of_one_object_and_flag_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &[]);
    ok(c.cli_stdin(&["apply", "-f", "-"], &svc("a")));
    let err = fails(c.cli(&["get", "svc", "nope", "-w"]));
    assert!(
        err.contains("Error from server (NotFound): services \"nope\" not found"),
        "{err}"
    );
    let err = fails(c.cli(&["get", "svc", "--output-watch-events"]));
    assert!(err.contains("--watch"), "{err}");
    let err = fails(c.cli(&["get", "svc", "a", "-A", "-w"]));
    assert!(
        err.contains("a resource cannot be retrieved by name across all namespaces"),
        "{err}"
    );

    let w = Watching::start(&c.addr, &["get", "svc", "a", "-w", "-o", "json"]);
    let mut text = String::new();
    let first = loop {
        text.push_str(&w.next());
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            break v;
        }
    };
    assert_eq!(first["metadata"]["name"], "a");
    ok(c.cli_stdin(&["apply", "-f", "-"], &svc("b")));
    ok(c.cli_stdin(
        &["apply", "-f", "-"],
        &svc("a").replace("port: 80", "port: 81"),
    ));
    text.clear();
    let second = loop {
        text.push_str(&w.next());
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            break v;
        }
    };
    assert_eq!(
        second["metadata"]["name"], "a",
        "only a is followed: {second}"
    );
    assert_eq!(second["spec"]["ports"][0]["port"], 81);
}

fn labeled(name: &str, labels: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\nspec:\n  ports:\n  - port: {port}\n"
    )
}

fn names_in(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// `get -l` in Kubernetes' selector syntax; with `-w`, an object that comes
/// to match is ADDED and one that stops matching is DELETED, as the
/// apiserver's filtered watch reports them.
#[test]
fn get_l_selects_by_labels_and_w_follows_the_selection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = Control::start(dir.path(), &[]);
    ok(c.cli_stdin(&["apply", "-f", "-"], &labeled("a", "app: web", 80)));
    ok(c.cli_stdin(&["apply", "-f", "-"], &labeled("b", "app: db", 80)));
    ok(c.cli_stdin(&["apply", "-f", "-"], &labeled("c", "", 80)));
    for (sel, want) in [
        ("app=web", vec!["a"]),
        ("app!=web", vec!["b", "c"]),
        ("app in (web, db)", vec!["a", "b"]),
        ("!app", vec!["c"]),
        ("app,app notin (db)", vec!["a"]),
    ] {
        assert_eq!(
            names_in(&ok(c.cli(&["get", "svc", "-l", sel]))),
            want,
            "{sel}"
        );
    }
    let err = fails(c.cli(&["get", "svc", "-l", "app=we b"]));
    assert!(
        err.contains("unable to parse requirement: \"app=we b\": invalid label value"),
        "{err}"
    );
    let err = fails(c.cli(&["get", "svc", "a", "-l", "app=web"]));
    assert!(
        err.contains("name cannot be provided when a selector is specified"),
        "{err}"
    );

    let w = Watching::start(
        &c.addr,
        &["get", "svc", "-l", "app=web", "-w", "--output-watch-events"],
    );
    assert!(w.next().starts_with("EVENT"));
    assert_eq!(w.rows(1), vec![row("ADDED", "a")]);
    ok(c.cli_stdin(&["apply", "-f", "-"], &labeled("b", "app: web", 80)));
    ok(c.cli_stdin(&["apply", "-f", "-"], &labeled("a", "app: other", 80)));
    ok(c.cli_stdin(&["apply", "-f", "-"], &labeled("c", "app: db", 81)));
    ok(c.cli_stdin(&["apply", "-f", "-"], &labeled("b", "app: web", 82)));
    assert_eq!(
        w.rows(3),
        vec![row("ADDED", "b"), row("DELETED", "a"), row("MODIFIED", "b")]
    );
}
