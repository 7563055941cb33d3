//! Tidepool runtime: everything that is not an actor.
//!
//! # Layout
//! - [`codec`]: the wire. rkyv envelopes, length-prefixed frames, validation, in-place tensor
//!   views. The only module with rkyv derives.
//! - [`transport`]: one quinn endpoint per node, mutual TLS against the cluster CA, one reused
//!   link per peer with a bounded send queue, reconnect with backoff, and (feature
//!   `fault-injection`) a UDP socket that drops, delays and blocks datagrams per peer.
//! - [`client`]: the client library (CLI, demo, tests): shard map, routing, idempotent retries.
//! - [`certs`]: the cluster CA and node / client certificates (rcgen).
//! - [`placement`]: sans-IO rendezvous hashing of shards onto members.
//! - [`config`]: typed node configuration, defaults with units, validation.
//! - [`metrics`]: one table of every metric name, type, unit and help text.
//! - [`control`]: the embedded Raft group (openraft) holding the cluster map.
//! - [`lease`], [`handoff`], [`rebalance`]: sans-IO lease arithmetic, the shard handoff state
//!   machine, and the leader's paced rebalancing policy.
//! - [`storage`]: object_store: the shards' op logs and epoch-fenced checkpoints.
//! - [`autoscale`]: sans-IO autoscaling policy (HPA rule, tolerance, bounds, stabilisation).
//! - [`jobspec`]: job specs (TOML), parsed and validated with the key named in every error.
//! - [`dataset`]: pure core of datasets: CSV to a numeric table, rows onto shards, the binary
//!   partition format viewed in place, and a seeded synthetic generator.
#![deny(unsafe_code)]

pub mod admission;
pub mod autoscale;
pub mod budget;
pub mod certs;
pub mod client;
pub mod codec;
pub mod config;
pub mod control;
pub mod dataset;
pub mod handoff;
pub mod jobspec;
pub mod leader_core;
pub mod lease;
pub mod metrics;
pub mod placement;
pub mod rebalance;
pub mod serving;
pub mod storage;
pub mod transport;

#[cfg(test)]
mod sim_cluster;

#[cfg(test)]
pub(crate) mod test_support {
    /// `default` proptest cases unless `PROPTEST_CASES` says otherwise (for long runs).
    pub(crate) fn cases(default: u32) -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }
}
