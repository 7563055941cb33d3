use super::*;
use crate::control::records::DatasetRecord;
use crate::control::types::{apply, Command};

fn spec(nulls: NullPolicy) -> ImportSpec {
    ImportSpec {
        url: "file:///data/*.parquet".into(),
        format: Format::Parquet,
        label: "y".into(),
        features: vec![],
        nulls,
        max_categories: 4,
        hash_buckets: 8,
        split_bytes: 1 << 20,
        zero_based: false,
    }
}

fn split(file: &str, bytes: u64) -> Split {
    Split {
        file: file.into(),
        unit: SplitUnit::RowGroups { first: 0, count: 1 },
        shard: 0,
        bytes,
    }
}

fn import(id: &str, nulls: NullPolicy, splits: usize) -> ImportRecord {
    let mut splits: Vec<Split> = (0..splits).map(|i| split(&format!("f{i}"), 100)).collect();
    assign_shards(&mut splits, 4);
    ImportRecord {
        id: id.into(),
        dataset: "d".into(),
        spec: spec(nulls),
        columns: vec![
            ColumnPlan::Numeric { name: "a".into() },
            ColumnPlan::OneHot {
                name: "c".into(),
                values: vec!["x".into(), "y".into()],
            },
        ],
        shards: 4,
        done: vec![None; splits.len()],
        splits,
        state: ImportState::Running,
        error: None,
    }
}

fn done(rows: u64, checksum: u64, sums: Vec<f64>, counts: Vec<u64>) -> SplitDone {
    SplitDone {
        rows,
        dropped: 0,
        segments: 1,
        checksum,
        sums,
        counts,
        columns: 0,
        nnz: 0,
    }
}

fn report(map: &mut ClusterMap, id: &str, split: u32, d: SplitDone) -> CommandResponse {
    apply(
        map,
        &Command::ImportSplitDone {
            id: id.into(),
            split,
            done: Box::new(d),
        },
    )
}

fn cluster() -> ClusterMap {
    let mut map = ClusterMap::default();
    assert!(apply(&mut map, &Command::Init { shards: 4 }).is_ok());
    map
}

#[test]
fn the_last_split_creates_the_dataset_once() {
    let mut map = cluster();
    let rec = import("i1", NullPolicy::Refuse, 3);
    assert!(apply(&mut map, &Command::StartImport(Box::new(rec.clone()))).is_ok());
    assert!(
        apply(&mut map, &Command::StartImport(Box::new(rec.clone()))).is_ok(),
        "retry"
    );
    assert!(report(&mut map, "i1", 1, done(5, 11, vec![], vec![])).is_ok());
    assert!(report(&mut map, "i1", 0, done(7, 22, vec![], vec![])).is_ok());
    // A stale owner reports split 1 again: the first report counts.
    assert!(report(&mut map, "i1", 1, done(999, 0, vec![], vec![])).is_ok());
    assert_eq!(map.imports["i1"].rows_done(), 12);
    assert!(
        !map.datasets.contains_key("d"),
        "not visible before the last split"
    );
    assert!(!report(&mut map, "i1", 3, done(1, 0, vec![], vec![])).is_ok());
    assert!(!report(&mut map, "i1", 2, done(1, 0, vec![1.0; 3], vec![1; 3])).is_ok());
    assert!(report(&mut map, "i1", 2, done(1, 33, vec![], vec![])).is_ok());
    let imp = &map.imports["i1"];
    assert_eq!(imp.state, ImportState::Succeeded);
    let ds: &DatasetRecord = &map.datasets["d"];
    assert_eq!(ds.rows, 13);
    assert_eq!(ds.features, vec!["a", "c=x", "c=y"]);
    let mut sums = Vec::new();
    for c in [22u64, 11, 33] {
        sums.extend_from_slice(&c.to_le_bytes());
    }
    match &ds.source {
        DatasetSource::Ingested {
            import,
            splits,
            checksum,
            fill,
            ..
        } => {
            assert_eq!(import, "i1");
            assert_eq!(splits.len(), 3);
            assert_eq!(*checksum, xxhash_rust::xxh3::xxh3_64(&sums));
            assert!(fill.is_empty());
        }
        other => panic!("{other:?}"),
    }
    // Once succeeded: late reports change nothing, and the same import again is refused.
    assert!(report(&mut map, "i1", 0, done(1, 0, vec![], vec![])).is_ok());
    assert_eq!(map.datasets["d"].rows, 13);
    let again = apply(&mut map, &Command::StartImport(Box::new(rec.clone())));
    assert!(
        matches!(&again, CommandResponse::Rejected(r) if r.contains("already imported")),
        "{again:?}"
    );
    // After `dataset delete`, the same import may run again.
    assert!(apply(&mut map, &Command::DeleteDataset { name: "d".into() }).is_ok());
    assert!(apply(&mut map, &Command::StartImport(Box::new(rec))).is_ok());
    assert_eq!(map.imports["i1"].state, ImportState::Running);
    assert_eq!(map.imports["i1"].rows_done(), 0);
}

