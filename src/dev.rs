//! `strait dev`: the newcomer's first command. One process with a
//! single-replica control plane, a node agent, demo backends on loopback
//! addresses, and the example manifests applied; no root needed because
//! every range lives inside 127.0.0.0/8.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::demo::spawn_backend as demo_backend;
use anyhow::{Context, bail};
use clap::Args;
use strait_proto::v1::resources_client::ResourcesClient;
use strait_proto::v1::{ApplyRequest, ListRequest, Object, object};

/// The example manifests, as shipped in `examples/`.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "backend-pods.yaml",
        include_str!("../examples/backend-pods.yaml"),
    ),
    (
        "backend-svc.yaml",
        include_str!("../examples/backend-svc.yaml"),
    ),
    (
        "db-externalname.yaml",
        include_str!("../examples/db-externalname.yaml"),
    ),
    (
        "frontend-nodeport.yaml",
        include_str!("../examples/frontend-nodeport.yaml"),
    ),
    (
        "web-loadbalancer.yaml",
        include_str!("../examples/web-loadbalancer.yaml"),
    ),
];

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where the dev cluster keeps its data.
    #[arg(long, default_value = ".strait-dev")]
    pub data_dir: PathBuf,
    /// Control-plane address.
    #[arg(long, default_value = "127.0.0.1:7700")]
    pub listen: SocketAddr,
    /// ClusterIP range (inside 127.0.0.0/8, so no route is needed).
    #[arg(long, default_value = "127.96.0.0/12")]
    pub service_cidr: ipnet::IpNet,
    /// LoadBalancer address pool.
    #[arg(long, default_value = "127.200.0.0/24")]
    pub lb_pool: String,
    /// Cluster DNS of the node agent (`off` disables it).
    #[arg(long, default_value = "127.0.0.1:5353")]
    pub dns_listen: String,
}

fn pod(name: &str, app: &str, node: &str, ip: &str, port_name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: {app}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: demo\n    ports: [{{name: {port_name}, containerPort: {port}}}]\nstatus:\n  podIP: {ip}\n"
    )
}

