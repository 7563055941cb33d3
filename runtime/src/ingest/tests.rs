#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use arrow_array::{
    ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray,
};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use tidepool_core::control::{ColumnPlan, Format, ImportSpec, NullPolicy, SplitDone};

use super::plan::plan;
use super::read::read_split;
use super::split_segment_key;
use crate::dataset::PartitionBuf;
use crate::storage::Store;

/// Every local file may be imported (the tests' temp dirs).
fn anywhere() -> Vec<String> {
    vec!["file:///".into()]
}

fn spec(url: &str, format: Format, nulls: NullPolicy, split_bytes: u64) -> ImportSpec {
    ImportSpec {
        url: url.into(),
        format,
        label: "y".into(),
        features: vec![],
        nulls,
        max_categories: 3,
        hash_buckets: 4,
        split_bytes,
        zero_based: false,
    }
}

/// Rows `lo..hi`: id, a timestamp, a flag, a city (3 values), a free-text tag, y; every 7th
/// row's `v` is null.
fn batch(lo: i64, hi: i64) -> RecordBatch {
    let ids: Vec<i64> = (lo..hi).collect();
    let v: Vec<Option<f64>> = ids
        .iter()
        .map(|&i| (i % 7 != 3).then_some(i as f64 * 0.5))
        .collect();
    let cities = ["ams", "ber", "cph"];
    let cols: Vec<(&str, ArrayRef)> = vec![
        ("id", Arc::new(Int64Array::from(ids.clone()))),
        ("v", Arc::new(Float64Array::from(v))),
        (
            "ts",
            Arc::new(TimestampMillisecondArray::from(
                ids.iter()
                    .map(|i| 1_700_000_000_000 + i)
                    .collect::<Vec<_>>(),
            )),
        ),
        (
            "flag",
            Arc::new(BooleanArray::from(
                ids.iter().map(|i| i % 2 == 0).collect::<Vec<_>>(),
            )),
        ),
        (
            "city",
            Arc::new(StringArray::from(
                ids.iter()
                    .map(|&i| cities[(i % 3) as usize])
                    .collect::<Vec<_>>(),
            )),
        ),
        (
            "tag",
            Arc::new(StringArray::from(
                ids.iter().map(|i| format!("t{i}")).collect::<Vec<_>>(),
            )),
        ),
        (
            "y",
            Arc::new(Float64Array::from(
                ids.iter().map(|&i| (i % 2) as f64).collect::<Vec<_>>(),
            )),
        ),
    ];
    RecordBatch::try_from_iter(cols).unwrap()
}

fn write_parquet(path: &std::path::Path, lo: i64, hi: i64, group: usize) {
    let file = std::fs::File::create(path).unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_size(group)
        .build();
    let b = batch(lo, hi);
    let mut w = ArrowWriter::try_new(file, b.schema(), Some(props)).unwrap();
    w.write(&b).unwrap();
    w.close().unwrap();
}

/// Every split read, in split order: (rows as (label, features), per-split reports).
async fn import_all(
    spec: &ImportSpec,
    shards: u32,
) -> Result<(Vec<(f32, Vec<f32>)>, Vec<SplitDone>, Vec<ColumnPlan>), super::IngestError> {
    let planned = plan("imp", "ds", spec, shards, &anywhere()).await?;
    let rec = planned.record;
    let store = Store::in_memory();
    let src = super::source::Source::open(&spec.url, &anywhere())?;
    let mut rows = Vec::new();
    let mut dones = Vec::new();
    for i in 0..rec.splits.len() as u32 {
        let done = read_split(&src, &rec, i, &store).await?;
        for seg in 0..done.segments {
            let bytes = store
                .get_blob(&split_segment_key("ds", "imp", i, seg))
                .await
                .unwrap()
                .unwrap();
            let buf = PartitionBuf::from_bytes(&bytes).unwrap();
            let v = buf.view().unwrap();
            for r in 0..v.rows() {
                assert_eq!(v.row_ids()[r] >> 40, u64::from(i));
                rows.push((v.labels()[r], v.row(r).to_vec()));
            }
        }
        dones.push(done);
    }
    Ok((rows, dones, rec.columns))
}

