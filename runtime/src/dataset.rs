//! The dataset layer's pure core: CSV parsing into a numeric [`Table`], partitioning rows onto
//! shards, the binary partition format (read in place, no copy), and a seeded synthetic generator.
//!
//! No I/O beyond the `std::io::Read` handed to [`parse_csv`]; no clocks, no global RNG. Storage of
//! the encoded partitions belongs to the storage layer.
//!
//! # Partition format (version 1, little-endian)
//!
//! ```text
//! offset  size  field
//!      0     4  magic b"TDDS"
//!      4     2  version (1)
//!      6     2  flags (0: dense rows, below; 1: compressed sparse rows, see crate::csr)
//!      8     8  rows
//!     16     4  features (columns per row)
//!     20     4  reserved (0; any other value is refused)
//!     24     8  checksum: xxh3_64 (seed 0) of bytes 0..24 followed by the body
//!     32        body, each section zero-padded to a multiple of 8 bytes:
//!               row ids  u64 x rows
//!               labels   f32 x rows
//!               features f32 x rows x features, row-major
//! ```
//!
//! (The body of a sparse partition, flag 1, is laid out in [`crate::csr`].)
//!
//! The checksum also covers the header fields before it, so a corrupted `rows` / `features` pair
//! that happens to give the same total length is still caught. Every section starts 8-aligned
//! relative to the start of the buffer, so a buffer that starts 8-aligned can be viewed in place
//! ([`PartitionView::parse`]); [`PartitionBuf`] copies once into an aligned buffer otherwise.
//!
//! The host must be little-endian (the codec module refuses to compile otherwise).

use std::collections::HashSet;
use std::io::Read;

use xxhash_rust::xxh3::Xxh3;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::csr::{SparsePartition, SparseView, FLAG_CSR};
use crate::placement::shard_for_key;

/// Default cap on the cells (features plus label, times rows) [`parse_csv`] accepts: 50 M cells,
/// about 200 MB of f32s.
pub const MAX_CELLS: usize = 50_000_000;

/// Largest partition object an import writes (client upload or cluster-side read); a larger
/// partition is split into segments of at most this size.
pub const SEGMENT_BYTES: usize = 8 << 20;

/// Magic bytes at the start of every encoded partition.
pub const MAGIC: [u8; 4] = *b"TDDS";
/// The partition format version this module writes and reads.
pub const VERSION: u16 = 1;
/// Size of the fixed partition header in bytes.
pub const HEADER_LEN: usize = 32;
/// Offset of the checksum field inside the header; the checksum covers the bytes before it.
pub(crate) const CHECKSUM_OFFSET: usize = 24;
/// Longest cell text quoted back in an error message.
const MAX_ERROR_TEXT: usize = 48;

