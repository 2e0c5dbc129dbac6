//! Strait's API: the generated prost messages and tonic services, plus the
//! small amount of hand-written glue every side needs (kind names, metadata
//! access, Kubernetes' int-or-string ports).
#![forbid(unsafe_code)]

/// Generated code for package `strait.v1`.
#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod v1 {
    tonic::include_proto!("strait.v1");
}

mod int_or_string;
pub mod manifest;
mod object;
pub mod tls;

pub use object::{Kind, UnknownKind};
