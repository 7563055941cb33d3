//! Reading one split: its rows, streamed from the source, written as partition segments of at
//! most [`crate::dataset::SEGMENT_BYTES`] each.
//!
//! Memory per split: one Parquet row group's column chunks (compressed) or one CSV read chunk
//! ([`CSV_CHUNK`]), one decoded batch, and one segment being filled. A split's output is a pure
//! function of the source and the plan: row ids are `split << 40 | row in split`.

use bytes::Bytes;
use futures::TryStreamExt;
use parquet::arrow::ProjectionMask;
use tidepool_core::control::{ColumnPlan, Format, ImportRecord, NullPolicy, SplitDone, SplitUnit};
use xxhash_rust::xxh3::Xxh3;

use super::arrow_file::ArrowFile;
use super::lines::LineChunks;
use super::plan::{csv_header, parquet_builder};
use super::source::{Source, SourceFile};
use super::{columns, split_segment_key, IngestError};
use crate::csr::{encode_sparse, SparsePartition};
use crate::dataset::{encode_partition, Partition, SEGMENT_BYTES};
use crate::storage::Store;

/// Bytes of a CSV split fetched per request.
pub const CSV_CHUNK: u64 = 4 << 20;
/// Longest CSV line accepted.
pub const MAX_LINE: usize = 16 << 20;
/// Rows per decoded Parquet batch.
const BATCH_ROWS: usize = 8192;

/// Rows of one split on their way into segments, with the split's checksum and column sums.
struct SplitWriter<'a> {
    store: &'a Store,
    imp: &'a ImportRecord,
    split: u32,
    names: Vec<String>,
    width: usize,
    seg_rows: usize,
    ids: Vec<u64>,
    y: Vec<f32>,
    x: Vec<f32>,
    next_row: u64,
    segments: u32,
    hasher: Xxh3,
    rows: u64,
    dropped: u64,
    sums: Vec<f64>,
    counts: Vec<u64>,
    /// A libsvm split's rows (instead of `ids`, `y`, `x`), and its widest column plus one.
    sparse: Option<SparsePartition>,
    columns: u64,
    nnz: u64,
}

impl<'a> SplitWriter<'a> {
    fn new(store: &'a Store, imp: &'a ImportRecord, split: u32) -> Self {
        let width = imp.width();
        let fill = imp.spec.nulls == NullPolicy::FillMean;
        SplitWriter {
            store,
            imp,
            split,
            // Per output feature, the source column it came from (for errors).
            names: imp
                .columns
                .iter()
                .flat_map(|c| std::iter::repeat_n(c.name().to_string(), c.width()))
                .collect(),
            width,
            seg_rows: (SEGMENT_BYTES / (width * 4 + 12)).max(1),
            ids: Vec::new(),
            y: Vec::new(),
            x: Vec::new(),
            next_row: 0,
            segments: 0,
            hasher: Xxh3::new(),
            rows: 0,
            dropped: 0,
            sums: if fill { vec![0.0; width] } else { Vec::new() },
            counts: if fill { vec![0; width] } else { Vec::new() },
            sparse: imp
                .is_sparse()
                .then(|| SparsePartition::new(u32::MAX as usize)),
            columns: 0,
            nnz: 0,
        }
    }

