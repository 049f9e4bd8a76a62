//! `kiem data prepare`: corpus → tokenized llm.c shards + `manifest.json` + `tokenizer.json`.
//!
//! Reading, tokenizing and writing overlap: one thread reads batches, all cores tokenize a batch
//! (in order, so the output does not depend on the thread count), the calling thread writes.
//! Everything is written into a hidden staging directory beside the output, which is renamed
//! into place only when complete; on any error or interruption it is removed.
//!
//! In a job of several processes (`mpirun -n N`, see `kiem_dist`), each tokenizes a contiguous
//! run of the input files (balanced by bytes) into its own shards (`train_r0001_000000.bin`)
//! in one shared staging directory; the first process merges their counts into one manifest
//! listing the shards in file order, so the token stream and the split are one process's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiem_tokenizer::Tokenizer;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use kiem_dist::Collective;

use crate::corpus::{
    discover_inputs, BadRecords, CorpusOptions, CorpusReader, InputFile, ReadProgress,
};
use crate::shard::{Shard, ShardInfo, ShardWriter, TokenWidth};
use crate::{DataError, Result};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
const MANIFEST_FORMAT: &str = "kiem-token-shards";
const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub inputs: Vec<PathBuf>,
    pub out: PathBuf,
    /// Fraction of documents (chosen by a hash of their text) held out for validation.
    pub val_fraction: f64,
    pub corpus: CorpusOptions,
    pub skip_bad_records: bool,
    /// Tokens per shard file.
    pub shard_tokens: u64,
    /// Replace an existing non-empty output directory.
    pub overwrite: bool,
}

/// What `manifest.json` records about a prepared data directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub kiem_version: String,
    pub tokenizer: TokenizerInfo,
    pub token_width: TokenWidth,
    pub val_fraction: f64,
    pub train: SplitStats,
    pub val: SplitStats,
    /// Records skipped with `--skip-bad-records`.
    pub skipped_records: u64,
    /// Records whose text was empty (nothing to train on).
    pub empty_documents: u64,
    pub input_files: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// `gpt2` or the path it was loaded from.
    pub source: String,
    /// `sha256:` of `tokenizer.json`; data and model must agree on it.
    pub hash: String,
    pub vocab_size: usize,
    pub bos_id: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitStats {
    pub documents: u64,
    /// Tokens including one BOS per document.
    pub tokens: u64,
    /// UTF-8 bytes of the documents' text (for bits per byte).
    pub bytes: u64,
    pub shards: Vec<ShardInfo>,
}

impl Manifest {
    pub fn total_documents(&self) -> u64 {
        self.train.documents + self.val.documents
    }
}

/// Progress of a running [`prepare`].
#[derive(Debug, Clone, Copy)]
pub struct PrepareProgress {
    pub bytes_read: u64,
    pub bytes_total: u64,
    pub documents: u64,
    pub tokens: u64,
    pub text_bytes: u64,
}

#[derive(Debug)]
pub struct PrepareReport {
    pub manifest: Manifest,
    pub bad: BadRecords,
    /// Files inside input directories skipped for their extension.
    pub ignored_inputs: Vec<PathBuf>,
    pub warnings: Vec<String>,
    pub elapsed: Duration,
}

