//! kiem's training: the one loop that pre-training (and later fine-tuning) share, with data
//! loading, schedules, evaluation, checkpoints and exact resume, metrics and plots.

pub mod checkpoint;
pub mod examples;
pub mod loader;
pub mod model_source;
pub mod plot;
pub mod schedule;
pub mod trainer;

pub use schedule::{Schedule, ScheduleKind};
pub use trainer::{pretrain, EvalReport, Observer, StepReport, Summary, TrainConfig};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Io(String),
    #[error("cannot resume: {0}")]
    Resume(String),
    #[error("training diverged: {0}")]
    Diverged(String),
    #[error(transparent)]
    Engine(#[from] kiem_engine::EngineError),
    #[error(transparent)]
    DataDir(#[from] kiem_data::DataError),
    #[error(transparent)]
    Tokenizer(#[from] kiem_tokenizer::TokenizerError),
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