    /// Adds one sparse row (columns increasing, values finite and non-zero).
    async fn push_sparse(
        &mut self,
        label: f32,
        cols: &[u32],
        vals: &[f32],
    ) -> Result<(), IngestError> {
        let row = self.next_row;
        self.next_row += 1;
        let id = u64::from(self.split) << 40 | row;
        let Some(part) = self.sparse.as_mut() else {
            return Err(IngestError::Data("a sparse row in a dense import".into()));
        };
        part.push(id, label, cols, vals)
            .map_err(|e| IngestError::Data(e.to_string()))?;
        self.hasher.update(&label.to_le_bytes());
        self.hasher.update(&(cols.len() as u64).to_le_bytes());
        for (c, v) in cols.iter().zip(vals) {
            self.hasher.update(&c.to_le_bytes());
            self.hasher.update(&v.to_le_bytes());
        }
        if let Some(&last) = cols.last() {
            self.columns = self.columns.max(u64::from(last) + 1);
        }
        self.nnz += cols.len() as u64;
        self.rows += 1;
        if part.bytes() >= SEGMENT_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Adds one row (NaN marks a null); `at` names where it came from, for errors.
    async fn push(
        &mut self,
        label: f32,
        features: &[f32],
        at: impl FnOnce() -> String,
    ) -> Result<(), IngestError> {
        let row = self.next_row;
        self.next_row += 1;
        let null_label = label.is_nan();
        let null_feature = features.iter().position(|v| v.is_nan());
        if null_label || null_feature.is_some() {
            let column = match null_feature {
                _ if null_label => self.imp.spec.label.clone(),
                Some(j) => self.names.get(j).cloned().unwrap_or_default(),
                None => String::new(),
            };
            match self.imp.spec.nulls {
                NullPolicy::DropRow => {
                    self.dropped += 1;
                    return Ok(());
                }
                NullPolicy::FillMean if !null_label => {}
                policy => {
                    return Err(IngestError::Data(format!(
                        "{}: null in column {column:?} (nulls = {}; use --nulls drop_row{})",
                        at(),
                        policy.as_str(),
                        if null_label { "" } else { " or fill_mean" }
                    )))
                }
            }
        }
        if !self.sums.is_empty() {
            for (j, &v) in features.iter().enumerate() {
                if !v.is_nan() {
                    self.sums[j] += f64::from(v);
                    self.counts[j] += 1;
                }
            }
        }
        self.hasher.update(&label.to_le_bytes());
        for v in features {
            self.hasher.update(&v.to_le_bytes());
        }
        self.ids.push(u64::from(self.split) << 40 | row);
        self.y.push(label);
        self.x.extend_from_slice(features);
        self.rows += 1;
        if self.ids.len() >= self.seg_rows {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), IngestError> {
        if let Some(part) = self.sparse.as_mut() {
            if part.rows() == 0 {
                return Ok(());
            }
            let mut full = std::mem::replace(part, SparsePartition::new(u32::MAX as usize));
            full.fit_columns();
            return self.put(Bytes::from(encode_sparse(&full))).await;
        }
        if self.ids.is_empty() {
            return Ok(());
        }
        let part = Partition::new(
            self.width,
            std::mem::take(&mut self.ids),
            std::mem::take(&mut self.y),
            std::mem::take(&mut self.x),
        )
        .map_err(|e| IngestError::Data(e.to_string()))?;
        let bytes = Bytes::from(encode_partition(&part));
        drop(part);
        self.put(bytes).await
    }

    /// Stores the split's next segment.
    async fn put(&mut self, bytes: Bytes) -> Result<(), IngestError> {
        let key = split_segment_key(&self.imp.dataset, &self.imp.id, self.split, self.segments);
        self.store.put_blob(&key, bytes).await?;
        self.segments += 1;
        Ok(())
    }

    async fn finish(mut self) -> Result<SplitDone, IngestError> {
        self.flush().await?;
        Ok(SplitDone {
            rows: self.rows,
            dropped: self.dropped,
            segments: self.segments,
            checksum: self.hasher.digest(),
            sums: self.sums,
            counts: self.counts,
            columns: self.columns,
            nnz: self.nnz,
        })
    }
}

/// Reads split `split` of `imp` from `src` and writes its segments into `store`.
pub async fn read_split(
    src: &Source,
    imp: &ImportRecord,
    split: u32,
    store: &Store,
) -> Result<SplitDone, IngestError> {
    let s = imp
        .splits
        .get(split as usize)
        .ok_or_else(|| IngestError::Data(format!("import {}: no split {split}", imp.id)))?;
    let mut w = SplitWriter::new(store, imp, split);
    match (imp.spec.format, s.unit) {
        (Format::Parquet, SplitUnit::RowGroups { first, count }) => {
            read_parquet(src, imp, &s.file, first, count, &mut w).await?
        }
        (Format::Csv, SplitUnit::Bytes { start, end }) => {
            read_csv(src, imp, &s.file, start, end, &mut w).await?
        }
        (Format::Arrow, SplitUnit::RowGroups { first, count }) => {
            read_arrow(src, imp, &s.file, first, count, &mut w).await?
        }
        (Format::Libsvm, SplitUnit::Bytes { start, end }) => {
            read_libsvm(src, imp, &s.file, start, end, &mut w).await?
        }
        (format, unit) => {
            return Err(IngestError::Data(format!(
                "import {}: a {} split cannot read {unit:?}",
                imp.id,
                format.as_str()
            )))
        }
    }
    w.finish().await
}

async fn read_parquet(
    src: &Source,
    imp: &ImportRecord,
    file: &str,
    first: u32,
    count: u32,
    w: &mut SplitWriter<'_>,
) -> Result<(), IngestError> {
    let name = src.display(file);
    let builder = parquet_builder(src, file).await?;
    let groups: Vec<usize> = (first as usize..(first + count) as usize).collect();
    let n_groups = builder.metadata().num_row_groups();
    if groups.iter().any(|&g| g >= n_groups) {
        return Err(IngestError::Data(format!(
            "{name}: has {n_groups} row groups, the plan reads {first}..{} (did the file change during the import?)",
            first + count
        )));
    }
    let group_rows: Vec<u64> = groups
        .iter()
        .map(|&g| builder.metadata().row_group(g).num_rows().max(0) as u64)
        .collect();
    let wanted: Vec<&str> = imp
        .columns
        .iter()
        .map(ColumnPlan::name)
        .chain(std::iter::once(imp.spec.label.as_str()))
        .collect();
    let roots: Vec<usize> = builder
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| wanted.contains(&f.name().as_str()))
        .map(|(i, _)| i)
        .collect();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
    // Where split row `r` is: (row group, row in it).
    let locate = |r: u64| {
        let mut left = r;
        for (k, &n) in group_rows.iter().enumerate() {
            if left < n {
                return (first as usize + k, left);
            }
            left -= n;
        }
        (first as usize + groups.len(), left)
    };
    let at = |r: u64| {
        let (g, row) = locate(r);
        format!("{name}: row group {g}, row {row}")
    };
    let corrupt = |r: u64, e: parquet::errors::ParquetError| match e {
        parquet::errors::ParquetError::External(inner) => IngestError::Source {
            url: name.clone(),
            reason: inner.to_string(),
        },
        other => IngestError::Data(format!("{}: {other}", at(r).replace(", row 0", ""))),
    };
    let mut stream = builder
        .with_row_groups(groups.clone())
        .with_projection(mask)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| corrupt(0, e))?;
    let mut done = 0u64;
    let mut x = Vec::new();
    loop {
        let batch = match stream.try_next().await {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(e) => return Err(corrupt(done, e)),
        };
        let rows = batch.num_rows();
        push_batch(imp, &batch, &mut x, w, |r| at(done + r)).await?;
        done += rows as u64;
    }
    let planned: u64 = group_rows.iter().sum();
    if done != planned {
        return Err(IngestError::Data(format!(
            "{name}: row groups {first}..{} hold {done} rows, their metadata says {planned}",
            first + count
        )));
    }
    Ok(())
}

