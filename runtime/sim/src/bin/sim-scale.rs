//! `sim-scale [--nodes 10,100,1000] [--seed N] [--json FILE]`: runs the scale simulation at each
//! size and prints one table row per phase (JSON lines to FILE for `benches/scale/plot.py`).

use std::io::Write;

use clap::Parser;
use tidepool_sim::scale::{run, ScaleConfig};

/// The control plane at scale, simulated with the node's own decision code.
#[derive(Parser, Debug)]
struct Args {
    /// Cluster sizes to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    nodes: Vec<usize>,
    /// Seed of the run (which nodes are killed, restarted, when nodes renew).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write each size's report as one JSON line here (for `benches/scale_plot.py`).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Cut a phase off after this many virtual seconds (default 600).
    #[arg(long)]
    cap_s: Option<u64>,
}

fn main() {
    let args = Args::parse();
    let mut out = args.json.as_ref().map(|p| {
        std::fs::File::create(p).unwrap_or_else(|e| {
            eprintln!("cannot write {}: {e}", p.display());
            std::process::exit(1);
        })
    });
    println!(
        "{:>6} {:>7} {:<16} {:>9} {:>5} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8} {:>6} {:>7} {:>7} {:>9} {:>9} {:>9}",
        "nodes", "shards", "phase", "virt_s", "done", "renew/s", "grant/s", "raft/s", "tick_p50", "tick_p99",
        "tick_max", "place_ms", "share", "moved", "ideal", "served_ms", "map_kB", "scan_us"
    );
    for nodes in args.nodes {
        let mut cfg = ScaleConfig::new(nodes, args.seed);
        if let Some(c) = args.cap_s {
            cfg.phase_cap_ms = c * 1000;
        }
        let wall = std::time::Instant::now();
        let r = run(cfg);
        for p in &r.phases {
            println!(
                "{:>6} {:>7} {:<16} {:>9.1} {:>5} {:>9.0} {:>9.0} {:>8.1} {:>9.0} {:>9.0} {:>9.0} {:>8.1} {:>6.3} {:>7} {:>7} {:>9} {:>9.0} {:>9.0}",
                r.nodes, r.shards, p.name, p.virtual_ms as f64 / 1000.0, p.done, p.renewals_per_s,
                p.grants_per_s, p.raft_entries_per_s, p.tick_us_median, p.tick_us_p99, p.tick_us_max,
                p.placement_ms_max, p.leader_core_share, p.moved, p.ideal_moves,
                p.served_after_ms.map_or("-".into(), |v| v.to_string()),
                r.map_bytes as f64 / 1024.0, r.node_scan_us
            );
        }
        eprintln!(
            "{nodes} nodes: {:.1} s of wall time",
            wall.elapsed().as_secs_f64()
        );
        if let Some(f) = out.as_mut() {
            let line = serde_json::to_string(&r).unwrap_or_default();
            let _ = writeln!(f, "{line}");
        }
    }
}
