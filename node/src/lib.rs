//! Strait's node agent: watch client, node state, listeners, splice forwarder,
//! cluster DNS.
//!
//! [`app::build`] starts it; [`state::NodeState`] is the immutable snapshot
//! the watch client publishes and every listener reads.

pub mod app;
pub mod config;
pub mod conns;
pub mod control;
pub mod dns;
pub mod drain;
pub mod forward;
pub mod fsutil;
pub mod health;
pub mod heartbeat;
pub mod listeners;
pub mod metrics;
pub mod pods;
pub mod routes;
pub mod service_health;
pub mod splice;
pub mod state;
pub mod udp;
pub mod watch;
pub mod workers;

pub use app::{AppError, Bound, build};
pub use config::{Config, LbPolicy};
pub use state::NodeState;
