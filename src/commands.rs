//! The kubectl-like verbs: apply, get, describe, delete, cluster. Each
//! object of a manifest is applied on its own and reported the way kubectl
//! does; any failure makes the command exit non-zero.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use clap::Subcommand;
use strait_proto::Kind;
use strait_proto::v1::{
    AddMemberRequest, ApplyRequest, ClusterStatusRequest, Consistency, DeleteRequest, GetRequest,
    ListRequest, NodeStatusRequest, Object, RemoveMemberRequest, object,
};

use crate::client::{Client, server_error};
use crate::output::{self, Format};
use crate::selector::Selector;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum ConsistencyArg {
    Linearizable,
    Serializable,
}

impl From<ConsistencyArg> for i32 {
    fn from(c: ConsistencyArg) -> i32 {
        match c {
            ConsistencyArg::Linearizable => Consistency::Linearizable as i32,
            ConsistencyArg::Serializable => Consistency::Serializable as i32,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Each member's role, term, last log and applied index, and the leader.
    Status,
    /// Add a replica: it catches up as a learner, then becomes a voter.
    AddMember {
        #[arg(long)]
        id: u64,
        /// Its host:port.
        #[arg(long)]
        address: String,
    },
    /// Remove a replica from the voters.
    RemoveMember {
        #[arg(long)]
        id: u64,
    },
}

/// Manifest files named by `-f`: files, directories (their .yaml, .yml and
/// .json files, sorted) or `-` for stdin.
fn read_sources(files: &[PathBuf]) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for f in files {
        if f.as_os_str() == "-" {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading stdin")?;
            out.push(("STDIN".to_string(), s));
        } else if f.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(f)
                .with_context(|| format!("reading directory {}", f.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
                })
                .collect();
            entries.sort();
            for p in entries {
                out.push((p.display().to_string(), read_file(&p)?));
            }
        } else {
            out.push((f.display().to_string(), read_file(f)?));
        }
    }
    Ok(out)
}

fn read_file(p: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| {
        format!(
            "the path {:?} does not exist or cannot be read",
            p.display().to_string()
        )
    })
}

fn reference(o: &Object) -> String {
    match o.kind() {
        Some(k) => format!("{}/{}", k.resource(), o.name()),
        None => o.name().to_string(),
    }
}

pub async fn apply(client: &Client, files: &[PathBuf]) -> anyhow::Result<()> {
    let sources = read_sources(files)?;
    let mut failures = 0;
    let mut session = client.session()?;
    for (source, text) in sources {
        let objects = match strait_proto::manifest::parse(&text) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("error: error validating {source:?}: {e}");
                failures += 1;
                continue;
            }
        };
        for o in objects {
            let what = reference(&o);
            let answer = session
                .write(|mut rpc| {
                    let object = Some(o.clone());
                    async move { rpc.apply(ApplyRequest { object }).await }
                })
                .await?;
            match answer {
                Ok(resp) => println!("{what} {}", resp.result),
                Err(status) => {
                    eprintln!(
                        "{}",
                        server_error(status)
                            .context(format!("error when applying {what} from {source:?}"))
                            .root_cause()
                    );
                    failures += 1;
                }
            }
        }
    }
    if failures > 0 {
        bail!("{failures} object(s) could not be applied");
    }
    Ok(())
}

fn parse_kind(kind: &str) -> anyhow::Result<Kind> {
    kind.parse::<Kind>().map_err(|e| anyhow!(e))
}

fn namespace_for(kind: Kind, ns: Option<&str>) -> String {
    if kind.namespaced() {
        ns.unwrap_or("default").to_string()
    } else {
        String::new()
    }
}

/// `get`: what to show and how.
pub struct Get<'a> {
    pub kind: &'a str,
    pub name: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub all_namespaces: bool,
    pub format: Option<Format>,
    pub selector: Option<&'a Selector>,
    pub consistency: ConsistencyArg,
}