/// Why a CSV was refused or partition bytes could not be read. CSV errors name the 1-based line
/// (as counted by the CSV reader: the line a record starts on); nothing was produced.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DatasetError {
    /// The input had no records at all.
    #[error("line {line}: empty file")]
    Empty {
        /// Always 1.
        line: u64,
    },
    /// The first record looks like data (every cell is a number), not a header.
    #[error("line {line}: no header row (the first row is all numbers)")]
    NoHeader {
        /// Line of the first record.
        line: u64,
    },
    /// A header cell is empty.
    #[error("line {line}: column {column} has an empty name")]
    EmptyColumnName {
        /// Header line.
        line: u64,
        /// 1-based column position.
        column: usize,
    },
    /// Two header cells have the same name.
    #[error("line {line}: duplicate column name {name:?}")]
    DuplicateColumn {
        /// Header line.
        line: u64,
        /// The repeated name.
        name: String,
    },
    /// The requested label column is not in the header.
    #[error("line {line}: label column {label:?} not in the header")]
    MissingLabel {
        /// Header line.
        line: u64,
        /// The requested label column.
        label: String,
    },
    /// The header has only the label column.
    #[error("line {line}: no feature columns besides the label {label:?}")]
    NoFeatures {
        /// Header line.
        line: u64,
        /// The label column.
        label: String,
    },
    /// A header but no data rows.
    #[error("line {line}: no data rows after the header")]
    NoRows {
        /// The line after the header.
        line: u64,
    },
    /// A row has a different number of fields than the header.
    #[error("line {line}: ragged row: expected {expected} fields, got {got}")]
    Ragged {
        /// The row's line.
        line: u64,
        /// Header field count.
        expected: usize,
        /// This row's field count.
        got: usize,
    },
    /// A cell is not a number.
    #[error("line {line}: column {column:?}: not a number: {text:?}")]
    NonNumeric {
        /// The row's line.
        line: u64,
        /// Column name.
        column: String,
        /// The cell text (shortened if long).
        text: String,
    },
    /// A cell is NaN or infinite (or overflows f32).
    #[error("line {line}: column {column:?}: NaN or infinite values are refused: {text:?}")]
    NonFinite {
        /// The row's line.
        line: u64,
        /// Column name.
        column: String,
        /// The cell text (shortened if long).
        text: String,
    },
    /// The table would exceed the cell cap.
    #[error("line {line}: too large: more than {max_cells} cells")]
    TooLarge {
        /// The row that crossed the cap.
        line: u64,
        /// The cap.
        max_cells: usize,
    },
    /// The CSV reader itself failed (I/O error, invalid UTF-8 in the header, bad quoting).
    #[error("line {line}: {reason}")]
    Csv {
        /// Best known line.
        line: u64,
        /// The reader's message.
        reason: String,
    },
    /// Partition bytes shorter than the header.
    #[error("partition truncated: {got} bytes, the header alone needs {HEADER_LEN}")]
    Truncated {
        /// Bytes given.
        got: usize,
    },
    /// The magic is not `TDDS`.
    #[error("not a tidepool partition (bad magic {found:?})")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// A version this build does not read.
    #[error("unsupported partition version {0} (this build reads {VERSION})")]
    UnsupportedVersion(u16),
    /// Unknown flag bits or a non-zero reserved field.
    #[error("unsupported partition header: flags {flags:#06x}, reserved {reserved:#010x}")]
    UnsupportedHeader {
        /// The flags field.
        flags: u16,
        /// The reserved field.
        reserved: u32,
    },
    /// The header's counts describe a partition larger than memory can address.
    #[error("partition header counts overflow: {rows} rows x {features} features")]
    SizeOverflow {
        /// Header rows.
        rows: u64,
        /// Header features.
        features: u32,
    },
    /// The byte length does not match the header's counts.
    #[error("partition length {got} bytes, header says {expected}")]
    LengthMismatch {
        /// Length implied by the header.
        expected: u64,
        /// Bytes given.
        got: usize,
    },
    /// The checksum does not match: the bytes are corrupt.
    #[error("partition checksum mismatch: header {expected:#018x}, computed {actual:#018x}")]
    Checksum {
        /// Stored checksum.
        expected: u64,
        /// Computed checksum.
        actual: u64,
    },
    /// Padding bytes are not zero.
    #[error("partition padding is not zero")]
    NonZeroPadding,
    /// A sparse (CSR) partition breaks the CSR invariants ([`crate::csr`]).
    #[error("sparse partition: {0}")]
    Csr(String),
    /// A sparse partition where dense rows are needed.
    #[error("a sparse (CSR) partition where dense rows are needed")]
    SparseNotDense,
    /// The buffer does not start 8-aligned, so it cannot be viewed in place; use [`PartitionBuf`].
    #[error("partition bytes are not 8-byte aligned; copy them with PartitionBuf::from_bytes")]
    Misaligned,
    /// [`Partition::new`] got vectors whose lengths do not fit together.
    #[error("partition shape mismatch: {row_ids} row ids, {labels} labels, {values} values, {features} features")]
    Shape {
        /// Row id count.
        row_ids: usize,
        /// Label count.
        labels: usize,
        /// Feature value count.
        values: usize,
        /// Features per row.
        features: usize,
    },
}

/// A numeric table: feature columns plus one label column, in memory, row-major.
///
/// Invariants (kept by [`parse_csv`] and [`synthetic`]; check with [`Table::check`] after
/// building one by hand): `x.len() == rows * features.len()`, `y.len() == rows`, all finite.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Feature column names, in file order, label excluded.
    pub features: Vec<String>,
    /// Label column name.
    pub label: String,
    /// Row count.
    pub rows: usize,
    /// Feature values, row-major: row `i` is `x[i * features.len()..(i + 1) * features.len()]`.
    pub x: Vec<f32>,
    /// Labels (class ids or regression targets), one per row.
    pub y: Vec<f32>,
}

impl Table {
    /// Row `i`'s features, or `None` past the end.
    pub fn row(&self, i: usize) -> Option<&[f32]> {
        let nf = self.features.len();
        let start = i.checked_mul(nf)?;
        if i >= self.rows {
            return None;
        }
        self.x.get(start..start.checked_add(nf)?)
    }

    /// Whether the shape invariants hold.
    pub fn check(&self) -> Result<(), DatasetError> {
        let shape_ok = self.rows.checked_mul(self.features.len()) == Some(self.x.len())
            && self.y.len() == self.rows;
        if shape_ok {
            Ok(())
        } else {
            Err(DatasetError::Shape {
                row_ids: self.rows,
                labels: self.y.len(),
                values: self.x.len(),
                features: self.features.len(),
            })
        }
    }
}

