//! Tidepool's sans-IO core: every decision of the ownership protocol, with no I/O, no clocks, no
//! randomness of its own and no async runtime (this crate does not depend on tokio). Callers pass
//! `now` in and carry out what comes back. The node (`tidepool-runtime`, `tidepool-actors`) and
//! the deterministic simulation run this same code.
//!
//! - [`node_id`]: `NodeId`, a node's identity (its certificate's name).
//! - [`lease`]: the lease holder and the leader's lease table (invariant 1).
//! - [`leader_core`]: the control-plane leader's grants, failure detection, promotion and
//!   rebalance commands.
//! - [`serving`]: the admission rule (actor at the op's epoch, accepting, lease valid now).
//! - [`handoff`]: the per-shard ownership state machine.
//! - [`ownership`]: one node's machines for every shard, fed from the map, the lease and
//!   effect results (the ownership driver's decisions).
//! - [`rebalance`], [`placement`]: where shards go, paced.
//! - [`autoscale`]: the autoscaling policy.
//! - [`control`]: the replicated cluster map, its commands, and `apply`, the state machine.

pub mod autoscale;
pub mod control;
pub mod handoff;
pub mod leader_core;
pub mod lease;
pub mod node_id;
pub mod ownership;
pub mod placement;
pub mod rebalance;
pub mod serving;

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

#[cfg(test)]
mod tests {
    /// The crate boundary is "does no I/O": no async runtime, no network, no storage, no clock
    /// crate may become a dependency of the core.
    #[test]
    fn the_core_depends_on_no_io_crate() {
        let manifest = include_str!("../Cargo.toml");
        let deps = manifest
            .split("[dependencies]")
            .nth(1)
            .and_then(|rest| rest.split("\n[").next())
            .unwrap_or_default();
        let names: Vec<&str> = deps
            .lines()
            .filter_map(|l| l.split(['.', '=', ' ']).next())
            .filter(|n| !n.is_empty() && !n.starts_with('#'))
            .collect();
        assert_eq!(names, ["serde", "thiserror", "xxhash-rust"], "{deps}");
    }
}
