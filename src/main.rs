//! The `strait` binary: one executable for the control plane, the node
//! agent, the all-in-one `dev` cluster and the kubectl-like CLI. Only flag
//! parsing and process wiring live here.

mod certs;
mod client;
mod commands;
mod control;
mod demo;
mod dev;
mod node;
mod output;
mod selector;
mod systemd;
mod telemetry;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Kubernetes-style Service networking for any set of machines.
#[derive(Parser, Debug)]
#[command(name = "strait", version, about, propagate_version = true)]
struct Cli {
    /// Control-plane replicas to talk to (comma-separated host:port); the
    /// CLI moves to the next one when one is unreachable.
    #[arg(
        long,
        global = true,
        env = "STRAIT_SERVER",
        default_value = "127.0.0.1:7700",
        value_delimiter = ','
    )]
    server: Vec<String>,

    /// How long the CLI waits for a replica's answer to a call ("0": no
    /// limit); a read then moves to the next replica. For `get -w`, the
    /// time to open the watch.
    #[arg(
        long,
        global = true,
        env = "STRAIT_REQUEST_TIMEOUT",
        default_value = "30s",
        value_parser = humantime::parse_duration
    )]
    request_timeout: std::time::Duration,

    /// Log as JSON lines instead of text.
    #[arg(long, global = true, env = "STRAIT_LOG_JSON")]
    log_json: bool,

    #[command(flatten)]
    tls: client::TlsArgs,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a control-plane replica.
    Control(control::ControlArgs),
    /// Run a node agent: listeners, forwarding, state from the control plane.
    Node(node::NodeArgs),
    /// Create the cluster CA and issue certificates (mTLS identities).
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
    /// An all-in-one local cluster with the example Services and demo backends.
    Dev(dev::DevArgs),
    /// Create or update objects from manifests (kubectl apply).
    Apply {
        /// A file, a directory of .yaml/.yml/.json files, or - for stdin.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// List objects or show one.
    Get {
        /// services (svc), pods (po), nodes (no), endpointslices.
        kind: String,
        /// Only this object.
        name: Option<String>,
        /// Namespace (default: default).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// Output format: wide, yaml or json.
        #[arg(short = 'o', long)]
        output: Option<output::Format>,
        /// Only objects whose labels match, in Kubernetes' syntax:
        /// `app=web,tier!=db`, `env in (a,b)`, `env notin (c)`, `canary`, `!canary`.
        #[arg(short = 'l', long)]
        selector: Option<selector::Selector>,
        /// Read the contacted replica's state without a read-index round trip.
        #[arg(long, value_enum, default_value_t = commands::ConsistencyArg::Linearizable)]
        consistency: commands::ConsistencyArg,
        /// After listing, show every change as it happens (until interrupted),
        /// moving to another replica, without a gap, when one fails.
        #[arg(short = 'w', long)]
        watch: bool,
        /// With --watch: an EVENT column (ADDED, MODIFIED, DELETED), or
        /// `{type, object}` documents with -o yaml|json.
        #[arg(long, requires = "watch")]
        output_watch_events: bool,
    },
    /// Show one object in detail, with its endpoints for a Service.
    Describe {
        kind: String,
        name: String,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
    },
    /// Delete objects named in manifests, or one object by kind and name.
    Delete {
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        kind: Option<String>,
        name: Option<String>,
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// Pods: seconds to stay terminating first (default: the Pod's
        /// terminationGracePeriodSeconds; 0 removes at once).
        #[arg(long)]
        grace_period: Option<i64>,
    },
    /// Inspect and change the control-plane membership.
    Cluster {
        #[command(subcommand)]
        command: commands::ClusterCommand,
    },
    /// Demo workloads for images with nothing but strait: an HTTP backend
    /// and a probe client.
    Demo {
        #[command(subcommand)]
        command: demo::DemoCommand,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = client::Client::new(cli.server.clone(), cli.tls.clone(), cli.request_timeout);
    let service = match &cli.command {
        Command::Control(_) => Some("strait-control"),
        Command::Node(_) => Some("strait-node"),
        Command::Dev(_) => Some("strait-dev"),
        _ => None,
    };
    let guard = match service.map(|s| telemetry::init(s, cli.log_json)) {
        Some(Ok(g)) => Some(g),
        Some(Err(e)) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
        None => None,
    };
    let result = match cli.command {
        Command::Control(args) => control::run(args, &cli.tls).await,
        Command::Node(args) => node::run(args, &cli.tls).await,
        Command::Dev(args) => dev::run(args).await,
        Command::Certs { command } => certs::run(command),
        Command::Apply { files } => commands::apply(&client, &files).await,
        Command::Get {
            kind,
            name,
            namespace,
            all_namespaces,
            output,
            selector,
            consistency,
            watch,
            output_watch_events,
        } => {
            let get = commands::Get {
                kind: &kind,
                name: name.as_deref(),
                namespace: namespace.as_deref(),
                all_namespaces,
                format: output,
                selector: selector.as_ref(),
                consistency,
            };
            if watch {
                get.watch(&client, output_watch_events).await
            } else {
                get.run(&client).await
            }
        }
        Command::Describe {
            kind,
            name,
            namespace,
        } => commands::describe(&client, &kind, &name, namespace.as_deref()).await,
        Command::Delete {
            files,
            kind,
            name,
            namespace,
            grace_period,
        } => {
            commands::delete(
                &client,
                &files,
                kind.as_deref(),
                name.as_deref(),
                namespace.as_deref(),
                grace_period,
            )
            .await
        }
        Command::Cluster { command } => commands::cluster(&client, command).await,
        Command::Demo { command } => demo::run(command).await,
    };
    if let Some(g) = guard {
        g.shutdown().await;
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Each cause once: some errors' messages already carry their source.
            eprintln!("error: {}", client::error_chain(&*e));
            ExitCode::FAILURE
        }
    }
}
