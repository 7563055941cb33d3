//! Arrow IPC files (`.arrow`, `.feather` v2, `.ipc`) read through object storage by ranges:
//! the footer (schema, record batch blocks) once, the dictionaries once, then each record batch
//! as one ranged read. A split is a run of whole record batches, as Parquet's are row groups.

use std::sync::Arc;

use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_ipc::reader::{read_footer_length, FileDecoder};
use arrow_ipc::Block;
use arrow_schema::SchemaRef;

use super::source::Source;
use super::IngestError;

/// Largest footer read (the schema and one block entry per record batch).
const MAX_FOOTER: usize = 64 << 20;
/// Largest record batch (or dictionary) read at once.
const MAX_BLOCK: u64 = 1 << 30;

/// An opened Arrow IPC file: its schema and blocks, dictionaries loaded.
pub(crate) struct ArrowFile {
    file: String,
    name: String,
    schema: SchemaRef,
    blocks: Vec<Block>,
    decoder: FileDecoder,
}

fn corrupt(name: &str, what: impl std::fmt::Display) -> IngestError {
    IngestError::Data(format!("{name}: not a readable Arrow IPC file: {what}"))
}

/// The byte range of `block` in a file of `size` bytes, checked.
fn range(name: &str, block: &Block, size: u64) -> Result<(u64, u64), IngestError> {
    let start = u64::try_from(block.offset()).map_err(|_| corrupt(name, "negative offset"))?;
    let meta = u64::try_from(block.metaDataLength()).map_err(|_| corrupt(name, "bad block"))?;
    let body = u64::try_from(block.bodyLength()).map_err(|_| corrupt(name, "bad block"))?;
    let len = meta.saturating_add(body);
    let end = start.saturating_add(len);
    if len > MAX_BLOCK || end > size {
        return Err(corrupt(
            name,
            format!("a block of {len} bytes at {start} (file of {size} bytes, at most {MAX_BLOCK} a block)"),
        ));
    }
    Ok((start, end))
}

impl ArrowFile {
    /// Reads the footer and dictionaries of `file` (`size` bytes).
    pub(crate) async fn open(src: &Source, file: &str, size: u64) -> Result<Self, IngestError> {
        let name = src.display(file);
        if size < 16 {
            return Err(corrupt(&name, "too short"));
        }
        let trailer = src.read_range(file, size - 10, size).await?;
        let trailer: [u8; 10] = trailer
            .as_ref()
            .try_into()
            .map_err(|_| corrupt(&name, "short trailer"))?;
        let footer_len = read_footer_length(trailer).map_err(|e| corrupt(&name, e))?;
        if footer_len > MAX_FOOTER || footer_len as u64 + 10 > size {
            return Err(corrupt(&name, format!("a footer of {footer_len} bytes")));
        }
        let footer_bytes = src
            .read_range(file, size - 10 - footer_len as u64, size - 10)
            .await?;
        let footer = arrow_ipc::root_as_footer(&footer_bytes).map_err(|e| corrupt(&name, e))?;
        let fb_schema = footer.schema().ok_or_else(|| corrupt(&name, "no schema"))?;
        let schema: SchemaRef = Arc::new(arrow_ipc::convert::fb_to_schema(fb_schema));
        let blocks: Vec<Block> = footer.recordBatches().iter().flatten().copied().collect();
        let dictionaries: Vec<Block> = footer.dictionaries().iter().flatten().copied().collect();
        let mut decoder = FileDecoder::new(schema.clone(), footer.version());
        for block in &dictionaries {
            let (start, end) = range(&name, block, size)?;
            let bytes = src.read_range(file, start, end).await?;
            decoder
                .read_dictionary(block, &Buffer::from(bytes))
                .map_err(|e| corrupt(&name, e))?;
        }
        Ok(ArrowFile {
            file: file.to_string(),
            name,
            schema,
            blocks,
            decoder,
        })
    }

    /// The file's schema.
    pub(crate) fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Record batches in the file.
    pub(crate) fn batches(&self) -> usize {
        self.blocks.len()
    }

    /// Bytes of record batch `i` (metadata and body).
    pub(crate) fn batch_bytes(&self, i: usize) -> u64 {
        self.blocks.get(i).map_or(0, |b| {
            (b.metaDataLength().max(0) as u64).saturating_add(b.bodyLength().max(0) as u64)
        })
    }

    /// Decodes record batch `i`.
    pub(crate) async fn batch(&self, src: &Source, i: usize) -> Result<RecordBatch, IngestError> {
        let block = self
            .blocks
            .get(i)
            .ok_or_else(|| corrupt(&self.name, format!("no record batch {i}")))?;
        let size = u64::MAX;
        let (start, end) = range(&self.name, block, size)?;
        let bytes = src.read_range(&self.file, start, end).await?;
        if (bytes.len() as u64) < end - start {
            return Err(corrupt(
                &self.name,
                format!("record batch {i} is truncated"),
            ));
        }
        self.decoder
            .read_record_batch(block, &Buffer::from(bytes))
            .map_err(|e| corrupt(&self.name, format!("record batch {i}: {e}")))?
            .ok_or_else(|| corrupt(&self.name, format!("record batch {i} is empty")))
    }
}