#[tokio::test]
async fn parquet_files_row_groups_types_and_categories() {
    let dir = tempfile::tempdir().unwrap();
    write_parquet(&dir.path().join("part-0.parquet"), 0, 50, 8);
    write_parquet(&dir.path().join("part-1.parquet"), 50, 100, 16);
    std::fs::write(dir.path().join("_SUCCESS"), b"").unwrap();
    let url = format!("file://{}/*.parquet", dir.path().display());
    let s = spec(&url, Format::Parquet, NullPolicy::DropRow, 1);
    let (rows, dones, columns) = import_all(&s, 4).await.unwrap();
    // One split per row group (the split size is 1 byte): 7 + 4.
    assert_eq!(dones.len(), 11);
    assert_eq!(
        columns,
        vec![
            ColumnPlan::Numeric { name: "id".into() },
            ColumnPlan::Numeric { name: "v".into() },
            ColumnPlan::Numeric { name: "ts".into() },
            ColumnPlan::Numeric {
                name: "flag".into()
            },
            ColumnPlan::OneHot {
                name: "city".into(),
                values: vec!["ams".into(), "ber".into(), "cph".into()]
            },
            ColumnPlan::Hashed {
                name: "tag".into(),
                buckets: 4
            },
        ]
    );
    let kept: Vec<i64> = (0..100).filter(|i| i % 7 != 3).collect();
    assert_eq!(rows.len(), kept.len());
    assert_eq!(
        dones.iter().map(|d| d.dropped).sum::<u64>(),
        100 - kept.len() as u64
    );
    for ((label, x), &i) in rows.iter().zip(&kept) {
        assert_eq!(x.len(), 1 + 1 + 1 + 1 + 3 + 4);
        assert_eq!(x[0], i as f32);
        assert_eq!(x[1], (i as f64 * 0.5) as f32);
        assert_eq!(x[2], (1_700_000_000_000 + i) as f32);
        assert_eq!(x[3], if i % 2 == 0 { 1.0 } else { 0.0 });
        let hot: Vec<f32> = (0..3)
            .map(|k| if k == (i % 3) as usize { 1.0 } else { 0.0 })
            .collect();
        assert_eq!(&x[4..7], &hot[..]);
        let b = super::columns::bucket(&format!("t{i}"), 4);
        assert_eq!(x[7..].iter().position(|&v| v == 1.0), Some(b));
        assert_eq!(*label, (i % 2) as f32);
    }

    // Refuse names the file, row group and row; fill_mean fills with the dataset mean.
    let refuse = spec(&url, Format::Parquet, NullPolicy::Refuse, 1);
    let err = import_all(&refuse, 4).await.unwrap_err().to_string();
    assert!(
        err.contains("part-0.parquet: row group 0, row 3") && err.contains("\"v\""),
        "{err}"
    );
    let fill = spec(&url, Format::Parquet, NullPolicy::FillMean, 1 << 30);
    let (rows, dones, _) = import_all(&fill, 4).await.unwrap();
    assert_eq!(dones.len(), 2, "whole files: one split each");
    assert_eq!(rows.len(), 100);
    assert!(rows[3].1[1].is_nan(), "nulls stay NaN until loaded");
    let count: u64 = dones.iter().map(|d| d.counts[1]).sum();
    assert_eq!(count, kept.len() as u64);
}

#[tokio::test]
async fn a_corrupt_parquet_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.parquet");
    write_parquet(&path, 0, 40, 10);
    let mut bytes = std::fs::read(&path).unwrap();
    // Damage the first row group's data pages (the footer stays valid).
    for b in &mut bytes[8..200] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    let url = format!("file://{}", path.display());
    let s = spec(&url, Format::Parquet, NullPolicy::Refuse, 1);
    let err = import_all(&s, 2).await.unwrap_err();
    assert!(err.is_data(), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("bad.parquet") && msg.contains("row group 0"),
        "{msg}"
    );

    std::fs::write(&path, b"PAR1 not really").unwrap();
    let err = plan("i", "d", &s, 2, &anywhere()).await.unwrap_err();
    assert!(
        err.is_data() && err.to_string().contains("bad.parquet"),
        "{err}"
    );
}

