//! `tidepool bench mf --scale`: one `mf` job over a large model (at least 100 M parameters:
//! 1.6 M users at rank 64, say) on each cluster size, to see the model spread over the nodes'
//! memory. Per node: `tidepool_param_table_bytes` at the end against its even share of the
//! model (the rows training touched, counted from the training file) with 25% slack, and its
//! peak resident memory against those table bytes plus the node's resident memory before the
//! job (the fixed overhead: runtime, connections, the uploaded partitions' bookkeeping).
//!
//! The tables hold only the rows training touched, so one full epoch (every training rating
//! once) is what puts every user seen in the file into them.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::Serialize;
use tidepool_actors::jobs::mf::MAX_ID;

use super::{rss_mib, scrape, spec, start_cluster, timed_job, upload, write_json, MfBenchOptions};
use super::{ITEM_COLUMN, MIB, USER_COLUMN, VALUE_BYTES};

/// Slack allowed over a node's even share of the model.
const SHARE_SLACK: f64 = 1.25;

/// Distinct ids in the training file.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Touched {
    pub rows: u64,
    pub users: u64,
    pub items: u64,
    /// Largest user id + 1 (the model's user rows).
    pub user_rows: u64,
    pub item_rows: u64,
}

/// A set of ids below [`MAX_ID`], one bit each.
struct IdSet {
    bits: Vec<u64>,
    count: u64,
    end: u64,
}

impl IdSet {
    fn new() -> Self {
        IdSet {
            bits: vec![0; (MAX_ID / 64) as usize],
            count: 0,
            end: 0,
        }
    }

    fn insert(&mut self, id: u64) {
        let (w, b) = ((id / 64) as usize, id % 64);
        if let Some(word) = self.bits.get_mut(w) {
            if *word & (1 << b) == 0 {
                *word |= 1 << b;
                self.count += 1;
            }
        }
        self.end = self.end.max(id + 1);
    }
}

/// Counts the distinct users and items of the ratings CSV at `path`.
pub fn touched(path: &Path) -> Result<Touched> {
    let what = || format!("reading {}", path.display());
    let mut rdr = csv::Reader::from_path(path).with_context(what)?;
    let header = rdr.headers().with_context(what)?.clone();
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .with_context(|| format!("{}: no column {name:?} in the header", path.display()))
    };
    let (uc, ic) = (col(USER_COLUMN)?, col(ITEM_COLUMN)?);
    let (mut users, mut items) = (IdSet::new(), IdSet::new());
    let mut rows = 0u64;
    let mut rec = csv::StringRecord::new();
    while rdr.read_record(&mut rec).with_context(what)? {
        rows += 1;
        let id = |c: usize| -> Result<u64> {
            let cell = rec.get(c).unwrap_or_default();
            let v: f64 = cell.parse().with_context(|| {
                format!("{} row {rows}: id {cell:?} is not a number", path.display())
            })?;
            ensure!(
                v >= 0.0 && v.fract() == 0.0 && v < MAX_ID as f64,
                "{} row {rows}: id {cell:?} is not an integer in 0..{MAX_ID}",
                path.display()
            );
            Ok(v as u64)
        };
        users.insert(id(uc)?);
        items.insert(id(ic)?);
    }
    Ok(Touched {
        rows,
        users: users.count,
        items: items.count,
        user_rows: users.end,
        item_rows: items.end,
    })
}

/// One node at the end of the job.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleNode {
    pub shards_owned: f64,
    /// The largest `tidepool_param_table_bytes` seen during the job (rows written plus pushes
    /// waiting).
    pub table_bytes: f64,
    /// Touched model bytes / nodes x 1.25.
    pub bound_bytes: f64,
    pub within_bound: bool,
    /// Resident memory after the start (nothing uploaded) and just before the job.
    pub rss_started_mib: f64,
    pub rss_before_job_mib: f64,
    pub rss_peak_mib: f64,
    /// rss_before_job + table bytes.
    pub rss_predicted_mib: f64,
    /// rss_peak over rss_predicted.
    pub rss_peak_over_predicted: f64,
}

/// One cluster size.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleCluster {
    pub nodes: usize,
    pub steps: u64,
    pub seconds: f64,
    pub updates_per_sec: f64,
    pub table_bytes_total: f64,
    pub per_node: Vec<ScaleNode>,
    pub spec: String,
    /// Every node's table MiB and RSS MiB through the job.
    pub timeline: Vec<super::Sample>,
}