impl Get<'_> {
    /// The namespace asked for; empty for every namespace and for
    /// cluster-scoped kinds. A name with `-A` or `-l` is kubectl's error.
    fn scope(&self, kind: Kind) -> anyhow::Result<String> {
        if self.all_namespaces && self.name.is_some() {
            bail!("a resource cannot be retrieved by name across all namespaces");
        }
        if self.selector.is_some() && self.name.is_some() {
            bail!("name cannot be provided when a selector is specified");
        }
        Ok(if self.all_namespaces {
            String::new()
        } else {
            namespace_for(kind, self.namespace)
        })
    }

    /// `get -w`: see [`crate::watch`].
    pub async fn watch(&self, client: &Client, events: bool) -> anyhow::Result<()> {
        let kind = parse_kind(self.kind)?;
        crate::watch::Watch {
            kind,
            name: self.name,
            namespace: self.scope(kind)?,
            all_namespaces: self.all_namespaces,
            format: self.format,
            selector: self.selector,
            consistency: self.consistency.into(),
            events,
        }
        .run(client)
        .await
    }

    /// `get` without `-w`: the objects as they are now.
    pub async fn run(&self, client: &Client) -> anyhow::Result<()> {
        let kind = parse_kind(self.kind)?;
        let (name, all, format) = (self.name, self.all_namespaces, self.format);
        let mut session = client.session()?;
        let ns = self.scope(kind)?;
        let consistency: i32 = self.consistency.into();
        let mut items: Vec<Object> = match name {
            Some(n) => {
                let req = GetRequest {
                    kind: kind.to_string(),
                    namespace: ns.clone(),
                    name: n.to_string(),
                    consistency,
                };
                session.get(req).await?.object.into_iter().collect()
            }
            None => {
                let req = ListRequest {
                    kind: kind.to_string(),
                    namespace: ns.clone(),
                    consistency,
                };
                session.list(req).await?.items
            }
        };
        if let Some(sel) = self.selector {
            items.retain(|o| sel.selects(o));
        }
        match format {
            Some(Format::Yaml) | Some(Format::Json) => {
                let values: Vec<serde_json::Value> = items.iter().map(output::manifest).collect();
                let v = if name.is_some() && values.len() == 1 {
                    values.into_iter().next().unwrap_or_default()
                } else {
                    serde_json::json!({"apiVersion": "v1", "kind": "List", "items": values})
                };
                if format == Some(Format::Json) {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print!("{}", output::to_yaml(&v)?);
                }
            }
            _ if items.is_empty() => output::no_resources(&ns),
            f => {
                let progress = if kind == Kind::Node {
                    node_progress(client).await
                } else {
                    output::NodeProgress::default()
                };
                print!(
                    "{}",
                    output::table(kind, &items, all, f == Some(Format::Wide), &progress)
                )
            }
        }
        Ok(())
    }
}

/// What the contacted replica heard from node agents; empty (columns
/// `<none>`) when it cannot say, e.g. a replica without the RPC.
pub(crate) async fn node_progress(client: &Client) -> output::NodeProgress {
    let Ok(mut session) = client.cluster_session() else {
        return output::NodeProgress::default();
    };
    match session
        .read(|mut rpc| async move { rpc.node_status(NodeStatusRequest {}).await })
        .await
    {
        Ok(Ok(r)) => output::NodeProgress {
            applied: r
                .nodes
                .into_iter()
                .map(|n| (n.node_name, n.applied_revision))
                .collect(),
            revision: r.revision,
        },
        _ => output::NodeProgress::default(),
    }
}

pub async fn describe(
    client: &Client,
    kind: &str,
    name: &str,
    namespace: Option<&str>,
) -> anyhow::Result<()> {
    let kind = parse_kind(kind)?;
    let ns = namespace_for(kind, namespace);
    let mut session = client.session()?;
    let req = GetRequest {
        kind: kind.to_string(),
        namespace: ns.clone(),
        name: name.to_string(),
        consistency: 0,
    };
    let o = session
        .get(req)
        .await?
        .object
        .ok_or_else(|| anyhow!("server returned no object"))?;
    match &o.kind {
        Some(object::Kind::Service(s)) => {
            let req = ListRequest {
                kind: "EndpointSlice".into(),
                namespace: ns,
                consistency: 0,
            };
            let slices: Vec<Object> = session
                .list(req)
                .await?
                .items
                .into_iter()
                .filter(|e| {
                    e.metadata()
                        .and_then(|m| m.labels.get("kubernetes.io/service-name"))
                        .map(String::as_str)
                        == Some(name)
                })
                .collect();
            print!("{}", output::describe_service(&o, s, &slices));
        }
        Some(object::Kind::Pod(p)) => print!("{}", output::describe_pod(&o, p)),
        Some(object::Kind::Node(n)) => {
            let progress = node_progress(client).await;
            print!("{}", output::describe_node(&o, n, &progress));
        }
        _ => print!("{}", output::to_yaml(&output::manifest(&o))?),
    }
    Ok(())
}