#[tokio::test]
async fn csv_byte_ranges_read_every_line_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("a,b,y\n");
    for i in 0..500 {
        // Lines of different lengths, a quoted cell, CRLF now and then, an empty cell.
        let b = if i % 11 == 5 {
            String::new()
        } else {
            format!("\"{}\"", i * 3)
        };
        let eol = if i % 13 == 0 { "\r\n" } else { "\n" };
        text.push_str(&format!("{i},{b},{}{eol}", i % 2));
    }
    text.push_str("500,1,0"); // no final newline
    std::fs::write(dir.path().join("d.csv"), &text).unwrap();
    let url = format!("file://{}/d.csv", dir.path().display());
    for split_bytes in [1u64, 7, 64, 1000, 1 << 20] {
        let s = spec(&url, Format::Csv, NullPolicy::FillMean, split_bytes);
        let (rows, _, _) = import_all(&s, 3).await.unwrap();
        let ids: Vec<f32> = rows.iter().map(|(_, x)| x[0]).collect();
        let want: Vec<f32> = (0..=500).map(|i| i as f32).collect();
        assert_eq!(ids, want, "split size {split_bytes}");
        assert!(rows[5].1[1].is_nan());
        assert_eq!(rows[6].1[1], 18.0);
    }
    let s = spec(&url, Format::Csv, NullPolicy::Refuse, 100);
    let err = import_all(&s, 3).await.unwrap_err().to_string();
    assert!(
        err.contains("d.csv: line at byte") && err.contains("\"b\""),
        "{err}"
    );
}

#[tokio::test]
async fn only_allowed_urls_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let secret = dir.path().join("secret");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(data.join("a.csv"), "x,y\n1,2\n").unwrap();
    std::fs::write(secret.join("key.csv"), "x,y\n3,4\n").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(secret.join("key.csv"), data.join("link.csv")).unwrap();
    let allowed = vec![format!("file://{}/", data.display())];
    let open = |url: String| super::source::Source::open(&url, &allowed).map(|_| ());
    assert!(open(format!("file://{}/a.csv", data.display())).is_ok());
    assert!(open(format!("file://{}/*.csv", data.display())).is_ok());
    let refused = [
        format!("file://{}/key.csv", secret.display()),
        // `..` and links are resolved before the check.
        format!("file://{}/../secret/key.csv", data.display()),
        format!("file://{}/link.csv", data.display()),
        format!("file://{}", dir.path().display()),
        "s3://bucket/x.csv".to_string(),
    ];
    for url in refused {
        let err = open(url.clone()).unwrap_err();
        assert!(
            err.is_data() && err.to_string().contains("jobs.import_urls"),
            "{url}: {err}"
        );
    }
    let none = super::source::Source::open(&format!("file://{}/a.csv", data.display()), &[]);
    assert!(none.unwrap_err().to_string().contains("none configured"));
    let s3 = super::source::Source::open("s3://lake/events/x.parquet", &["s3://lake/".into()]);
    assert!(s3.is_ok());
    let other = super::source::Source::open("s3://lakehouse/x.parquet", &["s3://lake/".into()]);
    assert!(
        other.is_err(),
        "a prefix of the bucket name is not the bucket"
    );
}

