//! The model directory of a matrix-factorisation (`mf`) job, streamed from the cluster's stored
//! parts with bounded memory: at most one shard's table, one merge chunk per export shard, the
//! CSR row pointers (`users + 1` integers) and small buffers, never the whole model.
//!
//! `model.safetensors` holds, in file order, `rated_offsets` (`I64`, `users + 1`),
//! `user_factors` (`F32`, `users x rank`), `item_factors` (`F32`, `items x rank`) and
//! `rated_items` (`I32`); see `tidepool_actors::jobs::model_dir`. It is written as
//! `model.safetensors.part`: the factors first filled with every row's initial value, then each
//! shard's saved table written over the rows training touched, then the items rated, a k-way
//! merge of the shards' sorted exports (a pair in two shards is written once), then the row
//! pointers and last the header, whose room was reserved up front. Renamed when complete; the
//! manifest comes last.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use tidepool_actors::jobs::mf;
use tidepool_actors::jobs::model_dir::{
    self, MfResult, DIR_FORMAT, MANIFEST, MF_ITEM_FACTORS, MF_RATED_ITEMS, MF_RATED_OFFSETS,
    MF_USER_FACTORS, TENSORS,
};
use tidepool_runtime::codec::decode_param_snapshot;

use crate::jobs_cli::{fetch_part, PartSource, ResultPart, RESULT_CHUNK_BYTES};
use crate::safetensors_file::Layout;

/// Buffer memory of the export merge over every shard together.
const MERGE_BUDGET_BYTES: u64 = 32 << 20;
/// Smallest chunk one export shard is read in.
const MIN_MERGE_CHUNK: u64 = 64 << 10;
/// Bytes of one exported (user, item) pair.
const PAIR_BYTES: usize = 8;
/// Write buffer of the sequential passes.
const WRITE_BUFFER: usize = 1 << 20;

/// The label recorded when the dataset's is not known.
pub const DEFAULT_LABEL: &str = "rating";

/// The layout of the tensors file for `r` with `pairs` rated pairs, its header taking at least
/// `min_header_len` bytes.
fn layout(r: &MfResult, pairs: u64, min_header_len: u64) -> Result<Layout> {
    let (u, i, k) = (r.users, r.items, r.rank as u64);
    Layout::new(
        [("format".to_string(), DIR_FORMAT.to_string())].into(),
        &[
            (MF_RATED_OFFSETS, "I64", vec![u + 1]),
            (MF_USER_FACTORS, "F32", vec![u, k]),
            (MF_ITEM_FACTORS, "F32", vec![i, k]),
            (MF_RATED_ITEMS, "I32", vec![pairs]),
        ],
        min_header_len,
    )
}

/// Writes the model directory of `mf` result document `doc` of job `job` (spec text `spec`,
/// the dataset's label column `label`) into `dir`, reading the job's tables and exports from
/// `src`; returns the tensor names.
pub async fn write(
    dir: &Path,
    doc: &serde_json::Value,
    job: &str,
    spec: Option<String>,
    label: &str,
    src: &impl PartSource,
) -> Result<Vec<String>> {
    let r = MfResult::parse(doc).with_context(|| format!("job {job}"))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // A directory without a manifest is incomplete: drop an old one before replacing the model.
    match std::fs::remove_file(dir.join(MANIFEST)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", dir.join(MANIFEST).display()))
        }
        _ => {}
    }
    let tmp = dir.join(format!("{TENSORS}.part"));
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let pairs = write_tensors(&file, &r, src, job)
        .await
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.sync_all()
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(file);
    std::fs::rename(&tmp, dir.join(TENSORS))
        .with_context(|| format!("renaming {}", tmp.display()))?;
    let manifest = model_dir::mf_manifest(&r, job, spec, label, pairs);
    let mut text = serde_json::to_string_pretty(&manifest)?;
    text.push('\n');
    std::fs::write(dir.join(MANIFEST), text)
        .with_context(|| format!("writing {}", dir.join(MANIFEST).display()))?;
    Ok(manifest.tensors.keys().cloned().collect())
}

