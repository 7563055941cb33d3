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
//! - [`config`]: typed node configuration, defaults with units, validation.
//! - [`metrics`]: one table of every metric name, type, unit and help text.
//! - [`control`]: the embedded Raft group (openraft) holding the cluster map (the map, its
//!   commands and `apply` are in `tidepool-core`, re-exported here).
//! - Re-exported from the sans-IO `tidepool-core` (runtime/core, no tokio): [`lease`],
//!   [`leader_core`], [`serving`], [`handoff`], [`rebalance`], [`placement`], [`autoscale`].
//! - [`storage`]: object_store: the shards' op logs and epoch-fenced checkpoints.
//! - [`shard_state`] (pure): one shard's data and its idempotency table ([`dedup`]);
//!   [`restore`]: a new owner's state, fenced then rebuilt from checkpoint and log. The node's
//!   actors and the deterministic simulation run the same code.
//! - [`jobspec`]: job specs (TOML), parsed and validated with the key named in every error.
//! - [`dataset`]: pure core of datasets: CSV to a numeric table, rows onto shards, the binary
//!   partition format viewed in place, and a seeded synthetic generator.
#![deny(unsafe_code)]

pub mod admission;
pub use tidepool_core::{
    autoscale, handoff, leader_core, lease, ownership, placement, rebalance, serving,
};
pub mod budget;
pub mod certs;
pub mod client;
pub mod codec;
pub mod config;
pub mod control;
pub mod csr;
pub mod dataset;
pub mod dedup;
pub mod ingest;
pub mod jobspec;
pub mod metrics;
pub mod partition_file;
pub mod ratings;
pub mod restore;
pub mod shard_state;
pub mod storage;
pub mod transport;