/// Parses a CSV with a header row into a [`Table`], with the default cap of [`MAX_CELLS`].
///
/// Every column must be numeric (f32, finite); `label` names the label column, the others are
/// features in file order. Fields are trimmed; blank lines are skipped.
pub fn parse_csv(reader: impl Read, label: &str) -> Result<Table, DatasetError> {
    parse_csv_with_limit(reader, label, MAX_CELLS)
}

/// [`parse_csv`] with an explicit cap on `rows * (features + 1)`.
pub fn parse_csv_with_limit(
    reader: impl Read,
    label: &str,
    max_cells: usize,
) -> Result<Table, DatasetError> {
    let mut rows_in = CsvRows::new(reader, label)?;
    let width = rows_in.features().len() + 1;
    if width > max_cells {
        return Err(DatasetError::TooLarge {
            line: rows_in.header_line,
            max_cells,
        });
    }
    let mut x = Vec::new();
    let mut y = Vec::new();
    let mut rows = 0usize;
    let mut row = Vec::with_capacity(width);
    while let Some(label) = rows_in.next_row(&mut row)? {
        let cells = rows.saturating_add(1).saturating_mul(width);
        if cells > max_cells {
            return Err(DatasetError::TooLarge {
                line: rows_in.line(),
                max_cells,
            });
        }
        x.extend_from_slice(&row);
        y.push(label);
        rows += 1;
    }
    if rows == 0 {
        return Err(DatasetError::NoRows {
            line: rows_in.header_line + 1,
        });
    }
    Ok(Table {
        features: rows_in.features,
        label: rows_in.label,
        rows,
        x,
        y,
    })
}

/// A CSV read row by row, with the checks of [`parse_csv`] (header, widths, numbers), holding
/// one record at a time: what a streamed import reads a file of any size through.
#[derive(Debug)]
pub struct CsvRows<R: Read> {
    rdr: csv::Reader<LineCounter<R>>,
    record: csv::ByteRecord,
    last_line: u64,
    header_line: u64,
    /// Every column name in file order (for errors).
    names: Vec<String>,
    features: Vec<String>,
    label: String,
    label_idx: usize,
}

impl<R: Read> CsvRows<R> {
    /// Reads and checks the header; `label` names the label column.
    pub fn new(reader: R, label: &str) -> Result<Self, DatasetError> {
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(LineCounter::new(reader));
        let mut record = csv::ByteRecord::new();
        let mut last_line = 1u64;
        if !read_record(&mut rdr, &mut record, &mut last_line)? {
            return Err(DatasetError::Empty { line: 1 });
        }
        let header_line = last_line;
        let mut names = Vec::with_capacity(record.len());
        for field in record.iter() {
            let name = std::str::from_utf8(field).map_err(|e| DatasetError::Csv {
                line: header_line,
                reason: format!("header is not UTF-8: {e}"),
            })?;
            names.push(name.to_owned());
        }
        if names.iter().all(|n| parse_f32(n.as_bytes()).is_some()) {
            return Err(DatasetError::NoHeader { line: header_line });
        }
        let mut seen = HashSet::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            if name.is_empty() {
                return Err(DatasetError::EmptyColumnName {
                    line: header_line,
                    column: i + 1,
                });
            }
            if !seen.insert(name.as_str()) {
                return Err(DatasetError::DuplicateColumn {
                    line: header_line,
                    name: name.clone(),
                });
            }
        }
        let label_idx =
            names
                .iter()
                .position(|n| n == label)
                .ok_or_else(|| DatasetError::MissingLabel {
                    line: header_line,
                    label: label.to_owned(),
                })?;
        if names.len() < 2 {
            return Err(DatasetError::NoFeatures {
                line: header_line,
                label: label.to_owned(),
            });
        }
        let mut features = names.clone();
        let label = features.remove(label_idx);
        Ok(CsvRows {
            rdr,
            record,
            last_line,
            header_line,
            names,
            features,
            label,
            label_idx,
        })
    }

    /// Feature column names, in file order.
    pub fn features(&self) -> &[String] {
        &self.features
    }

    /// The label column's name.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The line of the last record read.
    pub fn line(&self) -> u64 {
        self.last_line
    }

    /// The next row: its label, with its features in `x` (replacing what was there); `None` at
    /// the end.
    pub fn next_row(&mut self, x: &mut Vec<f32>) -> Result<Option<f32>, DatasetError> {
        if !read_record(&mut self.rdr, &mut self.record, &mut self.last_line)? {
            return Ok(None);
        }
        let line = self.last_line;
        let width = self.names.len();
        if self.record.len() != width {
            return Err(DatasetError::Ragged {
                line,
                expected: width,
                got: self.record.len(),
            });
        }
        x.clear();
        let mut label = 0.0;
        for (col, field) in self.record.iter().enumerate() {
            let value = parse_cell(field, line, &self.names, col)?;
            if col == self.label_idx {
                label = value;
            } else {
                x.push(value);
            }
        }
        Ok(Some(label))
    }
}

