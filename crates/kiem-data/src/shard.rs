//! Token shards in llm.c's format: a header of 256 little-endian `i32` (`[0]` magic 20240520,
//! `[1]` version: 1 = `u16` tokens, 2 = `u32` tokens, `[2]` token count), then the tokens.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::{DataError, Result};

pub const MAGIC: i32 = 20240520;
pub const HEADER_INTS: usize = 256;
pub const HEADER_BYTES: usize = HEADER_INTS * 4;
/// The header stores the token count in an `i32`.
pub const MAX_SHARD_TOKENS: u64 = i32::MAX as u64;

/// How tokens are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenWidth {
    /// 2 bytes a token (header version 1): vocabularies up to 65,536.
    U16,
    /// 4 bytes a token (header version 2).
    U32,
}

impl TokenWidth {
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 {
            TokenWidth::U16
        } else {
            TokenWidth::U32
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            TokenWidth::U16 => 2,
            TokenWidth::U32 => 4,
        }
    }

    fn version(self) -> i32 {
        match self {
            TokenWidth::U16 => 1,
            TokenWidth::U32 => 2,
        }
    }
}

fn header(width: TokenWidth, tokens: u64) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&width.version().to_le_bytes());
    header[8..12].copy_from_slice(&(tokens as i32).to_le_bytes());
    header
}

/// A finished shard as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardInfo {
    /// File name, relative to the data directory.
    pub file: String,
    pub tokens: u64,
}

/// Writes a stream of tokens into numbered shards `{prefix}_{index:06}.bin` of at most
/// `max_tokens` each. Each shard is written under a temporary name and renamed when complete.
pub struct ShardWriter {
    dir: PathBuf,
    prefix: String,
    max_tokens: u64,
    width: TokenWidth,
    open: Option<OpenShard>,
    done: Vec<ShardInfo>,
    buffer: Vec<u8>,
}

struct OpenShard {
    file: BufWriter<File>,
    temp: PathBuf,
    name: String,
    tokens: u64,
}