/// Pushes the rows of one decoded batch (Parquet or Arrow); `at(r)` names batch row `r` in
/// errors. `x` is scratch space for the batch's encoded features.
async fn push_batch(
    imp: &ImportRecord,
    batch: &arrow_array::RecordBatch,
    x: &mut Vec<f32>,
    w: &mut SplitWriter<'_>,
    at: impl Fn(u64) -> String,
) -> Result<(), IngestError> {
    let rows = batch.num_rows();
    let width = imp.width();
    let column = |n: &str| {
        batch
            .column_by_name(n)
            .ok_or_else(|| IngestError::Data(format!("{}: column {n:?} is missing", at(0))))
    };
    let labels = columns::labels(column(&imp.spec.label)?).map_err(|(r, e)| {
        IngestError::Data(format!(
            "{}: column {:?}: {e}",
            at(r as u64),
            imp.spec.label
        ))
    })?;
    x.clear();
    x.resize(rows * width, 0.0);
    let mut offset = 0;
    for plan in &imp.columns {
        columns::fill(plan, column(plan.name())?, x, width, offset).map_err(|(r, e)| {
            IngestError::Data(format!("{}: column {:?}: {e}", at(r as u64), plan.name()))
        })?;
        offset += plan.width();
    }
    for (r, &label) in labels.iter().enumerate() {
        let features = x.get(r * width..(r + 1) * width).unwrap_or_default();
        w.push(label, features, || at(r as u64)).await?;
    }
    Ok(())
}

