use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use kiem_data::prepare::{prepare, DataDir, PrepareOptions, SplitStats};

use super::tokenizer::TokenizerArg;
use super::{cancel_flag, report_bad_records, CorpusArgs};
use crate::progress;
use crate::ThreadArgs;

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Tokenize a corpus into llm.c-format token shards plus manifest.json and tokenizer.json.
    Prepare(PrepareArgs),
    /// Check a prepared data directory (every shard's header and size) and summarize it.
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
pub struct PrepareArgs {
    #[command(flatten)]
    corpus: CorpusArgs,

    #[command(flatten)]
    tokenizer: TokenizerArg,

    /// Output directory (created; must be empty or absent unless --overwrite).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,

    /// Fraction of documents held out for validation, chosen by a hash of each document's
    /// text (deterministic; independent of file order and thread count).
    #[arg(long, default_value_t = 0.01, value_name = "F")]
    val_fraction: f64,

    /// Tokens per shard file (llm.c uses 100M).
    #[arg(long, default_value_t = 100_000_000, value_name = "N")]
    shard_tokens: u64,

    /// Replace a non-empty output directory (only once the new data is complete).
    #[arg(long)]
    overwrite: bool,

    #[command(flatten)]
    threads: ThreadArgs,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A directory made by `kiem data prepare`.
    #[arg(value_name = "DIR")]
    dir: PathBuf,
}

pub fn run(command: DataCommand) -> Result<()> {
    match command {
        DataCommand::Prepare(args) => run_prepare(args),
        DataCommand::Inspect(args) => inspect(args),
    }
}

fn run_prepare(args: PrepareArgs) -> Result<()> {
    let threads = args.threads.install()?;
    let tokenizer = args.tokenizer.load()?;
    let options = PrepareOptions {
        inputs: args.corpus.inputs.clone(),
        out: args.out.clone(),
        val_fraction: args.val_fraction,
        corpus: args.corpus.options(),
        skip_bad_records: args.corpus.skip_bad_records,
        shard_tokens: args.shard_tokens,
        overwrite: args.overwrite,
    };
    let mut bar = None;
    // In a job of several processes the first reports (its share's progress, then the whole).
    let first = kiem_dist::world().rank() == 0;
    let report = prepare(&tokenizer, &options, cancel_flag(), &mut |p| {
        if !first {
            return;
        }
        let bar = bar.get_or_insert_with(|| progress::bytes_bar(p.bytes_total, "tokenizing"));
        bar.set_position(p.bytes_read);
        bar.set_message(format!(
            "{} docs, {} tokens",
            progress::count(p.documents),
            progress::count(p.tokens)
        ));
    });
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let report = report?;
    if !first {
        return Ok(());
    }
    report_bad_records(&report.bad);
    if !report.ignored_inputs.is_empty() {
        eprintln!(
            "ignored {} file(s) with unsupported extensions in input directories (e.g. {})",
            report.ignored_inputs.len(),
            report.ignored_inputs[0].display()
        );
    }
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    let m = &report.manifest;
    let seconds = report.elapsed.as_secs_f64();
    let bytes = m.train.bytes + m.val.bytes;
    let workers = match kiem_dist::world().size() {
        1 => format!("{threads} threads"),
        ranks => format!(
            "{ranks} processes x {threads} thread{}",
            if threads == 1 { "" } else { "s" }
        ),
    };
    println!(
        "prepared {} documents, {} tokens ({:.2} MB of text, {:.2} bytes/token) in {seconds:.1}s \
         ({:.1} MB/s, {workers}) with tokenizer {}",
        progress::count(m.total_documents()),
        progress::count(m.train.tokens + m.val.tokens),
        bytes as f64 / 1e6,
        bytes as f64 / (m.train.tokens + m.val.tokens).max(1) as f64,
        progress::mb_per_s(bytes, seconds),
        m.tokenizer.source,
    );
    print_split("train", &m.train);
    print_split("val", &m.val);
    println!("-> {}", args.out.display());
    Ok(())
}

fn print_split(name: &str, split: &SplitStats) {
    println!(
        "  {name:<5} {:>9} documents {:>9} tokens {:>3} shard(s)",
        progress::count(split.documents),
        progress::count(split.tokens),
        split.shards.len()
    );
}

fn inspect(args: InspectArgs) -> Result<()> {
    let data = DataDir::open(&args.dir)?;
    let tokenizer = data.tokenizer()?;
    let m = &data.manifest;
    println!("data directory {} is valid", args.dir.display());
    println!(
        "  tokenizer {} (vocab {}, bos {}, {})",
        m.tokenizer.source,
        tokenizer.vocab_size(),
        tokenizer.bos_id(),
        m.tokenizer.hash
    );
    println!("  tokens stored as {:?}", m.token_width);
    print_split("train", &m.train);
    print_split("val", &m.val);
    if m.skipped_records > 0 || m.empty_documents > 0 {
        println!(
            "  {} bad records skipped, {} empty documents",
            m.skipped_records, m.empty_documents
        );
    }
    Ok(())
}
