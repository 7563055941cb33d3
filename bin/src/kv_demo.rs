//! `tidepool demo --kv`: the key-value exactly-once demo. Makes a throwaway CA,
//! starts 3 node processes on loopback (n1 the control-plane voter), runs 100 000 idempotent
//! increments over all shards with retries, kills one node with SIGKILL part-way through, shows
//! its shards moving to the survivors while the workload keeps running, checks every
//! acknowledged increment is present exactly once, and stops the nodes cleanly.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tidepool_runtime::codec::WireShardState;

use anyhow::{bail, Context, Result};
use tidepool_runtime::client::{ClientOptions, ClusterClient};
use tidepool_runtime::transport::TlsMaterial;

use crate::http::sum_metric;
use crate::local_cluster::{wait_all_up, LocalCluster};
use crate::workload;

/// Demo settings (CLI flags).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub nodes: usize,
    pub shards: u32,
    pub ops: u64,
    pub keys: u64,
    pub concurrency: usize,
    pub keep: bool,
    /// Kill the last node with SIGKILL part-way through.
    pub kill: bool,
    /// Control-plane voters (the first nodes).
    pub voters: usize,
}

pub async fn run(opts: DemoOptions) -> Result<()> {
    let exe = std::env::current_exe().context("locating the tidepool binary")?;
    let mut cluster = LocalCluster::create(&exe, opts.nodes, opts.shards, opts.voters)?;
    println!(
        "tidepool demo: {} nodes, {} shards, temp dir {}",
        opts.nodes,
        opts.shards,
        cluster.root().display()
    );
    cluster.start_all()?;
    cluster.wait_ready(Duration::from_secs(60)).await?;
    println!("cluster is ready (every node's /readyz answers 200)");

    let result = workload_and_check(&mut cluster, &opts).await;
    let statuses = cluster.stop_all(Duration::from_secs(30)).await?;
    let clean = statuses.iter().all(|s| s.success());
    println!(
        "nodes stopped: {}",
        if clean {
            "every survivor drained and exited 0 after SIGTERM"
        } else {
            "NOT all clean"
        }
    );
    if opts.keep || result.is_err() || !clean {
        let dir = cluster.keep();
        println!("logs and certificates kept in {}", dir.display());
    }
    result?;
    if !clean {
        bail!("a node did not exit cleanly: {statuses:?}");
    }
    println!("demo OK");
    Ok(())
}

async fn workload_and_check(cluster: &mut LocalCluster, opts: &DemoOptions) -> Result<()> {
    let tls = TlsMaterial::load_client(&cluster.admin_dir())?;
    let client =
        Arc::new(ClusterClient::connect(&cluster.seeds(), &tls, ClientOptions::default()).await?);
    wait_all_up(&client, opts.nodes, Duration::from_secs(60)).await?;
    crate::local_cluster::wait_stable(&client, Duration::from_secs(90)).await?;
    let status = client.status().await?;
    println!(
        "\ncontrol-plane leader: {} (term {})\nmembers:",
        status.leader, status.term
    );
    for m in &status.members {
        println!(
            "  {:<4} {:<21} {:<8} {:>3} shards",
            m.name, m.addr, m.state, m.shards
        );
    }

    println!(
        "\nrunning {} idempotent increments over {} keys from {} concurrent senders...",
        opts.ops, opts.keys, opts.concurrency
    );
    let work = tokio::spawn(workload::run_increments(
        client.clone(),
        opts.ops,
        opts.keys,
        opts.concurrency,
    ));
    if opts.kill && opts.nodes > 1 {
        let victim = opts.nodes - 1;
        let name = cluster.nodes[victim].name.clone();
        crate::local_cluster::wait_applied(
            cluster,
            (opts.ops / 5) as f64,
            Duration::from_secs(120),
        )
        .await?;
        let theirs = client
            .shards()
            .await?
            .iter()
            .filter(|s| s.owner.as_ref() == Some(&name))
            .count();
        cluster.kill(victim).await?;
        let killed = Instant::now();
        println!("  killed {name} with SIGKILL while it owned {theirs} shards");
        let deadline = killed + Duration::from_secs(60);
        loop {
            let shards = client.shards().await?;
            if shards.iter().all(|s| {
                s.owner.as_deref() != Some(name.as_str()) && s.state == WireShardState::Serving
            }) {
                break;
            }
            if Instant::now() > deadline {
                bail!("{name}'s shards were not reassigned within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
        }
        println!(
            "  {name}'s lease expired and its {theirs} shards moved to the survivors {:.2?} after the kill (restored from checkpoint + op log)",
            killed.elapsed()
        );
    }
    let report = work.await.context("workload task")?;
    println!(
        "  acknowledged {} of {} in {:.2?} ({:.0} ops/s), {} retried deliveries deduplicated, {} unacknowledged",
        report.acked,
        report.ops,
        report.elapsed,
        report.ops_per_sec(),
        report.duplicates,
        report.unacked
    );
    let sum = workload::verify(&client, &report, opts.keys).await?;
    println!(
        "  exactly-once check: every key's counter equals its acknowledged increments (sum {sum})"
    );
    for (i, n) in cluster.nodes.iter().enumerate() {
        if n.pid().is_none() {
            continue;
        }
        let text = cluster.metrics(i).await?;
        let here = sum_metric(
            &text,
            "tidepool_shard_ops_total",
            &[("op", "incr"), ("result", "applied")],
        );
        let owned = sum_metric(&text, "tidepool_shards_owned", &[]);
        println!(
            "  {} applied {:>6} increments, owns {:>2} shards   metrics: http://{}/metrics",
            n.name, here, owned, n.admin
        );
    }
    client.close().await;
    Ok(())
}
