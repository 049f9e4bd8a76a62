//! Generation tasks: each prompt is answered by greedy decoding until a stop string, an
//! end-of-text (or, for a chat model, end-of-turn) token or the token limit, as the harness'
//! `generate_until` does; the reply is scored against the example's references with exact
//! match, ROUGE-L, chrF and BLEU (see [`crate::metrics`]).

use kiem_engine::sampling::{Control, GenerateOptions, SamplingParams};
use kiem_engine::Gpt;
use kiem_tokenizer::chat::{render_prompt, Message, Role};
use kiem_tokenizer::stream::StreamDecoder;
use kiem_tokenizer::Tokenizer;
use serde::Serialize;

use crate::metrics::{self, BleuStats, ChrfStats};
use crate::score::{draw_examples, Mean, Shots, FEWSHOT_DELIMITER, TARGET_DELIMITER};
use crate::tasks::{Example, GenerationTask};
use crate::{EvalError, Result};

/// How prompts are written for the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptFormat {
    /// The prompt text as it is (few-shot examples before it, as the harness writes them).
    Plain,
    /// A user message in the model's chat template (few-shot examples as earlier turns); the
    /// reply ends at the end-of-turn token.
    Chat,
}

/// How a generation task is run.
#[derive(Debug, Clone)]
pub struct GenerationOptions {
    /// Answer only the first this many examples.
    pub limit: Option<usize>,
    pub shots: Shots,
    /// Prompts decoded together.
    pub batch: usize,
    pub max_new_tokens: usize,
    /// The reply ends before the first of these (the harness' `until`).
    pub stops: Vec<String>,
    pub format: PromptFormat,
    /// Token ids that end a reply (end of text; for chat, the end-of-turn token too).
    pub stop_ids: Vec<u32>,
    /// Bootstrap resamples for the standard error of chrF and BLEU.
    pub bootstrap: usize,
    pub seed: u64,
}

/// One answered example.
#[derive(Debug, Clone, Serialize)]
pub struct Answered {
    pub line: usize,
    pub prediction: String,
    pub references: Vec<String>,
    pub exact_match: f64,
    pub rouge_l: f64,
    /// chrF of this example alone (0..=100).
    pub chrf: f64,
    /// Prompt tokens dropped from the left to leave room for the reply.
    pub truncated_tokens: usize,
}

/// A generation task's report: exact match and ROUGE-L are means over examples (stderr:
/// sample standard deviation / √n); chrF and BLEU are corpus scores (0..=100, stderr:
/// bootstrap).
#[derive(Debug, Clone, Serialize)]
pub struct GenerationReport {
    pub task: String,
    pub format: &'static str,
    pub prompt_format: PromptFormat,
    pub examples: usize,
    pub shots: usize,
    pub exact_match: Mean,
    pub rouge_l: Mean,
    pub chrf: Mean,
    pub bleu: Mean,
    pub bootstrap_resamples: usize,
    pub answers: Vec<Answered>,
}

/// The prompt of example `index`: after `shots` solved examples of the same task, as text
/// (`prompt reference\n\n` each) or as earlier chat turns.
pub fn prompt_ids(
    tokenizer: &Tokenizer,
    task: &GenerationTask,
    index: usize,
    shots: Shots,
    format: PromptFormat,
) -> Result<Vec<u32>> {
    let examples: Vec<&Example> = draw_examples(task.examples.len(), index, shots)
        .into_iter()
        .map(|i| &task.examples[i])
        .collect();
    let example = &task.examples[index];
    match format {
        PromptFormat::Plain => {
            let mut text = String::new();
            for e in examples {
                text.push_str(&e.prompt);
                text.push_str(TARGET_DELIMITER);
                text.push_str(&e.references[0]);
                text.push_str(FEWSHOT_DELIMITER);
            }
            text.push_str(&example.prompt);
            Ok(tokenizer.encode_prompt(&text))
        }
        PromptFormat::Chat => {
            let mut messages = Vec::new();
            for e in examples {
                messages.push(Message::new(Role::User, e.prompt.clone()));
                messages.push(Message::new(Role::Assistant, e.references[0].clone()));
            }
            messages.push(Message::new(Role::User, example.prompt.clone()));
            render_prompt(tokenizer, &messages)
                .map_err(|e| EvalError::Task(format!("{}: line {}: {e}", task.name, example.line)))
        }
    }
}

