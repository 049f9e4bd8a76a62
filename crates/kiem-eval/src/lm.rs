//! Language modelling: the loss, perplexity and bits per byte of texts, or of the validation
//! split of a prepared data directory. A text longer than the
//! context is scored in windows of the context's length that start every `stride` tokens; each
//! window scores only the tokens no earlier window scored, with everything before them in the
//! window as context (a stride below the context gives every token more context, at more cost).

use kiem_engine::Gpt;
use kiem_tokenizer::Tokenizer;
use serde::Serialize;

use crate::{EvalError, Result};

#[derive(Debug, Clone, Serialize)]
pub struct TextReport {
    pub text: String,
    /// Tokens scored (every token after the first).
    pub tokens: usize,
    /// UTF-8 bytes of the text.
    pub bytes: u64,
    /// Mean negative log-likelihood per token (nats).
    pub loss: f64,
    pub perplexity: f64,
    pub bits_per_byte: f64,
    pub stride: usize,
}

/// Scores `text` (named `name` in the report), calling `progress(done, total)` in tokens.
pub fn evaluate_text(
    gpt: &mut Gpt,
    tokenizer: &Tokenizer,
    name: &str,
    text: &str,
    stride: Option<usize>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TextReport> {
    let ids = tokenizer.encode_prompt(text);
    evaluate_tokens(gpt, name, &ids, text.len() as u64, stride, progress)
}

/// Scores the validation split of a data directory prepared by `kiem data prepare` (its
/// documents one after another, each starting with its BOS token, as training reads them).
/// The data's tokenizer must be the model's.
pub fn evaluate_data_dir(
    gpt: &mut Gpt,
    tokenizer: &Tokenizer,
    dir: &std::path::Path,
    stride: Option<usize>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TextReport> {
    let name = dir.display().to_string();
    let data = kiem_data::prepare::DataDir::open(dir)
        .map_err(|e| EvalError::Task(format!("{name}: {e}")))?;
    // The same tokens, whatever each side's rule for a prompt's first token.
    let data_tokenizer = data
        .tokenizer()
        .map_err(|e| EvalError::Task(format!("{name}: {e}")))?;
    if data_tokenizer.encoding_hash() != tokenizer.encoding_hash() {
        return Err(EvalError::Task(format!(
            "{name}: the data was tokenized with {} but the model's tokenizer is {}",
            data.manifest.tokenizer.hash,
            tokenizer.hash()
        )));
    }
    if data.val.is_empty() {
        return Err(EvalError::Task(format!(
            "{name}: the data has no validation split (prepare it with --val-fraction above 0)"
        )));
    }
    let mut ids = Vec::with_capacity(data.manifest.val.tokens as usize);
    for shard in &data.val {
        let start = ids.len();
        ids.resize(start + shard.len(), 0);
        shard.read_into(0, &mut ids[start..]);
    }
    evaluate_tokens(gpt, &name, &ids, data.manifest.val.bytes, stride, progress)
}

/// Scores a token sequence of `bytes` UTF-8 bytes of text.
fn evaluate_tokens(
    gpt: &mut Gpt,
    name: &str,
    ids: &[u32],
    bytes: u64,
    stride: Option<usize>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TextReport> {
    let window = gpt.config.context;
    let stride = stride.unwrap_or(window);
    if stride == 0 || stride > window {
        return Err(EvalError::Task(format!(
            "--stride {stride} is out of range: 1..={window} (the model's context)"
        )));
    }
    if ids.len() < 2 {
        return Err(EvalError::Task(format!(
            "{name}: the text has fewer than two tokens; nothing to score"
        )));
    }
    let (mut nll, mut scored) = (0f64, 0usize);
    // `scored_to`: tokens up to this index have been scored (token 0 never is).
    let mut scored_to = 1;
    let mut begin = 0;
    while scored_to < ids.len() {
        let end = (begin + window + 1).min(ids.len());
        let inputs = &ids[begin..end - 1];
        let targets: Vec<Option<u32>> = (begin + 1..end)
            .map(|t| (t >= scored_to).then(|| ids[t]))
            .collect();
        let (sum, count) = gpt.forward(inputs, &targets, 1, inputs.len(), None)?;
        nll += sum;
        scored += count;
        scored_to = end;
        progress(scored_to - 1, ids.len() - 1);
        begin += stride;
    }
    let loss = nll / scored as f64;
    Ok(TextReport {
        text: name.to_string(),
        tokens: scored,
        bytes,
        loss,
        perplexity: loss.exp(),
        bits_per_byte: nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
        stride,
    })
}
