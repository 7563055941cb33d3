//! `tidepool demo`: a real local cluster doing real work, with no setup. Makes a throwaway CA,
//! starts 3 node processes on loopback, runs 100 000 idempotent increments over all shards with
//! retries, checks every acknowledged increment is present exactly once (and that the nodes'
//! own metrics agree), prints a summary and stops the nodes cleanly.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tidepool_runtime::client::{ClientOptions, ClusterClient};
use tidepool_runtime::transport::TlsMaterial;

use crate::http::sum_metric;
use crate::local_cluster::LocalCluster;
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
}

pub async fn run(opts: DemoOptions) -> Result<()> {
    let exe = std::env::current_exe().context("locating the tidepool binary")?;
    let mut cluster = LocalCluster::create(&exe, opts.nodes, opts.shards)?;
    println!(
        "tidepool demo: {} nodes, {} shards, temp dir {}",
        opts.nodes,
        opts.shards,
        cluster.root().display()
    );
    cluster.start_all()?;
    cluster.wait_ready(Duration::from_secs(30)).await?;
    println!("cluster is ready (every node's /readyz answers 200)");

    let result = workload_and_check(&cluster, &opts).await;
    let statuses = cluster.stop_all(Duration::from_secs(15)).await?;
    let clean = statuses.iter().all(|s| s.success());
    println!(
        "nodes stopped: {}",
        if clean {
            "all exited 0 after SIGTERM"
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

async fn workload_and_check(cluster: &LocalCluster, opts: &DemoOptions) -> Result<()> {
    let tls = TlsMaterial::load_client(&cluster.admin_dir())?;
    let client =
        Arc::new(ClusterClient::connect(&cluster.seeds(), &tls, ClientOptions::default()).await?);
    crate::local_cluster::wait_all_up(&client, opts.nodes, Duration::from_secs(30)).await?;
    let status = client.status().await?;
    println!("\nmembers:");
    for m in &status.members {
        println!(
            "  {:<4} {:<21} {:<5} {:>3} shards",
            m.name, m.addr, m.state, m.shards
        );
    }

    println!(
        "\nrunning {} idempotent increments over {} keys from {} concurrent senders...",
        opts.ops, opts.keys, opts.concurrency
    );
    let report =
        workload::run_increments(client.clone(), opts.ops, opts.keys, opts.concurrency).await;
    println!(
        "  acknowledged {} of {} in {:.2?} ({:.0} ops/s), {} retried deliveries deduplicated, {} unacknowledged",
        report.acked, report.ops, report.elapsed, report.ops_per_sec(), report.duplicates, report.unacked
    );
    let sum = workload::verify(&client, &report, opts.keys).await?;
    println!(
        "  exactly-once check: every key's counter equals its acknowledged increments (sum {sum})"
    );

    let mut applied = 0.0;
    for (i, n) in cluster.nodes.iter().enumerate() {
        let text = cluster.metrics(i).await?;
        let here = sum_metric(
            &text,
            "tidepool_shard_ops_total",
            &[("op", "incr"), ("result", "applied")],
        );
        applied += here;
        println!(
            "  {} applied {:>6} increments   metrics: http://{}/metrics",
            n.name, here, n.admin
        );
    }
    // A retried op that the owner had already applied is acknowledged as a duplicate: it was
    // applied once, so the nodes' count equals the client's acknowledgements.
    if report.unacked == 0 && applied as u64 != report.acked {
        bail!(
            "nodes report {applied} applied increments, the client counted {} acknowledgements",
            report.acked
        );
    }
    println!(
        "  node metrics agree with the client: {} increments applied cluster-wide",
        applied
    );
    client.close().await;
    Ok(())
}