/// Answers the first `limit` examples of a task, `batch` at a time, and scores the replies,
/// calling `progress(done, total)` after each batch.
pub fn evaluate_generation(
    gpt: &Gpt,
    tokenizer: &Tokenizer,
    task: &GenerationTask,
    options: &GenerationOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<GenerationReport> {
    let context = gpt.config.context;
    if options.max_new_tokens == 0 || options.max_new_tokens >= context {
        return Err(EvalError::Task(format!(
            "--max-new-tokens {} is out of range: 1..{context} (the model's context)",
            options.max_new_tokens
        )));
    }
    let total = options
        .limit
        .map_or(task.examples.len(), |l| l.min(task.examples.len()));
    let generate = GenerateOptions {
        max_tokens: options.max_new_tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: options.stop_ids.clone(),
    };
    let mut answers = Vec::with_capacity(total);
    let (mut chrf_stats, mut bleu_stats) = (Vec::<ChrfStats>::new(), Vec::<BleuStats>::new());
    let batch = options.batch.max(1);
    for start in (0..total).step_by(batch) {
        let end = (start + batch).min(total);
        let mut prompts = Vec::with_capacity(end - start);
        let mut truncated = Vec::with_capacity(end - start);
        for i in start..end {
            let mut ids = prompt_ids(tokenizer, task, i, options.shots, options.format)?;
            // As the harness does: keep the prompt's last `context - max_new_tokens` tokens.
            let room = context - options.max_new_tokens;
            let dropped = ids.len().saturating_sub(room);
            ids.drain(..dropped);
            if ids.is_empty() {
                return Err(EvalError::Task(format!(
                    "{}: line {}: the prompt is empty",
                    task.name, task.examples[i].line
                )));
            }
            prompts.push(ids);
            truncated.push(dropped);
        }
        let mut decoders: Vec<StreamDecoder> = prompts
            .iter()
            .map(|_| StreamDecoder::new(tokenizer, &options.stops))
            .collect();
        let mut replies = vec![String::new(); prompts.len()];
        let mut stopped = vec![false; prompts.len()];
        gpt.generate(&prompts, &generate, &mut |s, token| {
            let chunk = decoders[s].push(token);
            replies[s].push_str(&chunk.text);
            if chunk.stopped {
                stopped[s] = true;
                Control::Stop
            } else {
                Control::Continue
            }
        })?;
        for (k, i) in (start..end).enumerate() {
            if !stopped[k] {
                replies[k].push_str(&decoders[k].finish());
            }
            let example = &task.examples[i];
            let prediction = std::mem::take(&mut replies[k]);
            let chrf = metrics::chrf_stats(&prediction, &example.references);
            chrf_stats.push(chrf);
            bleu_stats.push(metrics::bleu_stats(&prediction, &example.references));
            answers.push(Answered {
                line: example.line,
                exact_match: metrics::exact_match(&prediction, &example.references),
                rouge_l: metrics::rouge_l(&prediction, &example.references),
                chrf: metrics::chrf(&[chrf]),
                references: example.references.clone(),
                prediction,
                truncated_tokens: truncated[k],
            });
        }
        progress(end, total);
    }
    let column = |f: fn(&Answered) -> f64| -> Vec<f64> { answers.iter().map(f).collect() };
    let corpus = |value: f64, stderr: f64| Mean { value, stderr };
    Ok(GenerationReport {
        task: task.name.clone(),
        format: task.format.name(),
        prompt_format: options.format,
        examples: total,
        shots: options.shots.count,
        exact_match: Mean::of(&column(|a| a.exact_match)),
        rouge_l: Mean::of(&column(|a| a.rouge_l)),
        chrf: corpus(
            metrics::chrf(&chrf_stats),
            metrics::bootstrap_stderr(&chrf_stats, metrics::chrf, options.bootstrap, options.seed),
        ),
        bleu: corpus(
            metrics::bleu(&bleu_stats),
            metrics::bootstrap_stderr(&bleu_stats, metrics::bleu, options.bootstrap, options.seed),
        ),
        bootstrap_resamples: options.bootstrap,
        answers,
    })
}
