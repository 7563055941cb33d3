//! What an operator reads: three `tidepool node run` processes with `--log-format json`.
//!
//! - every line of every node's log is one JSON object with flattened fields and a top-level
//!   `node` equal to the node's name (also for the lines of spawned tasks and actors);
//! - start-up at INFO is a short summary per node (not a line per shard);
//! - leaders are named, never numeric Raft ids;
//! - a normal whole-cluster stop (SIGTERM to every node) logs no ERROR line.
//!
//! The same fresh cluster (no workload yet) checks what its `/metrics` carry from the start:
//! every series a dashboard or alert rule reads, on every node, labelled with the node's name
//! and the cluster's; `process_*` metrics; job-step buckets up to 600 s; exactly one Raft
//! leader; the certificate's expiry.
//!
//! Every wait is a poll with a deadline.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value};
use tidepool::local_cluster::LocalCluster;
use tidepool_runtime::client::ClientOptions;

const BIN: &str = env!("CARGO_BIN_EXE_tidepool");
/// INFO-or-above lines a node may log from start to a settled cluster.
const STARTUP_INFO_LINES: usize = 25;

/// Every line of a node's log as a JSON object; panics with the line if one is not.
fn json_lines(c: &LocalCluster, i: usize) -> Vec<Map<String, Value>> {
    let text = std::fs::read_to_string(&c.nodes[i].log).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str::<Value>(l) {
            Ok(Value::Object(m)) => m,
            other => panic!("{}: not a JSON object ({other:?}): {l}", c.nodes[i].name),
        })
        .collect()
}

fn level(line: &Map<String, Value>) -> &str {
    line.get("level").and_then(Value::as_str).unwrap_or("")
}

/// Every `tidepool_*` series named in the dashboards and the alert rules (`_bucket`, `_sum`,
/// `_count` kept: those are the exposed names).
fn used_series() -> BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![root.join("config/prometheus/rules.yml")];
    for e in std::fs::read_dir(root.join("dashboards")).unwrap() {
        files.push(e.unwrap().path());
    }
    let mut out = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for w in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if w.starts_with("tidepool_") {
                out.insert(w.to_string());
            }
        }
    }
    assert!(out.len() > 40, "only {} series found", out.len());
    out
}

async fn check_metrics(c: &LocalCluster, problems: &mut Vec<String>) {
    let used = used_series();
    let mut leaders = 0.0;
    for (i, n) in c.nodes.iter().enumerate() {
        let text = c.metrics(i).await.unwrap();
        let series: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .collect();
        let names: BTreeSet<&str> = series
            .iter()
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        for u in &used {
            if !names.contains(u.as_str()) {
                problems.push(format!("{}: {u} is not on /metrics at start", n.name));
            }
        }
        for p in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            if !names.contains(p) {
                problems.push(format!("{}: no {p}", n.name));
            }
        }
        let labels = format!("node=\"{}\"", n.name);
        for l in &series {
            if !l.contains(&labels) || !l.contains("cluster=\"tidepool\"") {
                problems.push(format!(
                    "{}: series without node/cluster labels: {l}",
                    n.name
                ));
                break;
            }
        }
        let les: Vec<&str> = series
            .iter()
            .filter(|l| l.starts_with("tidepool_job_step_duration_seconds_bucket{"))
            .filter(|l| l.contains("kind=\"sgd\""))
            .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next())
            .collect();
        if !les.contains(&"600") || !les.contains(&"60") {
            problems.push(format!(
                "{}: job step buckets {les:?} do not reach 600 s",
                n.name
            ));
        }
        leaders += tidepool::http::sum_metric(&text, "tidepool_raft_is_leader", &[]);
        let expiry =
            tidepool::http::sum_metric(&text, "tidepool_cert_expiry_timestamp_seconds", &[]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // LocalCluster issues certificates for 30 days.
        if !(now + 29.0 * 86400.0..now + 31.0 * 86400.0).contains(&expiry) {
            problems.push(format!(
                "{}: certificate expiry {expiry}, now {now}",
                n.name
            ));
        }
    }
    if leaders != 1.0 {
        problems.push(format!(
            "tidepool_raft_is_leader sums to {leaders} over the nodes"
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_name_the_node_stay_short_and_stop_without_errors() {
    let mut c = LocalCluster::create(Path::new(BIN), 3, 32, 3).unwrap();
    c.args = vec!["--log-format".into(), "json".into()];
    c.start_all().unwrap();
    let opts = ClientOptions {
        retry_for: Duration::from_secs(60),
        ..Default::default()
    };
    let client = c.settled_admin_client(opts).await.unwrap();
    drop(client);

    let mut problems = Vec::new();
    check_metrics(&c, &mut problems).await;
    for i in 0..c.nodes.len() {
        let name = c.nodes[i].name.clone();
        let lines = json_lines(&c, i);
        assert!(!lines.is_empty(), "{name}: empty log");
        for l in &lines {
            if l.get("node").and_then(Value::as_str) != Some(name.as_str()) {
                problems.push(format!("{name}: line without node={name:?}: {l:?}"));
            }
            if l.contains_key("fields") {
                problems.push(format!("{name}: fields not flattened: {l:?}"));
            }
            for (k, v) in l {
                let numeric = v.is_number() || v.as_str().is_some_and(|s| s.parse::<u64>().is_ok());
                if k.contains("leader") && numeric {
                    problems.push(format!("{name}: leader logged as a number: {l:?}"));
                }
            }
        }
        let info: Vec<&Map<String, Value>> = lines
            .iter()
            .filter(|l| matches!(level(l), "INFO" | "WARN" | "ERROR"))
            .collect();
        if info.len() > STARTUP_INFO_LINES {
            let msgs: Vec<String> = info
                .iter()
                .map(|l| {
                    format!(
                        "  {} {}",
                        level(l),
                        l.get("message").unwrap_or(&Value::Null)
                    )
                })
                .collect();
            problems.push(format!(
                "{name}: {} start-up lines at INFO or above (at most {STARTUP_INFO_LINES}):\n{}",
                info.len(),
                msgs.join("\n")
            ));
        }
    }

    let statuses = c.stop_all(Duration::from_secs(60)).await.unwrap();
    for (i, s) in statuses.iter().enumerate() {
        assert!(s.success(), "{} exited with {s}", c.nodes[i].name);
    }
    for i in 0..c.nodes.len() {
        for l in json_lines(&c, i) {
            if level(&l) == "ERROR" {
                problems.push(format!(
                    "{}: ERROR during a normal stop: {l:?}",
                    c.nodes[i].name
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
