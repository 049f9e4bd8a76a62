//! Evaluation: benchmark tasks read from the files people have (HellaSwag and ARC JSONL,
//! BIG-bench JSON, plain `{"context", "choices", "label"}` JSONL) and scored exactly as
//! lm-evaluation-harness scores them; generation tasks (prompt and references) scored with
//! exact match, ROUGE-L, chrF and BLEU as the reference tools compute them; the loss,
//! perplexity and bits per byte of texts; and the held-out loss of conversations.

pub mod chat;
pub mod generation;
pub mod lm;
pub mod metrics;
pub mod score;
pub mod tasks;

/// What can go wrong evaluating.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A task file's record is malformed: `file:line: message`.
    #[error("{file}:{line}: {message}")]
    Record {
        file: String,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    Task(String),
    #[error(transparent)]
    Engine(#[from] kiem_engine::EngineError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = EvalError> = std::result::Result<T, E>;

/// A task's main scores, as a training run records them at each evaluation: multiple choice
/// gives `acc_norm` (plotted) and `acc`; generation gives `rouge_l` (plotted), `exact_match`,
/// `chrf` and `bleu`.
#[derive(Debug, Clone, PartialEq)]
pub struct Brief {
    pub task: String,
    pub examples: usize,
    /// (metric, value), the plotted one first.
    pub metrics: Vec<(&'static str, f64)>,
}

/// Scores the first `limit` items of `task` for a training run's metrics. Generation tasks are
/// prompted in the model's chat format when it has one (a fine-tuned chat model), else as
/// plain text ending at a blank line; replies end at `eos_ids` and have at most 128 tokens.
pub fn brief(
    gpt: &mut kiem_engine::Gpt,
    tokenizer: &kiem_tokenizer::Tokenizer,
    task: &tasks::LoadedTask,
    limit: Option<usize>,
    eos_ids: &[u32],
) -> Result<Brief> {
    match task {
        tasks::LoadedTask::MultipleChoice(t) => {
            let options = score::EvalOptions {
                limit,
                batch: 8,
                ..Default::default()
            };
            let r = score::evaluate(gpt, tokenizer, t, options, &mut |_, _| {})?;
            Ok(Brief {
                task: r.task,
                examples: r.examples,
                metrics: vec![("acc_norm", r.acc_norm.value), ("acc", r.acc.value)],
            })
        }
        tasks::LoadedTask::Generation(t) => {
            let (format, stop_ids, stops) =
                match kiem_tokenizer::chat::reply_stop_ids(tokenizer, eos_ids.to_vec()) {
                    Ok(ids) => (generation::PromptFormat::Chat, ids, Vec::new()),
                    Err(_) => (
                        generation::PromptFormat::Plain,
                        eos_ids.to_vec(),
                        vec![score::FEWSHOT_DELIMITER.to_string()],
                    ),
                };
            let options = generation::GenerationOptions {
                limit,
                shots: Default::default(),
                batch: 8,
                max_new_tokens: 128.min(gpt.config.context / 2).max(1),
                stops,
                format,
                stop_ids,
                bootstrap: 0,
                seed: 0,
            };
            let r = generation::evaluate_generation(gpt, tokenizer, t, &options, &mut |_, _| {})?;
            Ok(Brief {
                task: r.task,
                examples: r.examples,
                metrics: vec![
                    ("rouge_l", r.rouge_l.value),
                    ("exact_match", r.exact_match.value),
                    ("chrf", r.chrf.value),
                    ("bleu", r.bleu.value),
                ],
            })
        }
    }
}