#[test]
fn fill_mean_uses_every_split_and_a_failure_shows_nothing() {
    let mut map = cluster();
    let rec = import("i2", NullPolicy::FillMean, 2);
    assert!(apply(&mut map, &Command::StartImport(Box::new(rec.clone()))).is_ok());
    assert!(report(
        &mut map,
        "i2",
        0,
        done(2, 1, vec![1.0, 1.0, 0.0], vec![1, 2, 2])
    )
    .is_ok());
    assert!(report(
        &mut map,
        "i2",
        1,
        done(2, 2, vec![5.0, 1.0, 2.0], vec![2, 2, 2])
    )
    .is_ok());
    match &map.datasets["d"].source {
        DatasetSource::Ingested { fill, .. } => assert_eq!(fill, &vec![2.0, 0.5, 0.5]),
        other => panic!("{other:?}"),
    }

    let mut map = cluster();
    assert!(apply(&mut map, &Command::StartImport(Box::new(rec.clone()))).is_ok());
    assert!(report(&mut map, "i2", 0, done(2, 1, vec![0.0; 3], vec![0; 3])).is_ok());
    let fail = Command::FailImport {
        id: "i2".into(),
        error: "part-0.parquet: row group 3: null in column a".into(),
    };
    assert!(apply(&mut map, &fail).is_ok());
    assert!(report(&mut map, "i2", 1, done(2, 2, vec![0.0; 3], vec![0; 3])).is_ok());
    assert_eq!(map.imports["i2"].state, ImportState::Failed);
    assert!(
        !map.datasets.contains_key("d"),
        "a failed import shows nothing"
    );
    // Started again after the failure: from the beginning.
    assert!(apply(&mut map, &Command::StartImport(Box::new(rec))).is_ok());
    assert_eq!(map.imports["i2"].state, ImportState::Running);
    assert!(map.imports["i2"].done.iter().all(Option::is_none));
}

#[test]
fn conflicts_and_malformed_plans_are_refused() {
    let mut map = cluster();
    assert!(apply(
        &mut map,
        &Command::StartImport(Box::new(import("i1", NullPolicy::Refuse, 2)))
    )
    .is_ok());
    let other = apply(
        &mut map,
        &Command::StartImport(Box::new(import("i9", NullPolicy::DropRow, 2))),
    );
    assert!(
        matches!(&other, CommandResponse::Rejected(r) if r.contains("being imported")),
        "{other:?}"
    );
    let mut bad = import("i3", NullPolicy::Refuse, 2);
    bad.dataset = "e".into();
    type Break = Box<dyn Fn(&mut ImportRecord)>;
    let cases: Vec<(&str, Break)> = vec![
        ("no splits", Box::new(|r| r.splits.clear())),
        ("shard out of range", Box::new(|r| r.splits[0].shard = 4)),
        ("shard count", Box::new(|r| r.shards = 8)),
        (
            "split done",
            Box::new(|r| r.done[0] = Some(done(1, 1, vec![], vec![]))),
        ),
        ("no features", Box::new(|r| r.columns.clear())),
        ("not running", Box::new(|r| r.state = ImportState::Failed)),
    ];
    for (what, break_it) in cases {
        let mut r = bad.clone();
        break_it(&mut r);
        assert!(
            !apply(&mut map, &Command::StartImport(Box::new(r))).is_ok(),
            "{what} accepted"
        );
    }
    assert!(!map.imports.contains_key("i3"));
    // Every row dropped: the import fails instead of creating an empty dataset.
    assert!(apply(&mut map, &Command::StartImport(Box::new(bad))).is_ok());
    for s in 0..2 {
        assert!(report(&mut map, "i3", s, done(0, 0, vec![], vec![])).is_ok());
    }
    assert_eq!(map.imports["i3"].state, ImportState::Failed);
    assert!(!map.datasets.contains_key("e"));
}