/// Writes the whole tensors file into `file`; returns the rated pairs.
async fn write_tensors(file: &File, r: &MfResult, src: &impl PartSource, job: &str) -> Result<u64> {
    // The header is written last, with the number of pairs the merge finds; reserve room for
    // the two numbers that grow with it (rated_items' shape and end offset, up to 20 digits).
    let draft = layout(r, 0, 0)?;
    let reserve = draft.json()?.len() as u64 + 40;
    let draft = layout(r, 0, reserve)?;
    fill_initial_rows(file, &draft, r)?;
    for shard in 0..r.shards {
        write_table(file, &draft, r, src, job, shard).await?;
    }
    let (pairs, offsets) = write_rated(file, &draft, r, src, job).await?;
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, file);
    w.seek(SeekFrom::Start(draft.file_offset(MF_RATED_OFFSETS)?))?;
    for o in &offsets {
        w.write_all(&o.to_le_bytes())?;
    }
    let done = layout(r, pairs, reserve)?;
    ensure!(
        done.header_len == draft.header_len,
        "the header outgrew its reserved room"
    );
    w.seek(SeekFrom::Start(0))?;
    w.write_all(&done.header()?)?;
    w.flush()?;
    Ok(pairs)
}

/// Every factor row at its initial value ([`mf::init_row`]), in order.
fn fill_initial_rows(file: &File, layout: &Layout, r: &MfResult) -> Result<()> {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, file);
    let mut row = vec![0f32; r.rank];
    for (tensor, count, key) in [
        (MF_USER_FACTORS, r.users, mf::user_key as fn(u64) -> u64),
        (MF_ITEM_FACTORS, r.items, mf::item_key),
    ] {
        w.seek(SeekFrom::Start(layout.file_offset(tensor)?))?;
        for id in 0..count {
            mf::init_row(r.seed, key(id), &mut row);
            for v in &row {
                w.write_all(&v.to_le_bytes())?;
            }
        }
    }
    w.flush()?;
    Ok(())
}

/// Shard `shard`'s final table over the rows it holds (runs of adjacent rows in one write).
async fn write_table(
    mut file: &File,
    layout: &Layout,
    r: &MfResult,
    src: &impl PartSource,
    job: &str,
    shard: u32,
) -> Result<()> {
    let part = ResultPart::Table(shard);
    let what = format!("job {job}");
    let bytes = fetch_part(src, part, &what).await?;
    let snap = decode_param_snapshot(&bytes).with_context(|| format!("{what}: {part}"))?;
    drop(bytes);
    let bad = |why: String| anyhow::anyhow!("{what}: {part}: {why}");
    if snap.shard != shard || snap.step != r.tables.step {
        return Err(bad(format!(
            "holds shard {} at step {}, the result says step {}",
            snap.shard, snap.step, r.tables.step
        )));
    }
    let k = r.rank;
    if snap.keys.len().checked_mul(k) != Some(snap.values.len()) {
        return Err(bad(format!(
            "{} values for {} rows of rank {k}",
            snap.values.len(),
            snap.keys.len()
        )));
    }
    let users_at = layout.file_offset(MF_USER_FACTORS)?;
    let items_at = layout.file_offset(MF_ITEM_FACTORS)?;
    let row_bytes = k as u64 * 4;
    let mut run_at = 0u64;
    let mut run: Vec<u8> = Vec::new();
    let mut prev = None;
    for (key, row) in snap.keys.iter().zip(snap.values.chunks_exact(k)) {
        if prev.is_some_and(|p| p >= *key) {
            return Err(bad(format!("keys not increasing at key {key:#x}")));
        }
        prev = Some(*key);
        let (table, id) = (key >> 32, key & 0xffff_ffff);
        let at = match table {
            mf::USERS if id < r.users => users_at + id * row_bytes,
            mf::ITEMS if id < r.items => items_at + id * row_bytes,
            _ => {
                return Err(bad(format!(
                    "key {key:#x} (table {table}, id {id}) is outside {} users and {} items",
                    r.users, r.items
                )))
            }
        };
        if run_at + run.len() as u64 != at || run.len() >= WRITE_BUFFER {
            if !run.is_empty() {
                file.seek(SeekFrom::Start(run_at))?;
                file.write_all(&run)?;
                run.clear();
            }
            run_at = at;
        }
        for v in row {
            run.extend_from_slice(&v.to_le_bytes());
        }
    }
    if !run.is_empty() {
        file.seek(SeekFrom::Start(run_at))?;
        file.write_all(&run)?;
    }
    Ok(())
}

