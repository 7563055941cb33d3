//! Planning an import: the source's files cut into splits, the output columns resolved, the
//! splits assigned to shards. Reads only footers (Parquet), header lines (CSV) and, for string
//! columns, the values (to choose one-hot or hashing): never the whole data.

use std::collections::BTreeSet;

use futures::TryStreamExt;
use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};
use parquet::arrow::ProjectionMask;
use tidepool_core::control::imports::{assign_shards, MAX_SPLITS};
use tidepool_core::control::{
    ColumnPlan, Format, ImportRecord, ImportSpec, ImportState, Split, SplitUnit,
};

use super::arrow_file::ArrowFile;
use super::columns::{self, ColumnKind};
use super::source::{Source, SourceFile};
use super::IngestError;

/// Longest CSV header line read.
const MAX_HEADER: u64 = 1 << 20;

/// A plan and what it left out.
#[derive(Debug, Clone)]
pub struct Planned {
    pub record: ImportRecord,
    /// Columns of types that do not import (name and type), left out because `features` did
    /// not name them.
    pub skipped: Vec<(String, String)>,
}

/// The import `id` of `spec` into dataset `dataset`, planned for `shards` shards; the URL must be
/// under one of `allowed` (`jobs.import_urls`).
pub async fn plan(
    id: &str,
    dataset: &str,
    spec: &ImportSpec,
    shards: u32,
    allowed: &[String],
) -> Result<Planned, IngestError> {
    let src = Source::open(&spec.url, allowed)?;
    let files = src.files(super::source::extensions(spec.format)).await?;
    let (columns, mut splits, skipped) = match spec.format {
        Format::Parquet => plan_parquet(&src, spec, &files).await?,
        Format::Csv => plan_csv(&src, spec, &files).await?,
        Format::Arrow => plan_arrow(&src, spec, &files).await?,
        Format::Libsvm => plan_libsvm(spec, &files),
    };
    if splits.len() > MAX_SPLITS {
        return Err(IngestError::Data(format!(
            "{} splits, at most {MAX_SPLITS}: raise the split size",
            splits.len()
        )));
    }
    if splits.is_empty() {
        return Err(IngestError::Data(format!("{}: no rows", spec.url)));
    }
    assign_shards(&mut splits, shards);
    Ok(Planned {
        record: ImportRecord {
            id: id.to_string(),
            dataset: dataset.to_string(),
            spec: spec.clone(),
            columns,
            shards,
            done: vec![None; splits.len()],
            splits,
            state: ImportState::Running,
            error: None,
        },
        skipped,
    })
}

/// The chosen feature columns with their kinds, and the columns left out (name, type).
type Chosen = (Vec<(String, ColumnKind)>, Vec<(String, String)>);

/// The feature columns: `spec.features` if given (each must exist), else every column but the
/// label. `kinds` gives each column's kind, `None` for a type that does not import.
fn choose_features(
    spec: &ImportSpec,
    names: &[(String, Option<ColumnKind>, String)],
    file: &str,
) -> Result<Chosen, IngestError> {
    let find = |n: &str| names.iter().find(|(c, _, _)| c == n);
    match find(&spec.label) {
        None => {
            return Err(IngestError::Data(format!(
                "{file}: label column {:?} not found",
                spec.label
            )))
        }
        Some((_, Some(ColumnKind::Number), _)) => {}
        Some((_, _, ty)) => {
            return Err(IngestError::Data(format!(
                "{file}: label column {:?} has type {ty}, not a number",
                spec.label
            )))
        }
    }
    let mut skipped = Vec::new();
    let mut out = Vec::new();
    if spec.features.is_empty() {
        for (n, kind, ty) in names.iter().filter(|(n, _, _)| *n != spec.label) {
            match kind {
                Some(k) => out.push((n.clone(), *k)),
                None => skipped.push((n.clone(), ty.clone())),
            }
        }
    } else {
        for f in &spec.features {
            match find(f) {
                _ if *f == spec.label => {
                    return Err(IngestError::Data(format!(
                        "column {f:?} is the label; it cannot also be a feature"
                    )))
                }
                None => {
                    return Err(IngestError::Data(format!(
                        "{file}: feature column {f:?} not found"
                    )))
                }
                Some((_, Some(k), _)) => out.push((f.clone(), *k)),
                Some((_, None, ty)) => {
                    return Err(IngestError::Data(format!(
                        "{file}: column {f:?} has type {ty}, which does not import (numbers, booleans, dates, timestamps and strings do)"
                    )))
                }
            }
        }
    }
    if out.is_empty() {
        return Err(IngestError::Data(format!(
            "{file}: no feature columns besides the label {:?}",
            spec.label
        )));
    }
    Ok((out, skipped))
}

