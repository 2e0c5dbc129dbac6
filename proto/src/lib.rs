//! Strait's API: the generated prost messages and tonic services, plus the
//! small amount of hand-written glue every side needs (kind names, metadata
//! access, Kubernetes' int-or-string ports).
#![forbid(unsafe_code)]

/// Generated code for package `strait.v1`.
#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod v1 {
    tonic::include_proto!("strait.v1");
}

/// The `Resources` server as control replicas serve it: the same service and
/// wire format as `v1::resources_server`, but `Watch` streams
/// [`frame::WatchFrame`]s, encoded once per revision for every watcher
/// (generated in `build.rs`). `v1::resources_server` stays for fakes and
/// tests that answer with plain `WatchResponse`s.
#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod fanout {
    include!(concat!(env!("OUT_DIR"), "/strait.v1.Resources.rs"));
}

pub mod frame;
mod int_or_string;
pub mod manifest;
mod object;
pub mod tls;

pub use object::{Kind, UnknownKind};
