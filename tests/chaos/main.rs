//! The chaos/failover suite: one scenario per file, each against real
//! `strait control` replicas (behind fault-injecting proxies) and, where
//! traffic matters, a real node agent with backends and a client loop.
//! Each scenario asserts named invariants — no acknowledged write lost, a
//! linearizable register, at most one leader per term, node agents at the
//! leader's revision, watches never skipping or going back, failed client
//! connections as bounded as the scenario states — and writes its row of
//! the README's scenario table (see `report`).

mod dataplane;
#[allow(dead_code)] // shared with the data-plane suite; not every helper is used here
#[path = "../dataplane/harness.rs"]
mod dp;
mod harness;
mod linearizable;
mod load;
mod proxy;
mod report;

mod control_plane_outage;
mod disk_full;
mod five_replicas;
mod graceful_leader_stop;
mod kill_leader;
mod node_and_backend_kills;
mod partitions;
mod replace_member;
mod restart_all;
mod rolling_restart;
mod sigstop_leader;
mod silent_replica;
mod watch_failover;
