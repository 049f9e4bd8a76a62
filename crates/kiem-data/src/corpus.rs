//! Corpus readers: find the input files, read them on a background thread in bounded batches of
//! raw records, and turn records into document text (in parallel, by the consumer).
//!
//! Memory stays bounded whatever the corpus size: at most [`QUEUED_BATCHES`] batches of about
//! [`BATCH_BYTES`] wait between the reader and its consumer, and a huge plain-text document is
//! read in pieces of about [`PIECE_BYTES`] (see [`safe_cut`] for why that is exact).

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::{DataError, Location, Position, Result};

/// A batch is handed to the consumer once it holds this many bytes of text...
pub const BATCH_BYTES: usize = 4 << 20;
/// ... or this many records.
pub const BATCH_RECORDS: usize = 4096;
/// Batches that may wait between the reader thread and the consumer.
pub const QUEUED_BATCHES: usize = 2;
/// Plain-text documents larger than this are read in pieces.
pub const PIECE_BYTES: usize = 8 << 20;
/// The most bytes one record may have (a JSONL line, a blank-line-separated block): memory
/// stays bounded whatever the input; a longer record is a bad record naming file and line.
pub const MAX_RECORD_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputFormat {
    /// `.txt` / `.md`: one document per file, or per blank-line-separated block.
    Text,
    /// `.jsonl` / `.ndjson`: one JSON object per line, text in a string field.
    Jsonl,
    /// `.parquet`: a string column.
    Parquet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

#[derive(Debug, Clone)]
pub struct InputFile {
    pub path: PathBuf,
    pub format: InputFormat,
    pub compression: Compression,
    /// Size on disk (compressed), for progress.
    pub size: u64,
}

/// What the file name says about an input, or `None` when kiem does not read such files.
pub fn detect_format(path: &Path) -> Option<(InputFormat, Compression)> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    let (stem, compression) = if let Some(stem) = name.strip_suffix(".gz") {
        (stem, Compression::Gzip)
    } else if let Some(stem) = name.strip_suffix(".zst") {
        (stem, Compression::Zstd)
    } else {
        (name.as_str(), Compression::None)
    };
    let format = match Path::new(stem).extension()?.to_str()? {
        "txt" | "md" | "text" => InputFormat::Text,
        "jsonl" | "ndjson" => InputFormat::Jsonl,
        "parquet" => InputFormat::Parquet,
        _ => return None,
    };
    Some((format, compression))
}

/// Inputs found by [`discover_inputs`].
#[derive(Debug, Default)]
pub struct Discovered {
    /// Readable inputs, in a deterministic order (sorted within each directory).
    pub files: Vec<InputFile>,
    /// Files inside given directories that were skipped because of their extension.
    pub ignored: Vec<PathBuf>,
}

/// Expands the given paths (files or directories, searched recursively) into input files.
/// A file named explicitly must have a supported extension; inside directories, other files and
/// hidden entries are skipped and listed in [`Discovered::ignored`].
pub fn discover_inputs(paths: &[PathBuf]) -> Result<Discovered> {
    if paths.is_empty() {
        return Err(DataError::Invalid("no input given".into()));
    }
    let mut found = Discovered::default();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(DataError::io(path))?;
        if meta.is_dir() {
            walk_dir(path, &mut found)?;
        } else {
            let (format, compression) = detect_format(path).ok_or_else(|| {
                DataError::file(
                    path,
                    "unsupported input type: expected .txt, .md, .jsonl, .ndjson or .parquet, \
                     optionally followed by .gz or .zst",
                )
            })?;
            found.files.push(InputFile {
                path: path.clone(),
                format,
                compression,
                size: meta.len(),
            });
        }
    }
    Ok(found)
}

