//! A partition written to a local file in the binary partition format ([`crate::dataset`],
//! dense, or sparse rows as in [`crate::csr`]), streamed: rows are appended in batches (one
//! storage segment at a time) and never held together. Each section (row ids, labels, and the
//! features, or the row pointers, columns and values) goes to a scratch file beside the target, joined
//! into the format (header, sections, padding, checksum) by [`PartitionFileWriter::finish`] and
//! renamed into place, so a reader never sees half a file. A node memory-maps the result and
//! reads it in place: partitions larger than memory are scanned through the page cache.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

use crate::csr::{CsrRows, FLAG_CSR};
use crate::dataset::{pad8, Header, CHECKSUM_OFFSET, HEADER_LEN, MAGIC, VERSION};

/// Writes one partition file; see the module docs.
#[derive(Debug)]
pub struct PartitionFileWriter {
    path: PathBuf,
    features: usize,
    rows: u64,
    tag: u64,
    /// Sparse: stored entries so far (the next row pointer's base); `None` for dense rows.
    nnz: Option<u64>,
    /// Dense: ids, labels, features. Sparse: ids, labels, indptr, indices, values.
    scratch: Vec<(PathBuf, BufWriter<File>)>,
}

/// A scratch file beside `path`, unique to this writer (two writers of one file do not mix).
fn scratch(path: &Path, what: &str, tag: u64) -> io::Result<(PathBuf, BufWriter<File>)> {
    let p = path.with_extension(format!("{tag:016x}.{what}.part"));
    Ok((p.clone(), BufWriter::new(File::create(&p)?)))
}

impl PartitionFileWriter {
    /// Starts the partition file `path` of `features` features per row.
    pub fn create(path: &Path, features: usize) -> io::Result<Self> {
        let tag = rand::random::<u64>();
        Ok(PartitionFileWriter {
            path: path.to_path_buf(),
            features,
            rows: 0,
            tag,
            nnz: None,
            scratch: vec![
                scratch(path, "ids", tag)?,
                scratch(path, "labels", tag)?,
                scratch(path, "features", tag)?,
            ],
        })
    }

    /// Starts the sparse partition file `path` of `columns` columns.
    pub fn create_sparse(path: &Path, columns: usize) -> io::Result<Self> {
        let tag = rand::random::<u64>();
        let mut scratch: Vec<_> = ["ids", "labels", "indptr", "indices", "values"]
            .into_iter()
            .map(|what| scratch(path, what, tag))
            .collect::<io::Result<_>>()?;
        if let Some((_, w)) = scratch.get_mut(2) {
            w.write_all(0u64.as_bytes())?;
        }
        Ok(PartitionFileWriter {
            path: path.to_path_buf(),
            features: columns,
            rows: 0,
            tag,
            nnz: Some(0),
            scratch,
        })
    }

