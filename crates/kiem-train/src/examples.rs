//! Fine-tuning examples: conversations rendered by the chat format into (ids, trained mask),
//! one example per row, padded, so attention never crosses from one example into another.

use std::path::PathBuf;

use kiem_data::chat::{read_conversations, ChatFormat};
use kiem_data::corpus::{split_key, BadRecords};
use kiem_data::prepare::is_validation;
use kiem_tokenizer::chat::{render, Rendered, TrainOn};
use kiem_tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

use crate::loader::{take_row, BatchShape, Batches, Cursor};
use crate::{Result, TrainError};

/// What a fine-tuning run trains on (saved in run.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FinetuneData {
    /// The model fine-tuning started from.
    pub base_model: PathBuf,
    pub data: Vec<PathBuf>,
    /// Held-out conversations; empty means a `val_fraction` of `data`, chosen by hash.
    pub val_data: Vec<PathBuf>,
    pub val_fraction: f64,
    /// `auto`, `openai`, `sharegpt`, `alpaca` or `prompt-completion`.
    pub format: String,
    pub train_on: TrainOn,
    pub skip_bad_records: bool,
}

/// Rendered train and validation examples.
pub struct Examples {
    pub train: Vec<Rendered>,
    pub val: Vec<Rendered>,
    /// Examples cut to the model's context.
    pub truncated: usize,
    pub bad: BadRecords,
}

impl Examples {
    /// Longest row needed (tokens minus one, as inputs are all but the last token).
    pub fn longest(&self) -> usize {
        self.train
            .iter()
            .chain(&self.val)
            .map(|r| r.ids.len().saturating_sub(1))
            .max()
            .unwrap_or(1)
    }
}

/// Reads, renders and splits the conversations; rows longer than `context` are truncated.
pub fn load_examples(
    spec: &FinetuneData,
    tokenizer: &Tokenizer,
    context: usize,
) -> Result<Examples> {
    let format: ChatFormat = spec.format.parse().map_err(TrainError::Config)?;
    let mut bad = BadRecords::default();
    let mut read = |paths: &[PathBuf]| -> Result<Vec<(u64, Rendered)>> {
        let mut out = Vec::new();
        for path in paths {
            for example in read_conversations(path, format, spec.skip_bad_records, &mut bad)? {
                let rendered = render(tokenizer, &example.messages, spec.train_on)
                    .map_err(|e| TrainError::Data(format!("{}: {e}", example.location)))?;
                let text: String = example
                    .messages
                    .iter()
                    .map(|m| format!("{}\u{0}{}\u{0}", m.role, m.content))
                    .collect();
                out.push((split_key(&text), rendered));
            }
        }
        Ok(out)
    };
    let all = read(&spec.data)?;
    let (mut train, mut val): (Vec<Rendered>, Vec<Rendered>) = (Vec::new(), Vec::new());
    if spec.val_data.is_empty() {
        for (key, r) in all {
            if is_validation(key, spec.val_fraction) {
                val.push(r)
            } else {
                train.push(r)
            }
        }
    } else {
        train = all.into_iter().map(|(_, r)| r).collect();
        val = read(&spec.val_data)?.into_iter().map(|(_, r)| r).collect();
    }
    let mut truncated = 0;
    for r in train.iter_mut().chain(val.iter_mut()) {
        if r.ids.len() > context + 1 {
            r.ids.truncate(context + 1);
            r.trained.truncate(context + 1);
            truncated += 1;
        }
    }
    train.retain(|r| r.trained[1..].iter().any(|&t| t));
    val.retain(|r| r.trained[1..].iter().any(|&t| t));
    if train.is_empty() {
        return Err(TrainError::Data("no training conversations with trained tokens (check --data, --format and --val-fraction)".into()));
    }
    Ok(Examples {
        train,
        val,
        truncated,
        bad,
    })
}

/// Rows of `seq` tokens that one pass over `examples` fills when packed in order (for sizing a
/// run; a shuffled order packs about as densely).
pub fn packed_rows(examples: &[Rendered], seq: usize) -> u64 {
    let mut rows = 0u64;
    let mut used = seq;
    for example in examples {
        let n = (example.ids.len() - 1).min(seq);
        if used + n > seq {
            rows += 1;
            used = 0;
        }
        used += n;
    }
    rows
}

/// Batches of examples, one per row, each batch padded to its longest example (padding is never
/// a target, and no example sees another: rows do not attend across each other). Packed, each
/// row holds as many consecutive examples as fit in `seq` tokens, with positions restarting at
/// each (attention then never crosses an example either).
pub struct ExampleLoader {
    examples: Vec<Rendered>,
    seq: usize,
    shuffle: Option<u64>,
    pad: u32,
    cursor: Cursor,
    pack: bool,
    /// The last packed batch's positions.
    positions: Vec<u32>,
}

impl ExampleLoader {
    pub fn new(examples: Vec<Rendered>, seq: usize, shuffle: Option<u64>, pad: u32) -> Self {
        Self {
            examples,
            seq,
            shuffle,
            pad,
            cursor: Cursor::default(),
            pack: false,
            positions: Vec::new(),
        }
    }

    /// Packs several examples per row from now on.
    pub fn packed(mut self) -> Self {
        self.pack = true;
        self
    }

    /// Inputs of an example: all its tokens but the last (which is only a target), cut to a row.
    fn input_len(&self, i: usize) -> usize {
        (self.examples[i].ids.len() - 1).min(self.seq)
    }