#[test]
fn splits_balance_by_bytes_deterministically() {
    let mut splits: Vec<Split> = [50u64, 10, 10, 10, 10, 10, 40]
        .iter()
        .enumerate()
        .map(|(i, &b)| split(&format!("f{i}"), b))
        .collect();
    assign_shards(&mut splits, 3);
    let shards: Vec<u32> = splits.iter().map(|s| s.shard).collect();
    assert_eq!(shards, vec![0, 1, 2, 1, 2, 1, 2]);
    let mut load = [0u64; 3];
    for s in &splits {
        load[s.shard as usize] += s.bytes;
    }
    assert_eq!(load, [50, 30, 60]);
}

#[test]
fn a_sparse_import_creates_a_dataset_of_the_widest_split_without_naming_columns() {
    let mut map = cluster();
    let mut imp = import("s1", NullPolicy::Refuse, 3);
    imp.spec.format = Format::Libsvm;
    // A libsvm import has exactly one sparse column plan, and refuses nulls.
    let mut dense_plan = imp.clone();
    dense_plan.id = "s0".into();
    assert!(!apply(&mut map, &Command::StartImport(Box::new(dense_plan))).is_ok());
    imp.columns = vec![ColumnPlan::Sparse {
        name: "libsvm".into(),
    }];
    let mut filled = imp.clone();
    filled.spec.nulls = NullPolicy::FillMean;
    assert!(!apply(&mut map, &Command::StartImport(Box::new(filled))).is_ok());
    assert!(apply(&mut map, &Command::StartImport(Box::new(imp))).is_ok());
    let sparse = |rows, columns, nnz| SplitDone {
        columns,
        nnz,
        ..done(rows, rows, vec![], vec![])
    };
    // A split claiming more columns than a partition header can hold is refused.
    assert!(!report(&mut map, "s1", 0, sparse(2, 1 << 33, 3)).is_ok());
    assert!(report(&mut map, "s1", 0, sparse(2, 3_000_000, 40)).is_ok());
    assert!(report(&mut map, "s1", 1, sparse(5, 17, 9)).is_ok());
    assert!(report(&mut map, "s1", 2, sparse(1, 0, 0)).is_ok());
    let ds = &map.datasets["d"];
    assert_eq!(ds.rows, 8);
    assert!(ds.features.is_empty(), "the record lists no column names");
    assert_eq!(ds.feature_count(), 3_000_000);
    assert_eq!(
        ds.sparse(),
        Some(&crate::control::SparseShape {
            columns: 3_000_000,
            nnz: 49,
            first_index: 1
        })
    );
    assert_eq!(&ds.feature_names()[..2], ["f1", "f2"]);
    // A dense import may not report sparse shapes.
    let dense = import("i9", NullPolicy::Refuse, 1);
    let mut dense = ImportRecord {
        dataset: "e".into(),
        ..dense
    };
    dense.id = "i9".into();
    assert!(apply(&mut map, &Command::StartImport(Box::new(dense))).is_ok());
    assert!(!report(&mut map, "i9", 0, sparse(1, 4, 4)).is_ok());
}
