//! A partition written to a local file in the binary partition format ([`crate::dataset`]),
//! streamed: rows are appended in batches (one storage segment at a time) and never held
//! together. Row ids, labels and features go to three scratch files beside the target, joined
//! into the format (header, sections, padding, checksum) by [`PartitionFileWriter::finish`] and
//! renamed into place, so a reader never sees half a file. A node memory-maps the result and
//! reads it in place: partitions larger than memory are scanned through the page cache.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

use crate::dataset::{pad8, Header, CHECKSUM_OFFSET, HEADER_LEN, MAGIC, VERSION};

/// Writes one partition file; see the module docs.
#[derive(Debug)]
pub struct PartitionFileWriter {
    path: PathBuf,
    features: usize,
    rows: u64,
    tag: u64,
    scratch: [(PathBuf, BufWriter<File>); 3],
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
            scratch: [
                scratch(path, "ids", tag)?,
                scratch(path, "labels", tag)?,
                scratch(path, "features", tag)?,
            ],
        })
    }

    /// Appends rows: their ids, labels and row-major features.
    pub fn append(&mut self, ids: &[u64], labels: &[f32], x: &[f32]) -> io::Result<()> {
        if ids.len() != labels.len() || ids.len().checked_mul(self.features) != Some(x.len()) {
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
        self.scratch[0].1.write_all(ids.as_bytes())?;
        self.scratch[1].1.write_all(labels.as_bytes())?;
        self.scratch[2].1.write_all(x.as_bytes())?;
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
            flags: U16::new(0),
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
        for (i, (path, w)) in self.scratch.into_iter().enumerate() {
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
            // Labels and features end padded to 8 bytes (row ids always end aligned).
            if i > 0 {
                let padded = pad8(len).unwrap_or(len);
                let zeros = vec![0u8; padded - len];
                hash.update(&zeros);
                out.write_all(&zeros)?;
                len = padded;
            }
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
}
