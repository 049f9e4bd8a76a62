pub mod bench;
pub mod chat;
pub mod chat_format;
pub mod data;
pub mod demo;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod generate;
pub mod merge;
pub mod pretrain;
pub mod serve;
pub mod tokenizer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use clap::Args;

static CANCEL: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Set by the first Ctrl-C; long work polls it, cleans up and exits. A second Ctrl-C exits at
/// once.
pub fn cancel_flag() -> Arc<AtomicBool> {
    CANCEL
        .get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone()
}

pub fn interrupted() -> bool {
    cancel_flag().load(Ordering::Relaxed)
}

pub fn install_interrupt_handler() {
    let flag = cancel_flag();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted twice: exiting now");
            std::process::exit(130);
        }
        eprintln!("\ninterrupting: finishing cleanly (Ctrl-C again to exit at once)");
    });
}

/// Where documents come from and how to read them.
#[derive(Args, Debug, Clone)]
pub struct CorpusArgs {
    /// Input files or directories (searched recursively): .txt/.md (one document per file),
    /// .jsonl, .parquet, each optionally .gz or .zst compressed. Repeat or list several.
    #[arg(long = "input", required = true, num_args = 1.., value_name = "PATH")]
    pub inputs: Vec<PathBuf>,

    /// JSONL field or Parquet column that holds the text.
    #[arg(long, default_value = "text", value_name = "NAME")]
    pub text_field: String,

    /// In .txt/.md inputs, treat each blank-line-separated block as its own document.
    #[arg(long)]
    pub split_on_blank_lines: bool,

    /// Skip malformed records (bad JSON, missing field, invalid UTF-8, null) and report how
    /// many, instead of stopping at the first one.
    #[arg(long)]
    pub skip_bad_records: bool,
}

impl CorpusArgs {
    pub fn options(&self) -> kiem_data::corpus::CorpusOptions {
        kiem_data::corpus::CorpusOptions {
            text_field: self.text_field.clone(),
            split_on_blank_lines: self.split_on_blank_lines,
            ..Default::default()
        }
    }
}

/// Prints the summary of records skipped with --skip-bad-records.
pub fn report_bad_records(bad: &kiem_data::corpus::BadRecords) {
    if bad.count == 0 {
        return;
    }
    eprintln!("skipped {} bad record(s), e.g.:", bad.count);
    for example in &bad.examples {
        eprintln!("  {example}");
    }
}