/// Tokenizes the corpus into `options.out`. See the module docs.
pub fn prepare(
    tokenizer: &Tokenizer,
    options: &PrepareOptions,
    cancel: Arc<AtomicBool>,
    on_progress: &mut dyn FnMut(PrepareProgress),
) -> Result<PrepareReport> {
    let started = Instant::now();
    let val_fraction = options.val_fraction;
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(DataError::Invalid(format!(
            "--val-fraction {val_fraction} is out of range: choose 0 <= F < 1"
        )));
    }
    check_output(&options.out, options.overwrite)?;
    let discovered = discover_inputs(&options.inputs)?;
    if discovered.files.is_empty() {
        return Err(DataError::Invalid(format!(
            "no readable input files in {} ({} other files ignored)",
            list_paths(&options.inputs),
            discovered.ignored.len()
        )));
    }
    let input_files = discovered.files.len() as u64;
    let world = kiem_dist::world();
    let (rank, ranks) = (world.rank(), world.size());
    let staging = Staging::create(&options.out, world)?;
    let width = TokenWidth::for_vocab(tokenizer.vocab_size());
    let prefix = |split: &str| {
        if ranks > 1 {
            format!("{split}_r{rank:04}")
        } else {
            split.to_string()
        }
    };
    let mut writers = [
        ShardWriter::new(&staging.dir, &prefix("train"), options.shard_tokens, width)?,
        ShardWriter::new(&staging.dir, &prefix("val"), options.shard_tokens, width)?,
    ];
    let mut stats = [SplitStats::default(), SplitStats::default()];
    let mut bad = BadRecords::default();
    let mut empty_documents = 0u64;
    let bos = [tokenizer.bos_id()];
    let field = options.corpus.text_field.as_str();

    let files = share_of_files(discovered.files, rank, ranks);
    let mut reader = CorpusReader::spawn(files, options.corpus.clone(), cancel.clone());
    let read_progress: Arc<ReadProgress> = reader.progress.clone();
    while let Some(batch) = reader.next_batch() {
        if cancel.load(Ordering::Relaxed) {
            return Err(DataError::Interrupted);
        }
        let tokenized: Vec<_> = batch?
            .into_par_iter()
            .map(|record| {
                let piece = record.into_text(field)?;
                Ok(piece.map(|p| {
                    let ids = encode_parallel(tokenizer, &p.text);
                    (p.split_key, p.starts_document, p.text.len() as u64, ids)
                }))
            })
            .collect();
        for outcome in tokenized {
            match outcome {
                Err(e) => bad.skip_or_fail(e, options.skip_bad_records)?,
                Ok(None) => empty_documents += 1,
                Ok(Some((key, starts_document, bytes, ids))) => {
                    let split = usize::from(is_validation(key, val_fraction));
                    if starts_document {
                        writers[split].write(&bos)?;
                        stats[split].documents += 1;
                        stats[split].tokens += 1;
                    }
                    writers[split].write(&ids)?;
                    stats[split].tokens += ids.len() as u64;
                    stats[split].bytes += bytes;
                }
            }
        }
        on_progress(PrepareProgress {
            bytes_read: read_progress.bytes_read.load(Ordering::Relaxed),
            bytes_total: read_progress.bytes_total,
            documents: stats[0].documents + stats[1].documents,
            tokens: stats[0].tokens + stats[1].tokens,
            text_bytes: stats[0].bytes + stats[1].bytes,
        });
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(DataError::Interrupted);
    }
    let [train_writer, val_writer] = writers;
    let [mut train, mut val] = stats;
    train.shards = train_writer.finish()?;
    val.shards = val_writer.finish()?;
    if ranks > 1 {
        let mine = PartCounts {
            splits: [train, val],
            bad,
            empty_documents,
        };
        let Some(all) = mine.merge_over(world, &staging.dir)? else {
            // The first process writes the manifest and moves the data into place.
            let mut json = Vec::new();
            world.broadcast_bytes(&mut json);
            let manifest = serde_json::from_slice(&json)
                .map_err(|e| DataError::Invalid(format!("the first process's manifest: {e}")))?;
            return Ok(PrepareReport {
                manifest,
                bad: BadRecords::default(),
                ignored_inputs: discovered.ignored,
                warnings: Vec::new(),
                elapsed: started.elapsed(),
            });
        };
        [train, val] = all.splits;
        bad = all.bad;
        empty_documents = all.empty_documents;
    }

    let documents = train.documents + val.documents;
    if documents == 0 {
        return Err(DataError::Invalid(format!(
            "empty corpus: no documents with text in {} ({input_files} files read, {} bad \
             records skipped, {empty_documents} empty documents)",
            list_paths(&options.inputs),
            bad.count
        )));
    }
    let mut warnings = Vec::new();
    if train.documents == 0 {
        return Err(DataError::Invalid(format!(
            "all {documents} documents fell into the validation split; lower --val-fraction"
        )));
    }
    if val_fraction > 0.0 && val.documents == 0 {
        warnings.push(format!(
            "the validation split is empty: {documents} document(s) is too few for \
             --val-fraction {val_fraction} (for a single long text, try --split-on-blank-lines)"
        ));
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        format_version: MANIFEST_VERSION,
        kiem_version: env!("CARGO_PKG_VERSION").into(),
        tokenizer: TokenizerInfo {
            source: tokenizer.source().to_string(),
            hash: tokenizer.hash().to_string(),
            vocab_size: tokenizer.vocab_size(),
            bos_id: tokenizer.bos_id(),
        },
        token_width: width,
        val_fraction,
        train,
        val,
        skipped_records: bad.count,
        empty_documents,
        input_files,
    };
    tokenizer.save(&staging.dir.join(TOKENIZER_FILE))?;
    let json = serde_json::to_string_pretty(&manifest).expect("manifest serializes");
    let manifest_path = staging.dir.join(MANIFEST_FILE);
    kiem_tokenizer::write_atomic(&manifest_path, json.as_bytes())
        .map_err(DataError::io(&manifest_path))?;
    staging.commit(&options.out)?;
    if ranks > 1 {
        world.broadcast_bytes(&mut json.into_bytes());
    }
    Ok(PrepareReport {
        manifest,
        bad,
        ignored_inputs: discovered.ignored,
        warnings,
        elapsed: started.elapsed(),
    })
}