/// One shard's export, read in chunks of `chunk` bytes as the merge consumes it.
struct ExportStream {
    shard: u32,
    chunk: u64,
    /// The next byte of the export to fetch.
    fetched: u64,
    total: Option<u64>,
    buf: Vec<u8>,
    pos: usize,
    last: Option<(u32, u32)>,
}

impl ExportStream {
    fn new(shard: u32, chunk: u64) -> Self {
        ExportStream {
            shard,
            chunk,
            fetched: 0,
            total: None,
            buf: Vec::new(),
            pos: 0,
            last: None,
        }
    }

    /// The next (user, item) pair, `None` at the end; an export out of order is an error.
    async fn next(&mut self, src: &impl PartSource, what: &str) -> Result<Option<(u32, u32)>> {
        let part = ResultPart::Export(self.shard);
        loop {
            if let Some(b) = self.buf.get(self.pos..self.pos + PAIR_BYTES) {
                let pair = (
                    u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                    u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
                );
                if self.last.is_some_and(|l| l >= pair) {
                    bail!(
                        "{what}: {part} is not sorted and distinct at pair {pair:?} (byte {})",
                        self.fetched - (self.buf.len() - self.pos) as u64
                    );
                }
                self.pos += PAIR_BYTES;
                self.last = Some(pair);
                return Ok(Some(pair));
            }
            if self.total == Some(self.fetched) {
                return Ok(None);
            }
            self.buf.drain(..self.pos);
            self.pos = 0;
            let (size, data) = src.chunk(part, self.fetched, self.chunk).await?;
            match self.total {
                None if size % PAIR_BYTES as u64 != 0 => {
                    bail!("{what}: {part} of {size} bytes is not whole (user, item) pairs")
                }
                None => self.total = Some(size),
                Some(t) if t != size => bail!("{what}: {part} changed size ({t} -> {size})"),
                Some(_) => {}
            }
            let end = self.fetched + data.len() as u64;
            if end > size || (data.is_empty() && self.fetched < size) {
                bail!(
                    "{what}: {part}: {} bytes at offset {} of {size}",
                    data.len(),
                    self.fetched
                );
            }
            self.fetched = end;
            self.buf.extend_from_slice(&data);
        }
    }
}