/// Reads the next record; `false` at the end. Tracks the line for error messages.
fn read_record<R: Read>(
    rdr: &mut csv::Reader<LineCounter<R>>,
    record: &mut csv::ByteRecord,
    last_line: &mut u64,
) -> Result<bool, DatasetError> {
    match rdr.read_byte_record(record) {
        Ok(more) => {
            if let Some(pos) = record.position() {
                *last_line = rdr.get_ref().line_at(pos.byte());
            }
            Ok(more)
        }
        Err(e) => {
            let line = e
                .position()
                .map_or(*last_line + 1, |pos| rdr.get_ref().line_at(pos.byte()));
            Err(DatasetError::Csv {
                line,
                reason: e.to_string(),
            })
        }
    }
}

/// Counts lines by byte offset, because the csv reader's own line count skips blank lines.
/// Keeps only the newline offsets read ahead of the current record (bounded by the csv reader's
/// buffer), so memory does not grow with the file.
#[derive(Debug)]
struct LineCounter<R> {
    inner: R,
    read: u64,
    state: std::cell::RefCell<LineState>,
}

#[derive(Debug, Default)]
struct LineState {
    /// Offsets of `\n` and `\r` bytes read but not yet passed by a record start.
    pending: std::collections::VecDeque<(u64, u8)>,
    /// Newlines before the last queried offset.
    passed: u64,
}

impl<R> LineCounter<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            read: 0,
            state: std::cell::RefCell::default(),
        }
    }

    /// 1-based line of the record starting at byte `offset`. The csv reader reports a record
    /// after blank lines as starting at the first of them, so line terminators at the start are
    /// skipped. Offsets must be queried in non-decreasing order.
    fn line_at(&self, offset: u64) -> u64 {
        let mut st = self.state.borrow_mut();
        let mut offset = offset;
        while let Some(&(at, byte)) = st.pending.front() {
            if at > offset {
                break;
            }
            if at == offset {
                offset += 1;
            }
            st.pending.pop_front();
            if byte == b'\n' {
                st.passed += 1;
            }
        }
        st.passed + 1
    }
}

impl<R: Read> Read for LineCounter<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let st = self.state.get_mut();
        for (i, &b) in buf.get(..n).unwrap_or_default().iter().enumerate() {
            if b == b'\n' || b == b'\r' {
                st.pending.push_back((self.read + i as u64, b));
            }
        }
        self.read += n as u64;
        Ok(n)
    }
}

pub(crate) fn parse_f32(field: &[u8]) -> Option<f32> {
    std::str::from_utf8(field).ok()?.parse::<f32>().ok()
}

fn parse_cell(field: &[u8], line: u64, names: &[String], col: usize) -> Result<f32, DatasetError> {
    let column = || names.get(col).cloned().unwrap_or_default();
    let text = || {
        let s = String::from_utf8_lossy(field);
        s.chars().take(MAX_ERROR_TEXT).collect::<String>()
    };
    match parse_f32(field) {
        Some(v) if v.is_finite() => Ok(v),
        Some(_) => Err(DatasetError::NonFinite {
            line,
            column: column(),
            text: text(),
        }),
        None => Err(DatasetError::NonNumeric {
            line,
            column: column(),
            text: text(),
        }),
    }
}

/// One shard's rows of a table, in original row order, with their original row ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    features: usize,
    row_ids: Vec<u64>,
    y: Vec<f32>,
    x: Vec<f32>,
}

impl Partition {
    /// Builds a partition, checking `y.len() == row_ids.len()` and
    /// `x.len() == row_ids.len() * features`.
    pub fn new(
        features: usize,
        row_ids: Vec<u64>,
        y: Vec<f32>,
        x: Vec<f32>,
    ) -> Result<Self, DatasetError> {
        let ok = y.len() == row_ids.len()
            && row_ids.len().checked_mul(features) == Some(x.len())
            && u32::try_from(features).is_ok();
        if !ok {
            return Err(DatasetError::Shape {
                row_ids: row_ids.len(),
                labels: y.len(),
                values: x.len(),
                features,
            });
        }
        Ok(Self {
            features,
            row_ids,
            y,
            x,
        })
    }

    /// Features per row.
    pub fn n_features(&self) -> usize {
        self.features
    }
    /// Row count.
    pub fn rows(&self) -> usize {
        self.row_ids.len()
    }
    /// Original row ids (0-based line order of the data rows in the table).
    pub fn row_ids(&self) -> &[u64] {
        &self.row_ids
    }
    /// Labels, one per row.
    pub fn labels(&self) -> &[f32] {
        &self.y
    }
    /// Feature values, row-major.
    pub fn features(&self) -> &[f32] {
        &self.x
    }
}

