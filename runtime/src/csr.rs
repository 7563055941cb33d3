//! Sparse partitions: the partition format's compressed-sparse-row layout (header flag
//! [`FLAG_CSR`]), for data with many columns and few non-zeros per row (libsvm imports). A row
//! costs its non-zeros, not its columns.
//!
//! # Layout (after the 32-byte header of [`crate::dataset`]; `features` is the column count)
//!
//! ```text
//! row ids  u64 x rows
//! labels   f32 x rows            zero-padded to 8 bytes
//! indptr   u64 x (rows + 1)      row i's non-zeros are entries indptr[i]..indptr[i+1]
//! indices  u32 x nnz             zero-padded to 8 bytes; column of each entry
//! values   f32 x nnz             zero-padded to 8 bytes
//! ```
//!
//! `nnz = indptr[rows]`. Checked on parse (never a panic on corrupt input): `indptr[0] == 0`,
//! non-decreasing; within a row the indices strictly increase and are below `features`; every
//! value is finite. The checksum covers the header before it and the body, as for dense
//! partitions.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use crate::dataset::{
    checksum, pad8, DatasetError, Header, CHECKSUM_OFFSET, HEADER_LEN, MAGIC, VERSION,
};

/// Header flag of a CSR partition.
pub const FLAG_CSR: u16 = 1;

/// Rows in compressed sparse row form, borrowed; valid by construction ([`CsrRows::new`]).
#[derive(Debug, Clone, Copy)]
pub struct CsrRows<'a> {
    columns: usize,
    indptr: &'a [u64],
    indices: &'a [u32],
    values: &'a [f32],
}

fn bad(reason: impl Into<String>) -> DatasetError {
    DatasetError::Csr(reason.into())
}

impl<'a> CsrRows<'a> {
    /// Checks the CSR invariants (see the module docs) and borrows the arrays.
    pub fn new(
        columns: usize,
        indptr: &'a [u64],
        indices: &'a [u32],
        values: &'a [f32],
    ) -> Result<Self, DatasetError> {
        if indptr.first() != Some(&0) {
            return Err(bad("indptr must start at 0"));
        }
        if indices.len() != values.len() || indptr.last() != Some(&(indices.len() as u64)) {
            return Err(bad(format!(
                "indptr ends at {:?}, {} indices, {} values",
                indptr.last(),
                indices.len(),
                values.len()
            )));
        }
        for (row, w) in indptr.windows(2).enumerate() {
            let (a, b) = (w[0], w[1]);
            if a > b {
                return Err(bad(format!("indptr decreases at row {row}")));
            }
            let cols = indices.get(a as usize..b as usize).unwrap_or_default();
            let mut prev: Option<u32> = None;
            for &c in cols {
                if c as usize >= columns {
                    return Err(bad(format!(
                        "row {row}: column {c} out of range ({columns} columns)"
                    )));
                }
                if prev.is_some_and(|p| c <= p) {
                    return Err(bad(format!("row {row}: columns not strictly increasing")));
                }
                prev = Some(c);
            }
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!("entry {i}: value is not finite")));
        }
        Ok(Self {
            columns,
            indptr,
            indices,
            values,
        })
    }

    /// The same rows seen as `columns` wide (a segment holds only the columns it uses; a
    /// dataset has its widest split's). `None` if `columns` is narrower than the rows'.
    pub fn widen(self, columns: usize) -> Option<Self> {
        (columns >= self.columns).then_some(Self { columns, ..self })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }
    /// Columns (features).
    pub fn columns(&self) -> usize {
        self.columns
    }
    /// Stored entries (non-zeros).
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }
    /// Row pointers, `rows + 1` of them.
    pub fn indptr(&self) -> &'a [u64] {
        self.indptr
    }
    /// Column of every entry.
    pub fn indices(&self) -> &'a [u32] {
        self.indices
    }
    /// Value of every entry.
    pub fn values(&self) -> &'a [f32] {
        self.values
    }
    /// Row `i`'s columns and values (empty past the end).
    pub fn row(&self, i: usize) -> (&'a [u32], &'a [f32]) {
        let (Some(&a), Some(&b)) = (self.indptr.get(i), self.indptr.get(i + 1)) else {
            return (&[], &[]);
        };
        let r = a as usize..b as usize;
        (
            self.indices.get(r.clone()).unwrap_or_default(),
            self.values.get(r).unwrap_or_default(),
        )
    }
}

/// One shard's sparse rows, owned (built by an import, or several segments joined).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SparsePartition {
    columns: usize,
    row_ids: Vec<u64>,
    y: Vec<f32>,
    indptr: Vec<u64>,
    indices: Vec<u32>,
    values: Vec<f32>,
}

impl SparsePartition {
    /// An empty partition of `columns` columns.
    pub fn new(columns: usize) -> Self {
        Self {
            columns,
            indptr: vec![0],
            ..Self::default()
        }
    }