fn walk_dir(dir: &Path, found: &mut Discovered) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(DataError::io(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(DataError::io(dir))?;
    entries.sort();
    for path in entries {
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        let meta = std::fs::metadata(&path).map_err(DataError::io(&path))?;
        if meta.is_dir() {
            walk_dir(&path, found)?;
        } else if let Some((format, compression)) = detect_format(&path) {
            found.files.push(InputFile {
                path,
                format,
                compression,
                size: meta.len(),
            });
        } else {
            found.ignored.push(path);
        }
    }
    Ok(())
}

/// How records become documents.
#[derive(Debug, Clone)]
pub struct CorpusOptions {
    /// JSONL field / Parquet column holding the text.
    pub text_field: String,
    /// Plain text: one document per blank-line-separated block instead of per file.
    pub split_on_blank_lines: bool,
    /// Plain-text documents longer than this are read in pieces ([`PIECE_BYTES`] by default).
    pub piece_bytes: usize,
    /// The most bytes of one JSONL line or blank-line block ([`MAX_RECORD_BYTES`] by default).
    pub max_record_bytes: usize,
}

impl Default for CorpusOptions {
    fn default() -> Self {
        Self {
            text_field: "text".into(),
            split_on_blank_lines: false,
            piece_bytes: PIECE_BYTES,
            max_record_bytes: MAX_RECORD_BYTES,
        }
    }
}

/// One record as read, before parsing.
#[derive(Debug)]
pub struct RawRecord {
    pub location: Location,
    payload: Payload,
    /// Set for pieces of a plain-text document that was read in several pieces, so that all
    /// of them land in the same split; `None` means "derive from the text".
    split_key: Option<u64>,
    /// False for the second and later pieces of a document.
    pub starts_document: bool,
}

#[derive(Debug)]
enum Payload {
    Text(String),
    Json(Vec<u8>),
    /// The reader already knows this record is bad (e.g. invalid UTF-8).
    Bad(String),
}

/// A document (or a piece of one) ready to tokenize.
#[derive(Debug)]
pub struct TextPiece {
    pub location: Location,
    pub text: String,
    /// Deterministic hash deciding the train/validation split of the whole document.
    pub split_key: u64,
    /// False for the second and later pieces of a document read in pieces.
    pub starts_document: bool,
}

impl RawRecord {
    /// Parses the record. `Ok(None)` is an empty document.
    pub fn into_text(self, text_field: &str) -> Result<Option<TextPiece>> {
        let location = self.location;
        let text = match self.payload {
            Payload::Text(text) => text,
            Payload::Json(bytes) => {
                json_text(&bytes, text_field).map_err(|message| DataError::Record {
                    location: location.clone(),
                    message,
                })?
            }
            Payload::Bad(message) => return Err(DataError::Record { location, message }),
        };
        if text.is_empty() {
            return Ok(None);
        }
        let split_key = self.split_key.unwrap_or_else(|| split_key(&text));
        Ok(Some(TextPiece {
            location,
            text,
            split_key,
            starts_document: self.starts_document,
        }))
    }
}

/// A stable 64-bit hash of a document's text: the train/validation split is a function of the
/// content alone, so it does not change with file order, thread count or machine.
pub fn split_key(text: &str) -> u64 {
    let digest = Sha256::digest(text.as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("sha256 has 32 bytes"))
}

fn json_text(bytes: &[u8], field: &str) -> Result<String, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| format!("invalid UTF-8 at byte {} of the line", e.valid_up_to() + 1))?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(format!(
            "expected a JSON object with a `{field}` field, found {}",
            json_kind(&value)
        ));
    };
    match object.remove(field) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(format!(
            "field `{field}` is {}, expected a string",
            json_kind(&other)
        )),
        None => {
            let mut fields: Vec<&String> = object.keys().collect();
            fields.sort();
            let fields: Vec<&str> = fields.iter().take(10).map(|s| s.as_str()).collect();
            Err(format!(
                "no field `{field}` (fields present: {}); choose one with --text-field",
                if fields.is_empty() {
                    "none".to_string()
                } else {
                    fields.join(", ")
                }
            ))
        }
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Shared between the reader thread and whoever shows progress or wants to stop it.
#[derive(Debug, Default)]
pub struct ReadProgress {
    /// Bytes of input consumed so far (as stored on disk, i.e. compressed).
    pub bytes_read: AtomicU64,
    /// Total bytes of all inputs on disk.
    pub bytes_total: u64,
}

