//! Compiles the .proto files with protox (pure Rust, so no system `protoc`)
//! and generates prost messages and tonic services. Resource messages also
//! derive serde with Kubernetes' JSON field names, so a manifest deserializes
//! straight into the wire type.

use std::path::PathBuf;

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
