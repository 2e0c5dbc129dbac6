//! How the agent dials the control plane: one set of connection settings
//! for every caller (the watch, heartbeats, the readiness prober, static
//! Pods), so that each notices a replica that died without a word — its
//! machine powered off, its packets dropped — in seconds, and moves on.

use std::time::Duration;

use tonic::transport::Endpoint;

/// A TCP connect that takes longer than this fails (a silent host never
/// answers the SYN).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 PINGs go out after this long without a frame from the replica,
/// also on connections with no call open. A watch stream carries progress
/// every 5 s, so a live watch sends few.
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);
/// A PING unanswered this long ends the connection, failing every call on
/// it; the callers then try the next replica. Generous, so a replica slowed
/// by a loaded machine is not mistaken for a dead one.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// A unary call that has no answer after this long fails, even on a
/// connection that answers PINGs (a replica stuck in a handler).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The endpoint for the replica at `addr` (`host:port` or URL).
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(strait_proto::tls::endpoint(addr)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_EVERY)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .timeout(CALL_TIMEOUT))
}
