//! Compiles the slice of etcd's v3 API the benchmark calls (`KV.Put`,
//! `Maintenance.Status`) with protox, like `proto/` does, so building the
//! benchmark needs no system `protoc` (the `etcd-client` crate's build
//! script does).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto");
    let file = "etcdserverpb/rpc.proto";
    println!("cargo:rerun-if-changed={}", root.join(file).display());
    let fds = protox::compile([file], [&root])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