/// Every split of a libsvm import read, in split order: (label, columns, values) per row.
async fn import_libsvm(
    spec: &ImportSpec,
) -> Result<(Vec<(f32, Vec<u32>, Vec<f32>)>, Vec<SplitDone>), super::IngestError> {
    let rec = plan("imp", "ds", spec, 3, &anywhere()).await?.record;
    assert_eq!(
        rec.columns,
        vec![ColumnPlan::Sparse {
            name: "libsvm".into()
        }]
    );
    let store = Store::in_memory();
    let src = super::source::Source::open(&spec.url, &anywhere())?;
    let (mut rows, mut dones) = (Vec::new(), Vec::new());
    for i in 0..rec.splits.len() as u32 {
        let done = read_split(&src, &rec, i, &store).await?;
        for seg in 0..done.segments {
            let key = split_segment_key("ds", "imp", i, seg);
            let bytes = store.get_blob(&key).await.unwrap().unwrap();
            let buf = PartitionBuf::from_bytes(&bytes).unwrap();
            let crate::dataset::AnyView::Sparse(v) = buf.any_view().unwrap() else {
                panic!("a libsvm split wrote a dense segment")
            };
            assert!(v.csr().columns() as u64 <= done.columns);
            for r in 0..v.rows() {
                let (c, x) = v.csr().row(r);
                rows.push((v.labels()[r], c.to_vec(), x.to_vec()));
            }
        }
        dones.push(done);
    }
    Ok((rows, dones))
}

#[tokio::test]
async fn libsvm_byte_ranges_read_every_line_once_as_sparse_rows() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::from("# a comment line\n\n");
    let mut want = Vec::new();
    for i in 0..400u32 {
        // Indices out of order, an explicit zero (not stored), qid, comments, CRLF, tabs, and
        // one index near three million.
        let big = 2_999_000 + i;
        let eol = if i % 13 == 0 { "\r\n" } else { "\n" };
        text.push_str(&format!(
            "{} qid:{}\t{big}:{}.5 {}:0 3:{} 1:-1e-3 # row {i}{eol}",
            i % 2,
            i / 10,
            i,
            i + 10,
            i as f32 * 0.25
        ));
        let mut cols = vec![0u32, 2, big - 1];
        let mut vals = vec![-1e-3f32, i as f32 * 0.25, format!("{i}.5").parse().unwrap()];
        if i == 0 {
            // 3:0 is not stored.
            cols.remove(1);
            vals.remove(1);
        }
        want.push(((i % 2) as f32, cols, vals));
    }
    text.push_str("1 5:2"); // no final newline
    want.push((1.0, vec![4], vec![2.0]));
    std::fs::write(dir.path().join("d.libsvm"), &text).unwrap();
    let url = format!("file://{}/d.libsvm", dir.path().display());
    for split_bytes in [2u64, 7, 64, 1000, 1 << 20] {
        let mut s = spec(&url, Format::Libsvm, NullPolicy::Refuse, split_bytes);
        s.label = "label".into();
        let (rows, dones) = import_libsvm(&s).await.unwrap();
        assert_eq!(rows, want, "split size {split_bytes}");
        assert_eq!(dones.iter().map(|d| d.columns).max(), Some(2_999_399));
        assert_eq!(dones.iter().map(|d| d.nnz).sum::<u64>(), 3 * 400 - 1 + 1);
    }
    let bad = [
        ("1 0:1\n", "index 0 in a file whose indices start at 1"),
        ("1 2:1 2:3\n", "appears twice"),
        ("1 2:x\n", "not a finite value"),
        ("1 2:inf\n", "not a finite value"),
        ("nan 2:1\n", "not a finite number"),
        ("1 two\n", "not index:value"),
        ("1 4294967296:1\n", "too large"),
    ];
    for (line, why) in bad {
        std::fs::write(dir.path().join("bad.libsvm"), format!("0 1:1\n{line}")).unwrap();
        let url = format!("file://{}/bad.libsvm", dir.path().display());
        let err = import_libsvm(&spec(&url, Format::Libsvm, NullPolicy::Refuse, 1 << 20))
            .await
            .unwrap_err();
        assert!(err.is_data(), "{line}: {err}");
        let err = err.to_string();
        assert!(
            err.contains("bad.libsvm: line at byte 6") && err.contains(why),
            "{line}: {err}"
        );
    }
    // Zero-based files may use index 0.
    std::fs::write(dir.path().join("z.libsvm"), "1 0:2 3:1\n").unwrap();
    let url = format!("file://{}/z.libsvm", dir.path().display());
    let mut s = spec(&url, Format::Libsvm, NullPolicy::Refuse, 1 << 20);
    s.zero_based = true;
    let (rows, dones) = import_libsvm(&s).await.unwrap();
    assert_eq!(rows, vec![(1.0, vec![0, 3], vec![2.0, 1.0])]);
    assert_eq!(dones[0].columns, 4);
}

