//! `tidepool bench math`: the training step's math on one core against the machine's memory
//! bandwidth, measured in the same run. A full pass of the minibatch kernel
//! (`jobs::minibatch::loss_and_grad_rows`, what every training step runs on every shard) over an
//! in-memory partition larger than the caches, for linear, logistic and softmax models; and a
//! single-threaded streaming read of a buffer of the same kind (f32 summed into f64 lanes, the
//! kernel's own access pattern without the math). The ratio of the two, per row, says how far
//! the math is from the hardware: `rows/s / (bandwidth / bytes per row)`.
//!
//! `--dump FILE` also writes the rows (f32 features, then f32 labels) so that
//! `benches/math_peer.py` can time scikit-learn's L-BFGS on the same data.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use nalgebra::DMatrix;
use serde::Serialize;
use tidepool_actors::jobs::minibatch::{loss_and_grad_rows, DenseRows};
use tidepool_actors::jobs::models::{ModelKind, Standardizer};
use tidepool_runtime::dataset::{synthetic_shard, SyntheticKind};

/// `bench math` settings (its command line).
#[derive(Debug, Clone, clap::Args)]
pub struct MathBenchOptions {
    /// Rows of the partition (2 000 000 x 64 features: 512 MB, beyond any cache).
    #[arg(long, default_value_t = 2_000_000)]
    pub rows: u64,
    /// Features per row.
    #[arg(long, default_value_t = 64)]
    pub features: usize,
    /// Softmax classes.
    #[arg(long, default_value_t = 4)]
    pub classes: usize,
    /// Timed passes of each measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Standardise (fold means and deviations into the weights, as a standardised job does).
    #[arg(long)]
    pub standardize: bool,
    /// Write the rows here (f32 features row-major, then f32 labels) for the peer script.
    #[arg(long)]
    pub dump: Option<PathBuf>,
    /// Write the measurements as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct MathResult {
    pub what: String,
    /// Median seconds of one pass.
    pub seconds: f64,
    pub rows_per_sec: f64,
    /// Bytes read per row (features and label, f32).
    pub bytes_per_row: u64,
    /// `rows_per_sec / (bandwidth / bytes_per_row)`.
    pub fraction_of_bandwidth: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Seconds of each of `reps` runs of `f` (after one untimed warm-up run).
fn timed(reps: usize, mut f: impl FnMut() -> f64) -> (Vec<f64>, f64) {
    let mut sink = f();
    let secs = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            sink += f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    (secs, sink)
}

/// A streaming read of `x` as the kernel reads rows: f32 into f64 lanes.
fn stream_sum(x: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0f64; LANES];
    for c in x.chunks_exact(LANES) {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f64::from(v);
        }
    }
    acc.iter().sum()
}

pub fn run(o: MathBenchOptions) -> Result<()> {
    let d = o.features;
    eprintln!("generating {} x {d} rows ...", o.rows);
    let part = synthetic_shard(o.rows, d, SyntheticKind::Logistic, 7, 0, 1);
    let rows = part.rows();
    let x = part.features();
    let bytes_per_row = (d as u64 + 1) * 4;
    if let Some(path) = &o.dump {
        let mut bytes = Vec::with_capacity(x.len() * 4 + rows * 4);
        bytes.extend(x.iter().flat_map(|v| v.to_le_bytes()));
        bytes.extend(part.labels().iter().flat_map(|v| v.to_le_bytes()));
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    let (bw_secs, sink) = timed(o.reps, || stream_sum(x) + stream_sum(part.labels()));
    let bw_seconds = median(bw_secs);
    let bandwidth = (x.len() + rows) as f64 * 4.0 / bw_seconds;
    eprintln!(
        "streaming read: {:.2} GB/s (checksum {sink:.3e})",
        bandwidth / 1e9
    );
    let limit = bandwidth / bytes_per_row as f64;

    let dense = DenseRows::new(x, d).context("partition shape")?;
    let idx: Vec<usize> = (0..rows).collect();
    let classes: Vec<f32> = (0..rows).map(|i| (i % o.classes) as f32).collect();
    let mut std = Standardizer {
        mean: vec![0.0; d],
        std: vec![1.0; d],
    };
    if o.standardize {
        std.mean = (0..d).map(|j| j as f64 * 0.01).collect();
        std.std = (0..d).map(|j| 1.0 + j as f64 * 0.001).collect();
    }
    let mut results = vec![MathResult {
        what: "streaming read".into(),
        seconds: bw_seconds,
        rows_per_sec: limit,
        bytes_per_row,
        fraction_of_bandwidth: 1.0,
    }];
    for (name, kind, labels) in [
        ("linear", ModelKind::Linear, part.labels()),
        ("logistic", ModelKind::Logistic, part.labels()),
        (
            "softmax",
            ModelKind::Softmax { classes: o.classes },
            &classes[..],
        ),
    ] {
        let params = DMatrix::from_fn(d + 1, kind.outputs(), |r, c| {
            ((r * 7 + c * 3) % 11) as f64 * 0.01 - 0.05
        });
        let (secs, sink) = timed(o.reps, || {
            loss_and_grad_rows(kind, &params, &std, &dense, labels, &idx)
                .map(|lg| lg.loss_sum)
                .unwrap_or(f64::NAN)
        });
        let seconds = median(secs);
        let rows_per_sec = rows as f64 / seconds;
        let r = MathResult {
            what: format!("{name} gradient"),
            seconds,
            rows_per_sec,
            bytes_per_row,
            fraction_of_bandwidth: rows_per_sec / limit,
        };
        eprintln!(
            "{:<18} {:>7.1} M rows/s per core, {:.2} of the bandwidth limit ({:.1} M rows/s) \
             (loss {sink:.4e})",
            r.what,
            rows_per_sec / 1e6,
            r.fraction_of_bandwidth,
            limit / 1e6
        );
        results.push(r);
    }
    // The kernel it replaced: the minibatch gathered into a standardised f32 matrix, widened to
    // f64 and multiplied by nalgebra (`models::loss_and_grad`), for comparison in the same run.
    let params = DMatrix::from_fn(d + 1, 1, |r, _| (r % 11) as f64 * 0.01 - 0.05);
    let (secs, _) = timed(o.reps, || {
        let gathered = DMatrix::from_fn(rows, d, |r, c| {
            ((f64::from(x[r * d + c]) - std.mean[c]) / std.std[c]) as f32
        });
        tidepool_actors::jobs::models::loss_and_grad(
            ModelKind::Logistic,
            &params,
            &gathered,
            part.labels(),
        )
        .map(|lg| lg.loss_sum)
        .unwrap_or(f64::NAN)
    });
    let seconds = median(secs);
    let rows_per_sec = rows as f64 / seconds;
    eprintln!(
        "logistic, gathered copy + nalgebra (the previous kernel): {:.1} M rows/s",
        rows_per_sec / 1e6
    );
    results.push(MathResult {
        what: "logistic gradient, gathered copy + nalgebra (previous kernel)".into(),
        seconds,
        rows_per_sec,
        bytes_per_row,
        fraction_of_bandwidth: rows_per_sec / limit,
    });
    let doc = serde_json::json!({
        "rows": rows,
        "features": d,
        "classes": o.classes,
        "standardize": o.standardize,
        "bandwidth_bytes_per_sec": bandwidth,
        "results": results,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    if let Some(path) = &o.out {
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)?;
    }
    Ok(())
}
