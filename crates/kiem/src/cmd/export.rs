//! `kiem export`: a model written in another format for other tools. GGUF for llama.cpp (and
//! Ollama, LM Studio): weights in F32, F16, BF16, Q8_0, Q4_0 or Q4_1, with the tokenizer, its
//! special tokens and the chat template.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use kiem_engine::gguf::ExportType;

use crate::ThreadArgs;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The model to export: a model directory (e.g. RUN_DIR/model) or a GGUF file.
    #[arg(long, value_name = "DIR|FILE")]
    model: PathBuf,

    /// Output format (gguf: llama.cpp's).
    #[arg(long, default_value = "gguf", value_parser = ["gguf"], value_name = "F")]
    format: String,

    /// Type of the weight matrices: f32, f16, bf16, q8_0, q4_0 or q4_1 (quantized as ggml's
    /// reference quantizers do; norms, biases and position embeddings stay f32).
    #[arg(long = "type", default_value = "f16", value_name = "T")]
    kind: String,

    /// The file to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,

    /// A LoRA adapter directory (PEFT's format) to merge into --model before exporting.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,

    #[command(flatten)]
    threads: ThreadArgs,
}

pub fn run(args: ExportArgs) -> Result<()> {
    args.threads.install()?;
    let kind = ExportType::parse(&args.kind).map_err(anyhow::Error::msg)?;
    if !kiem_engine::gguf::is_gguf(&args.out) {
        bail!("--out {}: name the file FILE.gguf", args.out.display());
    }
    let (mut gpt, tokenizer, _) = kiem_train::model_source::load_model(&args.model)?;
    if let Some(adapter) = &args.adapter {
        kiem_train::model_source::merge_adapter(&mut gpt, adapter)
            .map_err(|e| anyhow::anyhow!("--adapter {}: {e}", adapter.display()))?;
    }
    let name = args
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "kiem".into());
    let kept = kiem_train::model_source::export_gguf(&gpt, &tokenizer, kind, &name, &args.out)?;
    if !kept.is_empty() {
        eprintln!(
            "kept in F32 (rows not a whole number of {}-value blocks): {}",
            32,
            kept.join(", ")
        );
    }
    let bytes = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({:.1} MB, {} weights, {} parameters)",
        args.out.display(),
        bytes as f64 / 1e6,
        args.kind.to_ascii_uppercase(),
        gpt.num_parameters()
    );
    Ok(())
}