/// Rows `lo..hi` of [`batch`] as an Arrow IPC file of record batches of `per` rows.
fn write_arrow(path: &std::path::Path, lo: i64, hi: i64, per: i64, lz4: bool) {
    use arrow_ipc::writer::{FileWriter, IpcWriteOptions};
    let file = std::fs::File::create(path).unwrap();
    let mut opts = IpcWriteOptions::default();
    if lz4 {
        opts = opts
            .try_with_compression(Some(arrow_ipc::CompressionType::LZ4_FRAME))
            .unwrap();
    }
    let fields: Vec<arrow_schema::Field> = batch(lo, lo + 1)
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    let schema = arrow_schema::Schema::new(fields);
    let mut w = FileWriter::try_new_with_options(file, &schema, opts).unwrap();
    let mut at = lo;
    while at < hi {
        let b = batch(at, (at + per).min(hi));
        let b = RecordBatch::try_new(std::sync::Arc::new(schema.clone()), b.columns().to_vec());
        w.write(&b.unwrap()).unwrap();
        at += per;
    }
    w.finish().unwrap();
}

#[tokio::test]
async fn arrow_ipc_files_import_like_the_same_rows_in_parquet() {
    let dir = tempfile::tempdir().unwrap();
    write_parquet(&dir.path().join("p-0.parquet"), 0, 50, 8);
    write_parquet(&dir.path().join("p-1.parquet"), 50, 100, 16);
    write_arrow(&dir.path().join("a-0.arrow"), 0, 50, 8, false);
    write_arrow(&dir.path().join("a-1.feather"), 50, 100, 16, true);
    let pq = format!("file://{}/*.parquet", dir.path().display());
    let (want, _, want_columns) =
        import_all(&spec(&pq, Format::Parquet, NullPolicy::DropRow, 1), 4)
            .await
            .unwrap();
    // A prefix import takes every Arrow extension (.arrow, .feather, .ipc).
    let prefix = format!("file://{}/", dir.path().display());
    let mut s = spec(&prefix, Format::Arrow, NullPolicy::DropRow, 1);
    let (rows, dones, columns) = import_all(&s, 4).await.unwrap();
    assert_eq!(dones.len(), 7 + 4, "one split per record batch");
    assert_eq!(columns, want_columns);
    assert_eq!(bits(&rows), bits(&want));
    s.split_bytes = 1 << 30;
    let (rows, dones, _) = import_all(&s, 4).await.unwrap();
    assert_eq!((dones.len(), bits(&rows)), (2, bits(&want)));
    // Refuse names the file, record batch and row.
    s.nulls = NullPolicy::Refuse;
    let err = import_all(&s, 4).await.unwrap_err().to_string();
    assert!(err.contains("a-0.arrow: record batch 0, row 3"), "{err}");
    // A truncated file is named, never a panic.
    let path = dir.path().join("a-0.arrow");
    let bytes = std::fs::read(&path).unwrap();
    for cut in [0, 9, 100, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let url = format!("file://{}", path.display());
        let err = import_all(&spec(&url, Format::Arrow, NullPolicy::DropRow, 1), 2)
            .await
            .unwrap_err();
        assert!(
            err.is_data() && err.to_string().contains("a-0.arrow"),
            "cut {cut}: {err}"
        );
    }
}

fn bits(rows: &[(f32, Vec<f32>)]) -> Vec<Vec<u32>> {
    rows.iter()
        .map(|(y, x)| std::iter::once(y).chain(x).map(|v| v.to_bits()).collect())
        .collect()
}