/// Splits `table` into `max(shards, 1)` partitions; element `s` is shard `s`.
///
/// Row `i` goes to `placement::shard_for_key(&(i as u64).to_le_bytes(), shards)`: a function of
/// the row id and the (fixed) shard count only, never of the nodes, so every node computes the
/// same partitions. Rows keep their table order within a shard. A table that breaks its shape
/// invariants is cut to the rows fully present (see [`Table::check`]).
pub fn partition(table: &Table, shards: u32) -> Vec<Partition> {
    let n = shards.max(1);
    let nf = table.features.len();
    let mut parts: Vec<Partition> = (0..n)
        .map(|_| Partition {
            features: nf,
            row_ids: Vec::new(),
            y: Vec::new(),
            x: Vec::new(),
        })
        .collect();
    for i in 0..table.rows {
        let (Some(row), Some(&label)) = (table.row(i), table.y.get(i)) else {
            break;
        };
        let id = i as u64;
        let shard = shard_of_row(id, n) as usize;
        if let Some(p) = parts.get_mut(shard) {
            p.row_ids.push(id);
            p.y.push(label);
            p.x.extend_from_slice(row);
        }
    }
    parts
}

/// The shard row `id` of an uploaded table belongs to (of `shards`).
pub fn shard_of_row(id: u64, shards: u32) -> u32 {
    shard_for_key(&id.to_le_bytes(), shards.max(1))
}

/// The fixed 32-byte partition header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub(crate) struct Header {
    pub(crate) magic: [u8; 4],
    pub(crate) version: U16,
    pub(crate) flags: U16,
    pub(crate) rows: U64,
    pub(crate) features: U32,
    pub(crate) reserved: U32,
    pub(crate) checksum: U64,
}

const _: () = assert!(size_of::<Header>() == HEADER_LEN);

/// Byte ranges of the sections, computed with checked arithmetic from the header counts.
#[derive(Debug, Clone, Copy)]
struct Layout {
    rows: usize,
    features: usize,
    ids_end: usize,
    labels_start: usize,
    labels_end: usize,
    feats_start: usize,
    feats_end: usize,
    total: usize,
}

pub(crate) fn pad8(n: usize) -> Option<usize> {
    n.checked_add(7).map(|v| v & !7)
}

impl Layout {
    fn new(rows: u64, features: u32) -> Option<Self> {
        let r = usize::try_from(rows).ok()?;
        let f = usize::try_from(features).ok()?;
        let ids_end = HEADER_LEN.checked_add(r.checked_mul(8)?)?;
        let labels_start = ids_end;
        let labels_end = labels_start.checked_add(r.checked_mul(4)?)?;
        let feats_start = pad8(labels_end)?;
        let feats_end = feats_start.checked_add(r.checked_mul(f)?.checked_mul(4)?)?;
        let total = pad8(feats_end)?;
        // Vec and slice lengths may not exceed isize::MAX bytes.
        if total > isize::MAX as usize {
            return None;
        }
        Some(Self {
            rows: r,
            features: f,
            ids_end,
            labels_start,
            labels_end,
            feats_start,
            feats_end,
            total,
        })
    }
}

pub(crate) fn checksum(bytes_before_checksum: &[u8], body: &[u8]) -> u64 {
    let mut h = Xxh3::new();
    h.update(bytes_before_checksum);
    h.update(body);
    h.digest()
}

/// Encodes a partition in the binary format (see the module docs).
pub fn encode_partition(p: &Partition) -> Vec<u8> {
    let rows = p.row_ids.len();
    // Partition::new and partition() keep features within u32 and the shape consistent, so the
    // layout exists for any partition that fits in memory.
    let features = u32::try_from(p.features).unwrap_or(u32::MAX);
    let total = Layout::new(rows as u64, features).map_or(0, |l| l.total);
    let mut out = Vec::with_capacity(total);
    let header = Header {
        magic: MAGIC,
        version: U16::new(VERSION),
        flags: U16::new(0),
        rows: U64::new(rows as u64),
        features: U32::new(features),
        reserved: U32::new(0),
        checksum: U64::new(0),
    };
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(p.row_ids.as_bytes());
    out.extend_from_slice(p.y.as_bytes());
    out.resize(pad8(out.len()).unwrap_or(out.len()), 0);
    out.extend_from_slice(p.x.as_bytes());
    out.resize(pad8(out.len()).unwrap_or(out.len()), 0);
    let (head, body) = out.split_at(HEADER_LEN);
    let sum = checksum(head.get(..CHECKSUM_OFFSET).unwrap_or_default(), body);
    if let Some(slot) = out.get_mut(CHECKSUM_OFFSET..HEADER_LEN) {
        slot.copy_from_slice(&sum.to_le_bytes());
    }
    out
}

