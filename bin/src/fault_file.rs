//! Chaos hook (feature `fault-injection`): with `TIDEPOOL_FAULT_FILE=PATH` in its environment, a
//! node binds the fault-injecting UDP socket and applies whatever faults the chaos harness
//! writes to PATH (JSON, polled every 100 ms): per-peer blocks (partitions, one-way with
//! `outgoing_only`), loss, delay, jitter (reordering) and duplication. Without the variable the
//! node binds a plain socket.
//!
//! Storage faults are the runtime's (`tidepool_runtime::storage::faulty`): with
//! `TIDEPOOL_STORAGE_FAULT_FILE=PATH`, `Store::open` wraps the node's object store and applies
//! the JSON written to PATH (`{"write_error_rate":0.2,"write_delay_ms":50,"read_error_rate":0.0}`,
//! polled every 100 ms; empty or missing = no faults). Nothing to do here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use tidepool_runtime::transport::fault::{FaultPlan, FaultSocket, Rule};
use tidepool_runtime::transport::Socket;

use crate::fault_spec::{FaultSpec, RuleSpec};

fn rule(r: &RuleSpec) -> Rule {
    Rule {
        blocked: r.blocked,
        outgoing_only: r.outgoing_only,
        drop_rate: r.drop_rate.clamp(0.0, 1.0),
        delay: Duration::from_millis(r.delay_ms),
        jitter: Duration::from_millis(r.jitter_ms),
        duplicate_rate: r.duplicate_rate.clamp(0.0, 1.0),
    }
}

/// The socket to bind: the fault-injecting one when `TIDEPOOL_FAULT_FILE` is set.
pub fn socket_from_env(listen: SocketAddr) -> Result<Option<Socket>> {
    let Some(path) = std::env::var_os("TIDEPOOL_FAULT_FILE").map(PathBuf::from) else {
        return Ok(None);
    };
    let seed = std::env::var("TIDEPOOL_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let plan = FaultPlan::new(seed);
    let sock = FaultSocket::bind(listen, plan.clone())
        .with_context(|| format!("binding the fault-injecting socket on {listen}"))?;
    tracing::warn!(file = %path.display(), "fault injection enabled: applying the faults written to this file");
    tokio::spawn(watch(path, plan));
    Ok(Some(Socket::Abstract(sock)))
}

async fn watch(path: PathBuf, plan: FaultPlan) {
    let mut last: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let text = tokio::fs::read_to_string(&path).await.unwrap_or_default();
        if last.as_deref() == Some(text.as_str()) {
            continue;
        }
        let spec: FaultSpec = if text.trim().is_empty() {
            FaultSpec::default()
        } else {
            match serde_json::from_str(&text) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable fault file; keeping the current faults");
                    last = Some(text);
                    continue;
                }
            }
        };
        plan.heal();
        plan.set_default(rule(&spec.default));
        for (peer, r) in &spec.peers {
            plan.set(*peer, rule(r));
        }
        tracing::info!(peers = spec.peers.len(), "fault plan updated");
        last = Some(text);
    }
}