/// The rated items, merged from every shard's export into `rated_items` in (user, item)
/// order, each pair once; returns the pairs and the CSR row pointers.
async fn write_rated(
    file: &File,
    layout: &Layout,
    r: &MfResult,
    src: &impl PartSource,
    job: &str,
) -> Result<(u64, Vec<i64>)> {
    let what = format!("job {job}");
    let chunk = (MERGE_BUDGET_BYTES / u64::from(r.shards.max(1)))
        .clamp(MIN_MERGE_CHUNK, RESULT_CHUNK_BYTES)
        / PAIR_BYTES as u64
        * PAIR_BYTES as u64;
    let mut streams: Vec<ExportStream> =
        (0..r.shards).map(|s| ExportStream::new(s, chunk)).collect();
    let mut heap = BinaryHeap::with_capacity(streams.len());
    for (i, s) in streams.iter_mut().enumerate() {
        if let Some((u, it)) = s.next(src, &what).await? {
            heap.push(Reverse((u, it, i)));
        }
    }
    let mut counts = vec![0i64; r.users as usize + 1];
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, file);
    w.seek(SeekFrom::Start(layout.file_offset(MF_RATED_ITEMS)?))?;
    let mut last = None;
    let mut pairs = 0u64;
    while let Some(Reverse((u, item, i))) = heap.pop() {
        if last != Some((u, item)) {
            last = Some((u, item));
            if u64::from(u) >= r.users || u64::from(item) >= r.items {
                bail!(
                    "{what}: export of shard {i} has pair ({u}, {item}) outside {} users and {} \
                     items",
                    r.users,
                    r.items
                );
            }
            w.write_all(&(item as i32).to_le_bytes())?;
            counts[u as usize + 1] += 1;
            pairs += 1;
        }
        if let Some(s) = streams.get_mut(i) {
            if let Some((u, it)) = s.next(src, &what).await? {
                heap.push(Reverse((u, it, i)));
            }
        }
    }
    w.flush()?;
    for j in 1..counts.len() {
        counts[j] += counts[j - 1];
    }
    Ok((pairs, counts))
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use super::*;
    use tidepool_runtime::codec::{encode_param_snapshot, ParamSnapshot};

    /// Parts in memory, answered in chunks of at most `cap` bytes (not a multiple of 8, as a
    /// node's frame cap need not be).
    pub(crate) struct MemParts {
        pub parts: HashMap<ResultPart, Vec<u8>>,
        pub cap: u64,
    }

    impl PartSource for MemParts {
        async fn chunk(
            &self,
            part: ResultPart,
            offset: u64,
            length: u64,
        ) -> Result<(u64, Vec<u8>)> {
            let bytes = self.parts.get(&part).context("no such part")?;
            let total = bytes.len() as u64;
            ensure!(offset <= total, "offset past the end");
            let n = length.min(self.cap).min(total - offset);
            Ok((
                total,
                bytes[offset as usize..(offset + n) as usize].to_vec(),
            ))
        }
    }

    fn pairs(p: &[(u32, u32)]) -> Vec<u8> {
        p.iter()
            .flat_map(|(u, i)| u.to_le_bytes().into_iter().chain(i.to_le_bytes()))
            .collect()
    }

    /// A small trained model: 3 users, 4 items, rank 2, two shards; rows not in a table keep
    /// their initial values. Returns the result document and its parts.
    pub(crate) fn fixture() -> (serde_json::Value, MemParts) {
        let doc = serde_json::json!({
            "kind": "mf", "job": "j1", "rank": 2, "user_column": "user", "item_column": "item",
            "users": 3, "items": 4, "rows": 7, "mu": 3.0, "seed": 7, "steps": 5, "shards": 2,
            "tables": {"step": 5, "prefix": "jobs/j1/params"}, "train_rmse": 0.5,
            "epoch_train_rmse": [0.9, 0.5], "rollbacks": 1,
        });
        let snap = |shard, keys: Vec<u64>, values: Vec<f32>| {
            encode_param_snapshot(&ParamSnapshot {
                shard,
                step: 5,
                keys,
                values,
            })
            .unwrap()
        };
        let mut parts = HashMap::new();
        parts.insert(
            ResultPart::Table(0),
            snap(
                0,
                vec![mf::user_key(0), mf::user_key(1), mf::item_key(3)],
                vec![1.0, 0.0, 0.5, 0.5, 2.0, 1.0],
            ),
        );
        parts.insert(
            ResultPart::Table(1),
            snap(
                1,
                vec![mf::user_key(2), mf::item_key(0), mf::item_key(1)],
                vec![-1.0, 1.0, 1.0, 1.0, 0.25, -0.5],
            ),
        );
        parts.insert(ResultPart::Export(0), pairs(&[(0, 0), (0, 3), (2, 1)]));
        // (0, 3) is in both shards: rated once.
        parts.insert(
            ResultPart::Export(1),
            pairs(&[(0, 1), (0, 3), (1, 0), (2, 0)]),
        );
        (doc, MemParts { parts, cap: 13 })
    }

    #[tokio::test]
    async fn the_tensors_file_is_safetensors_with_tables_over_initial_rows() {
        let (doc, src) = fixture();
        let dir = tempfile::tempdir().unwrap();
        let names = write(
            dir.path(),
            &doc,
            "j1",
            Some("[job]\n".into()),
            "rating",
            &src,
        )
        .await
        .unwrap();
        assert_eq!(names.len(), 4);
        let bytes = std::fs::read(dir.path().join(TENSORS)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let f32s = |n: &str| crate::safetensors_file::f32s(st.tensor(n).unwrap().data());
        let users = f32s(MF_USER_FACTORS);
        let items = f32s(MF_ITEM_FACTORS);
        assert_eq!(st.tensor(MF_USER_FACTORS).unwrap().shape(), &[3, 2]);
        assert_eq!(st.tensor(MF_ITEM_FACTORS).unwrap().shape(), &[4, 2]);
        assert_eq!(users, vec![1.0, 0.0, 0.5, 0.5, -1.0, 1.0]);
        let mut init = vec![0f32; 2];
        mf::init_row(7, mf::item_key(2), &mut init);
        assert_eq!(
            items,
            [vec![1.0, 1.0, 0.25, -0.5], init, vec![2.0, 1.0]].concat()
        );
        let offsets = crate::safetensors_file::i64s(st.tensor(MF_RATED_OFFSETS).unwrap().data());
        let rated = crate::safetensors_file::i32s(st.tensor(MF_RATED_ITEMS).unwrap().data());
        assert_eq!(offsets, vec![0, 3, 4, 6]);
        assert_eq!(rated, vec![0, 1, 3, 0, 0, 1]);
        assert!(!dir.path().join(format!("{TENSORS}.part")).exists());
        let manifest: model_dir::Manifest =
            serde_json::from_slice(&std::fs::read(dir.path().join(MANIFEST)).unwrap()).unwrap();
        let m = manifest.mf.clone().unwrap();
        assert_eq!((m.rank, m.users, m.items, m.pairs, m.seed), (2, 3, 4, 6, 7));
        assert_eq!(
            (manifest.kind.as_str(), manifest.label.as_str()),
            ("mf", "rating")
        );
        assert_eq!(manifest.tensors[MF_RATED_ITEMS].shape, vec![6]);
        assert_eq!(manifest.metrics["rollbacks"], 1);
        assert_eq!(manifest.spec.as_deref(), Some("[job]\n"));
    }

    #[tokio::test]
    async fn damaged_parts_are_errors_naming_the_part() {
        let (doc, mut src) = fixture();
        src.parts
            .insert(ResultPart::Export(1), pairs(&[(1, 0), (0, 3)]));
        let dir = tempfile::tempdir().unwrap();
        let err = format!(
            "{:#}",
            write(dir.path(), &doc, "j1", None, "r", &src)
                .await
                .unwrap_err()
        );
        assert!(err.contains("export of shard 1 is not sorted"), "{err}");
        assert!(!dir.path().join(MANIFEST).exists());

        let (doc, mut src) = fixture();
        src.parts.insert(ResultPart::Export(0), vec![0; 12]);
        let err = format!(
            "{:#}",
            write(dir.path(), &doc, "j1", None, "r", &src)
                .await
                .unwrap_err()
        );
        assert!(err.contains("not whole (user, item) pairs"), "{err}");

        let (mut doc, src) = fixture();
        doc["users"] = 2.into();
        let err = format!(
            "{:#}",
            write(dir.path(), &doc, "j1", None, "r", &src)
                .await
                .unwrap_err()
        );
        assert!(err.contains("table of shard 1"), "{err}");

        let (mut doc, src) = fixture();
        doc["tables"]["step"] = 4.into();
        assert!(write(dir.path(), &doc, "j1", None, "r", &src)
            .await
            .is_err());
        let (doc, mut src) = fixture();
        src.parts.insert(ResultPart::Table(0), vec![1, 2, 3]);
        assert!(write(dir.path(), &doc, "j1", None, "r", &src)
            .await
            .is_err());
        let (mut doc, src) = fixture();
        doc["rank"] = "two".into();
        assert!(write(dir.path(), &doc, "j1", None, "r", &src)
            .await
            .is_err());
    }
}