    /// Appends one row; `entries` must be in strictly increasing column order below
    /// [`Self::columns`] with finite values (checked).
    pub fn push(
        &mut self,
        id: u64,
        label: f32,
        cols: &[u32],
        vals: &[f32],
    ) -> Result<(), DatasetError> {
        if cols.len() != vals.len() {
            return Err(bad("columns and values differ in length"));
        }
        let ok_order = cols.windows(2).all(|w| w[0] < w[1]);
        let ok_range = cols.last().is_none_or(|&c| (c as usize) < self.columns);
        if !ok_order || !ok_range || vals.iter().any(|v| !v.is_finite()) {
            return Err(bad(format!(
                "row {id}: columns must increase, stay below {} and hold finite values",
                self.columns
            )));
        }
        self.row_ids.push(id);
        self.y.push(label);
        self.indices.extend_from_slice(cols);
        self.values.extend_from_slice(vals);
        self.indptr.push(self.indices.len() as u64);
        Ok(())
    }

    /// Narrows the column count to the largest stored column plus one (0 when nothing is
    /// stored): a segment of a libsvm split records only the columns it holds.
    pub fn fit_columns(&mut self) {
        self.columns = self.indices.iter().max().map_or(0, |&c| c as usize + 1);
    }

    /// Appends every row of `other` (its columns must fit this partition's).
    pub fn extend(&mut self, other: &SparseView<'_>) -> Result<(), DatasetError> {
        let csr = other.csr();
        if csr.columns() > self.columns {
            return Err(bad(format!(
                "a segment of {} columns joined to {}",
                csr.columns(),
                self.columns
            )));
        }
        let base = self.indices.len() as u64;
        self.row_ids.extend_from_slice(other.row_ids());
        self.y.extend_from_slice(other.labels());
        self.indices.extend_from_slice(csr.indices());
        self.values.extend_from_slice(csr.values());
        self.indptr
            .extend(csr.indptr().iter().skip(1).map(|p| p + base));
        Ok(())
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.row_ids.len()
    }
    /// Columns.
    pub fn columns(&self) -> usize {
        self.columns
    }
    /// Stored entries.
    pub fn nnz(&self) -> usize {
        self.indices.len()
    }
    /// Bytes this partition holds in memory (and, within padding, encoded).
    pub fn bytes(&self) -> usize {
        self.rows() * 20 + 8 + self.nnz() * 8
    }
    /// Row ids.
    pub fn row_ids(&self) -> &[u64] {
        &self.row_ids
    }
    /// Labels.
    pub fn labels(&self) -> &[f32] {
        &self.y
    }
    /// The rows as CSR (valid by construction).
    pub fn csr(&self) -> CsrRows<'_> {
        CsrRows {
            columns: self.columns,
            indptr: &self.indptr,
            indices: &self.indices,
            values: &self.values,
        }
    }
}

/// Byte ranges of a CSR partition's sections.
#[derive(Debug, Clone, Copy)]
struct Layout {
    ids: (usize, usize),
    labels: (usize, usize),
    indptr: (usize, usize),
    indices: (usize, usize),
    values: (usize, usize),
    total: usize,
}

impl Layout {
    fn new(rows: u64, nnz: u64) -> Option<Self> {
        let r = usize::try_from(rows).ok()?;
        let n = usize::try_from(nnz).ok()?;
        let ids = (HEADER_LEN, HEADER_LEN.checked_add(r.checked_mul(8)?)?);
        let labels = (ids.1, ids.1.checked_add(r.checked_mul(4)?)?);
        let p = pad8(labels.1)?;
        let indptr = (p, p.checked_add(r.checked_add(1)?.checked_mul(8)?)?);
        let indices = (indptr.1, indptr.1.checked_add(n.checked_mul(4)?)?);
        let v = pad8(indices.1)?;
        let values = (v, v.checked_add(n.checked_mul(4)?)?);
        let total = pad8(values.1)?;
        (total <= isize::MAX as usize).then_some(Self {
            ids,
            labels,
            indptr,
            indices,
            values,
            total,
        })
    }
}

/// Encodes a sparse partition (see the module docs).
pub fn encode_sparse(p: &SparsePartition) -> Vec<u8> {
    let rows = p.rows() as u64;
    let total = Layout::new(rows, p.nnz() as u64).map_or(0, |l| l.total);
    let mut out = Vec::with_capacity(total);
    let header = Header {
        magic: MAGIC,
        version: U16::new(VERSION),
        flags: U16::new(FLAG_CSR),
        rows: U64::new(rows),
        features: U32::new(u32::try_from(p.columns).unwrap_or(u32::MAX)),
        reserved: U32::new(0),
        checksum: U64::new(0),
    };
    let pad = |out: &mut Vec<u8>| out.resize(pad8(out.len()).unwrap_or(out.len()), 0);
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(p.row_ids.as_bytes());
    out.extend_from_slice(p.y.as_bytes());
    pad(&mut out);
    out.extend_from_slice(p.indptr.as_bytes());
    out.extend_from_slice(p.indices.as_bytes());
    pad(&mut out);
    out.extend_from_slice(p.values.as_bytes());
    pad(&mut out);
    let (head, body) = out.split_at(HEADER_LEN);
    let sum = checksum(head.get(..CHECKSUM_OFFSET).unwrap_or_default(), body);
    if let Some(slot) = out.get_mut(CHECKSUM_OFFSET..HEADER_LEN) {
        slot.copy_from_slice(&sum.to_le_bytes());
    }
    out
}

