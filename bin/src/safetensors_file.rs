//! The safetensors file format by hand, for files written and read in place rather than whole
//! in memory: an 8-byte little-endian header length `N`, `N` bytes of JSON (`{"__metadata__":
//! {...}, NAME: {"dtype", "shape", "data_offsets": [begin, end]}, ...}`, padded with spaces so
//! the data starts 8-byte aligned), then the tensors' bytes back to back (offsets relative to
//! the data start). [`Layout`] places the tensors and renders the header; [`read_layout`] reads
//! and checks one from an open file, and [`read_range`] reads a tensor's slice.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use anyhow::{bail, ensure, Context, Result};

/// Largest header this reader accepts (the safetensors crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Bytes per element of a dtype this module handles.
pub fn dtype_size(dtype: &str) -> Option<u64> {
    match dtype {
        "F64" | "I64" | "U64" => Some(8),
        "F32" | "I32" | "U32" => Some(4),
        "F16" | "BF16" | "I16" | "U16" => Some(2),
        "I8" | "U8" | "BOOL" => Some(1),
        _ => None,
    }
}

/// One tensor's place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorPlace {
    pub dtype: String,
    pub shape: Vec<u64>,
    /// Byte offsets relative to the data start.
    pub begin: u64,
    pub end: u64,
}

/// The tensors of a file and where their data lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The header's JSON length `N` (padded): the data starts at `8 + N`.
    pub header_len: u64,
    /// `__metadata__`.
    pub metadata: BTreeMap<String, String>,
    pub tensors: BTreeMap<String, TensorPlace>,
}

impl Layout {
    /// Tensors `(name, dtype, shape)` back to back in the given order; the header takes at
    /// least `min_header_len` bytes (reserve room to rewrite it later with larger numbers).
    pub fn new(
        metadata: BTreeMap<String, String>,
        tensors: &[(&str, &str, Vec<u64>)],
        min_header_len: u64,
    ) -> Result<Self> {
        let mut placed = BTreeMap::new();
        let mut at = 0u64;
        for (name, dtype, shape) in tensors {
            let size = dtype_size(dtype).with_context(|| format!("{name}: dtype {dtype:?}"))?;
            let bytes = shape
                .iter()
                .try_fold(size, |n, &d| n.checked_mul(d))
                .with_context(|| format!("{name}: shape {shape:?} overflows"))?;
            let end = at
                .checked_add(bytes)
                .with_context(|| format!("{name}: offsets overflow"))?;
            let place = TensorPlace {
                dtype: dtype.to_string(),
                shape: shape.clone(),
                begin: at,
                end,
            };
            ensure!(
                placed.insert(name.to_string(), place).is_none(),
                "tensor {name} twice"
            );
            at = end;
        }
        let mut layout = Layout {
            header_len: 0,
            metadata,
            tensors: placed,
        };
        let json = layout.json()?.len() as u64;
        layout.header_len = json.max(min_header_len).next_multiple_of(8);
        Ok(layout)
    }

    /// The header's JSON, unpadded.
    pub fn json(&self) -> Result<Vec<u8>> {
        let mut doc = serde_json::Map::new();
        if !self.metadata.is_empty() {
            doc.insert("__metadata__".into(), serde_json::to_value(&self.metadata)?);
        }
        for (name, t) in &self.tensors {
            doc.insert(
                name.clone(),
                serde_json::json!({
                    "dtype": t.dtype, "shape": t.shape, "data_offsets": [t.begin, t.end],
                }),
            );
        }
        Ok(serde_json::to_vec(&doc)?)
    }

    /// The file's first `8 + header_len` bytes: the length and the padded JSON.
    pub fn header(&self) -> Result<Vec<u8>> {
        let json = self.json()?;
        ensure!(
            json.len() as u64 <= self.header_len,
            "header of {} bytes does not fit the {} reserved",
            json.len(),
            self.header_len
        );
        let mut out = Vec::with_capacity(8 + self.header_len as usize);
        out.extend_from_slice(&self.header_len.to_le_bytes());
        out.extend_from_slice(&json);
        out.resize(8 + self.header_len as usize, b' ');
        Ok(out)
    }

    /// Where the data starts in the file.
    pub fn data_start(&self) -> u64 {
        8 + self.header_len
    }

    /// Bytes of data after the header.
    pub fn data_len(&self) -> u64 {
        self.tensors.values().map(|t| t.end).max().unwrap_or(0)
    }

    /// Tensor `name`, or an error naming it.
    pub fn tensor(&self, name: &str) -> Result<&TensorPlace> {
        self.tensors
            .get(name)
            .with_context(|| format!("no tensor {name:?}"))
    }

    /// The absolute file offset of tensor `name`'s data.
    pub fn file_offset(&self, name: &str) -> Result<u64> {
        Ok(self.data_start() + self.tensor(name)?.begin)
    }
}

