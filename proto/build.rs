//! Compiles the .proto files with protox (pure Rust, so no system `protoc`)
//! and generates prost messages and tonic services. Resource messages also
//! derive serde with Kubernetes' JSON field names, so a manifest deserializes
//! straight into the wire type.

use std::path::PathBuf;

use protox::prost_reflect::prost_types::FileDescriptorSet;

/// Resource messages that appear in manifests (and `-o yaml` output).
const RESOURCE_MESSAGES: &[&str] = &[
    "ObjectMeta",
    "Service",
    "ServiceSpec",
    "ServicePort",
    "SessionAffinityConfig",
    "ClientIPConfig",
    "ServiceStatus",
    "LoadBalancerStatus",
    "LoadBalancerIngress",
    "Pod",
    "PodSpec",
    "Container",
    "ContainerPort",
    "Probe",
    "TcpSocketAction",
    "HttpGetAction",
    "ExecAction",
    "PodStatus",
    "PodIp",
    "Condition",
    "Node",
    "NodeSpec",
    "NodeStatus",
    "NodeAddress",
    "EndpointSlice",
    "Endpoint",
    "EndpointConditions",
    "EndpointPort",
    "ObjectReference",
];

/// Fields whose Kubernetes JSON name is not the camelCase of the proto name.
const RENAMES: &[(&str, &str)] = &[
    ("ServiceSpec.cluster_ip", "clusterIP"),
    ("ServiceSpec.cluster_ips", "clusterIPs"),
    ("ServiceSpec.load_balancer_ip", "loadBalancerIP"),
    ("ServiceSpec.external_ips", "externalIPs"),
    ("SessionAffinityConfig.client_ip", "clientIP"),
    ("PodStatus.pod_ip", "podIP"),
    ("PodStatus.pod_ips", "podIPs"),
    ("PodStatus.host_ip", "hostIP"),
    ("NodeSpec.pod_cidr", "podCIDR"),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto");
    let files = ["strait/v1/resources.proto", "strait/v1/api.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    fanout_server(&fds)?;

    let mut builder = tonic_prost_build::configure().btree_map(".");
    for msg in RESOURCE_MESSAGES {
        builder = builder.message_attribute(
            format!(".strait.v1.{msg}"),
            "#[derive(serde::Serialize, serde::Deserialize)] \
             #[serde(rename_all = \"camelCase\", default, deny_unknown_fields)]",
        );
    }
    for (field, json) in RENAMES {
        builder = builder.field_attribute(
            format!(".strait.v1.{field}"),
            format!("#[serde(rename = \"{json}\")]"),
        );
    }
    builder.compile_fds(fds)?;
    Ok(())
}

/// The `Resources` server once more, for control replicas: `Watch` answers
/// pre-encoded `frame::WatchFrame`s through `frame::WatchCodec` (encode once,
/// send to every watcher), every other method is as generated above. Built
/// from the descriptor, so it cannot drift from api.proto; lands in
/// `$OUT_DIR/strait.v1.Resources.rs`.
fn fanout_server(fds: &FileDescriptorSet) -> Result<(), Box<dyn std::error::Error>> {
    let resources = fds
        .file
        .iter()
        .flat_map(|f| &f.service)
        .find(|s| s.name() == "Resources")
        .ok_or("api.proto defines no Resources service")?;
    let rust_type = |proto: &str| {
        proto
            .strip_prefix(".strait.v1.")
            .map(|name| format!("crate::v1::{name}"))
            .ok_or_else(|| format!("Resources uses {proto}, outside strait.v1"))
    };
    let mut service = tonic_build::manual::Service::builder()
        .name("Resources")
        .package("strait.v1");
    for m in &resources.method {
        let route = m.name();
        let mut method = tonic_build::manual::Method::builder()
            .name(snake_case(route))
            .route_name(route)
            .input_type(rust_type(m.input_type())?);
        method = if route == "Watch" {
            method
                .output_type("crate::frame::WatchFrame")
                .codec_path("crate::frame::WatchCodec")
        } else {
            method
                .output_type(rust_type(m.output_type())?)
                .codec_path("tonic_prost::ProstCodec")
        };
        if m.client_streaming() {
            method = method.client_streaming();
        }
        if m.server_streaming() {
            method = method.server_streaming();
        }
        service = service.method(method.build());
    }
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[service.build()]);
    Ok(())
}

/// `AddMember` → `add_member`, as tonic names trait methods.
fn snake_case(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}