    /// Appends sparse rows (a sparse writer only); their columns must fit the file's.
    pub fn append_sparse(
        &mut self,
        ids: &[u64],
        labels: &[f32],
        rows: &CsrRows<'_>,
    ) -> io::Result<()> {
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidInput, what);
        let Some(base) = self.nnz else {
            return Err(invalid(
                "sparse rows appended to a dense partition file".into(),
            ));
        };
        if ids.len() != labels.len() || ids.len() != rows.rows() || rows.columns() > self.features {
            return Err(invalid(format!(
                "{} ids, {} labels, {} rows of {} columns for {} columns",
                ids.len(),
                labels.len(),
                rows.rows(),
                rows.columns(),
                self.features
            )));
        }
        let ptrs: Vec<u64> = rows.indptr().iter().skip(1).map(|p| p + base).collect();
        for (k, bytes) in [
            ids.as_bytes(),
            labels.as_bytes(),
            ptrs.as_bytes(),
            rows.indices().as_bytes(),
            rows.values().as_bytes(),
        ]
        .into_iter()
        .enumerate()
        {
            if let Some((_, w)) = self.scratch.get_mut(k) {
                w.write_all(bytes)?;
            }
        }
        self.rows += ids.len() as u64;
        self.nnz = Some(base + rows.nnz() as u64);
        Ok(())
    }

    /// Appends rows: their ids, labels and row-major features.
    pub fn append(&mut self, ids: &[u64], labels: &[f32], x: &[f32]) -> io::Result<()> {
        if self.nnz.is_some()
            || ids.len() != labels.len()
            || ids.len().checked_mul(self.features) != Some(x.len())
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} ids, {} labels, {} values for {} features",
                    ids.len(),
                    labels.len(),
                    x.len(),
                    self.features
                ),
            ));
        }
        for (k, bytes) in [ids.as_bytes(), labels.as_bytes(), x.as_bytes()]
            .into_iter()
            .enumerate()
        {
            if let Some((_, w)) = self.scratch.get_mut(k) {
                w.write_all(bytes)?;
            }
        }
        self.rows += ids.len() as u64;
        Ok(())
    }

    /// Rows appended so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Joins the sections into the partition file; returns its length in bytes.
    pub fn finish(self) -> io::Result<u64> {
        let features = u32::try_from(self.features)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many features"))?;
        let header = Header {
            magic: MAGIC,
            version: U16::new(VERSION),
            flags: U16::new(if self.nnz.is_some() { FLAG_CSR } else { 0 }),
            rows: U64::new(self.rows),
            features: U32::new(features),
            reserved: U32::new(0),
            checksum: U64::new(0),
        };
        let tmp = self
            .path
            .with_extension(format!("{:016x}.tdds.part", self.tag));
        let mut out = BufWriter::new(File::create(&tmp)?);
        let mut hash = Xxh3::new();
        let head = header.as_bytes();
        hash.update(head.get(..CHECKSUM_OFFSET).unwrap_or_default());
        out.write_all(head)?;
        let mut len = HEADER_LEN;
        let mut buf = vec![0u8; 1 << 20];
        for (path, w) in self.scratch {
            drop(w.into_inner().map_err(|e| e.into_error())?);
            let mut r = File::open(&path)?;
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                let chunk = buf.get(..n).unwrap_or_default();
                hash.update(chunk);
                out.write_all(chunk)?;
                len += n;
            }
            std::fs::remove_file(&path)?;
            // Every section ends padded to 8 bytes (u64 sections always end aligned).
            let padded = pad8(len).unwrap_or(len);
            let zeros = vec![0u8; padded - len];
            hash.update(&zeros);
            out.write_all(&zeros)?;
            len = padded;
        }
        let mut file = out.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(CHECKSUM_OFFSET as u64))?;
        file.write_all(&hash.digest().to_le_bytes())?;
        drop(file);
        std::fs::rename(&tmp, &self.path)?;
        Ok(len as u64)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::dataset::{encode_partition, Partition};

    #[test]
    fn a_streamed_file_equals_the_encoded_partition() {
        let dir = tempfile::tempdir().unwrap();
        for (rows, features) in [(0usize, 3usize), (1, 1), (7, 3), (1000, 5)] {
            let ids: Vec<u64> = (0..rows as u64).map(|i| i * 3 + 1).collect();
            let y: Vec<f32> = (0..rows).map(|i| i as f32 * 0.5).collect();
            let x: Vec<f32> = (0..rows * features).map(|i| i as f32 - 7.0).collect();
            let path = dir.path().join(format!("p-{rows}-{features}.tdds"));
            let mut w = PartitionFileWriter::create(&path, features).unwrap();
            // In uneven batches.
            let mut at = 0;
            for step in [1usize, 2, 3, 500].iter().cycle() {
                if at >= rows {
                    break;
                }
                let end = (at + step).min(rows);
                w.append(
                    &ids[at..end],
                    &y[at..end],
                    &x[at * features..end * features],
                )
                .unwrap();
                at = end;
            }
            assert_eq!(w.rows(), rows as u64);
            let len = w.finish().unwrap();
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(bytes.len() as u64, len);
            let want = encode_partition(&Partition::new(features, ids, y, x).unwrap());
            assert_eq!(bytes, want, "{rows} x {features}");
            let leftovers = std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .path()
                        .to_string_lossy()
                        .ends_with(".part")
                })
                .count();
            assert_eq!(leftovers, 0);
        }
        let mut w = PartitionFileWriter::create(&dir.path().join("bad.tdds"), 2).unwrap();
        assert!(w.append(&[1], &[1.0], &[1.0]).is_err());
    }

    #[test]
    fn a_streamed_sparse_file_equals_the_encoded_partition() {
        use crate::csr::{encode_sparse, SparsePartition};
        let dir = tempfile::tempdir().unwrap();
        let mut whole = SparsePartition::new(1000);
        let mut batches = Vec::new();
        for b in 0..4u64 {
            let mut part = SparsePartition::new(1000);
            for r in 0..b * 3 {
                let id = b * 100 + r;
                let cols: Vec<u32> = (0..(id % 5) as u32).map(|k| k * 97 + b as u32).collect();
                let vals: Vec<f32> = cols.iter().map(|&c| c as f32 * 0.5 + 1.0).collect();
                part.push(id, r as f32, &cols, &vals).unwrap();
                whole.push(id, r as f32, &cols, &vals).unwrap();
            }
            batches.push(part);
        }
        let path = dir.path().join("s.tdds");
        let mut w = PartitionFileWriter::create_sparse(&path, 1000).unwrap();
        for part in &batches {
            w.append_sparse(part.row_ids(), part.labels(), &part.csr())
                .unwrap();
        }
        assert!(w.append(&[1], &[1.0], &[1.0; 1000]).is_err(), "dense rows");
        let len = w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, len);
        assert_eq!(bytes, encode_sparse(&whole));
        let mut narrow =
            PartitionFileWriter::create_sparse(&dir.path().join("n.tdds"), 10).unwrap();
        let err = narrow.append_sparse(whole.row_ids(), whole.labels(), &whole.csr());
        assert!(err.is_err(), "wider rows than the file's columns");
    }
}
