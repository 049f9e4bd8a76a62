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

/// Batches of examples, one per row, each batch padded to its longest example (padding is never
/// a target, and no example sees another: rows do not attend across each other).
pub struct ExampleLoader {
    examples: Vec<Rendered>,
    seq: usize,
    shuffle: Option<u64>,
    pad: u32,
    cursor: Cursor,
}

impl ExampleLoader {
    pub fn new(examples: Vec<Rendered>, seq: usize, shuffle: Option<u64>, pad: u32) -> Self {
        Self {
            examples,
            seq,
            shuffle,
            pad,
            cursor: Cursor::default(),
        }
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
        let count = self.rows();
        let rows: Vec<usize> = (0..batch)
            .map(|_| take_row(&mut self.cursor, count, self.shuffle) as usize)
            .collect();
        // Inputs of an example: all its tokens but the last (which is only a target).
        let length = |i: usize| (self.examples[i].ids.len() - 1).min(self.seq);
        let seq = rows.iter().map(|&i| length(i)).max().unwrap_or(1).max(1);
        let mut tokens = 0;
        for &i in &rows {
            let (example, n) = (&self.examples[i], length(i));
            inputs.extend_from_slice(&example.ids[..n]);
            inputs.extend(std::iter::repeat_n(self.pad, seq - n));
            targets.extend((1..=n).map(|t| example.trained[t].then_some(example.ids[t])));
            targets.extend(std::iter::repeat_n(None, seq - n));
            tokens += n;
        }
        BatchShape { seq, tokens }
    }
}
