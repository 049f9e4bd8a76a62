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