/// A background thread reading inputs into batches of raw records.
pub struct CorpusReader {
    batches: Receiver<Result<Vec<RawRecord>>>,
    pub progress: Arc<ReadProgress>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CorpusReader {
    /// Starts reading `files` in order. Setting `cancel` stops the reader at the next record.
    pub fn spawn(files: Vec<InputFile>, options: CorpusOptions, cancel: Arc<AtomicBool>) -> Self {
        let progress = Arc::new(ReadProgress {
            bytes_read: AtomicU64::new(0),
            bytes_total: files.iter().map(|f| f.size).sum(),
        });
        let (tx, rx) = sync_channel(QUEUED_BATCHES);
        let thread_progress = progress.clone();
        let thread = std::thread::Builder::new()
            .name("kiem-corpus-reader".into())
            .spawn(move || {
                let mut batcher = Batcher {
                    tx,
                    batch: Vec::new(),
                    bytes: 0,
                    cancel,
                };
                for file in &files {
                    let result = read_file(file, &options, &thread_progress, &mut batcher);
                    match result {
                        Ok(()) => {}
                        Err(ReadStop::Receiver) => return,
                        Err(ReadStop::Error(e)) => {
                            let _ = batcher.tx.send(Err(e));
                            return;
                        }
                    }
                }
                let _ = batcher.flush();
            })
            .expect("spawning a thread succeeds");
        Self {
            batches: rx,
            progress,
            thread: Some(thread),
        }
    }

    /// The next batch; `None` once every input has been read.
    pub fn next_batch(&mut self) -> Option<Result<Vec<RawRecord>>> {
        match self.batches.recv() {
            Ok(batch) => Some(batch),
            Err(_) => {
                if let Some(thread) = self.thread.take() {
                    if let Err(panic) = thread.join() {
                        std::panic::resume_unwind(panic);
                    }
                }
                None
            }
        }
    }
}

enum ReadStop {
    /// The consumer hung up (it failed or was cancelled): stop quietly.
    Receiver,
    Error(DataError),
}

impl From<DataError> for ReadStop {
    fn from(e: DataError) -> Self {
        ReadStop::Error(e)
    }
}

struct Batcher {
    tx: SyncSender<Result<Vec<RawRecord>>>,
    batch: Vec<RawRecord>,
    bytes: usize,
    cancel: Arc<AtomicBool>,
}

impl Batcher {
    fn push(&mut self, record: RawRecord) -> Result<(), ReadStop> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(ReadStop::Receiver);
        }
        self.bytes += match &record.payload {
            Payload::Text(t) => t.len(),
            Payload::Json(b) => b.len(),
            Payload::Bad(m) => m.len(),
        };
        self.batch.push(record);
        if self.bytes >= BATCH_BYTES || self.batch.len() >= BATCH_RECORDS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ReadStop> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.bytes = 0;
        let batch = std::mem::take(&mut self.batch);
        self.tx.send(Ok(batch)).map_err(|_| ReadStop::Receiver)
    }
}