/// Reads the header and checks magic, version, flags (dense or [`FLAG_CSR`]) and the reserved
/// field.
fn read_header(bytes: &[u8]) -> Result<Header, DatasetError> {
    let (header, _) = Header::read_from_prefix(bytes)
        .map_err(|_| DatasetError::Truncated { got: bytes.len() })?;
    if header.magic != MAGIC {
        return Err(DatasetError::BadMagic {
            found: header.magic,
        });
    }
    if header.version.get() != VERSION {
        return Err(DatasetError::UnsupportedVersion(header.version.get()));
    }
    if !matches!(header.flags.get(), 0 | FLAG_CSR) || header.reserved.get() != 0 {
        return Err(DatasetError::UnsupportedHeader {
            flags: header.flags.get(),
            reserved: header.reserved.get(),
        });
    }
    Ok(header)
}

/// Checks everything but alignment and the checksum: length, magic, version, flags, counts.
fn validate_layout(bytes: &[u8]) -> Result<(Header, Layout), DatasetError> {
    let header = read_header(bytes)?;
    if header.flags.get() == FLAG_CSR {
        return Err(DatasetError::SparseNotDense);
    }
    let rows = header.rows.get();
    let features = header.features.get();
    let layout =
        Layout::new(rows, features).ok_or(DatasetError::SizeOverflow { rows, features })?;
    if layout.total != bytes.len() {
        return Err(DatasetError::LengthMismatch {
            expected: layout.total as u64,
            got: bytes.len(),
        });
    }
    Ok((header, layout))
}

/// An encoded partition viewed in place: every accessor borrows from the input bytes.
#[derive(Debug, Clone, Copy)]
pub struct PartitionView<'a> {
    features: usize,
    row_ids: &'a [u64],
    labels: &'a [f32],
    values: &'a [f32],
}

impl<'a> PartitionView<'a> {
    /// Validates `bytes` (length, magic, version, flags, counts, alignment, checksum, zero padding)
    /// and views them without copying. `bytes` must start 8-aligned ([`DatasetError::Misaligned`]
    /// otherwise; [`PartitionBuf`] copies into aligned memory). Never panics on corrupt input.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DatasetError> {
        let (header, layout) = validate_layout(bytes)?;
        if bytes.as_ptr().align_offset(8) != 0 {
            return Err(DatasetError::Misaligned);
        }
        let body = bytes.get(HEADER_LEN..).unwrap_or_default();
        let actual = checksum(bytes.get(..CHECKSUM_OFFSET).unwrap_or_default(), body);
        if actual != header.checksum.get() {
            return Err(DatasetError::Checksum {
                expected: header.checksum.get(),
                actual,
            });
        }
        Self::from_layout(bytes, &layout)
    }

    /// [`Self::parse`] without the checksum: for bytes whose checksum was already checked (a
    /// partition file this process wrote from checked segments and mapped once).
    pub fn parse_checked_before(bytes: &'a [u8]) -> Result<Self, DatasetError> {
        let (_, layout) = validate_layout(bytes)?;
        if bytes.as_ptr().align_offset(8) != 0 {
            return Err(DatasetError::Misaligned);
        }
        Self::from_layout(bytes, &layout)
    }

    /// Slices the sections of bytes whose layout has been validated.
    fn from_layout(bytes: &'a [u8], l: &Layout) -> Result<Self, DatasetError> {
        let section = |a: usize, b: usize| {
            bytes
                .get(a..b)
                .ok_or(DatasetError::Truncated { got: bytes.len() })
        };
        let padding_zero = section(l.labels_end, l.feats_start)?
            .iter()
            .all(|&b| b == 0)
            && section(l.feats_end, l.total)?.iter().all(|&b| b == 0);
        if !padding_zero {
            return Err(DatasetError::NonZeroPadding);
        }
        let row_ids = <[u64]>::ref_from_bytes(section(HEADER_LEN, l.ids_end)?)
            .map_err(|_| DatasetError::Misaligned)?;
        let labels = <[f32]>::ref_from_bytes(section(l.labels_start, l.labels_end)?)
            .map_err(|_| DatasetError::Misaligned)?;
        let values = <[f32]>::ref_from_bytes(section(l.feats_start, l.feats_end)?)
            .map_err(|_| DatasetError::Misaligned)?;
        debug_assert_eq!(row_ids.len(), l.rows);
        Ok(Self {
            features: l.features,
            row_ids,
            labels,
            values,
        })
    }

    /// Row count.
    pub fn rows(&self) -> usize {
        self.row_ids.len()
    }
    /// Features per row.
    pub fn n_features(&self) -> usize {
        self.features
    }
    /// Original row ids.
    pub fn row_ids(&self) -> &'a [u64] {
        self.row_ids
    }
    /// Labels, one per row.
    pub fn labels(&self) -> &'a [f32] {
        self.labels
    }
    /// All feature values, row-major.
    pub fn features(&self) -> &'a [f32] {
        self.values
    }
    /// Row `i`'s features. Panics if `i >= rows()`, like slice indexing; see [`Self::get_row`].
    pub fn row(&self, i: usize) -> &'a [f32] {
        let start = i * self.features;
        &self.values[start..start + self.features]
    }
    /// Row `i`'s features, or `None` past the end.
    pub fn get_row(&self, i: usize) -> Option<&'a [f32]> {
        if i >= self.rows() {
            return None;
        }
        let start = i.checked_mul(self.features)?;
        self.values.get(start..start.checked_add(self.features)?)
    }
    /// Copies the view into an owned [`Partition`].
    pub fn to_partition(&self) -> Partition {
        Partition {
            features: self.features,
            row_ids: self.row_ids.to_vec(),
            y: self.labels.to_vec(),
            x: self.values.to_vec(),
        }
    }
}

