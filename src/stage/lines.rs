//! Newline-delimited input and output for the loop (`seen filter`).

use std::io::{BufRead, BufReader, Read, Write};

use super::{BoxError, InvalidId, Next, OnInvalid, Sink, Source};

/// Lines from a reader; each item is one line with its line ending.
pub struct LineSource<R> {
    reader: BufReader<R>,
    line: Vec<u8>,
}

impl<R: Read> LineSource<R> {
    /// Read lines from `reader` (buffered here).
    pub fn new(reader: R) -> Self {
        LineSource {
            reader: BufReader::with_capacity(1 << 16, reader),
            line: Vec::with_capacity(4096),
        }
    }
}

impl<R: Read> Source for LineSource<R> {
    type Item = [u8];

    fn next(&mut self, may_block: bool) -> Result<Next<'_, [u8]>, BoxError> {
        if !may_block && self.reader.buffer().is_empty() {
            // Whatever is decided goes out now; a slow writer upstream
            // (`tail -f | seen filter`) does not hold it back.
            return Ok(Next::Idle);
        }
        self.line.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.line)
            .map_err(|e| format!("reading input: {e}"))?;
        Ok(if n == 0 {
            Next::End
        } else {
            Next::Item(&self.line)
        })
    }
}

/// Told about each invalid line: (line number, why, what the policy does).
type Report = Box<dyn FnMut(u64, &InvalidId, OnInvalid)>;

/// Lines to a writer, byte for byte; a last line without a newline gets
/// one, so the output stays line-based.
pub struct LineSink<W: Write> {
    writer: W,
    report: Report,
}

impl<W: Write> LineSink<W> {
    /// Write lines to `writer` (wrap it in a `BufWriter`: the loop
    /// flushes once per batch). `report` is told about each invalid line.
    pub fn new(writer: W, report: impl FnMut(u64, &InvalidId, OnInvalid) + 'static) -> Self {
        LineSink {
            writer,
            report: Box::new(report),
        }
    }

    /// The writer back.
    pub fn into_inner(self) -> W {
        self.writer
    }
}

impl<W: Write> Sink<[u8]> for LineSink<W> {
    fn emit(&mut self, line: &[u8], _id: Option<&[u8]>) -> Result<(), BoxError> {
        self.writer.write_all(line)?;
        if line.last() != Some(&b'\n') {
            self.writer.write_all(b"\n")?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BoxError> {
        Ok(self.writer.flush()?)
    }

    fn invalid(&mut self, seq: u64, why: &InvalidId, action: OnInvalid) {
        (self.report)(seq, why, action)
    }
}

/// A line without its `\n` or `\r\n`.
pub(crate) fn strip_line_ending(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}
