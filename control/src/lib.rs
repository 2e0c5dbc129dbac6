//! Strait's control plane: a Raft-replicated store of Services, Pods, Nodes
//! and EndpointSlices whose state machine validates, allocates and derives
//! endpoints deterministically, served and streamed over gRPC.
#![forbid(unsafe_code)]

pub mod alloc;
pub mod api;
pub mod app;
pub mod authz;
pub mod commit_point;
pub mod endpoints;
pub mod field;
pub mod liveness;
pub mod log_import;
pub mod log_store;
pub mod metrics;
pub mod objects;
pub mod propose;
pub mod raft;
pub mod raft_net;
pub mod service;
pub mod state;
pub mod tls;
pub mod wal;
pub mod watch;
