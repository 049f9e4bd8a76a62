//! Batches of (input, target) rows from token shards, read as one stream that wraps around.
//! The cursor is plain data, saved in checkpoints, so a resumed run reads the same batches.

use kiem_data::shard::Shard;
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// Position in the token stream of one split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Token offset into the concatenation of the split's shards.
    pub position: u64,
    /// Completed passes over the data.
    pub epoch: u64,
}

/// Reads rows of `seq + 1` consecutive tokens; row `r` of a batch starts `seq` tokens after row
/// `r - 1` (as llm.c does), so every token is a target once per epoch.
pub struct TokenLoader<'a> {
    shards: &'a [Shard],
    starts: Vec<u64>,
    total: u64,
    pub cursor: Cursor,
}

impl<'a> TokenLoader<'a> {
    pub fn new(shards: &'a [Shard], split: &str, seq: usize) -> Result<Self> {
        let mut starts = Vec::with_capacity(shards.len());
        let mut total = 0u64;
        for shard in shards {
            starts.push(total);
            total += shard.len() as u64;
        }
        if total < seq as u64 + 1 {
            return Err(TrainError::Data(format!(
                "the {split} split holds {total} tokens, fewer than one sequence of --context {seq} \
                 (+1); use a smaller context or more data"
            )));
        }
        Ok(Self {
            shards,
            starts,
            total,
            cursor: Cursor::default(),
        })
    }

    pub fn shards(&self) -> &'a [Shard] {
        self.shards
    }

    pub fn total_tokens(&self) -> u64 {
        self.total
    }

    /// Copies `out.len()` tokens starting at stream position `pos` (no wrap inside).
    fn read(&self, mut pos: u64, out: &mut [u32]) {
        let mut filled = 0;
        while filled < out.len() {
            let shard = self.starts.partition_point(|&s| s <= pos) - 1;
            let offset = (pos - self.starts[shard]) as usize;
            let available = self.shards[shard].len() - offset;
            let n = available.min(out.len() - filled);
            self.shards[shard].read_into(offset, &mut out[filled..filled + n]);
            filled += n;
            pos += n as u64;
        }
    }

    /// Fills `inputs` and `targets` (`batch * seq` each) and advances the cursor.
    pub fn next_batch(
        &mut self,
        batch: usize,
        seq: usize,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<Option<u32>>,
    ) {
        inputs.clear();
        targets.clear();
        let mut row = vec![0u32; seq + 1];
        for _ in 0..batch {
            if self.cursor.position + seq as u64 + 1 > self.total {
                self.cursor.position = 0;
                self.cursor.epoch += 1;
            }
            self.read(self.cursor.position, &mut row);
            inputs.extend_from_slice(&row[..seq]);
            targets.extend(row[1..].iter().map(|&t| Some(t)));
            self.cursor.position += seq as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiem_data::shard::{ShardWriter, TokenWidth};

    fn shards(dir: &std::path::Path, sizes: &[u32]) -> Vec<Shard> {
        let mut writer = ShardWriter::new(dir, "train", sizes[0] as u64, TokenWidth::U16).unwrap();
        let total: u32 = sizes.iter().sum();
        writer.write(&(0..total).collect::<Vec<_>>()).unwrap();
        let infos = writer.finish().unwrap();
        infos
            .iter()
            .map(|i| Shard::open(&dir.join(&i.file)).unwrap())
            .collect()
    }

    #[test]
    fn rows_cross_shards_and_wrap_around() {
        let dir = tempfile::tempdir().unwrap();
        let shards = shards(dir.path(), &[10, 10, 5]);
        let mut loader = TokenLoader::new(&shards, "train", 4).unwrap();
        assert_eq!(loader.total_tokens(), 25);
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        loader.next_batch(3, 4, &mut inputs, &mut targets);
        assert_eq!(inputs, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        let expected: Vec<Option<u32>> = (1..=12).map(Some).collect();
        assert_eq!(
            targets, expected,
            "targets are the inputs shifted by one, across shards"
        );
        loader.next_batch(3, 4, &mut inputs, &mut targets);
        assert_eq!(inputs, vec![12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]);
        assert_eq!(
            targets.last(),
            Some(&Some(24)),
            "the last row ends exactly at the last token"
        );
        // A row at 24 would need tokens up to 28 > 25: wrap to the start, next epoch.
        loader.next_batch(1, 4, &mut inputs, &mut targets);
        assert_eq!(inputs, vec![0, 1, 2, 3]);
        assert_eq!(
            loader.cursor,
            Cursor {
                position: 4,
                epoch: 1
            }
        );
    }

    #[test]
    fn a_split_shorter_than_a_row_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let shards = shards(dir.path(), &[5]);
        let err = TokenLoader::new(&shards, "train", 8)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("5 tokens") && err.contains("--context 8"),
            "{err}"
        );
    }
}
