//! The complete lines that start in a byte range of a text file (CSV, libsvm), fetched in
//! chunks of [`CSV_CHUNK`] bytes: a split reads only its range plus the end of its last line.

use super::read::{CSV_CHUNK, MAX_LINE};
use super::source::Source;
use super::IngestError;

/// Runs of complete lines that start in `start..end` (see [`LineChunks::next`]).
pub(super) struct LineChunks<'a> {
    src: &'a Source,
    file: &'a str,
    size: u64,
    end: u64,
    /// Next byte to fetch.
    pos: u64,
    buf: Vec<u8>,
    /// Absolute offset of `buf[0]`.
    base: u64,
    /// The first line belongs to the split before (it started before `start`).
    skip_first: bool,
    /// Bytes of `buf` handed out by the last `next`.
    cut: usize,
    finished: bool,
}

impl<'a> LineChunks<'a> {
    /// The lines of `file` (`size` bytes; data from `data_start`, after any header) that start
    /// in `start..end`. A range that does not start at the data's first byte starts after the
    /// first newline at or after `start - 1`: the line that crosses `start` belongs to the
    /// range before.
    pub(super) fn new(
        src: &'a Source,
        file: &'a str,
        size: u64,
        data_start: u64,
        start: u64,
        end: u64,
    ) -> Self {
        let pos = if start <= data_start {
            data_start
        } else {
            start - 1
        };
        LineChunks {
            src,
            file,
            size,
            end,
            pos,
            buf: Vec::new(),
            base: pos,
            skip_first: start > data_start,
            cut: 0,
            finished: false,
        }
    }

    /// The next run of complete lines (each ends with a newline, or at the end of the file)
    /// and the absolute offset of its first byte; `None` when the range is done.
    pub(super) async fn next(&mut self) -> Result<Option<(u64, &[u8])>, IngestError> {
        self.buf.drain(..self.cut);
        self.base += self.cut as u64;
        self.cut = 0;
        while !self.finished {
            let eof = self.pos >= self.size;
            if !eof {
                let chunk = self
                    .src
                    .read_range(self.file, self.pos, (self.pos + CSV_CHUNK).min(self.size))
                    .await?;
                self.pos += chunk.len() as u64;
                self.buf.extend_from_slice(&chunk);
            }
            if self.skip_first {
                match self.buf.iter().position(|&b| b == b'\n') {
                    Some(nl) => {
                        self.buf.drain(..=nl);
                        self.base += nl as u64 + 1;
                        self.skip_first = false;
                    }
                    None if eof => return Ok(None),
                    None => {
                        self.base += self.buf.len() as u64;
                        self.buf.clear();
                        continue;
                    }
                }
            }
            // Complete lines that start before `end` (at EOF the last line needs no newline).
            let mut cut = 0usize;
            while self.base + (cut as u64) < self.end {
                match self
                    .buf
                    .get(cut..)
                    .and_then(|b| b.iter().position(|&c| c == b'\n'))
                {
                    Some(nl) => cut += nl + 1,
                    None if eof => {
                        cut = self.buf.len();
                        break;
                    }
                    None => break,
                }
            }
            self.finished = self.base + (cut as u64) >= self.end || eof;
            if cut == 0 && !self.finished && self.buf.len() > MAX_LINE {
                return Err(IngestError::Data(format!(
                    "{}: a line at byte {} is longer than {MAX_LINE} bytes",
                    self.src.display(self.file),
                    self.base
                )));
            }
            if cut > 0 {
                self.cut = cut;
                return Ok(Some((self.base, self.buf.get(..cut).unwrap_or_default())));
            }
        }
        Ok(None)
    }
}