/// Encoded partition bytes copied once into 8-aligned memory and validated, for bytes that do not
/// start aligned (for example a `bytes::Bytes` from storage at an arbitrary offset).
#[derive(Debug, Clone)]
pub struct PartitionBuf {
    words: Vec<u64>,
    len: usize,
}

impl PartitionBuf {
    /// Copies `bytes` (dense or sparse) into aligned memory and validates them as
    /// [`AnyView::parse`] does.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DatasetError> {
        // Check the header before copying: a buffer that is not a partition is not copied.
        read_header(bytes)?;
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        if let Some(dst) = words.as_mut_bytes().get_mut(..bytes.len()) {
            dst.copy_from_slice(bytes);
        }
        let buf = Self {
            words,
            len: bytes.len(),
        };
        AnyView::parse(buf.bytes())?;
        Ok(buf)
    }

    /// The encoded bytes (8-aligned).
    pub fn bytes(&self) -> &[u8] {
        self.words.as_bytes().get(..self.len).unwrap_or_default()
    }

    /// Views a dense buffer in place ([`DatasetError::SparseNotDense`] for a sparse one). Skips
    /// the checksum (checked once in [`Self::from_bytes`]); the sections are re-sliced checked.
    pub fn view(&self) -> Result<PartitionView<'_>, DatasetError> {
        let bytes = self.bytes();
        let (_, layout) = validate_layout(bytes)?;
        PartitionView::from_layout(bytes, &layout)
    }

    /// Views the buffer in place, dense or sparse (checksum checked once, in `from_bytes`).
    pub fn any_view(&self) -> Result<AnyView<'_>, DatasetError> {
        AnyView::parse_checked_before(self.bytes())
    }
}

/// Encoded partition bytes of either layout, viewed in place.
#[derive(Debug, Clone, Copy)]
pub enum AnyView<'a> {
    /// Row-major dense features.
    Dense(PartitionView<'a>),
    /// Compressed sparse rows ([`crate::csr`]).
    Sparse(SparseView<'a>),
}

impl<'a> AnyView<'a> {
    /// Validates `bytes` as [`PartitionView::parse`] does (and, for a sparse partition, the CSR
    /// invariants) and views them without copying.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DatasetError> {
        Self::parse_inner(bytes, true)
    }

    /// [`Self::parse`] without the checksum (bytes whose checksum was checked before).
    pub fn parse_checked_before(bytes: &'a [u8]) -> Result<Self, DatasetError> {
        Self::parse_inner(bytes, false)
    }

    fn parse_inner(bytes: &'a [u8], check_sum: bool) -> Result<Self, DatasetError> {
        let header = read_header(bytes)?;
        if header.flags.get() == FLAG_CSR {
            return SparseView::parse_with(bytes, &header, check_sum).map(AnyView::Sparse);
        }
        if check_sum {
            PartitionView::parse(bytes).map(AnyView::Dense)
        } else {
            PartitionView::parse_checked_before(bytes).map(AnyView::Dense)
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        match self {
            AnyView::Dense(v) => v.rows(),
            AnyView::Sparse(v) => v.rows(),
        }
    }
    /// Columns (features).
    pub fn n_features(&self) -> usize {
        match self {
            AnyView::Dense(v) => v.n_features(),
            AnyView::Sparse(v) => v.csr().columns(),
        }
    }
    /// Original row ids.
    pub fn row_ids(&self) -> &'a [u64] {
        match self {
            AnyView::Dense(v) => v.row_ids(),
            AnyView::Sparse(v) => v.row_ids(),
        }
    }
    /// Labels.
    pub fn labels(&self) -> &'a [f32] {
        match self {
            AnyView::Dense(v) => v.labels(),
            AnyView::Sparse(v) => v.labels(),
        }
    }
}