/// Texts longer than this are cut at exact boundaries and tokenized on several cores.
const PARALLEL_SEGMENT_BYTES: usize = 256 << 10;

/// Encodes like `tokenizer.encode`, with long texts split into segments at cut points that no
/// pre-token spans ([`crate::corpus::safe_cut`]), so the ids are identical.
pub fn encode_parallel(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
    if text.len() <= 2 * PARALLEL_SEGMENT_BYTES {
        return tokenizer.encode(text);
    }
    let parts: Vec<Vec<u32>> = crate::corpus::segments(text, PARALLEL_SEGMENT_BYTES)
        .into_par_iter()
        .map(|segment| tokenizer.encode(segment))
        .collect();
    parts.concat()
}

/// Deterministic document-level split: the top 53 bits of the key as a uniform [0, 1) number.
pub fn is_validation(split_key: u64, val_fraction: f64) -> bool {
    ((split_key >> 11) as f64 / (1u64 << 53) as f64) < val_fraction
}

/// The contiguous run of `files` that process `rank` of `ranks` tokenizes: each file goes to the
/// process whose equal share of the total bytes holds the file's first byte.
fn share_of_files(files: Vec<InputFile>, rank: usize, ranks: usize) -> Vec<InputFile> {
    let total = files.iter().map(|f| f.size as u128).sum::<u128>().max(1);
    let mut start = 0u128;
    files
        .into_iter()
        .filter(|file| {
            let owner = ((start * ranks as u128 / total) as usize).min(ranks - 1);
            start += file.size as u128;
            owner == rank
        })
        .collect()
}

/// What one process of a job counted over its share of the corpus.
#[derive(Debug, Serialize, Deserialize)]
struct PartCounts {
    splits: [SplitStats; 2],
    bad: BadRecords,
    empty_documents: u64,
}

impl PartCounts {
    /// Every process's counts, summed in rank order (shards listed in file order), on the first
    /// process; `None` on the others. Exchanged through files in the shared staging directory.
    fn merge_over(self, world: &dyn Collective, staging: &Path) -> Result<Option<PartCounts>> {
        let part_file = |rank: usize| staging.join(format!(".counts-r{rank:04}.json"));
        let path = part_file(world.rank());
        let json = serde_json::to_vec(&self).expect("counts serialize");
        kiem_tokenizer::write_atomic(&path, &json).map_err(DataError::io(&path))?;
        world.barrier();
        if world.rank() != 0 {
            return Ok(None);
        }
        let mut all = PartCounts {
            splits: Default::default(),
            bad: BadRecords::default(),
            empty_documents: 0,
        };
        for rank in 0..world.size() {
            let path = part_file(rank);
            let text = std::fs::read(&path).map_err(DataError::io(&path))?;
            let part: PartCounts = serde_json::from_slice(&text)
                .map_err(|e| DataError::file(&path, format!("malformed counts: {e}")))?;
            std::fs::remove_file(&path).map_err(DataError::io(&path))?;
            for (sum, split) in all.splits.iter_mut().zip(part.splits) {
                sum.documents += split.documents;
                sum.tokens += split.tokens;
                sum.bytes += split.bytes;
                sum.shards.extend(split.shards);
            }
            all.bad.absorb(part.bad);
            all.empty_documents += part.empty_documents;
        }
        Ok(Some(all))
    }
}