impl ShardWriter {
    pub fn new(dir: &Path, prefix: &str, max_tokens: u64, width: TokenWidth) -> Result<Self> {
        if max_tokens == 0 || max_tokens > MAX_SHARD_TOKENS {
            return Err(DataError::Invalid(format!(
                "shard size {max_tokens} tokens is out of range: choose 1..={MAX_SHARD_TOKENS}"
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            max_tokens,
            width,
            open: None,
            done: Vec::new(),
            buffer: Vec::new(),
        })
    }

    /// Appends tokens, starting new shards as they fill. Ids must fit the token width.
    pub fn write(&mut self, mut tokens: &[u32]) -> Result<()> {
        while !tokens.is_empty() {
            if self.open.is_none() {
                self.open = Some(self.start_shard()?);
            }
            let shard = self.open.as_mut().expect("just opened");
            let room = (self.max_tokens - shard.tokens) as usize;
            let (now, later) = tokens.split_at(room.min(tokens.len()));
            self.buffer.clear();
            match self.width {
                TokenWidth::U16 => {
                    for &t in now {
                        let t = u16::try_from(t).map_err(|_| {
                            DataError::Invalid(format!("token id {t} does not fit in 16 bits"))
                        })?;
                        self.buffer.extend_from_slice(&t.to_le_bytes());
                    }
                }
                TokenWidth::U32 => {
                    for &t in now {
                        self.buffer.extend_from_slice(&t.to_le_bytes());
                    }
                }
            }
            shard
                .file
                .write_all(&self.buffer)
                .map_err(DataError::io(&shard.temp))?;
            shard.tokens += now.len() as u64;
            if shard.tokens == self.max_tokens {
                self.close_shard()?;
            }
            tokens = later;
        }
        Ok(())
    }

    fn start_shard(&self) -> Result<OpenShard> {
        let name = format!("{}_{:06}.bin", self.prefix, self.done.len());
        let temp = self.dir.join(format!(".{name}.partial"));
        let file = File::create(&temp).map_err(DataError::io(&temp))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        file.write_all(&header(self.width, 0))
            .map_err(DataError::io(&temp))?;
        Ok(OpenShard {
            file,
            temp,
            name,
            tokens: 0,
        })
    }

    fn close_shard(&mut self) -> Result<()> {
        let Some(shard) = self.open.take() else {
            return Ok(());
        };
        let mut file = shard
            .file
            .into_inner()
            .map_err(|e| DataError::io(&shard.temp)(e.into_error()))?;
        let io = DataError::io(&shard.temp);
        (|| {
            file.seek(SeekFrom::Start(0))?;
            file.write_all(&header(self.width, shard.tokens))?;
            file.sync_all()
        })()
        .map_err(io)?;
        let path = self.dir.join(&shard.name);
        std::fs::rename(&shard.temp, &path).map_err(DataError::io(&path))?;
        self.done.push(ShardInfo {
            file: shard.name,
            tokens: shard.tokens,
        });
        Ok(())
    }

    /// Closes the last shard and returns all of them.
    pub fn finish(mut self) -> Result<Vec<ShardInfo>> {
        self.close_shard()?;
        Ok(std::mem::take(&mut self.done))
    }
}

/// A memory-mapped shard whose header and size have been checked.
pub struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
    width: TokenWidth,
    tokens: usize,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("width", &self.width)
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl Shard {
    /// Opens and validates a shard: magic, version, and a file size that matches the token
    /// count in the header exactly (a truncated or padded file is an error).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(DataError::io(path))?;
        let len = file.metadata().map_err(DataError::io(path))?.len();
        let bad = |message: String| DataError::file(path, message);
        if len < HEADER_BYTES as u64 {
            return Err(bad(format!(
                "not a token shard: {len} bytes, shorter than the {HEADER_BYTES}-byte header"
            )));
        }
        // SAFETY: the map is read-only; shards are written under a temporary name and renamed
        // into place whole, so nothing writes to a file while it is mapped.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(DataError::io(path))?;
        let int = |i: usize| i32::from_le_bytes(map[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        if int(0) != MAGIC {
            return Err(bad(format!(
                "not a token shard: magic number {} (expected {MAGIC})",
                int(0)
            )));
        }
        let width = match int(1) {
            1 => TokenWidth::U16,
            2 => TokenWidth::U32,
            v => {
                return Err(bad(format!(
                    "unsupported shard version {v} (expected 1 or 2)"
                )))
            }
        };
        let tokens = int(2);
        if tokens < 0 {
            return Err(bad(format!(
                "corrupt header: negative token count {tokens}"
            )));
        }
        let tokens = tokens as usize;
        let expected = HEADER_BYTES as u64 + (tokens * width.bytes()) as u64;
        if len != expected {
            let what = if len < expected {
                "truncated"
            } else {
                "longer than its header says"
            };
            return Err(bad(format!(
                "shard is {what}: the header promises {tokens} tokens ({expected} bytes) but the \
                 file has {len} bytes"
            )));
        }
        Ok(Self {
            path: path.to_path_buf(),
            map,
            width,
            tokens,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn width(&self) -> TokenWidth {
        self.width
    }

    pub fn len(&self) -> usize {
        self.tokens
    }

    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// The token at `index`. Panics when out of range.
    pub fn get(&self, index: usize) -> u32 {
        assert!(
            index < self.tokens,
            "token {index} of a {}-token shard",
            self.tokens
        );
        let data = &self.map[HEADER_BYTES..];
        match self.width {
            TokenWidth::U16 => u16::from_le_bytes([data[2 * index], data[2 * index + 1]]) as u32,
            TokenWidth::U32 => {
                u32::from_le_bytes(data[4 * index..4 * index + 4].try_into().expect("4 bytes"))
            }
        }
    }

    /// Copies `out.len()` tokens starting at `start` into `out`. Panics when out of range.
    pub fn read_into(&self, start: usize, out: &mut [u32]) {
        let end = start + out.len();
        assert!(
            end <= self.tokens,
            "tokens {start}..{end} of a {}-token shard",
            self.tokens
        );
        let w = self.width.bytes();
        let data = &self.map[HEADER_BYTES + start * w..HEADER_BYTES + end * w];
        match self.width {
            TokenWidth::U16 => {
                for (o, b) in out.iter_mut().zip(data.chunks_exact(2)) {
                    *o = u16::from_le_bytes([b[0], b[1]]) as u32;
                }
            }
            TokenWidth::U32 => {
                for (o, b) in out.iter_mut().zip(data.chunks_exact(4)) {
                    *o = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
        }
    }

    /// All tokens, copied out.
    pub fn to_vec(&self) -> Vec<u32> {
        let mut out = vec![0; self.tokens];
        self.read_into(0, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_shards(dir: &Path, width: TokenWidth, max: u64, tokens: &[u32]) -> Vec<ShardInfo> {
        let mut writer = ShardWriter::new(dir, "train", max, width).unwrap();
        writer.write(&tokens[..tokens.len() / 2]).unwrap();
        writer.write(&tokens[tokens.len() / 2..]).unwrap();
        writer.finish().unwrap()
    }

    #[test]
    fn round_trip_and_split_across_shards() {
        for width in [TokenWidth::U16, TokenWidth::U32] {
            let dir = tempfile::tempdir().unwrap();
            let tokens: Vec<u32> = (0..2500).map(|i| (i * 7) % 60000).collect();
            let shards = write_shards(dir.path(), width, 1000, &tokens);
            assert_eq!(
                shards.iter().map(|s| s.tokens).collect::<Vec<_>>(),
                vec![1000, 1000, 500]
            );
            let mut all = Vec::new();
            for info in &shards {
                let shard = Shard::open(&dir.path().join(&info.file)).unwrap();
                assert_eq!(shard.width(), width);
                all.extend(shard.to_vec());
            }
            assert_eq!(all, tokens);
            let shard = Shard::open(&dir.path().join("train_000001.bin")).unwrap();
            assert_eq!(shard.get(3), tokens[1003]);
            let mut window = [0u32; 5];
            shard.read_into(10, &mut window);
            assert_eq!(window, tokens[1010..1015]);
            // No temporary files are left behind.
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
        }
    }

    #[test]
    fn header_matches_llm_c() {
        let dir = tempfile::tempdir().unwrap();
        write_shards(dir.path(), TokenWidth::U16, 100, &[1, 2, 3, 65535]);
        let bytes = std::fs::read(dir.path().join("train_000000.bin")).unwrap();
        assert_eq!(bytes.len(), 1024 + 8);
        assert_eq!(&bytes[0..4], &20240520i32.to_le_bytes());
        assert_eq!(&bytes[4..8], &1i32.to_le_bytes());
        assert_eq!(&bytes[8..12], &4i32.to_le_bytes());
        assert_eq!(&bytes[1024..], &[1, 0, 2, 0, 3, 0, 255, 255]);
    }

    #[test]
    fn u16_rejects_large_ids() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = ShardWriter::new(dir.path(), "train", 10, TokenWidth::U16).unwrap();
        let err = writer.write(&[70000]).unwrap_err();
        assert!(err.to_string().contains("70000"));
    }

    #[test]
    fn corrupt_shards_are_rejected_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        write_shards(dir.path(), TokenWidth::U16, 100, &[1, 2, 3, 4]);
        let path = dir.path().join("train_000000.bin");
        let good = std::fs::read(&path).unwrap();

        let check = |bytes: &[u8], needle: &str| {
            std::fs::write(&path, bytes).unwrap();
            let err = Shard::open(&path).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
            assert!(err.contains("train_000000.bin"), "{err}");
        };
        check(&good[..good.len() - 1], "truncated");
        check(&[good.clone(), vec![0, 0]].concat(), "longer");
        check(&good[..100], "shorter than");
        let mut bad_magic = good.clone();
        bad_magic[0] = 0;
        check(&bad_magic, "magic");
        let mut bad_version = good.clone();
        bad_version[4] = 9;
        check(&bad_version, "version 9");
    }
}
