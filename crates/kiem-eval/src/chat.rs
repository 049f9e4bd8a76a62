//! Held-out chat loss: conversations rendered in the model's chat format (its template, or
//! kiem's), scored on the assistant's tokens only (each reply and its end-of-turn token), as
//! `kiem finetune` reports its validation loss.

use std::path::Path;

use kiem_data::chat::{read_conversations, ChatFormat};
use kiem_data::corpus::BadRecords;
use kiem_engine::Gpt;
use kiem_tokenizer::chat::{render, TrainOn};
use kiem_tokenizer::Tokenizer;
use serde::Serialize;

use crate::{EvalError, Result};

#[derive(Debug, Clone, Serialize)]
pub struct ChatReport {
    pub file: String,
    pub conversations: usize,
    /// Assistant tokens scored.
    pub tokens: usize,
    /// Mean negative log-likelihood per assistant token (nats).
    pub loss: f64,
    pub perplexity: f64,
    /// Conversations cut to the model's context.
    pub truncated: usize,
}

/// Scores every conversation of a JSONL file (OpenAI, ShareGPT, Alpaca or prompt/completion),
/// calling `progress(done, total)`.
pub fn evaluate_chat(
    gpt: &mut Gpt,
    tokenizer: &Tokenizer,
    path: &Path,
    limit: Option<usize>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ChatReport> {
    let mut bad = BadRecords::default();
    let examples = read_conversations(path, ChatFormat::Auto, false, &mut bad)
        .map_err(|e| EvalError::Task(e.to_string()))?;
    let total = limit.map_or(examples.len(), |l| l.min(examples.len()));
    if total == 0 {
        return Err(EvalError::Task(format!(
            "{}: no conversations",
            path.display()
        )));
    }
    let (mut nll, mut tokens, mut truncated) = (0f64, 0usize, 0usize);
    for (i, example) in examples[..total].iter().enumerate() {
        let rendered = render(tokenizer, &example.messages, TrainOn::Assistant)
            .map_err(|e| EvalError::Task(format!("{}: {e}", example.location)))?;
        let keep = rendered.ids.len().min(gpt.config.context + 1);
        truncated += usize::from(keep < rendered.ids.len());
        let ids = &rendered.ids[..keep];
        let targets: Vec<Option<u32>> = (1..keep)
            .map(|t| rendered.trained[t].then_some(ids[t]))
            .collect();
        if targets.iter().any(Option::is_some) {
            let (sum, count) = gpt.forward(&ids[..keep - 1], &targets, 1, keep - 1, None)?;
            nll += sum;
            tokens += count;
        }
        progress(i + 1, total);
    }
    if tokens == 0 {
        return Err(EvalError::Task(format!(
            "{}: no assistant tokens to score",
            path.display()
        )));
    }
    let loss = nll / tokens as f64;
    Ok(ChatReport {
        file: path.display().to_string(),
        conversations: total,
        tokens,
        loss,
        perplexity: loss.exp(),
        truncated,
    })
}