/// Counts bytes read from disk into the shared progress.
struct Counting<R> {
    inner: R,
    progress: Arc<ReadProgress>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress
            .bytes_read
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn open_decompressed(file: &InputFile, progress: &Arc<ReadProgress>) -> Result<Box<dyn BufRead>> {
    let raw = File::open(&file.path).map_err(DataError::io(&file.path))?;
    let counted = Counting {
        inner: raw,
        progress: progress.clone(),
    };
    const BUF: usize = 1 << 20;
    Ok(match file.compression {
        Compression::None => Box::new(BufReader::with_capacity(BUF, counted)),
        Compression::Gzip => Box::new(BufReader::with_capacity(
            BUF,
            flate2::read::MultiGzDecoder::new(BufReader::new(counted)),
        )),
        Compression::Zstd => Box::new(BufReader::with_capacity(
            BUF,
            zstd::stream::read::Decoder::new(counted).map_err(DataError::io(&file.path))?,
        )),
    })
}

fn read_file(
    file: &InputFile,
    options: &CorpusOptions,
    progress: &Arc<ReadProgress>,
    out: &mut Batcher,
) -> Result<(), ReadStop> {
    let name: Arc<Path> = Arc::from(file.path.as_path());
    match file.format {
        InputFormat::Parquet => crate::corpus::parquet::read(file, name, options, progress, out),
        InputFormat::Jsonl => {
            let reader = open_decompressed(file, progress)?;
            read_jsonl(reader, name, options.max_record_bytes, out)
        }
        InputFormat::Text if options.split_on_blank_lines => {
            let reader = open_decompressed(file, progress)?;
            read_blocks(reader, name, options.max_record_bytes, out)
        }
        InputFormat::Text => {
            let reader = open_decompressed(file, progress)?;
            read_whole(reader, name, options.piece_bytes.max(1), out)
        }
    }
}

fn line_error(name: &Arc<Path>, line: u64, e: std::io::Error) -> ReadStop {
    ReadStop::Error(DataError::file(
        name.to_path_buf(),
        format!("read error near line {line}: {e}"),
    ))
}

/// Whether a JSONL line holds no record: nothing but white space (Unicode's, as `str::trim`
/// has it, so a vertical tab or a no-break space alone is blank too).
pub fn is_blank_record(line: &[u8]) -> bool {
    std::str::from_utf8(line).is_ok_and(|t| t.trim().is_empty())
}

/// What [`next_line`] read.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A line (with its newline, if it had one) is in the buffer.
    Read,
    /// The line was longer than the limit: it was consumed and dropped.
    TooLong,
    /// The end of the input.
    End,
}

/// Reads the next line into `line` (cleared first) keeping at most `limit` bytes of it
/// besides the newline; a longer line is read to its end and dropped, so memory stays bounded.
pub fn next_line(
    reader: &mut dyn BufRead,
    line: &mut Vec<u8>,
    limit: usize,
) -> std::io::Result<Line> {
    line.clear();
    let n = std::io::Read::take(&mut *reader, limit as u64 + 2).read_until(b'\n', line)?;
    if n == 0 {
        return Ok(Line::End);
    }
    let content =
        line.len() - usize::from(line.ends_with(b"\n")) - usize::from(line.ends_with(b"\r\n"));
    if content <= limit {
        return Ok(Line::Read);
    }
    if !line.ends_with(b"\n") {
        loop {
            let buf = reader.fill_buf()?;
            if buf.is_empty() {
                break;
            }
            match buf.iter().position(|&b| b == b'\n') {
                Some(p) => {
                    reader.consume(p + 1);
                    break;
                }
                None => {
                    let all = buf.len();
                    reader.consume(all);
                }
            }
        }
    }
    line.clear();
    Ok(Line::TooLong)
}

/// The bad-record message of a record over the limit.
pub fn too_long(limit: usize) -> String {
    format!(
        "record longer than {} (the limit for one JSONL line or blank-line block): split it",
        human_bytes(limit)
    )
}

fn human_bytes(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

fn read_jsonl(
    mut reader: Box<dyn BufRead>,
    name: Arc<Path>,
    limit: usize,
    out: &mut Batcher,
) -> Result<(), ReadStop> {
    let mut line_no = 0u64;
    loop {
        let mut line = Vec::new();
        let read = next_line(&mut *reader, &mut line, limit)
            .map_err(|e| line_error(&name, line_no + 1, e))?;
        if read == Line::End {
            return Ok(());
        }
        line_no += 1;
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        let payload = match read {
            Line::TooLong => Payload::Bad(too_long(limit)),
            _ if is_blank_record(&line) => continue,
            _ => Payload::Json(line),
        };
        out.push(RawRecord {
            location: Location {
                file: name.clone(),
                position: Position::Line(line_no),
            },
            payload,
            split_key: None,
            starts_document: true,
        })?;
    }
}

/// Text record from bytes, or a bad record naming the line of the first invalid byte.
fn text_payload(bytes: Vec<u8>, first_line: u64) -> (Payload, u64) {
    match String::from_utf8(bytes) {
        Ok(text) => (Payload::Text(text), first_line),
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let line = first_line
                + e.as_bytes()[..valid]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count() as u64;
            (
                Payload::Bad(format!(
                    "invalid UTF-8 (byte 0x{:02x}); the text must be UTF-8",
                    e.as_bytes()[valid]
                )),
                line,
            )
        }
    }
}