pub async fn delete(
    client: &Client,
    files: &[PathBuf],
    kind: Option<&str>,
    name: Option<&str>,
    namespace: Option<&str>,
    grace_period: Option<i64>,
) -> anyhow::Result<()> {
    let mut targets: Vec<(Kind, String, String)> = Vec::new();
    if !files.is_empty() {
        if kind.is_some() {
            bail!("use either -f FILE or KIND NAME, not both");
        }
        for (source, text) in read_sources(files)? {
            let objects = strait_proto::manifest::parse(&text)
                .with_context(|| format!("error validating {source:?}"))?;
            for o in objects {
                if let Some(k) = o.kind() {
                    let ns = if k.namespaced() && o.namespace().is_empty() {
                        namespace_for(k, namespace)
                    } else {
                        o.namespace().to_string()
                    };
                    targets.push((k, ns, o.name().to_string()));
                }
            }
        }
    } else {
        let (Some(kind), Some(name)) = (kind, name) else {
            bail!("you must provide one or more resources by -f FILE or KIND NAME");
        };
        let k = parse_kind(kind)?;
        targets.push((k, namespace_for(k, namespace), name.to_string()));
    }
    let mut session = client.session()?;
    let mut failures = 0;
    for (kind, ns, name) in targets {
        let req = DeleteRequest {
            kind: kind.to_string(),
            namespace: ns,
            name: name.clone(),
            resource_version: String::new(),
            grace_period_seconds: grace_period,
        };
        let answer = session
            .write(|mut rpc| {
                let req = req.clone();
                async move { rpc.delete(req).await }
            })
            .await?;
        match answer {
            Ok(_) => println!("{} {name:?} deleted", kind.resource()),
            Err(status) => {
                eprintln!("{}", server_error(status));
                failures += 1;
            }
        }
    }
    if failures > 0 {
        bail!("{failures} object(s) could not be deleted");
    }
    Ok(())
}

/// `cluster …`: the status from whichever replica answers, moving on as
/// reads do; membership changes as writes.
pub async fn cluster(client: &Client, cmd: ClusterCommand) -> anyhow::Result<()> {
    let mut session = client.cluster_session()?;
    match cmd {
        ClusterCommand::Status => {
            let s = session
                .read(|mut rpc| async move { rpc.status(ClusterStatusRequest {}).await })
                .await?
                .map_err(server_error)?;
            println!("leader: {}   revision: {}", s.leader_id, s.revision);
            println!(
                "{:<4} {:<22} {:<11} {:<6} {:>9} {:>9}  VOTER",
                "ID", "ADDRESS", "ROLE", "TERM", "LAST-LOG", "APPLIED"
            );
            for m in s.members {
                // Each member reports its own term, log and applied index.
                let member = client.with_servers(vec![m.address.clone()]);
                let own = match member.cluster_session() {
                    Ok(mut one) => one
                        .read(|mut rpc| async move { rpc.status(ClusterStatusRequest {}).await })
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .and_then(|r| r.members.into_iter().find(|x| x.id == m.id && x.term > 0)),
                    Err(_) => None,
                };
                match own {
                    Some(o) => println!(
                        "{:<4} {:<22} {:<11} {:<6} {:>9} {:>9}  {}",
                        m.id, m.address, o.role, o.term, o.last_log_index, o.applied_index, m.voter
                    ),
                    None => println!(
                        "{:<4} {:<22} {:<11} {:<6} {:>9} {:>9}  {}",
                        m.id, m.address, "unreachable", "-", "-", "-", m.voter
                    ),
                }
            }
        }
        ClusterCommand::AddMember { id, address } => {
            let r = session
                .write(|mut rpc| {
                    let address = address.clone();
                    async move { rpc.add_member(AddMemberRequest { id, address }).await }
                })
                .await?
                .map_err(server_error)?;
            println!("member {id} added; voters: {:?}", r.voters);
        }
        ClusterCommand::RemoveMember { id } => {
            let r = session
                .write(|mut rpc| async move { rpc.remove_member(RemoveMemberRequest { id }).await })
                .await?
                .map_err(server_error)?;
            println!("member {id} removed; voters: {:?}", r.voters);
        }
    }
    Ok(())
}
