//! `strait get -w`: the objects of a kind, then every change to them as the
//! control plane commits it, following the control plane from replica to
//! replica the way a node agent does: a watch that breaks or goes silent
//! resumes on the next replica from the last revision received, so no change
//! is skipped or shown twice; one too old to resume re-lists and shows the
//! difference.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use strait_node::watch::WATCH_SILENCE;
use strait_proto::Kind;
use strait_proto::v1::{EventType, GetRequest, ListRequest, Object, WatchRequest, WatchResponse};

use crate::client::{Client, Session, server_error};
use crate::commands::node_progress;
use crate::output::{self, Columns, Format, NodeProgress};
use crate::selector::Selector;

/// What `get -w` follows and how it shows it.
pub struct Watch<'a> {
    pub kind: Kind,
    pub name: Option<&'a str>,
    /// The namespace, empty for every namespace (or a cluster-scoped kind).
    pub namespace: String,
    pub all_namespaces: bool,
    pub format: Option<Format>,
    /// `-l`: only objects whose labels match.
    pub selector: Option<&'a Selector>,
    pub consistency: i32,
    /// An EVENT column (ADDED, MODIFIED, DELETED); with `-o yaml|json`,
    /// each object wrapped as `{type, object}`, as kubectl's
    /// `--output-watch-events`.
    pub events: bool,
}

/// The pause after a broken watch, doubled per failure up to [`MAX_BACKOFF`],
/// so replicas that keep refusing are not called in a tight loop.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a batch of node rows waits for the nodes' progress columns.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(2);

/// Objects shown so far, by namespace and name: what a re-list is compared
/// with.
type Shown = BTreeMap<(String, String), Object>;

impl Watch<'_> {
    /// Shows the current objects, then changes, until the output is closed
    /// or a replica refuses the watch (a refusal that another try cannot
    /// change). A control plane that cannot be reached is waited for.
    pub async fn run(&self, client: &Client) -> anyhow::Result<()> {
        let mut session = client.session()?;
        let mut printer = Printer::new(self, client);
        let (items, mut from) = self.list(&mut session).await?;
        let mut shown = Shown::new();
        let mut first = Vec::new();
        for o in items.into_iter().filter(|o| self.selects(o)) {
            first.push((EventType::Added, o.clone()));
            shown.insert(key(&o), o);
        }
        if !printer.initial(&first).await? {
            return Ok(());
        }
        let mut backoff = FIRST_BACKOFF;
        let mut outage = false;
        loop {
            let req = WatchRequest {
                kinds: vec![self.kind.to_string()],
                revision: from,
            };
            let opened = session
                .read(|mut rpc| {
                    let req = req.clone();
                    async move { rpc.watch(req).await }
                })
                .await;
            let ended = match opened {
                Ok(Ok(mut stream)) => loop {
                    match tokio::time::timeout(WATCH_SILENCE, stream.message()).await {
                        Ok(Ok(Some(resp))) => {
                            (backoff, outage) = (FIRST_BACKOFF, false);
                            from = resp.revision;
                            let changes = self.changes(resp, &mut shown);
                            if !printer.changes(&changes).await? {
                                return Ok(());
                            }
                        }
                        // The replica ended the stream (shutting down) or
                        // sent nothing, not even its progress ticks, for
                        // too long.
                        Ok(Ok(None)) | Err(_) => break None,
                        Ok(Err(status)) => break Some(status),
                    }
                },
                // Every replica refused to open it, or the last one did.
                Ok(Err(status)) => Some(status),
                Err(unreachable) => {
                    if !outage {
                        eprintln!("{unreachable:#}; the watch resumes when one answers");
                        outage = true;
                    }
                    None
                }
            };
            match ended {
                Some(s) if compacted(&s) => {
                    from = 0;
                    continue;
                }
                Some(s) if !resumable(&s) => return Err(server_error(s)),
                _ => {}
            }
            session.leave();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// The objects now and the revision they are at. A named object that
    /// does not exist is kubectl's NotFound error.
    async fn list(&self, session: &mut Session<'_>) -> anyhow::Result<(Vec<Object>, u64)> {
        if let Some(name) = self.name {
            let req = GetRequest {
                kind: self.kind.to_string(),
                namespace: self.namespace.clone(),
                name: name.to_string(),
                consistency: self.consistency,
            };
            session.get(req).await?;
        }
        let req = ListRequest {
            kind: self.kind.to_string(),
            namespace: self.namespace.clone(),
            consistency: self.consistency,
        };
        let list = session.list(req).await?;
        Ok((list.items, list.revision))
    }

    /// Whether `o` is one of the objects asked for.
    fn selects(&self, o: &Object) -> bool {
        let in_namespace = self.namespace.is_empty() || o.namespace() == self.namespace;
        in_namespace
            && self.name.is_none_or(|n| o.name() == n)
            && self.selector.is_none_or(|s| s.selects(o))
    }

    /// The changes one response makes to what was shown. A response marked
    /// `initial` (after "compacted") is the whole state: compared with what
    /// was shown, it yields what was added, changed and deleted meanwhile.
    fn changes(&self, resp: WatchResponse, shown: &mut Shown) -> Vec<(EventType, Object)> {
        let mut out = Vec::new();
        if resp.initial {
            let mut before = std::mem::take(shown);
            for o in resp.events.into_iter().filter_map(|e| e.object) {
                if !self.selects(&o) {
                    continue;
                }
                let k = key(&o);
                match before.remove(&k) {
                    None => out.push((EventType::Added, o.clone())),
                    // Deleted and created again meanwhile.
                    Some(old) if uid(&old) != uid(&o) => {
                        out.push((EventType::Deleted, old));
                        out.push((EventType::Added, o.clone()));
                    }
                    Some(old) if resource_version(&old) != resource_version(&o) => {
                        out.push((EventType::Modified, o.clone()))
                    }
                    Some(_) => {}
                }
                shown.insert(k, o);
            }
            out.extend(before.into_values().map(|o| (EventType::Deleted, o)));
            return out;
        }
        // What was shown decides the event, as the apiserver's filtered
        // watch does: an object that comes to match the selection is ADDED,
        // one that stops matching is DELETED (in its last shown state).
        for e in resp.events {
            let Some(o) = e.object else { continue };
            let deleted = e.r#type == EventType::Deleted as i32;
            let k = key(&o);
            let was_shown = shown.contains_key(&k);
            if !deleted && self.selects(&o) {
                let event = if was_shown {
                    EventType::Modified
                } else {
                    EventType::Added
                };
                shown.insert(k, o.clone());
                out.push((event, o));
            } else if let Some(old) = shown.remove(&k) {
                out.push((EventType::Deleted, if deleted { o } else { old }));
            }
        }
        out
    }
}

fn key(o: &Object) -> (String, String) {
    (o.namespace().to_string(), o.name().to_string())
}

fn resource_version(o: &Object) -> &str {
    o.metadata().map_or("", |m| m.resource_version.as_str())
}

fn uid(o: &Object) -> &str {
    o.metadata().map_or("", |m| m.uid.as_str())
}

fn compacted(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::FailedPrecondition && status.message().starts_with("compacted")
}

/// Whether a broken watch may be resumed elsewhere: a replica that is gone,
/// unreachable or shutting down, or a watcher cut for falling behind.
fn resumable(status: &tonic::Status) -> bool {
    use std::error::Error;
    use tonic::Code;
    status.source().is_some()
        || matches!(
            status.code(),
            Code::Unavailable | Code::ResourceExhausted | Code::Cancelled | Code::Aborted
        )
}

fn event_word(e: EventType) -> &'static str {
    match e {
        EventType::Added => "ADDED",
        EventType::Modified => "MODIFIED",
        EventType::Deleted => "DELETED",
    }
}