/// The layout of the safetensors file open as `file`, checked: a JSON header of tensors with
/// known dtypes whose offsets match their shapes and cover the data exactly, up to the end of
/// the file.
pub fn read_layout(file: &mut File) -> Result<Layout> {
    let file_len = file.metadata()?.len();
    file.seek(SeekFrom::Start(0))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .context("shorter than a safetensors header")?;
    let header_len = u64::from_le_bytes(len);
    ensure!(
        header_len <= MAX_HEADER_BYTES && 8 + header_len <= file_len,
        "header length {header_len} does not fit the {file_len}-byte file"
    );
    let mut json = vec![0u8; header_len as usize];
    file.read_exact(&mut json)?;
    let doc: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).context("header is not a JSON object")?;
    let mut metadata = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    for (name, v) in doc {
        if name == "__metadata__" {
            metadata = serde_json::from_value(v).context("__metadata__")?;
            continue;
        }
        #[derive(serde::Deserialize)]
        struct Raw {
            dtype: String,
            shape: Vec<u64>,
            data_offsets: [u64; 2],
        }
        let raw: Raw = serde_json::from_value(v).with_context(|| format!("tensor {name:?}"))?;
        let size = dtype_size(&raw.dtype)
            .with_context(|| format!("tensor {name:?}: dtype {:?}", raw.dtype))?;
        let bytes = raw.shape.iter().try_fold(size, |n, &d| n.checked_mul(d));
        let [begin, end] = raw.data_offsets;
        ensure!(
            bytes.is_some() && end.checked_sub(begin) == bytes,
            "tensor {name:?}: data_offsets [{begin}, {end}] do not hold shape {:?} of {}",
            raw.shape,
            raw.dtype
        );
        tensors.insert(
            name,
            TensorPlace {
                dtype: raw.dtype,
                shape: raw.shape,
                begin,
                end,
            },
        );
    }
    let mut spans: Vec<(u64, u64)> = tensors.values().map(|t| (t.begin, t.end)).collect();
    spans.sort_unstable();
    let mut at = 0;
    for (begin, end) in spans {
        ensure!(begin == at, "tensor data is not contiguous at byte {at}");
        at = end;
    }
    ensure!(
        8 + header_len + at == file_len,
        "the tensors take {at} bytes after the header, the file has {}",
        file_len - 8 - header_len
    );
    Ok(Layout {
        header_len,
        metadata,
        tensors,
    })
}

/// `len` bytes of tensor `name` from byte `offset` of its data.
pub fn read_range(
    file: &mut File,
    layout: &Layout,
    name: &str,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>> {
    let t = layout.tensor(name)?;
    let end = offset.checked_add(len);
    if end.is_none_or(|e| e > t.end - t.begin) {
        bail!(
            "bytes {offset}..+{len} are outside tensor {name:?} ({} bytes)",
            t.end - t.begin
        );
    }
    file.seek(SeekFrom::Start(layout.data_start() + t.begin + offset))?;
    let mut out = vec![0u8; usize::try_from(len)?];
    file.read_exact(&mut out)
        .with_context(|| format!("reading tensor {name:?}"))?;
    Ok(out)
}

/// Little-endian `f32`s.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Little-endian `i64`s.
pub fn i64s(bytes: &[u8]) -> Vec<i64> {
    bytes
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// Little-endian `i32`s.
pub fn i32s(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::io::Write;

    #[test]
    fn a_reserved_header_is_padded_and_read_back_by_both_readers() {
        let meta = BTreeMap::from([("format".to_string(), "x/1".to_string())]);
        let small = Layout::new(
            meta.clone(),
            &[("a", "F32", vec![2, 3]), ("b", "I64", vec![1])],
            0,
        )
        .unwrap();
        assert_eq!(small.header_len % 8, 0);
        let big = Layout::new(
            meta,
            &[("a", "F32", vec![2, 3]), ("b", "I64", vec![1])],
            small.header_len + 13,
        )
        .unwrap();
        assert_eq!(big.header_len, (small.header_len + 13).next_multiple_of(8));
        assert_eq!((big.tensor("b").unwrap().begin, big.data_len()), (24, 32));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let mut f = File::create(&path).unwrap();
        f.write_all(&big.header().unwrap()).unwrap();
        for v in [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0] {
            f.write_all(&v.to_le_bytes()).unwrap();
        }
        f.write_all(&(-7i64).to_le_bytes()).unwrap();
        drop(f);
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().shape(), &[2, 3]);
        let mut f = File::open(&path).unwrap();
        let back = read_layout(&mut f).unwrap();
        assert_eq!(back, big);
        let row = f32s(&read_range(&mut f, &back, "a", 12, 12).unwrap());
        assert_eq!(row, vec![4.0, 5.0, 6.0]);
        assert_eq!(
            i64s(&read_range(&mut f, &back, "b", 0, 8).unwrap()),
            vec![-7]
        );
        assert!(read_range(&mut f, &back, "a", 20, 8).is_err());
        assert!(read_range(&mut f, &back, "c", 0, 1).is_err());
        // A truncated file is refused, never a panic.
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(read_layout(&mut File::open(&path).unwrap()).is_err());
        std::fs::write(&path, &bytes[..5]).unwrap();
        assert!(read_layout(&mut File::open(&path).unwrap()).is_err());
    }
}