fn list_paths(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn check_output(out: &Path, overwrite: bool) -> Result<()> {
    match std::fs::metadata(out) {
        Err(_) => Ok(()),
        Ok(meta) if !meta.is_dir() => Err(DataError::file(out, "exists and is not a directory")),
        Ok(_) => {
            let empty = std::fs::read_dir(out)
                .map_err(DataError::io(out))?
                .next()
                .is_none();
            if empty || overwrite {
                Ok(())
            } else {
                Err(DataError::file(
                    out,
                    "output directory is not empty; pass --overwrite to replace it",
                ))
            }
        }
    }
}

/// A hidden directory beside the output that becomes the output on [`Staging::commit`] and is
/// removed otherwise. In a job of several processes the first creates, commits and removes it;
/// the others write into it (the output must be on a filesystem they all share).
struct Staging {
    dir: PathBuf,
    committed: bool,
}

impl Staging {
    fn create(out: &Path, world: &dyn Collective) -> Result<Self> {
        if world.size() == 1 {
            return Self::create_here(out);
        }
        let (staging, mut name) = if world.rank() == 0 {
            let staging = Self::create_here(out)?;
            let name = staging.dir.to_string_lossy().into_owned().into_bytes();
            (Some(staging), name)
        } else {
            (None, Vec::new())
        };
        world.broadcast_bytes(&mut name);
        if let Some(staging) = staging {
            return Ok(staging);
        }
        let dir = PathBuf::from(String::from_utf8_lossy(&name).into_owned());
        if !dir.is_dir() {
            return Err(DataError::file(
                &dir,
                "the first process's staging directory is not visible here: the output of a job \
                 on several machines must be on a filesystem they share",
            ));
        }
        // Not ours to remove: the first process owns it.
        Ok(Self {
            dir,
            committed: true,
        })
    }

    fn create_here(out: &Path) -> Result<Self> {
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(DataError::io(&parent))?;
        let name = out
            .file_name()
            .ok_or_else(|| DataError::file(out, "output must name a directory"))?
            .to_string_lossy();
        let dir = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(DataError::io(&dir))?;
        }
        std::fs::create_dir(&dir).map_err(DataError::io(&dir))?;
        Ok(Self {
            dir,
            committed: false,
        })
    }

    fn commit(mut self, out: &Path) -> Result<()> {
        if out.exists() {
            // Checked before any work: `out` is empty, or the user asked to replace it.
            let old = self.dir.with_extension("old");
            std::fs::rename(out, &old).map_err(DataError::io(out))?;
            std::fs::rename(&self.dir, out).map_err(DataError::io(out))?;
            self.committed = true;
            std::fs::remove_dir_all(&old).map_err(DataError::io(&old))?;
        } else {
            std::fs::rename(&self.dir, out).map_err(DataError::io(out))?;
            self.committed = true;
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A prepared data directory, opened for training: manifest read, every shard validated.
#[derive(Debug)]
pub struct DataDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub train: Vec<Shard>,
    pub val: Vec<Shard>,
}

impl DataDir {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(DataError::file(
                dir,
                "data directory does not exist (create one with `kiem data prepare`)",
            ));
        }
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DataError::file(
                    dir,
                    "not a prepared data directory: no manifest.json (create one with `kiem data \
                     prepare`)",
                )
            } else {
                DataError::io(&manifest_path)(e)
            }
        })?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| DataError::file(&manifest_path, format!("malformed manifest: {e}")))?;
        if manifest.format != MANIFEST_FORMAT || manifest.format_version > MANIFEST_VERSION {
            return Err(DataError::file(
                &manifest_path,
                format!(
                    "unsupported manifest {} v{} (this kiem reads {MANIFEST_FORMAT} v{MANIFEST_VERSION})",
                    manifest.format, manifest.format_version
                ),
            ));
        }
        let open_split = |split: &SplitStats| -> Result<Vec<Shard>> {
            split
                .shards
                .iter()
                .map(|info| {
                    let path = dir.join(&info.file);
                    let shard = Shard::open(&path)?;
                    if shard.len() as u64 != info.tokens || shard.width() != manifest.token_width {
                        return Err(DataError::file(
                            &path,
                            format!(
                                "shard does not match manifest.json ({} {:?} tokens, manifest says \
                                 {} {:?})",
                                shard.len(),
                                shard.width(),
                                info.tokens,
                                manifest.token_width
                            ),
                        ));
                    }
                    Ok(shard)
                })
                .collect()
        };
        let train = open_split(&manifest.train)?;
        let val = open_split(&manifest.val)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            train,
            val,
        })
    }

    /// The tokenizer stored with the data, checked against the manifest's hash.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let path = self.dir.join(TOKENIZER_FILE);
        let tokenizer = Tokenizer::load(
            path.to_str()
                .ok_or_else(|| DataError::file(&path, "path is not valid UTF-8"))?,
        )?;
        if tokenizer.hash() != self.manifest.tokenizer.hash {
            return Err(DataError::file(
                &path,
                format!(
                    "tokenizer does not match the shards: hash {} but manifest.json says {}",
                    tokenizer.hash(),
                    self.manifest.tokenizer.hash
                ),
            ));
        }
        Ok(tokenizer)
    }
}
