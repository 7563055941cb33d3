//! Admission arithmetic, table-driven: each case names the limit it is about.

use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn spec(text: &str) -> JobSpec {
    JobSpec::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn sgd(model: &str, extra: &str) -> JobSpec {
    spec(&format!(
        "[job]\nkind = \"sgd\"\ndataset = \"d\"\n[model]\ntype = \"{model}\"\n{extra}"
    ))
}

fn limits(budget: u64, frame: u64) -> Limits {
    Limits {
        memory_budget_bytes: budget,
        max_frame_bytes: frame,
    }
}

#[test]
fn data_bytes_counts_features_label_and_row_id() {
    assert_eq!(data_bytes(0, 64), 0);
    assert_eq!(data_bytes(1, 64), 64 * 4 + 12);
    assert_eq!(data_bytes(1_000_000_000, 64), 268_000_000_000);
    assert_eq!(data_bytes(u64::MAX, 64), u64::MAX, "saturates, never wraps");
}

#[test]
fn datasets_table() {
    // (rows, features, budget, admitted)
    let cases = [
        (2_000_000, 64, 8 * GIB, true),      // the `dataset synth` default
        (1_000_000_000, 64, 8 * GIB, false), // issue 12 item 8: 268 GB
        (31_300_000, 64, 8 * GIB, true),     // 8.39e9 bytes: just under 8 GiB
        (32_100_000, 64, 8 * GIB, false),    // 8.60e9: just over
        (u64::MAX, 1, u64::MAX - 1, false),  // saturated need still refused
        (0, 100_000, MIB, true),
    ];
    for (rows, features, budget, ok) in cases {
        let r = admit_dataset(rows, features, &limits(budget, 64 * MIB));
        assert_eq!(r.is_ok(), ok, "{rows} x {features} on {budget}: {r:?}");
    }
    let err = admit_dataset(1_000_000_000, 64, &limits(8 * GIB, 64 * MIB))
        .unwrap_err()
        .to_string();
    for needle in [
        "268000000000",
        "1000000000 rows",
        "64 features",
        "8589934592",
        "jobs.memory_budget_bytes",
    ] {
        assert!(err.contains(needle), "{needle} not in {err}");
    }
}

#[test]
fn shapes_table() {
    // (spec, features, shards, broadcast, partial sums)
    let logistic = sgd("logistic", "");
    let softmax = sgd("softmax", "classes = 10");
    let softmax_default = sgd("softmax", "");
    let kmeans = spec("[job]\nkind = \"kmeans\"\ndataset = \"d\"\n[model]\nk = 8");
    let stats = spec("[job]\nkind = \"stats\"\ndataset = \"d\"\n[train]\nbins = 10");
    let cases = [
        (&logistic, 30, 32, 3 * 31 + 1, 31 + 2), // the statistics pass's broadcast is larger
        (&softmax, 64, 32, 650 + 128 + 2, 650 + 2),
        (&softmax_default, 64, 32, 130 + 128 + 2, 130 + 2),
        (&kmeans, 4, 32, 32 + 2, 32 + 8 + 1),
        (&kmeans, 1, 64, 8 + 2, 64), // seeding: one value per shard
        (&stats, 5, 32, 3 * 6 + 1, 6 * 11),
    ];
    for (i, (spec, f, shards, broadcast, sums)) in cases.into_iter().enumerate() {
        let s = shape(spec, f, shards);
        assert_eq!(
            (s.broadcast_values, s.partial_sums),
            (broadcast, sums),
            "case {i}"
        );
    }
}

#[test]
fn jobs_table() {
    // Issue 12 item 9: a 10 M-parameter softmax (1000 features x 10000 classes) on a 64 MiB frame.
    let huge = sgd("softmax", "classes = 10000");
    let small = sgd("logistic", "");
    // (spec, rows, features, budget, frame, expected error kind: None | "task" | "partial" | "memory")
    type Case<'a> = (&'a JobSpec, u64, u64, u64, u64, Option<&'static str>);
    let cases: [Case<'_>; 8] = [
        (&small, 569, 30, 8 * GIB, 64 * MIB, None),
        (&huge, 1000, 1000, 8 * GIB, 64 * MIB, Some("task")),
        (&huge, 1000, 1000, 8 * GIB, GIB, None),
        (&huge, 1000, 1000, 100 * MIB, GIB, Some("memory")),
        // 32 shards: a partition of 31 250 000 rows (8.4 GB) fits 8 GiB; ten times more does not.
        (&small, 1_000_000_000, 64, 8 * GIB, 64 * MIB, None),
        (
            &small,
            10_000_000_000,
            64,
            8 * GIB,
            64 * MIB,
            Some("memory"),
        ),
        // 200 000 parameters: the task (1.6 MB) fits 2 MiB, the partial (3.2 MB) does not.
        (
            &sgd("softmax", "classes = 200"),
            10,
            999,
            8 * GIB,
            2 * MIB,
            Some("partial"),
        ),
        (&small, 10, 10, 8 * GIB, 1024, Some("task")),
    ];
    for (i, (spec, rows, f, budget, frame, want)) in cases.into_iter().enumerate() {
        let got = admit_job(
            spec,
            200,
            &DataShape::dense(rows, f),
            32,
            &limits(budget, frame),
        );
        let kind = match &got {
            Ok(_) => None,
            Err(AdmissionError::Frame { what, .. }) => Some(*what),
            Err(AdmissionError::Memory { .. }) => Some("memory"),
        };
        assert_eq!(kind, want, "case {i}: {got:?}");
    }
    let err = admit_job(
        &huge,
        200,
        &DataShape::dense(1000, 1000),
        32,
        &limits(8 * GIB, 64 * MIB),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("task message of 80") && err.contains("transport.max_frame_bytes = 67108864"),
        "{err}"
    );
}

#[test]
fn partitions_are_checked_before_allocating() {
    let l = limits(MIB, 64 * MIB);
    let dense = DataShape::dense(1_000_000, 64);
    assert_eq!(check_partition(1000, &dense, &l), Ok(268_000));
    assert!(check_partition(10_000, &dense, &l).is_err());
}

#[test]
fn sparse_rows_cost_their_entries_not_their_columns() {
    // Three million columns, 40 entries a row: 340 bytes a row, not 12 MB.
    let sparse = DataShape {
        rows: 1_000_000,
        features: 3_000_000,
        nnz: Some(40_000_000),
    };
    assert_eq!(sparse.bytes_of(1), 20 + 40 * 8);
    assert_eq!(sparse.bytes_of(1_000_000), 340_000_000);
    let l = limits(GIB, 128 * MIB);
    assert_eq!(check_partition(1_000_000, &sparse, &l), Ok(340_000_000));
    assert!(check_partition(10_000_000, &sparse, &l).is_err());
    // The model still has one weight per column: a logistic model over three million
    // columns fits the frames; softmax over 10 classes does not.
    let ok = admit_job(&sgd("logistic", ""), 200, &sparse, 32, &l);
    assert!(ok.is_ok(), "{ok:?}");
    let big = admit_job(&sgd("softmax", "classes = 10"), 200, &sparse, 32, &l);
    assert!(matches!(big, Err(AdmissionError::Frame { .. })), "{big:?}");
}

#[test]
fn synthetic_shard_rows_match_the_generator() {
    for (rows, shards) in [(0u64, 4u32), (3, 4), (10, 4), (1000, 32), (1001, 7)] {
        let total: u64 = (0..shards)
            .map(|s| synthetic_shard_rows(rows, s, shards))
            .sum();
        assert_eq!(total, rows, "{rows} over {shards}");
        for s in 0..shards {
            let ids = (u64::from(s)..rows).step_by(shards as usize).count() as u64;
            assert_eq!(synthetic_shard_rows(rows, s, shards), ids);
        }
    }
}
