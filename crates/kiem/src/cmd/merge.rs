//! `kiem merge`: a base model with a LoRA adapter added into its weights, written as a model
//! directory (as PEFT's `merge_and_unload` then `save_pretrained`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::ThreadArgs;

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base model the adapter was trained on: a model directory or a GGUF file.
    #[arg(long, value_name = "DIR|FILE")]
    model: PathBuf,

    /// The adapter directory (PEFT's format: a kiem LoRA run's RUN_DIR/adapter, or one `peft`
    /// saved).
    #[arg(long, value_name = "DIR")]
    adapter: PathBuf,

    /// The model directory to write (Hugging Face layout, with the base's tokenizer).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    #[command(flatten)]
    threads: ThreadArgs,
}

pub fn run(args: MergeArgs) -> Result<()> {
    args.threads.install()?;
    if args.out.exists() && std::fs::read_dir(&args.out)?.next().is_some() {
        bail!(
            "--out {} exists and is not empty: choose a new directory",
            args.out.display()
        );
    }
    let (mut gpt, tokenizer, _) = kiem_train::model_source::load_model(&args.model)?;
    kiem_train::model_source::merge_adapter(&mut gpt, &args.adapter)
        .with_context(|| format!("--adapter {}", args.adapter.display()))?;
    kiem_train::checkpoint::write_model_dir(&args.out, &gpt, &tokenizer, None)?;
    eprintln!(
        "wrote {}: {} with {} merged in ({:.2}M parameters)",
        args.out.display(),
        args.model.display(),
        args.adapter.display(),
        gpt.num_parameters() as f64 / 1e6
    );
    Ok(())
}
