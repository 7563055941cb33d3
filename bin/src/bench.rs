//! `tidepool bench failover`: measures, on a real local cluster, how long a failed node's shards
//! take to be served again (after SIGKILL, or after SIGSTOP past the lease), how many shards
//! move when the node comes back (vs the ideal ceil(S/N)), and the pause of graceful handoffs
//! (from the old owner's stop to the new owner's start, from the nodes' ownership logs).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tidepool_runtime::client::{ClientOptions, ClusterClient};
use tidepool_runtime::codec::{Op, WireShardState};
use tidepool_runtime::transport::TlsMaterial;

use crate::local_cluster::{wait_all_up, wait_stable, LocalCluster};

/// What to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Kill,
    Pause,
}

#[derive(Debug, Clone)]
pub struct FailoverOptions {
    pub runs: usize,
    pub nodes: usize,
    pub shards: u32,
    pub fault: Fault,
    pub out: Option<PathBuf>,
}

/// Percentile of sorted samples (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub async fn failover(opts: FailoverOptions) -> Result<()> {
    let exe = std::env::current_exe().context("locating the tidepool binary")?;
    let voters = opts.nodes.min(3);
    let mut c = LocalCluster::create(&exe, opts.nodes, opts.shards, voters)?;
    c.start_all()?;
    c.wait_ready(Duration::from_secs(120)).await?;
    let tls = TlsMaterial::load_client(&c.admin_dir())?;
    let copts = ClientOptions {
        request_timeout: Duration::from_millis(500),
        retry_for: Duration::from_secs(60),
        ..Default::default()
    };
    let client = Arc::new(ClusterClient::connect(&c.seeds(), &tls, copts).await?);
    wait_all_up(&client, opts.nodes, Duration::from_secs(60)).await?;
    wait_stable(&client, Duration::from_secs(120)).await?;

    let mut failovers = Vec::new();
    let mut moved_on_rejoin = Vec::new();
    for run in 0..opts.runs {
        let leader = client.status().await?.leader;
        // Rotate over the nodes that do not lead (a leader failure adds an election, measured
        // separately by the leader-kill test).
        let candidates: Vec<usize> = (0..c.nodes.len())
            .filter(|i| c.nodes[*i].name != leader)
            .collect();
        let victim = candidates[run % candidates.len()];
        let name = c.nodes[victim].name.clone();
        let theirs: Vec<u32> = client
            .shards()
            .await?
            .iter()
            .filter(|s| s.owner.as_ref() == Some(&name))
            .map(|s| s.id)
            .collect();
        let t0 = Instant::now();
        match opts.fault {
            Fault::Kill => c.kill(victim).await?,
            Fault::Pause => c.signal(victim, libc::SIGSTOP)?,
        }
        let took = served_elsewhere(&client, &name, &theirs, t0).await?;
        println!(
            "run {:>2}: {name} ({} shards) {:?} -> served elsewhere after {:.3} s",
            run + 1,
            theirs.len(),
            opts.fault,
            took.as_secs_f64()
        );
        failovers.push(took.as_secs_f64());
        // Bring it back and let the cluster settle.
        let before = client.shards().await?;
        match opts.fault {
            Fault::Kill => {
                c.start(victim)?;
                c.wait_node_ready(victim, Duration::from_secs(60)).await?;
            }
            Fault::Pause => c.signal(victim, libc::SIGCONT)?,
        }
        wait_all_up(&client, opts.nodes, Duration::from_secs(60)).await?;
        wait_stable(&client, Duration::from_secs(120)).await?;
        let after = client.shards().await?;
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b.owner != a.owner)
            .count();
        moved_on_rejoin.push(moved);
    }
    let pauses = handoff_pauses(&c);
    c.stop_all(Duration::from_secs(60)).await?;

    failovers.sort_by(f64::total_cmp);
    let ideal = (f64::from(opts.shards) / opts.nodes as f64).ceil() as usize;
    let mut moved_sorted = moved_on_rejoin.clone();
    moved_sorted.sort_unstable();
    let moved_median = moved_sorted
        .get(moved_sorted.len() / 2)
        .copied()
        .unwrap_or(0);
    println!(
        "\nfailover after {:?} ({} runs, {} nodes, {} shards, lease ttl 2 s):",
        opts.fault, opts.runs, opts.nodes, opts.shards
    );
    println!(
        "  p50 {:.3} s   p99 {:.3} s   max {:.3} s",
        percentile(&failovers, 50.0),
        percentile(&failovers, 99.0),
        failovers.last().copied().unwrap_or(f64::NAN)
    );
    println!("handoff pause ({} graceful handoffs):", pauses.len());
    println!(
        "  p50 {:.1} ms   p99 {:.1} ms",
        percentile(&pauses, 50.0) * 1e3,
        percentile(&pauses, 99.0) * 1e3
    );
    println!("shards moved when the node came back: median {moved_median} (ideal ceil(S/N) = {ideal}; ratio {:.2})", moved_median as f64 / ideal as f64);
    if let Some(path) = opts.out {
        let out = serde_json::json!({
            "fault": format!("{:?}", opts.fault), "runs": opts.runs, "nodes": opts.nodes, "shards": opts.shards,
            "failover_s": failovers, "failover_p50_s": percentile(&failovers, 50.0), "failover_p99_s": percentile(&failovers, 99.0),
            "handoff_pause_p50_s": percentile(&pauses, 50.0), "handoff_pause_p99_s": percentile(&pauses, 99.0), "handoffs": pauses.len(),
            "moved_on_rejoin": moved_on_rejoin, "ideal_moves": ideal,
        });
        std::fs::write(&path, serde_json::to_vec_pretty(&out)?)?;
    }
    Ok(())
}

