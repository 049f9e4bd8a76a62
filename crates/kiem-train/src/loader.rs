//! Batches of (input, target) rows from token shards, read as one stream cut into rows.
//!
//! Training visits the rows of each epoch in a seeded pseudo-random order (a bijection on the
//! row indices, so no permutation table is stored whatever the corpus size): batches mix the
//! whole corpus instead of reading the first file for the first thousand steps. Evaluation reads
//! rows in order. The cursor is plain data, saved in checkpoints, so a resumed run reads the
//! same batches.

use kiem_data::shard::Shard;
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};

/// Position in the row order of one split.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    /// Rows of the current epoch already read.
    pub row: u64,
    /// Completed passes over the data.
    pub epoch: u64,
}

/// A source of training or evaluation batches with a resumable cursor.
pub trait Batches {
    /// Longest row: no batch is longer.
    fn seq(&self) -> usize;
    /// Rows per epoch.
    fn rows(&self) -> u64;
    fn cursor(&self) -> Cursor;
    fn set_cursor(&mut self, cursor: Cursor);
    /// Fills `inputs` and `targets` (`batch * shape.seq` each, `shape.seq <= self.seq()`) and
    /// advances the cursor.
    fn next_batch(
        &mut self,
        batch: usize,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<Option<u32>>,
    ) -> BatchShape;
    /// The last batch's positions when its rows pack several examples (see
    /// `kiem_engine::Gpt::forward_packed`); `None`: one sequence per row.
    fn packed_positions(&self) -> Option<&[u32]> {
        None
    }
}

/// What a batch holds: its row length and how many of its inputs are real tokens (not padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchShape {
    pub seq: usize,
    pub tokens: usize,
}

/// The next row to read, advancing `cursor` (and starting the next epoch after the last row).
pub fn take_row(cursor: &mut Cursor, rows: u64, shuffle: Option<u64>) -> u64 {
    if cursor.row >= rows {
        cursor.row = 0;
        cursor.epoch += 1;
    }
    let index = row_index(*cursor, rows, shuffle);
    cursor.row += 1;
    index
}

/// Row `row` of an epoch: shuffled with a per-epoch key, or in order.
pub fn row_index(cursor: Cursor, rows: u64, shuffle: Option<u64>) -> u64 {
    match shuffle {
        Some(seed) => permute(
            cursor.row,
            rows,
            seed ^ cursor.epoch.wrapping_mul(0xA24B_AED4_963E_E407),
        ),
        None => cursor.row,
    }
}

/// Reads rows of `seq + 1` consecutive tokens; row `r` starts at token `r · seq` (as llm.c's
/// rows do), so every token is a target once per epoch.
pub struct TokenLoader<'a> {
    shards: &'a [Shard],
    starts: Vec<u64>,
    total: u64,
    seq: usize,
    rows: u64,
    /// `Some(seed)`: visit rows in a seeded pseudo-random order per epoch.
    shuffle: Option<u64>,
    pub cursor: Cursor,
}

/// A pseudo-random bijection on `0..n`, different for each key: a 4-round Feistel network on
/// the smallest even number of bits covering `n`, cycle-walking values that land outside.
pub fn permute(index: u64, n: u64, key: u64) -> u64 {
    debug_assert!(index < n);
    if n <= 1 {
        return index;
    }
    let bits = (64 - (n - 1).leading_zeros()).max(2).div_ceil(2);
    let mask = (1u64 << bits) - 1;
    let round = |x: u64, r: u64| {
        let mut z = x ^ key.wrapping_add(r.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) & mask
    };
    let mut x = index;
    loop {
        let (mut left, mut right) = (x >> bits, x & mask);
        for r in 0..4 {
            let next = left ^ round(right, r);
            left = right;
            right = next;
        }
        x = (left << bits) | right;
        if x < n {
            return x;
        }
    }
}

