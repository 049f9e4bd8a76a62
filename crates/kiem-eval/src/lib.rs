//! Evaluation: benchmark tasks read from the files people have (HellaSwag and ARC JSONL,
//! BIG-bench JSON, plain `{"context", "choices", "label"}` JSONL) and scored exactly as
//! lm-evaluation-harness scores them; and the loss, perplexity and bits per byte of texts.

pub mod chat;
pub mod lm;
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