fn read_blocks(
    mut reader: Box<dyn BufRead>,
    name: Arc<Path>,
    limit: usize,
    out: &mut Batcher,
) -> Result<(), ReadStop> {
    let mut line_no = 0u64;
    let mut block: Vec<u8> = Vec::new();
    let mut block_start = 1u64;
    // A block over the limit is dropped as it is read, and reported once it ends.
    let mut oversized = false;
    let emit = |block: &mut Vec<u8>,
                oversized: &mut bool,
                start: u64,
                out: &mut Batcher|
     -> Result<(), ReadStop> {
        let (payload, line) = if std::mem::take(oversized) {
            block.clear();
            (Payload::Bad(too_long(limit)), start)
        } else if block.is_empty() {
            return Ok(());
        } else {
            text_payload(std::mem::take(block), start)
        };
        out.push(RawRecord {
            location: Location {
                file: name.clone(),
                position: Position::Line(line),
            },
            payload,
            split_key: None,
            starts_document: true,
        })
    };
    let mut line = Vec::new();
    loop {
        let read = next_line(&mut *reader, &mut line, limit)
            .map_err(|e| line_error(&name, line_no + 1, e))?;
        if read == Line::End {
            return emit(&mut block, &mut oversized, block_start, out);
        }
        line_no += 1;
        if read == Line::Read && line.iter().all(u8::is_ascii_whitespace) {
            emit(&mut block, &mut oversized, block_start, out)?;
            block_start = line_no + 1;
        } else if read == Line::TooLong || block.len() + line.len() > limit {
            oversized = true;
            block.clear();
        } else if !oversized {
            block.extend_from_slice(&line);
        }
    }
}

/// Where a long text may be cut so that tokenizing the pieces gives exactly the tokens of the
/// whole: right after a newline that follows a visible ASCII character and precedes one. The
/// GPT-2 and GPT-4 pre-tokenizers never join `x\n` with the `y` that follows, nor let the lone
/// `\n` run into the next piece, so no pre-token spans such a cut.
pub fn safe_cut(bytes: &[u8]) -> Option<usize> {
    (2..bytes.len()).rev().find(|&p| {
        bytes[p - 1] == b'\n' && bytes[p - 2].is_ascii_graphic() && bytes[p].is_ascii_graphic()
    })
}

/// Splits `text` at [`safe_cut`] points into segments of roughly `target` bytes (a segment
/// grows past `target` where no cut exists), so long texts can be tokenized in parallel.
pub fn segments(text: &str, target: usize) -> Vec<&str> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    while bytes.len() - start > target {
        // The first cut at or after start + target: search forward in steps.
        let mut probe_end = start + target;
        let cut = loop {
            let window_end = (probe_end + target).min(bytes.len());
            let window_start = probe_end.saturating_sub(2).max(start);
            let found = (window_start + 2..window_end).find(|&p| {
                bytes[p - 1] == b'\n'
                    && bytes[p - 2].is_ascii_graphic()
                    && bytes[p].is_ascii_graphic()
            });
            if found.is_some() || window_end == bytes.len() {
                break found;
            }
            probe_end = window_end;
        };
        match cut {
            Some(cut) => {
                out.push(&text[start..cut]);
                start = cut;
            }
            None => break,
        }
    }
    out.push(&text[start..]);
    out
}