/// Reads record batches `first..first + count` of an Arrow IPC file.
async fn read_arrow(
    src: &Source,
    imp: &ImportRecord,
    file: &str,
    first: u32,
    count: u32,
    w: &mut SplitWriter<'_>,
) -> Result<(), IngestError> {
    let name = src.display(file);
    let size = size_of(src, file).await?;
    let af = ArrowFile::open(src, file, size).await?;
    if first as usize + count as usize > af.batches() {
        return Err(IngestError::Data(format!(
            "{name}: has {} record batches, the plan reads {first}..{} (did the file change during the import?)",
            af.batches(),
            first + count
        )));
    }
    let mut x = Vec::new();
    for b in first..first + count {
        let batch = af.batch(src, b as usize).await?;
        push_batch(imp, &batch, &mut x, w, |r| {
            format!("{name}: record batch {b}, row {r}")
        })
        .await?;
    }
    Ok(())
}

/// Reads the lines that start in `start..end` of a CSV file (the header is never one of them).
async fn read_csv(
    src: &Source,
    imp: &ImportRecord,
    file: &str,
    start: u64,
    end: u64,
    w: &mut SplitWriter<'_>,
) -> Result<(), IngestError> {
    let name = src.display(file);
    let size = size_of(src, file).await?;
    let sf = SourceFile {
        path: file.to_string(),
        size,
    };
    let (header, data_start) = csv_header(src, &sf).await?;
    let index = |n: &str| {
        header
            .iter()
            .position(|h| h == n)
            .ok_or_else(|| IngestError::Data(format!("{name}: column {n:?} is not in the header")))
    };
    let label_at = index(&imp.spec.label)?;
    let feature_at: Vec<usize> = imp
        .columns
        .iter()
        .map(|c| index(c.name()))
        .collect::<Result<_, _>>()?;
    let names = imp.features();
    let mut lines = LineChunks::new(src, file, size, data_start, start, end);
    let mut row = Vec::with_capacity(feature_at.len());
    while let Some((base, chunk)) = lines.next().await? {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .from_reader(chunk);
        let mut record = csv::ByteRecord::new();
        loop {
            let got = reader
                .read_byte_record(&mut record)
                .map_err(|e| IngestError::Data(format!("{name}: near byte {base}: {e}")))?;
            if !got {
                break;
            }
            let at_byte = base + record.position().map_or(0, |p| p.byte());
            let at = || format!("{name}: line at byte {at_byte}");
            if record.len() != header.len() {
                return Err(IngestError::Data(format!(
                    "{}: ragged row: expected {} fields, got {}",
                    at(),
                    header.len(),
                    record.len()
                )));
            }
            let cell = |i: usize, col: &str| -> Result<f32, IngestError> {
                let text = record.get(i).unwrap_or_default();
                let trimmed = text.trim_ascii();
                if trimmed.is_empty() {
                    return Ok(f32::NAN);
                }
                match crate::dataset::parse_f32(trimmed) {
                    Some(v) if v.is_finite() => Ok(v),
                    Some(_) => Err(IngestError::Data(format!(
                        "{}: column {col:?}: NaN or infinite values are refused",
                        at()
                    ))),
                    None => Err(IngestError::Data(format!(
                        "{}: column {col:?}: not a number: {:?}",
                        at(),
                        String::from_utf8_lossy(&trimmed[..trimmed.len().min(48)])
                    ))),
                }
            };
            let label = cell(label_at, &imp.spec.label)?;
            row.clear();
            for (&i, n) in feature_at.iter().zip(&names) {
                row.push(cell(i, n)?);
            }
            w.push(label, &row, at).await?;
        }
    }
    Ok(())
}

