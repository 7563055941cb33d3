//! The fault file the chaos harness writes and a `fault-injection` node applies
//! (`TIDEPOOL_FAULT_FILE`, see `fault_file.rs`): JSON, a default rule and rules per peer
//! address.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// One rule as written in the fault file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RuleSpec {
    pub blocked: bool,
    pub outgoing_only: bool,
    pub drop_rate: f64,
    pub delay_ms: u64,
    pub jitter_ms: u64,
    pub duplicate_rate: f64,
}

/// The fault file: a default rule and rules per peer address.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FaultSpec {
    pub default: RuleSpec,
    pub peers: BTreeMap<SocketAddr, RuleSpec>,
}