fn read_whole(
    mut reader: Box<dyn BufRead>,
    name: Arc<Path>,
    piece_bytes: usize,
    out: &mut Batcher,
) -> Result<(), ReadStop> {
    let mut pending: Vec<u8> = Vec::new();
    let mut piece_line = 1u64;
    let mut key: Option<u64> = None;
    let mut first = true;
    loop {
        let old_len = pending.len();
        let n = (&mut reader)
            .take(piece_bytes as u64)
            .read_to_end(&mut pending)
            .map_err(|e| line_error(&name, piece_line, e))?;
        if n < piece_bytes {
            // End of file: the rest is the last (often the only) piece.
            if pending.is_empty() && !first {
                return Ok(());
            }
            return emit_piece(pending, &name, piece_line, key, first, out);
        }
        // Earlier bytes held no safe cut, so only the new ones (and the 2 before) need a look.
        let scan_from = old_len.saturating_sub(2);
        let Some(cut) = safe_cut(&pending[scan_from..]).map(|c| c + scan_from) else {
            continue;
        };
        let rest = pending.split_off(cut);
        let piece = std::mem::replace(&mut pending, rest);
        if first {
            // A document read in pieces lands in the split its first piece decides.
            key = Some(std::str::from_utf8(&piece).map(split_key).unwrap_or(0));
        }
        let piece_start = piece_line;
        piece_line += piece.iter().filter(|&&b| b == b'\n').count() as u64;
        emit_piece(piece, &name, piece_start, key, first, out)?;
        first = false;
    }
}

fn emit_piece(
    piece: Vec<u8>,
    name: &Arc<Path>,
    line: u64,
    key: Option<u64>,
    first: bool,
    out: &mut Batcher,
) -> Result<(), ReadStop> {
    let (payload, line) = text_payload(piece, line);
    out.push(RawRecord {
        location: Location {
            file: name.clone(),
            position: Position::Line(line),
        },
        payload,
        split_key: key,
        starts_document: first,
    })
}

mod parquet {
    use super::*;
    use ::parquet::column::reader::ColumnReader;
    use ::parquet::file::reader::{FileReader, SerializedFileReader};

    const ROWS_PER_READ: usize = 1024;