/// Polls until every shard in `theirs` has another owner and answers a read there.
async fn served_elsewhere(
    client: &ClusterClient,
    dead: &str,
    theirs: &[u32],
    t0: Instant,
) -> Result<Duration> {
    let deadline = t0 + Duration::from_secs(60);
    loop {
        if let Ok(map) = client.shards().await {
            if theirs.iter().all(|s| {
                map.get(*s as usize).is_some_and(|i| {
                    i.owner.as_ref().is_some_and(|o| *o != dead)
                        && i.state == WireShardState::Serving
                })
            }) {
                client.refresh().await?;
                // A read on each key of each moved shard: served, not just assigned.
                let mut ok = true;
                for s in theirs {
                    let key = key_on_shard(client, *s);
                    if client.op(&key, Op::Get { key: key.clone() }).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                if ok {
                    return Ok(t0.elapsed());
                }
            }
        }
        if Instant::now() > deadline {
            bail!("{dead}'s shards were not served elsewhere within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval
    }
}

/// Some key that lives on `shard`.
fn key_on_shard(client: &ClusterClient, shard: u32) -> String {
    (0u64..)
        .map(|i| format!("probe-{i}"))
        .find(|k| client.shard_of(k) == shard)
        .unwrap_or_default()
}

/// Gaps between one owner's stop and the next owner's start, per shard, from ownership logs.
fn handoff_pauses(c: &LocalCluster) -> Vec<f64> {
    let mut per: BTreeMap<u64, Vec<(u64, String, &'static str)>> = BTreeMap::new();
    for n in &c.nodes {
        let text =
            std::fs::read_to_string(c.root().join("data").join(&n.name).join("ownership.log"))
                .unwrap_or_default();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let (Some(shard), Some(ts)) = (v["shard"].as_u64(), v["ts_us"].as_u64()) else {
                continue;
            };
            let ev = if v["event"] == "start" {
                "start"
            } else {
                "stop"
            };
            per.entry(shard).or_default().push((ts, n.name.clone(), ev));
        }
    }
    let mut out = Vec::new();
    for (_, mut evs) in per {
        evs.sort();
        for w in evs.windows(2) {
            if let [(t_stop, from, "stop"), (t_start, to, "start")] = w {
                if from != to {
                    out.push((t_start - t_stop) as f64 / 1e6);
                }
            }
        }
    }
    out.sort_by(f64::total_cmp);
    out
}