/// An encoded sparse partition viewed in place.
#[derive(Debug, Clone, Copy)]
pub struct SparseView<'a> {
    row_ids: &'a [u64],
    labels: &'a [f32],
    csr: CsrRows<'a>,
}

impl<'a> SparseView<'a> {
    /// Views `bytes` whose header (magic, version, flags) has been read as `header`; checks
    /// length, padding, alignment and the CSR invariants, and the checksum when `check_sum`.
    pub(crate) fn parse_with(
        bytes: &'a [u8],
        header: &Header,
        check_sum: bool,
    ) -> Result<Self, DatasetError> {
        let rows = header.rows.get();
        let features = header.features.get();
        let overflow = DatasetError::SizeOverflow { rows, features };
        let r = usize::try_from(rows).map_err(|_| overflow.clone())?;
        // nnz is the last row pointer: find it first (its offset depends on rows only).
        let at = pad8(HEADER_LEN + r.checked_mul(12).ok_or(overflow.clone())?)
            .and_then(|p| p.checked_add(r.checked_mul(8)?))
            .ok_or(overflow.clone())?;
        let nnz = at
            .checked_add(8)
            .and_then(|end| bytes.get(at..end))
            .and_then(|b| u64::read_from_bytes(b).ok())
            .ok_or(DatasetError::LengthMismatch {
                expected: at as u64 + 8,
                got: bytes.len(),
            })?;
        let l = Layout::new(rows, nnz).ok_or(overflow)?;
        if l.total != bytes.len() {
            return Err(DatasetError::LengthMismatch {
                expected: l.total as u64,
                got: bytes.len(),
            });
        }
        if bytes.as_ptr().align_offset(8) != 0 {
            return Err(DatasetError::Misaligned);
        }
        if check_sum {
            let body = bytes.get(HEADER_LEN..).unwrap_or_default();
            let actual = checksum(bytes.get(..CHECKSUM_OFFSET).unwrap_or_default(), body);
            if actual != header.checksum.get() {
                return Err(DatasetError::Checksum {
                    expected: header.checksum.get(),
                    actual,
                });
            }
        }
        let section = |(a, b): (usize, usize)| {
            bytes
                .get(a..b)
                .ok_or(DatasetError::Truncated { got: bytes.len() })
        };
        let zero = |a: usize, b: usize| section((a, b)).map(|s| s.iter().all(|&x| x == 0));
        if !(zero(l.labels.1, l.indptr.0)?
            && zero(l.indices.1, l.values.0)?
            && zero(l.values.1, l.total)?)
        {
            return Err(DatasetError::NonZeroPadding);
        }
        let row_ids =
            <[u64]>::ref_from_bytes(section(l.ids)?).map_err(|_| DatasetError::Misaligned)?;
        let labels =
            <[f32]>::ref_from_bytes(section(l.labels)?).map_err(|_| DatasetError::Misaligned)?;
        let indptr =
            <[u64]>::ref_from_bytes(section(l.indptr)?).map_err(|_| DatasetError::Misaligned)?;
        let indices =
            <[u32]>::ref_from_bytes(section(l.indices)?).map_err(|_| DatasetError::Misaligned)?;
        let values =
            <[f32]>::ref_from_bytes(section(l.values)?).map_err(|_| DatasetError::Misaligned)?;
        let csr = CsrRows::new(features as usize, indptr, indices, values)?;
        Ok(Self {
            row_ids,
            labels,
            csr,
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.row_ids.len()
    }
    /// Original row ids.
    pub fn row_ids(&self) -> &'a [u64] {
        self.row_ids
    }
    /// Labels.
    pub fn labels(&self) -> &'a [f32] {
        self.labels
    }
    /// The rows.
    pub fn csr(&self) -> CsrRows<'a> {
        self.csr
    }
    /// Copies the view into an owned partition.
    pub fn to_partition(&self) -> SparsePartition {
        SparsePartition {
            columns: self.csr.columns,
            row_ids: self.row_ids.to_vec(),
            y: self.labels.to_vec(),
            indptr: self.csr.indptr.to_vec(),
            indices: self.csr.indices.to_vec(),
            values: self.csr.values.to_vec(),
        }
    }
}

#[cfg(test)]
#[path = "csr_tests.rs"]
mod tests;