    pub(super) fn read(
        file: &InputFile,
        name: Arc<Path>,
        options: &CorpusOptions,
        progress: &Arc<ReadProgress>,
        out: &mut Batcher,
    ) -> Result<(), ReadStop> {
        let path = &file.path;
        let parquet_err = |e: ::parquet::errors::ParquetError| {
            ReadStop::Error(DataError::file(
                path,
                format!("not a readable Parquet file: {e}"),
            ))
        };
        // Parquet needs random access: a compressed file is unpacked to a temporary file first.
        let (handle, _temp) = match file.compression {
            Compression::None => (File::open(path).map_err(DataError::io(path))?, None),
            _ => {
                let mut reader = open_decompressed(file, progress)?;
                let mut temp = tempfile::tempfile().map_err(DataError::io(path))?;
                std::io::copy(&mut reader, &mut temp).map_err(DataError::io(path))?;
                (temp.try_clone().map_err(DataError::io(path))?, Some(temp))
            }
        };
        let reader = SerializedFileReader::new(handle).map_err(parquet_err)?;
        let schema = reader.metadata().file_metadata().schema_descr();
        let field = &options.text_field;
        let column = schema
            .columns()
            .iter()
            .position(|c| c.path().string() == *field)
            .ok_or_else(|| {
                let names: Vec<String> =
                    schema.columns().iter().map(|c| c.path().string()).collect();
                DataError::file(
                    path,
                    format!(
                        "no column `{field}` (columns: {}); choose one with --text-field",
                        names.join(", ")
                    ),
                )
            })?;
        let descriptor = schema.column(column);
        let max_def = descriptor.max_def_level();
        let row_groups = reader.num_row_groups();
        let share = if file.compression == Compression::None {
            file.size / row_groups.max(1) as u64
        } else {
            0
        };
        let mut row = 0u64;
        for group in 0..row_groups {
            let group_reader = reader.get_row_group(group).map_err(parquet_err)?;
            let ColumnReader::ByteArrayColumnReader(mut values_reader) = group_reader
                .get_column_reader(column)
                .map_err(parquet_err)?
            else {
                return Err(ReadStop::Error(DataError::file(
                    path,
                    format!("column `{field}` does not hold strings"),
                )));
            };
            loop {
                let mut values = Vec::with_capacity(ROWS_PER_READ);
                let mut def_levels = Vec::with_capacity(ROWS_PER_READ);
                let mut rep_levels = Vec::with_capacity(ROWS_PER_READ);
                let (records, _values, levels) = values_reader
                    .read_records(
                        ROWS_PER_READ,
                        Some(&mut def_levels),
                        Some(&mut rep_levels),
                        &mut values,
                    )
                    .map_err(parquet_err)?;
                if records == 0 {
                    break;
                }
                if levels > records {
                    return Err(ReadStop::Error(DataError::file(
                        path,
                        format!("column `{field}` is a list; expected one string per row"),
                    )));
                }
                let mut values = values.into_iter();
                for i in 0..records {
                    let null = max_def > 0 && def_levels.get(i).is_some_and(|&d| d < max_def);
                    let payload = if null {
                        Payload::Bad(format!("`{field}` is null"))
                    } else {
                        let bytes = values.next().map(|v| v.data().to_vec()).unwrap_or_default();
                        text_payload(bytes, 0).0
                    };
                    out.push(RawRecord {
                        location: Location {
                            file: name.clone(),
                            position: Position::Row(row),
                        },
                        payload,
                        split_key: None,
                        starts_document: true,
                    })?;
                    row += 1;
                }
            }
            progress.bytes_read.fetch_add(share, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Tally of records skipped with `--skip-bad-records`.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct BadRecords {
    pub count: u64,
    /// The first few, for the report.
    pub examples: Vec<String>,
}

impl BadRecords {
    const EXAMPLES: usize = 5;

    /// Skips `error` when `skip` is set (counting it), otherwise returns it.
    pub fn skip_or_fail(&mut self, error: DataError, skip: bool) -> Result<()> {
        if !skip {
            return Err(error);
        }
        self.count += 1;
        if self.examples.len() < Self::EXAMPLES {
            self.examples.push(error.to_string());
        }
        Ok(())
    }

    /// Adds another part of the corpus' skipped records (keeping the first examples).
    pub fn absorb(&mut self, other: BadRecords) {
        self.count += other.count;
        let room = Self::EXAMPLES.saturating_sub(self.examples.len());
        self.examples.extend(other.examples.into_iter().take(room));
    }
}

/// Parses a batch of raw records into text pieces on all cores, in order.
pub fn parse_batch(batch: Vec<RawRecord>, text_field: &str) -> Vec<Result<Option<TextPiece>>> {
    batch
        .into_par_iter()
        .map(|record| record.into_text(text_field))
        .collect()
}

/// The documents of a corpus as an iterator of text (for tokenizer training). Bad records stop
/// the stream (see [`DocumentStream::finish`]) unless they are skipped.
pub struct DocumentStream {
    reader: CorpusReader,
    text_field: String,
    skip_bad_records: bool,
    cancel: Arc<AtomicBool>,
    pending: std::vec::IntoIter<String>,
    error: Option<DataError>,
    pub bad: BadRecords,
    pub documents: u64,
    pub bytes: u64,
}

impl DocumentStream {
    pub fn new(
        files: Vec<InputFile>,
        options: CorpusOptions,
        skip_bad_records: bool,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        let text_field = options.text_field.clone();
        Self {
            reader: CorpusReader::spawn(files, options, cancel.clone()),
            text_field,
            skip_bad_records,
            cancel,
            pending: Vec::new().into_iter(),
            error: None,
            bad: BadRecords::default(),
            documents: 0,
            bytes: 0,
        }
    }

    pub fn progress(&self) -> Arc<ReadProgress> {
        self.reader.progress.clone()
    }

    /// The error that ended the stream early, if any.
    pub fn finish(self) -> Result<Self> {
        match self.error {
            Some(e) => Err(e),
            None if self.cancel.load(Ordering::Relaxed) => Err(DataError::Interrupted),
            None => Ok(self),
        }
    }

    fn refill(&mut self) -> bool {
        if self.error.is_some() || self.cancel.load(Ordering::Relaxed) {
            return false;
        }
        let batch = match self.reader.next_batch() {
            None => return false,
            Some(Err(e)) => {
                self.error = Some(e);
                return false;
            }
            Some(Ok(batch)) => batch,
        };
        let mut texts = Vec::with_capacity(batch.len());
        for parsed in parse_batch(batch, &self.text_field) {
            match parsed {
                Ok(Some(piece)) => {
                    if piece.starts_document {
                        self.documents += 1;
                    }
                    self.bytes += piece.text.len() as u64;
                    texts.push(piece.text);
                }
                Ok(None) => {}
                Err(e) => {
                    if let Err(e) = self.bad.skip_or_fail(e, self.skip_bad_records) {
                        self.error = Some(e);
                        return false;
                    }
                }
            }
        }
        self.pending = texts.into_iter();
        true
    }
}

impl Iterator for DocumentStream {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(text) = self.pending.next() {
                return Some(text);
            }
            if !self.refill() {
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_extension() {
        let f = |p: &str| detect_format(Path::new(p));
        assert_eq!(f("a.txt"), Some((InputFormat::Text, Compression::None)));
        assert_eq!(f("a.MD"), Some((InputFormat::Text, Compression::None)));
        assert_eq!(
            f("a.jsonl.gz"),
            Some((InputFormat::Jsonl, Compression::Gzip))
        );
        assert_eq!(
            f("a.parquet.zst"),
            Some((InputFormat::Parquet, Compression::Zstd))
        );
        assert_eq!(f("a.csv"), None);
        assert_eq!(f("a.gz"), None);
        assert_eq!(f("README"), None);
    }

    #[test]
    fn safe_cut_only_between_visible_characters() {
        assert_eq!(safe_cut(b"ab\ncd"), Some(3));
        assert_eq!(safe_cut(b"ab \ncd"), None, "whitespace before the newline");
        assert_eq!(safe_cut(b"ab\n cd"), None, "whitespace after the newline");
        assert_eq!(safe_cut(b"ab\r\ncd"), None, "CRLF");
        assert_eq!(safe_cut(b"a\nb\nc"), Some(4), "the last cut wins");
    }

    #[test]
    fn segments_cover_the_text_at_safe_cuts() {
        let text = "line one\nline two\n  indented\nx\ny\nlast";
        for target in 1..text.len() + 2 {
            let parts = segments(text, target);
            assert_eq!(parts.concat(), text, "target {target}");
            let mut cut = 0;
            for part in &parts[..parts.len() - 1] {
                cut += part.len();
                assert!(
                    safe_cut(&text.as_bytes()[cut - 2..=cut]).is_some(),
                    "{part:?}"
                );
            }
        }
        assert_eq!(
            segments("no newlines at all", 4),
            vec!["no newlines at all"]
        );
    }

    #[test]
    fn json_errors_say_what_is_wrong() {
        assert_eq!(json_text(br#"{"text":"hi"}"#, "text").unwrap(), "hi");
        assert!(json_text(br#"{"text":"hi""#, "text")
            .unwrap_err()
            .contains("malformed JSON"));
        let e = json_text(br#"{"body":"hi","id":1}"#, "text").unwrap_err();
        assert!(
            e.contains("no field `text`") && e.contains("body, id"),
            "{e}"
        );
        assert!(json_text(br#"{"text":3}"#, "text")
            .unwrap_err()
            .contains("a number"));
        assert!(json_text(br#"[1]"#, "text")
            .unwrap_err()
            .contains("an array"));
        assert!(json_text(b"{\"text\":\"\xff\"}", "text")
            .unwrap_err()
            .contains("UTF-8"));
    }
}