impl<'a> TokenLoader<'a> {
    /// `shuffle`: a seed to visit rows in pseudo-random order (training), or `None` (evaluation).
    pub fn new(shards: &'a [Shard], split: &str, seq: usize, shuffle: Option<u64>) -> Result<Self> {
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
            seq,
            rows: (total - 1) / seq as u64,
            shuffle,
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
}

impl Batches for TokenLoader<'_> {
    fn seq(&self) -> usize {
        self.seq
    }

    fn rows(&self) -> u64 {
        self.rows
    }

    fn cursor(&self) -> Cursor {
        self.cursor
    }

    fn set_cursor(&mut self, cursor: Cursor) {
        self.cursor = cursor;
    }

    fn next_batch(
        &mut self,
        batch: usize,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<Option<u32>>,
    ) -> BatchShape {
        let seq = self.seq;
        inputs.clear();
        targets.clear();
        let mut row = vec![0u32; seq + 1];
        for _ in 0..batch {
            let index = take_row(&mut self.cursor, self.rows, self.shuffle);
            self.read(index * seq as u64, &mut row);
            inputs.extend_from_slice(&row[..seq]);
            targets.extend(row[1..].iter().map(|&t| Some(t)));
        }
        BatchShape {
            seq,
            tokens: batch * seq,
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
        let mut loader = TokenLoader::new(&shards, "train", 4, None).unwrap();
        assert_eq!(loader.total_tokens(), 25);
        assert_eq!(loader.rows(), 6);
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        loader.next_batch(3, &mut inputs, &mut targets);
        assert_eq!(inputs, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        let expected: Vec<Option<u32>> = (1..=12).map(Some).collect();
        assert_eq!(
            targets, expected,
            "targets are the inputs shifted by one, across shards"
        );
        loader.next_batch(3, &mut inputs, &mut targets);
        assert_eq!(inputs, vec![12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]);
        assert_eq!(
            targets.last(),
            Some(&Some(24)),
            "the last row ends exactly at the last token"
        );
        // A row at 24 would need tokens up to 28 > 25: wrap to the start, next epoch.
        loader.next_batch(1, &mut inputs, &mut targets);
        assert_eq!(inputs, vec![0, 1, 2, 3]);
        assert_eq!(loader.cursor, Cursor { row: 1, epoch: 1 });
    }

    #[test]
    fn shuffled_epochs_visit_every_row_once_in_a_new_order() {
        for n in [1u64, 2, 3, 7, 64, 1000, 4097] {
            for key in [0u64, 1, 99] {
                let mut seen: Vec<u64> = (0..n).map(|i| permute(i, n, key)).collect();
                seen.sort();
                assert_eq!(seen, (0..n).collect::<Vec<_>>(), "bijection for n={n}");
            }
        }
        let order: Vec<u64> = (0..1000).map(|i| permute(i, 1000, 5)).collect();
        let other: Vec<u64> = (0..1000).map(|i| permute(i, 1000, 6)).collect();
        assert_ne!(order, other);
        assert!(
            order.windows(2).filter(|w| w[1] == w[0] + 1).count() < 20,
            "not near the identity"
        );

        let dir = tempfile::tempdir().unwrap();
        let shards = shards(dir.path(), &[100, 100, 41]);
        let mut loader = TokenLoader::new(&shards, "train", 4, Some(7)).unwrap();
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        let mut starts = Vec::new();
        for _ in 0..loader.rows() {
            loader.next_batch(1, &mut inputs, &mut targets);
            assert_eq!(targets[0], Some(inputs[0] + 1));
            starts.push(inputs[0]);
        }
        let mut sorted = starts.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (0..60).map(|r| r * 4).collect::<Vec<_>>(),
            "each row once per epoch"
        );
        assert_ne!(starts, sorted, "in shuffled order");
    }

    #[test]
    fn a_split_shorter_than_a_row_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let shards = shards(dir.path(), &[5]);
        let err = TokenLoader::new(&shards, "train", 8, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("5 tokens") && err.contains("--context 8"),
            "{err}"
        );
    }
}
