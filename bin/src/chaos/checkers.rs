//! The chaos checkers: each turns a run's history into a list of violations (empty = passed).
//!
//! 1. [`ops`]: no acknowledged increment lost, none applied twice (per key: counter == acked,
//!    or acked <= counter <= acked + unacknowledged when some ops stayed unacknowledged).
//! 2. [`ownership`]: from every node's `ownership.log` of (shard, epoch, node, start, stop),
//!    never two nodes serving one shard at the same time. A node is not serving while it is
//!    SIGSTOPped or after it was killed, so those times end its intervals.
//! 3. convergence (in the runner): after healing, every shard served by a live node, no node
//!    above the placement cap, within the scenario's bound.
//! 4. [`model`]: the training job's final parameters equal the fault-free model's.
//! 5. exits (in the runner): no process exited that the scenario did not kill.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use tidepool_runtime::client::ClusterClient;
use tidepool_runtime::codec::{Op, OpResult};

use crate::workload::WorkloadReport;

/// Checker 1. Reads every key back (with retries) and compares with the client's record.
pub async fn ops(client: &ClusterClient, report: &WorkloadReport, keys: u64) -> Vec<String> {
    let mut out = Vec::new();
    for k in 0..keys {
        let key = format!("k{k}");
        let acked = report.per_key.get(&key).copied().unwrap_or(0);
        let value = match client.op(&key, Op::Get { key: key.clone() }).await {
            Ok(OpResult::Counter(v)) => u64::try_from(v).unwrap_or(u64::MAX),
            Ok(OpResult::Value(None)) => 0,
            Ok(other) => {
                out.push(format!("{key}: unexpected reply {other:?}"));
                continue;
            }
            Err(e) => {
                out.push(format!("{key}: cannot read it back: {e}"));
                continue;
            }
        };
        if value < acked {
            out.push(format!(
                "{key}: LOST {} acknowledged increments (counter {value}, acknowledged {acked})",
                acked - value
            ));
        } else if value > acked + report.unacked {
            out.push(format!(
                "{key}: APPLIED TWICE (counter {value}, acknowledged {acked}, unacknowledged {})",
                report.unacked
            ));
        }
    }
    out
}

/// One node's time serving one shard (microseconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct Interval {
    pub node: String,
    pub epoch: u64,
    pub start: u64,
    pub stop: Option<u64>,
}

/// Ownership intervals per shard from the nodes' `{data_dir}/ownership.log`.
pub fn intervals(data_dir: &Path, nodes: &[String]) -> BTreeMap<u64, Vec<Interval>> {
    let mut out: BTreeMap<u64, Vec<Interval>> = BTreeMap::new();
    for n in nodes {
        let text =
            std::fs::read_to_string(data_dir.join(n).join("ownership.log")).unwrap_or_default();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue; // a line torn by kill -9
            };
            let (Some(shard), Some(ts)) = (v["shard"].as_u64(), v["ts_us"].as_u64()) else {
                continue;
            };
            let list = out.entry(shard).or_default();
            if v["event"] == "start" {
                list.push(Interval {
                    node: n.clone(),
                    epoch: v["epoch"].as_u64().unwrap_or(0),
                    start: ts,
                    stop: None,
                });
            } else if let Some(open) = list
                .iter_mut()
                .rev()
                .find(|i| i.node == *n && i.stop.is_none())
            {
                open.stop = Some(ts);
            }
        }
    }
    out
}

/// Checker 2. `down[node]` = periods (µs) in which the node's process did not exist (killed, or
/// exited and not yet restarted); an interval is cut at the first such period that starts inside
/// it, since a dead process writes no `stop`. A paused, stalled or starved process gets no cut: it
/// must date the end of its intervals itself, at its own lease expiry.
pub fn ownership(
    intervals: &BTreeMap<u64, Vec<Interval>>,
    down: &HashMap<String, Vec<(u64, u64)>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (shard, list) in intervals {
        let mut list: Vec<Interval> = list
            .iter()
            .map(|i| {
                let mut i = i.clone();
                let cut = down
                    .get(&i.node)
                    .into_iter()
                    .flatten()
                    .filter(|(from, _)| *from >= i.start && i.stop.is_none_or(|s| *from < s))
                    .map(|(from, _)| *from)
                    .min();
                if let Some(c) = cut {
                    i.stop = Some(c);
                }
                i
            })
            .collect();
        list.sort_by_key(|i| i.start);
        for (a_idx, a) in list.iter().enumerate() {
            for b in &list[a_idx + 1..] {
                if a.node == b.node {
                    continue;
                }
                let a_stop = a.stop.unwrap_or(u64::MAX);
                if b.start < a_stop {
                    out.push(format!(
                        "shard {shard}: TWO OWNERS: {} (epoch {}) served until {} while {} (epoch {}) started at {}",
                        a.node,
                        a.epoch,
                        a.stop.map_or("the end".into(), |s| s.to_string()),
                        b.node,
                        b.epoch,
                        b.start
                    ));
                }
            }
        }
    }
    out
}

/// Checker 4. Maximum absolute difference of the trained parameters against the reference.
pub fn model(got: &serde_json::Value, want: &serde_json::Value) -> Vec<String> {
    let flat = |v: &serde_json::Value| -> Vec<f64> {
        v["standardized_params"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default()
    };
    let (a, b) = (flat(got), flat(want));
    if a.is_empty() || a.len() != b.len() {
        return vec![format!(
            "model: {} parameters, fault-free model has {}",
            a.len(),
            b.len()
        )];
    }
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    if d > 1e-5 {
        vec![format!("model differs from the fault-free model by {d:e}")]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(node: &str, start: u64, stop: Option<u64>) -> Interval {
        Interval {
            node: node.into(),
            epoch: 1,
            start,
            stop,
        }
    }

    #[test]
    fn overlapping_owners_are_reported_and_deaths_end_intervals() {
        let mut map = BTreeMap::new();
        map.insert(3, vec![iv("n1", 0, Some(100)), iv("n2", 100, None)]);
        assert!(
            ownership(&map, &HashMap::new()).is_empty(),
            "back to back is fine"
        );
        map.insert(4, vec![iv("n1", 0, Some(150)), iv("n2", 100, None)]);
        let v = ownership(&map, &HashMap::new());
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("shard 4"));
        // n1 was killed at 90: it could not serve after that.
        let down = HashMap::from([("n1".to_string(), vec![(90, 200)])]);
        assert!(ownership(&map, &down).is_empty());
    }

    #[test]
    fn models_compare_within_tolerance() {
        let a = serde_json::json!({"standardized_params": [1.0, 2.0]});
        let b = serde_json::json!({"standardized_params": [1.0, 2.000001]});
        let c = serde_json::json!({"standardized_params": [1.0, 2.1]});
        assert!(model(&a, &b).is_empty());
        assert_eq!(model(&a, &c).len(), 1);
        assert_eq!(model(&a, &serde_json::json!({})).len(), 1);
    }
}