    fn push_example(&self, i: usize, inputs: &mut Vec<u32>, targets: &mut Vec<Option<u32>>) {
        let (example, n) = (&self.examples[i], self.input_len(i));
        inputs.extend_from_slice(&example.ids[..n]);
        targets.extend((1..=n).map(|t| example.trained[t].then_some(example.ids[t])));
    }

    fn next_packed_batch(
        &mut self,
        batch: usize,
        inputs: &mut Vec<u32>,
        targets: &mut Vec<Option<u32>>,
    ) -> BatchShape {
        let count = self.rows();
        // Each row: the next examples, in the cursor's order, while they fit.
        let mut rows: Vec<Vec<usize>> = Vec::with_capacity(batch);
        for _ in 0..batch {
            let mut row = Vec::new();
            let mut used = 0;
            loop {
                let mut peek = self.cursor;
                let i = take_row(&mut peek, count, self.shuffle) as usize;
                let n = self.input_len(i);
                if !row.is_empty() && used + n > self.seq {
                    break;
                }
                self.cursor = peek;
                row.push(i);
                used += n;
                if used >= self.seq {
                    break;
                }
            }
            rows.push(row);
        }
        let lengths: Vec<usize> = rows
            .iter()
            .map(|row| row.iter().map(|&i| self.input_len(i)).sum())
            .collect();
        let seq = lengths.iter().copied().max().unwrap_or(1).max(1);
        let mut positions = std::mem::take(&mut self.positions);
        positions.clear();
        let mut tokens = 0;
        for (row, &n) in rows.iter().zip(&lengths) {
            for &i in row {
                self.push_example(i, inputs, targets);
                positions.extend(0..self.input_len(i) as u32);
            }
            inputs.extend(std::iter::repeat_n(self.pad, seq - n));
            targets.extend(std::iter::repeat_n(None, seq - n));
            // Padding is an example of its own.
            positions.extend(0..(seq - n) as u32);
            tokens += n;
        }
        self.positions = positions;
        BatchShape { seq, tokens }
    }

    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
}

impl Batches for ExampleLoader {
    fn seq(&self) -> usize {
        self.seq
    }

    fn rows(&self) -> u64 {
        self.examples.len() as u64
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
        inputs.clear();
        targets.clear();
        if self.pack {
            return self.next_packed_batch(batch, inputs, targets);
        }
        let count = self.rows();
        let rows: Vec<usize> = (0..batch)
            .map(|_| take_row(&mut self.cursor, count, self.shuffle) as usize)
            .collect();
        let seq = rows
            .iter()
            .map(|&i| self.input_len(i))
            .max()
            .unwrap_or(1)
            .max(1);
        let mut tokens = 0;
        for &i in &rows {
            let n = self.input_len(i);
            self.push_example(i, inputs, targets);
            inputs.extend(std::iter::repeat_n(self.pad, seq - n));
            targets.extend(std::iter::repeat_n(None, seq - n));
            tokens += n;
        }
        BatchShape { seq, tokens }
    }

    fn packed_positions(&self) -> Option<&[u32]> {
        self.pack.then_some(self.positions.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Examples of lengths 3..=7 whose tokens name the example (`100·i + t`).
    fn examples() -> Vec<Rendered> {
        (0..10)
            .map(|i| {
                let len = 3 + i % 5;
                Rendered {
                    ids: (0..len as u32).map(|t| 100 * i as u32 + t).collect(),
                    trained: vec![true; len],
                }
            })
            .collect()
    }

    #[test]
    fn packed_rows_hold_whole_examples_with_restarting_positions() {
        let seq = 8;
        let mut loader = ExampleLoader::new(examples(), seq, Some(3), 9999).packed();
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        let mut seen = std::collections::BTreeMap::<u32, usize>::new();
        let mut tokens = 0;
        // 10 examples of 2..=6 inputs (40 tokens): an epoch packs into fewer than 10 rows.
        for _ in 0..4 {
            let shape = loader.next_batch(2, &mut inputs, &mut targets);
            let positions = loader.packed_positions().unwrap().to_vec();
            let row_of = |i: usize| i / shape.seq;
            assert_eq!(positions.len(), 2 * shape.seq);
            assert!(shape.seq <= seq);
            tokens += shape.tokens;
            for (row, pos) in inputs.chunks(shape.seq).zip(positions.chunks(shape.seq)) {
                for (&id, &p) in row.iter().zip(pos) {
                    if id == 9999 {
                        continue;
                    }
                    // Each token sits at its own position in its example.
                    assert_eq!(id % 100, p, "token {id} at position {p}");
                    if p == 0 {
                        *seen.entry(id / 100).or_default() += 1;
                    }
                }
            }
            // Targets are the next token of the same example, never the next example's.
            for (i, t) in targets.iter().enumerate() {
                if let Some(t) = t {
                    assert_eq!(*t, inputs[i] + 1, "row {}", row_of(i));
                }
            }
        }
        assert!(
            seen.len() == 10,
            "every example appears in 8 rows: {seen:?}"
        );
        assert!(
            tokens > 5 * seq,
            "packing fills rows: {tokens} tokens in 8 rows of {seq}"
        );
        // The cursor resumes exactly.
        let cursor = loader.cursor();
        let mut again = ExampleLoader::new(examples(), seq, Some(3), 9999).packed();
        again.set_cursor(cursor);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        loader.next_batch(2, &mut a, &mut b);
        let (mut c, mut d) = (Vec::new(), Vec::new());
        again.next_batch(2, &mut c, &mut d);
        assert_eq!((a, b), (c, d));
        // In order: 2+3 | 4 | 5 | 6+2 | 3+4 | 5 | 6.
        assert_eq!(packed_rows(&examples(), seq), 7);
    }
}