fn parquet_error(file: &str, e: parquet::errors::ParquetError) -> IngestError {
    match e {
        parquet::errors::ParquetError::External(inner) => IngestError::Source {
            url: file.to_string(),
            reason: inner.to_string(),
        },
        other => IngestError::Data(format!("{file}: not a readable Parquet file: {other}")),
    }
}

/// Opens a Parquet file's reader (reads its footer).
pub(crate) async fn parquet_builder(
    src: &Source,
    path: &str,
) -> Result<ParquetRecordBatchStreamBuilder<ParquetObjectReader>, IngestError> {
    let reader = ParquetObjectReader::new(src.store().clone(), src.path_of(path));
    ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .map_err(|e| parquet_error(&src.display(path), e))
}

type PlanParts = (Vec<ColumnPlan>, Vec<Split>, Vec<(String, String)>);

/// The columns every file of an import must share: the first file's choice, checked against
/// each later one.
#[derive(Default)]
struct SameSchema {
    chosen: Option<Chosen>,
    first_types: Vec<(String, String)>,
}

impl SameSchema {
    /// Checks file `name` (schema `schema`) against the first file (`first`).
    fn check(
        &mut self,
        spec: &ImportSpec,
        schema: &arrow_schema::Schema,
        name: &str,
        first: &str,
    ) -> Result<(), IngestError> {
        let names: Vec<(String, Option<ColumnKind>, String)> = schema
            .fields()
            .iter()
            .map(|f| {
                (
                    f.name().clone(),
                    columns::kind_of(f.data_type()),
                    f.data_type().to_string(),
                )
            })
            .collect();
        let (features, skipped) = choose_features(spec, &names, name)?;
        let types: Vec<(String, String)> = features
            .iter()
            .map(|(n, k)| (n.clone(), format!("{k:?}")))
            .collect();
        match &self.chosen {
            None => {
                self.first_types = types;
                self.chosen = Some((features, skipped));
            }
            Some(_) if types != self.first_types => {
                return Err(IngestError::Data(format!(
                    "{name}: its columns differ from {first}'s (every file of an import needs the same schema)"
                )))
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// The output columns (string columns one-hot or hashed by what `scan` found) and the
    /// columns left out.
    async fn finish(
        self,
        spec: &ImportSpec,
        scan: impl AsyncFnOnce(&[&str]) -> Result<Categories, IngestError>,
    ) -> Result<(Vec<ColumnPlan>, Vec<(String, String)>), IngestError> {
        let Some((features, skipped)) = self.chosen else {
            return Err(IngestError::NoFiles {
                url: spec.url.clone(),
            });
        };
        let text: Vec<&str> = features
            .iter()
            .filter(|(_, k)| *k == ColumnKind::Text)
            .map(|(n, _)| n.as_str())
            .collect();
        let categories = scan(&text).await?;
        let columns = features
            .into_iter()
            .map(|(name, kind)| match kind {
                ColumnKind::Number => ColumnPlan::Numeric { name },
                ColumnKind::Text => match categories.iter().find(|(n, _)| *n == name) {
                    Some((_, Some(values))) => ColumnPlan::OneHot {
                        name,
                        values: values.iter().cloned().collect(),
                    },
                    _ => ColumnPlan::Hashed {
                        name,
                        buckets: spec.hash_buckets.max(1),
                    },
                },
            })
            .collect();
        Ok((columns, skipped))
    }
}

/// Per string column, its distinct values if there are at most `max_categories` (`None`:
/// more, so it is hashed).
type Categories = Vec<(String, Option<BTreeSet<String>>)>;

/// Consecutive units (row groups, record batches) of `sizes` bytes, up to `split_bytes` each
/// (at least one unit a split): `(first, count, bytes)`.
fn group_units(sizes: &[u64], split_bytes: u64) -> Vec<(u32, u32, u64)> {
    let mut out = Vec::new();
    let mut first = 0usize;
    while first < sizes.len() {
        let (mut count, mut bytes) = (0usize, 0u64);
        while let Some(&b) = sizes.get(first + count) {
            if count > 0 && bytes + b > split_bytes {
                break;
            }
            bytes += b;
            count += 1;
        }
        out.push((first as u32, count as u32, bytes));
        first += count;
    }
    out
}

async fn plan_parquet(
    src: &Source,
    spec: &ImportSpec,
    files: &[SourceFile],
) -> Result<PlanParts, IngestError> {
    let mut splits = Vec::new();
    let mut schema = SameSchema::default();
    let first = files
        .first()
        .map(|f| src.display(&f.path))
        .unwrap_or_default();
    for file in files {
        let name = src.display(&file.path);
        let builder = parquet_builder(src, &file.path).await?;
        schema.check(spec, builder.schema(), &name, &first)?;
        // Whole row groups, consecutive, up to the split size (at least one each).
        let groups = builder.metadata().row_groups();
        let sizes: Vec<u64> = groups
            .iter()
            .map(|g| g.compressed_size().max(0) as u64)
            .collect();
        for (first, count, bytes) in group_units(&sizes, spec.split_bytes) {
            let rows: i64 = groups
                .iter()
                .skip(first as usize)
                .take(count as usize)
                .map(|g| g.num_rows())
                .sum();
            if rows > 0 {
                splits.push(Split {
                    file: file.path.clone(),
                    unit: SplitUnit::RowGroups { first, count },
                    shard: 0,
                    bytes,
                });
            }
        }
    }
    let (columns, skipped) = schema
        .finish(spec, async |text: &[&str]| {
            scan_categories(src, files, text, spec.max_categories).await
        })
        .await?;
    Ok((columns, splits, skipped))
}

async fn plan_arrow(
    src: &Source,
    spec: &ImportSpec,
    files: &[SourceFile],
) -> Result<PlanParts, IngestError> {
    let mut splits = Vec::new();
    let mut schema = SameSchema::default();
    let first = files
        .first()
        .map(|f| src.display(&f.path))
        .unwrap_or_default();
    for file in files {
        let name = src.display(&file.path);
        let af = ArrowFile::open(src, &file.path, file.size).await?;
        schema.check(spec, af.schema(), &name, &first)?;
        let sizes: Vec<u64> = (0..af.batches()).map(|i| af.batch_bytes(i)).collect();
        for (first, count, bytes) in group_units(&sizes, spec.split_bytes) {
            splits.push(Split {
                file: file.path.clone(),
                unit: SplitUnit::RowGroups { first, count },
                shard: 0,
                bytes,
            });
        }
    }
    let (columns, skipped) = schema
        .finish(spec, async |text: &[&str]| {
            let mut out = new_categories(text, spec.max_categories);
            if text.is_empty() || spec.max_categories == 0 {
                return Ok(out);
            }
            for file in files {
                let name = src.display(&file.path);
                let af = ArrowFile::open(src, &file.path, file.size).await?;
                for i in 0..af.batches() {
                    if out.iter().all(|(_, v)| v.is_none()) {
                        return Ok(out);
                    }
                    let batch = af.batch(src, i).await?;
                    add_categories(&mut out, &batch, &name, spec.max_categories)?;
                }
            }
            Ok(out)
        })
        .await?;
    Ok((columns, splits, skipped))
}

/// No values seen yet for each of `text` (`None` at once when `max` is 0: always hashed).
fn new_categories(text: &[&str], max: u32) -> Categories {
    text.iter()
        .map(|n| (n.to_string(), (max > 0).then(BTreeSet::new)))
        .collect()
}

/// Adds the values of `batch`'s string columns; a column past `max` values becomes `None`.
fn add_categories(
    out: &mut Categories,
    batch: &arrow_array::RecordBatch,
    name: &str,
    max: u32,
) -> Result<(), IngestError> {
    for (col, values) in out.iter_mut() {
        let (Some(set), Some(a)) = (values.as_mut(), batch.column_by_name(col)) else {
            continue;
        };
        for v in columns::strings(a)
            .map_err(|e| IngestError::Data(format!("{name}: column {col:?}: {e}")))?
            .into_iter()
            .flatten()
        {
            set.insert(v);
            if set.len() > max as usize {
                break;
            }
        }
        if set.len() > max as usize {
            *values = None;
        }
    }
    Ok(())
}

/// Per string column, its distinct values if there are at most `max` of them (`None`: more,
/// so it is hashed). Reads only those columns of the Parquet files.
async fn scan_categories(
    src: &Source,
    files: &[SourceFile],
    text: &[&str],
    max: u32,
) -> Result<Categories, IngestError> {
    let mut out = new_categories(text, max);
    if text.is_empty() || max == 0 {
        return Ok(out);
    }
    for file in files {
        if out.iter().all(|(_, v)| v.is_none()) {
            break;
        }
        let name = src.display(&file.path);
        let builder = parquet_builder(src, &file.path).await?;
        let roots: Vec<usize> = builder
            .schema()
            .fields()
            .iter()
            .enumerate()
            .filter(|(_, f)| out.iter().any(|(n, v)| v.is_some() && n == f.name()))
            .map(|(i, _)| i)
            .collect();
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
        let mut stream = builder
            .with_projection(mask)
            .build()
            .map_err(|e| parquet_error(&name, e))?;
        while let Some(batch) = stream
            .try_next()
            .await
            .map_err(|e| parquet_error(&name, e))?
        {
            add_categories(&mut out, &batch, &name, max)?;
        }
    }
    Ok(out)
}

/// A CSV file's header (column names) and where its data starts.
pub(crate) async fn csv_header(
    src: &Source,
    file: &SourceFile,
) -> Result<(Vec<String>, u64), IngestError> {
    let name = src.display(&file.path);
    let head = src
        .read_range(&file.path, 0, file.size.min(MAX_HEADER))
        .await?;
    let Some(nl) = head.iter().position(|&b| b == b'\n') else {
        if file.size > MAX_HEADER {
            return Err(IngestError::Data(format!(
                "{name}: header line longer than {MAX_HEADER} bytes"
            )));
        }
        return Err(IngestError::Data(format!(
            "{name}: no data rows after the header"
        )));
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(&head[..nl]);
    let record = reader
        .byte_records()
        .next()
        .transpose()
        .map_err(|e| IngestError::Data(format!("{name}: header: {e}")))?
        .unwrap_or_default();
    let names: Vec<String> = record
        .iter()
        .map(|c| String::from_utf8_lossy(c).trim().to_string())
        .collect();
    if names.iter().any(String::is_empty) {
        return Err(IngestError::Data(format!(
            "{name}: a header column has no name"
        )));
    }
    if names
        .iter()
        .all(|n| crate::dataset::parse_f32(n.as_bytes()).is_some())
    {
        return Err(IngestError::Data(format!(
            "{name}: no header row (the first row is all numbers)"
        )));
    }
    Ok((names, nl as u64 + 1))
}

async fn plan_csv(
    src: &Source,
    spec: &ImportSpec,
    files: &[SourceFile],
) -> Result<PlanParts, IngestError> {
    let mut splits = Vec::new();
    let mut header0: Option<Vec<String>> = None;
    let mut chosen = None;
    for file in files {
        let name = src.display(&file.path);
        let (header, data_start) = csv_header(src, file).await?;
        match &header0 {
            None => {
                let names: Vec<(String, Option<ColumnKind>, String)> = header
                    .iter()
                    .map(|n| (n.clone(), Some(ColumnKind::Number), "number".to_string()))
                    .collect();
                chosen = Some(choose_features(spec, &names, &name)?);
                header0 = Some(header);
            }
            Some(h) if *h != header => {
                return Err(IngestError::Data(format!(
                    "{name}: its header differs from {}'s (every file of an import needs the same columns)",
                    src.display(&files[0].path)
                )))
            }
            Some(_) => {}
        }
        let step = spec.split_bytes.max(1);
        let mut start = data_start;
        while start < file.size {
            let end = (start + step).min(file.size);
            splits.push(Split {
                file: file.path.clone(),
                unit: SplitUnit::Bytes { start, end },
                shard: 0,
                bytes: end - start,
            });
            start = end;
        }
    }
    let Some((features, skipped)) = chosen else {
        return Err(IngestError::NoFiles {
            url: spec.url.clone(),
        });
    };
    let columns = features
        .into_iter()
        .map(|(name, _)| ColumnPlan::Numeric { name })
        .collect();
    Ok((columns, splits, skipped))
}

/// libsvm: byte ranges of whole lines, no header; one sparse column plan (the column count is
/// the widest split's, known once every split is read).
fn plan_libsvm(spec: &ImportSpec, files: &[SourceFile]) -> PlanParts {
    let step = spec.split_bytes.max(1);
    let mut splits = Vec::new();
    for file in files {
        let mut start = 0;
        while start < file.size {
            let end = (start + step).min(file.size);
            splits.push(Split {
                file: file.path.clone(),
                unit: SplitUnit::Bytes { start, end },
                shard: 0,
                bytes: end - start,
            });
            start = end;
        }
    }
    let columns = vec![ColumnPlan::Sparse {
        name: "libsvm".to_string(),
    }];
    (columns, splits, Vec::new())
}
