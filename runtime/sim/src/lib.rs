//! Tidepool's simulations, for development only (no node links this crate).
//!
//! [`scale`] runs the control plane of a cluster of 10 to 10 000 simulated nodes on a virtual
//! clock, through the same sans-IO cores the node runs ([`tidepool_core::leader_core::LeaderCore`],
//! [`tidepool_core::ownership::OwnershipCore`], [`tidepool_core::lease::LeaseHolder`], the map's
//! [`tidepool_core::control::apply`]), and measures what the leader does per second and per tick
//! as the cluster grows. `cargo run --release -p tidepool-sim --bin sim-scale` prints the table
//! BENCHMARKS.md records; `benches/scale/plot.py` draws it.

pub mod scale;

/// The ownership protocol under faults (crashes, pauses, partitions, slow and failing storage),
/// with the real cores and the real storage layer; tests only.
#[cfg(test)]
mod cluster;