/// What `bench mf --scale` writes.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub train: std::path::PathBuf,
    pub rank: usize,
    pub touched: Touched,
    /// (user rows + item rows) x rank: the model's parameters.
    pub parameters: u64,
    /// Bytes of the rows training touches (distinct users and items in the file, x rank x 4).
    pub touched_model_bytes: f64,
    pub memory_budget: Option<u64>,
    pub clusters: Vec<ScaleCluster>,
}

async fn one(o: &MfBenchOptions, n: usize, t: &Touched) -> Result<ScaleCluster> {
    let (c, client) = start_cluster(o, n).await?;
    let started = rss_mib(&c, "VmRSS");
    upload(&client, &o.train).await?;
    let before = rss_mib(&c, "VmRSS");
    let length = match o.steps {
        Some(s) => format!("steps = {s}"),
        None => format!("epochs = {}", o.epochs.first().copied().unwrap_or(1)),
    };
    let text = spec(o, &length, o.seed);
    let job = timed_job(&c, &client, &text).await?;
    let end = scrape(&c).await?;
    let model = (t.users + t.items) as f64 * o.rank as f64 * VALUE_BYTES;
    let bound = model / n as f64 * SHARE_SLACK;
    let per_node: Vec<ScaleNode> = (0..n)
        .map(|i| {
            let table = job.table_bytes_peak.get(i).copied().unwrap_or(f64::NAN);
            let before = before.get(i).copied().unwrap_or(f64::NAN);
            let peak = job.rss_peak_mib.get(i).copied().unwrap_or(f64::NAN);
            let predicted = before + table / MIB;
            ScaleNode {
                shards_owned: end.get(i).map_or(f64::NAN, |e| e.shards_owned),
                table_bytes: table,
                bound_bytes: bound,
                within_bound: table <= bound,
                rss_started_mib: started.get(i).copied().unwrap_or(f64::NAN),
                rss_before_job_mib: before,
                rss_peak_mib: peak,
                rss_predicted_mib: predicted,
                rss_peak_over_predicted: peak / predicted,
            }
        })
        .collect();
    let (_, pushed) = job.moved();
    let out = ScaleCluster {
        nodes: n,
        steps: job.steps(),
        seconds: job.seconds,
        updates_per_sec: pushed / o.rank as f64 / job.seconds,
        table_bytes_total: per_node.iter().map(|p| p.table_bytes).sum(),
        per_node,
        spec: text,
        timeline: job.timeline.clone(),
    };
    for (i, p) in out.per_node.iter().enumerate() {
        eprintln!(
            "{n} nodes, node {i} ({} shards): tables {:.1} MiB (bound {:.1} MiB: {}), RSS \
             {:.0} MiB before the job, peak {:.0} MiB ({:.2}x before + tables)",
            p.shards_owned,
            p.table_bytes / MIB,
            p.bound_bytes / MIB,
            if p.within_bound { "within" } else { "OVER" },
            p.rss_before_job_mib,
            p.rss_peak_mib,
            p.rss_peak_over_predicted
        );
    }
    let mut c = c;
    c.stop_all(std::time::Duration::from_secs(60)).await?;
    Ok(out)
}

/// `tidepool bench mf --scale`.
pub async fn run(o: &MfBenchOptions) -> Result<()> {
    let t = touched(&o.train)?;
    let parameters = (t.user_rows + t.item_rows) * o.rank as u64;
    eprintln!(
        "{}: {} ratings, {} distinct users (of {}), {} distinct items (of {}): {} parameters",
        o.train.display(),
        t.rows,
        t.users,
        t.user_rows,
        t.items,
        t.item_rows,
        parameters
    );
    let mut clusters = Vec::new();
    for &n in &o.nodes {
        clusters.push(one(o, n, &t).await?);
    }
    let report = ScaleReport {
        train: o.train.clone(),
        rank: o.rank,
        touched: t,
        parameters,
        touched_model_bytes: (t.users + t.items) as f64 * o.rank as f64 * VALUE_BYTES,
        memory_budget: o.memory_budget,
        clusters,
    };
    write_json(o.out.as_deref(), &report)
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_distinct_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        std::fs::write(&path, "user,item,rating\n0,5,1\n3,5,2\n3,1,3.5\n").unwrap();
        let t = super::touched(&path).unwrap();
        assert_eq!((t.rows, t.users, t.items), (3, 2, 2));
        assert_eq!((t.user_rows, t.item_rows), (4, 6));
        std::fs::write(&path, "user,item,rating\n-1,5,1\n").unwrap();
        assert!(super::touched(&path).is_err());
    }
}
