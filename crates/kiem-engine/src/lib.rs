//! kiem's compute engine: the GPT-2 architecture over flat parameter, gradient and optimizer
//! buffers, fused kernels behind the [`kernels::Kernels`] trait (CPU reference implementation),
//! AdamW, and Hugging Face model directories (safetensors) in and out.

pub mod batch;
pub mod bf16_gemm;
pub mod blas;
pub mod config;
pub mod f32_gemm;
mod frozen;
pub mod gguf;
pub mod hf_llama;
pub mod infer;
pub mod io;
pub mod kernels;
pub mod lora;
pub mod model;
pub mod rng;
pub mod sampling;

pub use config::{ModelConfig, ParamLayout};
pub use model::{AdamWState, Gpt};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("{0}")]
    Shape(String),
    #[error("{path}: {message}")]
    File {
        path: std::path::PathBuf,
        message: String,
    },
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
