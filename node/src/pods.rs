//! Static pods: Pod manifests in a local directory (`--pods-dir`), bound to
//! this node and registered with the control plane — created when a file
//! appears, updated when it changes, deleted (gracefully) when it goes. Each
//! registered Pod carries an annotation naming its file, so an agent that
//! restarts finds and removes Pods whose files disappeared meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use strait_proto::tls::Transport;
use strait_proto::v1::resources_client::ResourcesClient;
use strait_proto::v1::{ApplyRequest, DeleteRequest, ListRequest, Object, object};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

/// Annotation naming the file a static Pod came from.
pub const SOURCE_ANNOTATION: &str = "strait.dev/static-pod-file";
/// Kubernetes' mark of a static ("mirror") Pod; the control plane lets a
/// node create and delete only Pods that carry it (NodeRestriction).
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";
/// How often the directory is scanned.
pub const SCAN_EVERY: Duration = Duration::from_secs(1);

/// The Pods one scan of the directory describes, by (namespace, name).
pub fn scan(dir: &Path, node: &str) -> BTreeMap<(String, String), Object> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    files.sort();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let objects = match strait_proto::manifest::parse(&text) {
            Ok(o) => o,
            Err(e) => {
                warn!(file = %f.display(), error = %e, "static pod manifest skipped");
                continue;
            }
        };
        let file = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for mut o in objects {
            let Some(object::Kind::Pod(p)) = o.kind.as_mut() else {
                warn!(file = %f.display(), kind = ?o.kind(), "only Pods belong in --pods-dir");
                continue;
            };
            p.spec.get_or_insert_default().node_name = node.to_string();
            let m = p.metadata.get_or_insert_default();
            if m.namespace.is_empty() {
                m.namespace = "default".into();
            }
            m.annotations.insert(SOURCE_ANNOTATION.into(), file.clone());
            m.annotations.insert(MIRROR_ANNOTATION.into(), file.clone());
            out.insert((o.namespace().to_string(), o.name().to_string()), o);
        }
    }
    out
}

/// Keeps the control plane's static Pods of this node equal to the directory.
pub struct StaticPods {
    dir: PathBuf,
    node: String,
    control: Vec<String>,
    transport: Transport,
    /// The replica in use (its index in `control`) and its client.
    current: Option<(usize, ResourcesClient<Channel>)>,
    /// Where the next connection attempt starts.
    next: usize,
}

impl StaticPods {
    pub fn new(dir: PathBuf, node: String, control: Vec<String>, transport: Transport) -> Self {
        Self {
            dir,
            node,
            control,
            transport,
            current: None,
            next: 0,
        }
    }

    /// The replica in use, else the first from `next` on that accepts a
    /// connection.
    async fn client(&mut self) -> Option<ResourcesClient<Channel>> {
        if let Some((_, c)) = &self.current {
            return Some(c.clone());
        }
        for k in 0..self.control.len() {
            let i = (self.next + k) % self.control.len();
            let Ok(ep) = crate::control::endpoint(&self.control[i]) else {
                continue;
            };
            if let Ok(ch) = self.transport.connect(ep).await {
                let c = ResourcesClient::new(ch);
                self.current = Some((i, c.clone()));
                return Some(c);
            }
        }
        None
    }

    /// After `status`, the next call goes to the next replica if this one
    /// failed rather than refused (unreachable, gone silent, cut off from
    /// the leader, stuck): asking it again on every scan would register
    /// nothing for as long as it stays that way. True when it moved on.
    fn failed(&mut self, status: &tonic::Status) -> bool {
        use tonic::Code;
        let replica_failed = matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        );
        if replica_failed && let Some((i, _)) = self.current.take() {
            self.next = (i + 1) % self.control.len();
        }
        replica_failed
    }

    /// Static Pods of this node the control plane has now.
    async fn registered(
        &self,
        c: &mut ResourcesClient<Channel>,
    ) -> Result<BTreeSet<(String, String)>, tonic::Status> {
        let items = c
            .list(ListRequest {
                kind: "Pod".into(),
                namespace: String::new(),
                consistency: 0,
            })
            .await?
            .into_inner()
            .items;
        Ok(items
            .iter()
            .filter(|o| match &o.kind {
                Some(object::Kind::Pod(p)) => {
                    p.spec.as_ref().is_some_and(|s| s.node_name == self.node)
                        && p.metadata
                            .as_ref()
                            .is_some_and(|m| m.annotations.contains_key(SOURCE_ANNOTATION))
                }
                _ => false,
            })
            .map(|o| (o.namespace().to_string(), o.name().to_string()))
            .collect())
    }

    pub async fn run(mut self, stop: CancellationToken) {
        // What was last applied from each file, to apply only changes.
        let mut applied: BTreeMap<(String, String), Object> = BTreeMap::new();
        let mut synced = false;
        let mut tick = tokio::time::interval(SCAN_EVERY);
        'scan: loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let want = scan(&self.dir, &self.node);
            let Some(mut c) = self.client().await else {
                debug!("control plane unreachable; static pods wait");
                continue;
            };
            if !synced {
                // After a restart: forget nothing the directory lost meanwhile.
                let have = match self.registered(&mut c).await {
                    Ok(have) => have,
                    Err(e) => {
                        debug!(error = %e.message(), "static pods not listed; retrying");
                        self.failed(&e);
                        continue;
                    }
                };
                for k in have.difference(&want.keys().cloned().collect()) {
                    applied.insert(k.clone(), Object::default());
                }
                synced = true;
            }
            for (k, o) in &want {
                if applied.get(k) == Some(o) {
                    continue;
                }
                match c
                    .apply(ApplyRequest {
                        object: Some(o.clone()),
                    })
                    .await
                {
                    Ok(r) => {
                        info!(pod = %k.1, namespace = %k.0, result = %r.into_inner().result, "static pod registered");
                        applied.insert(k.clone(), o.clone());
                    }
                    Err(e) => {
                        warn!(pod = %k.1, error = %e.message(), "static pod not registered; retrying");
                        if self.failed(&e) {
                            continue 'scan;
                        }
                    }
                }
            }
            let gone: Vec<(String, String)> = applied
                .keys()
                .filter(|k| !want.contains_key(*k))
                .cloned()
                .collect();
            for k in gone {
                let req = DeleteRequest {
                    kind: "Pod".into(),
                    namespace: k.0.clone(),
                    name: k.1.clone(),
                    resource_version: String::new(),
                    grace_period_seconds: None,
                };
                match c.delete(req).await {
                    Ok(_) => info!(pod = %k.1, namespace = %k.0, "static pod removed"),
                    Err(e) if e.code() == tonic::Code::NotFound => {}
                    Err(e) => {
                        warn!(pod = %k.1, error = %e.message(), "static pod not removed; retrying");
                        if self.failed(&e) {
                            continue 'scan;
                        }
                        continue;
                    }
                }
                applied.remove(&k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_binds_pods_to_the_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("web.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web, labels: {app: web}}\nspec:\n  containers: [{name: c}]\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("notes.txt"), "ignored").expect("write");
        let pods = scan(dir.path(), "n1");
        let o = pods
            .get(&("default".to_string(), "web".to_string()))
            .expect("pod");
        let Some(object::Kind::Pod(p)) = &o.kind else {
            panic!("not a pod")
        };
        assert_eq!(p.spec.as_ref().expect("spec").node_name, "n1");
        assert_eq!(
            p.metadata.as_ref().expect("meta").annotations[SOURCE_ANNOTATION],
            "web.yaml"
        );
    }
}