/// The size of `file`, asked of the store (a split's plan does not carry it).
async fn size_of(src: &Source, file: &str) -> Result<u64, IngestError> {
    Ok(src
        .store()
        .head(&src.path_of(file))
        .await
        .map_err(|e| IngestError::Source {
            url: src.display(file),
            reason: e.to_string(),
        })?
        .size)
}

/// Reads the libsvm lines that start in `start..end`: `label [qid:q] index:value ...`, `#`
/// starts a comment, blank lines are skipped. Indices may come in any order but not twice;
/// zeros are not stored.
async fn read_libsvm(
    src: &Source,
    imp: &ImportRecord,
    file: &str,
    start: u64,
    end: u64,
    w: &mut SplitWriter<'_>,
) -> Result<(), IngestError> {
    let name = src.display(file);
    let size = size_of(src, file).await?;
    let first = u64::from(!imp.spec.zero_based);
    let mut lines = LineChunks::new(src, file, size, 0, start, end);
    let mut entries: Vec<(u32, f32)> = Vec::new();
    let (mut cols, mut vals) = (Vec::new(), Vec::new());
    while let Some((base, chunk)) = lines.next().await? {
        let mut offset = 0usize;
        for line in chunk.split_inclusive(|&b| b == b'\n') {
            let at_byte = base + offset as u64;
            offset += line.len();
            let at = || format!("{name}: line at byte {at_byte}");
            let text = line.split(|&b| b == b'#').next().unwrap_or_default();
            let mut fields = text
                .split(|b| b.is_ascii_whitespace())
                .filter(|f| !f.is_empty());
            let Some(label) = fields.next() else {
                continue;
            };
            let label = match crate::dataset::parse_f32(label) {
                Some(v) if v.is_finite() => v,
                _ => {
                    return Err(IngestError::Data(format!(
                        "{}: the label {:?} is not a finite number",
                        at(),
                        String::from_utf8_lossy(&label[..label.len().min(48)])
                    )))
                }
            };
            entries.clear();
            for field in fields {
                let bad = |why: &str| {
                    IngestError::Data(format!(
                        "{}: {why}: {:?}",
                        at(),
                        String::from_utf8_lossy(&field[..field.len().min(48)])
                    ))
                };
                let Some(colon) = field.iter().position(|&b| b == b':') else {
                    return Err(bad("not index:value"));
                };
                let (index, value) = (&field[..colon], &field[colon + 1..]);
                if index == b"qid" {
                    continue;
                }
                let index: u64 = std::str::from_utf8(index)
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .ok_or_else(|| bad("not a feature index"))?;
                let col = index.checked_sub(first).ok_or_else(|| {
                    bad("index 0 in a file whose indices start at 1 (import with --zero-based)")
                })?;
                let col = u32::try_from(col)
                    .ok()
                    .filter(|&c| c < u32::MAX)
                    .ok_or_else(|| bad("feature index too large"))?;
                let value = match crate::dataset::parse_f32(value) {
                    Some(v) if v.is_finite() => v,
                    _ => return Err(bad("not a finite value")),
                };
                if value != 0.0 {
                    entries.push((col, value));
                }
            }
            entries.sort_unstable_by_key(|e| e.0);
            if entries.windows(2).any(|p| p[0].0 == p[1].0) {
                return Err(IngestError::Data(format!(
                    "{}: a feature index appears twice",
                    at()
                )));
            }
            cols.clear();
            vals.clear();
            cols.extend(entries.iter().map(|e| e.0));
            vals.extend(entries.iter().map(|e| e.1));
            w.push_sparse(label, &cols, &vals).await?;
        }
    }
    Ok(())
}
