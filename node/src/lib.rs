//! Strait's node agent: watch client, node state, listeners, splice forwarder, DNS.

pub mod splice;