/// An owned partition of either layout.
#[derive(Debug, Clone, PartialEq)]
pub enum AnyPartition {
    Dense(Partition),
    Sparse(SparsePartition),
}

/// Ground truth of a [`synthetic`] table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticKind {
    /// `y = w . x + noise`, noise normal with standard deviation 0.1.
    Linear,
    /// `y ~ Bernoulli(sigmoid(w . x))`, labels 0 or 1.
    Logistic,
}

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny seeded generator; deterministic on every platform.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in (0, 1): 53 random bits, never 0.
    pub(crate) fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal by Box-Muller (one of the pair; simple and deterministic).
    pub(crate) fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.unit(), self.unit());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// A seeded synthetic table with a known ground truth: `rows x features` standard-normal features
/// (columns `x0..`, label `y`) and weights `w_j ~ N(0, 1) * 2 / sqrt(features)` (no bias), so
/// `w . x` has standard deviation about 2. Returns the table and `w`. Same seed, same table, on
/// every platform.
pub fn synthetic(
    rows: usize,
    features: usize,
    kind: SyntheticKind,
    seed: u64,
) -> (Table, Vec<f32>) {
    let mut rng = SplitMix64(seed);
    let scale = 2.0 / (features.max(1) as f64).sqrt();
    let weights: Vec<f32> = (0..features)
        .map(|_| (rng.normal() * scale) as f32)
        .collect();
    let mut x = Vec::with_capacity(rows.saturating_mul(features).min(1 << 28));
    let mut y = Vec::with_capacity(rows.min(1 << 28));
    for _ in 0..rows {
        let mut dot = 0.0f64;
        for w in &weights {
            let v = rng.normal() as f32;
            dot += f64::from(*w) * f64::from(v);
            x.push(v);
        }
        let label = match kind {
            SyntheticKind::Linear => dot + 0.1 * rng.normal(),
            SyntheticKind::Logistic => {
                let p = 1.0 / (1.0 + (-dot).exp());
                if rng.unit() < p {
                    1.0
                } else {
                    0.0
                }
            }
        };
        y.push(label as f32);
    }
    let table = Table {
        features: (0..features).map(|j| format!("x{j}")).collect(),
        label: "y".to_owned(),
        rows,
        x,
        y,
    };
    (table, weights)
}

/// The weights of a [`synthetic_shard`] dataset (its ground truth): `w_j ~ N(0, 1) * 2 /
/// sqrt(features)`, from `seed` alone.
pub fn synthetic_weights(features: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    let scale = 2.0 / (features.max(1) as f64).sqrt();
    (0..features)
        .map(|_| (rng.normal() * scale) as f32)
        .collect()
}

/// Shard `shard`'s rows of a synthetic table of `rows` rows generated where it is used (large
/// benchmark runs; nothing is stored): row `i` belongs to shard `i % shards` and is drawn from a
/// generator seeded by `(seed, i)`, so every shard's partition, and the whole table, depend
/// only on `(rows, features, kind, seed, shards)`. Same ground truth as [`synthetic_weights`].
pub fn synthetic_shard(
    rows: u64,
    features: usize,
    kind: SyntheticKind,
    seed: u64,
    shard: u32,
    shards: u32,
) -> Partition {
    let weights = synthetic_weights(features, seed);
    let shards = u64::from(shards.max(1));
    let ids: Vec<u64> = (u64::from(shard)..rows).step_by(shards as usize).collect();
    let mut x = Vec::with_capacity(ids.len() * features);
    let mut y = Vec::with_capacity(ids.len());
    for &i in &ids {
        let mut rng = SplitMix64(seed ^ i.wrapping_mul(0xd134_2543_de82_ef95));
        rng.next_u64();
        let mut dot = 0.0f64;
        for w in &weights {
            let v = rng.normal() as f32;
            dot += f64::from(*w) * f64::from(v);
            x.push(v);
        }
        let label = match kind {
            SyntheticKind::Linear => dot + 0.1 * rng.normal(),
            SyntheticKind::Logistic => {
                let p = 1.0 / (1.0 + (-dot).exp());
                f64::from(u8::from(rng.unit() < p))
            }
        };
        y.push(label as f32);
    }
    Partition {
        features,
        row_ids: ids,
        y,
        x,
    }
}

#[cfg(test)]
#[path = "dataset_tests.rs"]
mod tests;