/// Writes what the watch shows. Every write returns `false` once stdout is
/// closed (`get -w | head`), which ends the watch quietly.
struct Printer<'a> {
    watch: &'a Watch<'a>,
    client: &'a Client,
    columns: Columns,
    /// The table's column widths, fixed by the first print, so later rows
    /// line up under the header.
    widths: Vec<usize>,
}

impl<'a> Printer<'a> {
    fn new(watch: &'a Watch<'a>, client: &'a Client) -> Self {
        Self {
            watch,
            client,
            columns: Columns {
                kind: watch.kind,
                all_namespaces: watch.all_namespaces,
                wide: watch.format == Some(Format::Wide),
            },
            widths: Vec::new(),
        }
    }

    async fn initial(&mut self, objects: &[(EventType, Object)]) -> anyhow::Result<bool> {
        if objects.is_empty() && self.is_table() {
            output::no_resources(&self.watch.namespace);
        }
        let mut header = self.columns.header();
        if self.watch.events {
            header.insert(0, "EVENT".to_string());
        }
        if self.is_table() {
            let progress = self.progress().await;
            let mut rows = vec![header];
            rows.extend(
                objects
                    .iter()
                    .filter_map(|(e, o)| self.row(*e, o, &progress)),
            );
            self.widths = output::widths(&rows, &[]);
            let text: String = rows.iter().map(|r| output::line(r, &self.widths)).collect();
            return Ok(emit(&text));
        }
        self.documents(objects)
    }

    async fn changes(&mut self, changes: &[(EventType, Object)]) -> anyhow::Result<bool> {
        if changes.is_empty() {
            return Ok(true);
        }
        if !self.is_table() {
            return self.documents(changes);
        }
        let progress = self.progress().await;
        let text: String = changes
            .iter()
            .filter_map(|(e, o)| self.row(*e, o, &progress))
            .map(|r| output::line(&r, &output::widths(std::slice::from_ref(&r), &self.widths)))
            .collect();
        Ok(emit(&text))
    }

    fn is_table(&self) -> bool {
        matches!(self.watch.format, None | Some(Format::Wide))
    }

    fn row(&self, event: EventType, o: &Object, progress: &NodeProgress) -> Option<Vec<String>> {
        let mut cells = self.columns.row(o, progress)?;
        if self.watch.events {
            cells.insert(0, event_word(event).to_string());
        }
        Some(cells)
    }

    /// Nodes' APPLIED-REVISION and LAG, asked for each batch of rows; left
    /// out (`<none>`) rather than holding the rows back when the answer is
    /// slow.
    async fn progress(&self) -> NodeProgress {
        if self.watch.kind != Kind::Node {
            return NodeProgress::default();
        }
        tokio::time::timeout(PROGRESS_TIMEOUT, node_progress(self.client))
            .await
            .unwrap_or_default()
    }

    /// `-o json`: one object (or `{type, object}`) after another; `-o yaml`:
    /// the same as YAML documents.
    fn documents(&self, objects: &[(EventType, Object)]) -> anyhow::Result<bool> {
        let mut text = String::new();
        for (event, o) in objects {
            let mut v = output::manifest(o);
            if self.watch.events {
                v = serde_json::json!({"type": event_word(*event), "object": v});
            }
            if self.watch.format == Some(Format::Json) {
                text.push_str(&serde_json::to_string_pretty(&v).context("encoding JSON")?);
                text.push('\n');
            } else {
                text.push_str("---\n");
                text.push_str(&output::to_yaml(&v).context("encoding YAML")?);
            }
        }
        Ok(emit(&text))
    }
}

/// Writes `text` to stdout and flushes it; `false` when stdout is closed.
fn emit(text: &str) -> bool {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}
