//! `sim-scale [--nodes 10,100,1000] [--seed N] [--json FILE]`: runs the scale simulation at each
//! size and prints one table row per phase (JSON lines to FILE for `benches/scale/plot.py`).

use std::io::Write;

use tidepool_sim::scale::{run, ScaleConfig};

fn main() {
    let mut sizes = vec![10usize, 100, 1000];
    let mut seed = 1u64;
    let mut json: Option<String> = None;
    let mut cap_s: Option<u64> = None;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--nodes" => {
                sizes = val
                    .split(',')
                    .filter_map(|s| s.trim().parse().ok())
                    .collect();
            }
            "--seed" => seed = val.parse().unwrap_or(1),
            "--json" => json = Some(val),
            "--cap-s" => cap_s = val.parse().ok(),
            other => {
                eprintln!("unknown argument {other:?}; usage: sim-scale [--nodes 10,100] [--seed N] [--json FILE] [--cap-s S]");
                std::process::exit(2);
            }
        }
        i += 2;
    }
    let mut out = json.map(|p| {
        std::fs::File::create(&p).unwrap_or_else(|e| {
            eprintln!("cannot write {p}: {e}");
            std::process::exit(1);
        })
    });
    println!(
        "{:>6} {:>7} {:<16} {:>9} {:>5} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8} {:>6} {:>7} {:>7} {:>9} {:>9} {:>9}",
        "nodes", "shards", "phase", "virt_s", "done", "renew/s", "grant/s", "raft/s", "tick_p50", "tick_p99",
        "tick_max", "place_ms", "share", "moved", "ideal", "served_ms", "map_kB", "scan_us"
    );
    for nodes in sizes {
        let mut cfg = ScaleConfig::new(nodes, seed);
        if let Some(c) = cap_s {
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