async fn apply_all(
    client: &mut ResourcesClient<tonic::transport::Channel>,
    text: &str,
) -> anyhow::Result<()> {
    for o in strait_proto::manifest::parse(text)? {
        let what = format!(
            "{}/{}",
            o.kind().map(|k| k.resource()).unwrap_or("object"),
            o.name()
        );
        let r = client
            .apply(ApplyRequest { object: Some(o) })
            .await
            .map_err(crate::client::server_error)?;
        println!("  {what} {}", r.into_inner().result);
    }
    Ok(())
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if !args.service_cidr.addr().is_loopback() {
        bail!(
            "strait dev keeps every range inside 127.0.0.0/8; --service-cidr {} is not",
            args.service_cidr
        );
    }
    let cfg = strait_control::app::Config {
        data_dir: args.data_dir.join("control"),
        listen: args.listen,
        service_cidr: args.service_cidr,
        lb_pool: args.lb_pool.clone(),
        ..Default::default()
    };
    let mut control = strait_control::app::build(cfg)
        .await
        .context("starting the control plane")?;
    strait_control::app::wait_for_leader(&control.raft, Duration::from_secs(30))
        .await
        .context("the control plane elected no leader")?;
    let server = control.addr.to_string();

    // node-1 is this process's agent (127.0.0.1); node-2 stands for a second
    // machine at 127.0.0.2 whose workloads this agent reaches directly.
    let dns_listen = match args.dns_listen.as_str() {
        "off" | "none" => None,
        a => Some(
            a.parse::<SocketAddr>()
                .with_context(|| format!("--dns-listen {a:?}: expected IP:PORT or off"))?,
        ),
    };
    let dns_upstream = strait_node::dns::upstream::resolv_conf(
        std::path::Path::new("/etc/resolv.conf"),
        dns_listen,
    )
    .unwrap_or_default();
    let node = strait_node::config::Config {
        name: "node-1".into(),
        control: vec![server.clone()],
        node_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        data_dir: args.data_dir.join("node-1"),
        service_cidr: Some(args.service_cidr),
        dns_listen,
        dns_upstream,
        ..Default::default()
    };
    let agent = match strait_node::app::build(node.clone()).await {
        Err(strait_node::AppError::Dns(e)) => {
            // A taken port (an mDNS responder on 5353) should not stop the demo.
            println!("  (cluster DNS skipped: {e}; pick another --dns-listen)");
            strait_node::app::build(strait_node::config::Config {
                dns_listen: None,
                ..node
            })
            .await
        }
        other => other,
    }
    .context("starting the node agent")?;

    let mut client = ResourcesClient::connect(format!("http://{server}"))
        .await
        .context("connecting to the control plane")?;
    println!("Applying the example manifests:");
    let node2 = "apiVersion: v1\nkind: Node\nmetadata: {name: node-2}\nstatus:\n  addresses: [{type: InternalIP, address: 127.0.0.2}]\n  conditions: [{type: Ready, status: \"True\"}]\n";
    apply_all(&mut client, node2).await?;
    // node-2 has no agent of its own here: heartbeat on its behalf so the
    // control plane keeps it Ready.
    let stop_node2 = tokio_util::sync::CancellationToken::new();
    tokio::spawn(strait_node::heartbeat::run(
        "node-2".into(),
        vec![server.clone()],
        strait_proto::tls::Transport::Insecure,
        // The demo's node-2 shares node-1's process and its state.
        agent.metrics(),
        stop_node2.clone(),
    ));
    demo_backend("127.0.0.1:5678".parse()?, "backend-1 (node-1)".into()).await?;
    demo_backend("127.0.0.2:5678".parse()?, "backend-2 (node-2)".into()).await?;
    for (file, text) in EXAMPLES {
        println!(" {file}");
        apply_all(&mut client, text).await?;
    }
    // Demo frontend Pods for the NodePort and LoadBalancer examples, on the
    // examples' targetPort 80, which only root (or CAP_NET_BIND_SERVICE, or
    // a lowered net.ipv4.ip_unprivileged_port_start) may listen on.
    let fport = 80;
    let mut frontends = Vec::new();
    for (i, ip) in ["127.0.1.1", "127.0.1.2"].iter().enumerate() {
        let addr: SocketAddr = format!("{ip}:{fport}").parse()?;
        match demo_backend(addr, format!("frontend-{}", i + 1)).await {
            Ok(()) => frontends.push(pod(
                &format!("frontend-{}", i + 1),
                "frontend",
                "node-1",
                ip,
                "http",
                fport,
            )),
            Err(e) => {
                println!(
                    "  (frontend demo skipped: {e:#}; the examples' targetPort is 80, so run as \
                     root for the NodePort and LoadBalancer paths)"
                );
                break;
            }
        }
    }
    for p in &frontends {
        apply_all(&mut client, p).await?;
    }

    let services = client
        .list(ListRequest {
            kind: "Service".into(),
            namespace: "default".into(),
            consistency: 0,
        })
        .await
        .map_err(crate::client::server_error)?
        .into_inner()
        .items;
    let find = |name: &str| -> Option<strait_proto::v1::Service> {
        services
            .iter()
            .find(|o: &&Object| o.name() == name)
            .and_then(|o| match &o.kind {
                Some(object::Kind::Service(s)) => Some(s.clone()),
                _ => None,
            })
    };
    let ip = |name: &str| {
        find(name)
            .and_then(|s| s.spec)
            .map(|s| s.cluster_ip)
            .unwrap_or_default()
    };
    let lb = find("web-lb")
        .and_then(|s| s.status)
        .and_then(|s| s.load_balancer)
        .and_then(|l| l.ingress.first().map(|i| i.ip.clone()))
        .unwrap_or_else(|| "<pending>".into());
    println!();
    println!(
        "Strait dev cluster is up: control plane on {server}, node agent node-1 on 127.0.0.1."
    );
    println!("Try:");
    println!("  strait --insecure --server {server} get svc");
    println!(
        "  curl http://{}:9090/      # ClusterIP backend-svc, balanced over backend-1 and backend-2",
        ip("backend-svc")
    );
    let none = if frontends.is_empty() {
        " (no endpoints without root: refused)"
    } else {
        ""
    };
    println!("  curl http://127.0.0.1:31000/    # NodePort frontend-svc{none}");
    println!("  curl http://{lb}:8080/     # LoadBalancer web-lb{none}");
    if let Some(dns) = agent.dns_addr() {
        println!(
            "  dig @{} -p {} backend-svc.default.svc.cluster.local   # cluster DNS",
            dns.ip(),
            dns.port()
        );
    }
    println!(
        "Data in {}; Ctrl-C stops everything.",
        args.data_dir.display()
    );
    tokio::select! {
        () = crate::control::shutdown_signal() => {}
        reason = control.wait() => {
            tracing::error!(reason, "the embedded control plane cannot go on; exiting");
            stop_node2.cancel();
            agent.shutdown().await;
            return Err(anyhow::anyhow!(reason).context("the control plane stopped"));
        }
    }
    stop_node2.cancel();
    agent.shutdown().await;
    control.shutdown().await;
    Ok(())
}
