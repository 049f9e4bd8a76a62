//! `kiem eval`: multiple-choice benchmark tasks scored as lm-evaluation-harness scores them,
//! and the loss, perplexity and bits per byte of texts.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kiem_eval::score::{evaluate, TaskReport};
use kiem_eval::tasks::load_task;
use kiem_tokenizer::Tokenizer;

use crate::progress::items_bar;
use crate::ThreadArgs;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The model to evaluate (a kiem run's model, or a Hugging Face GPT-2 or Llama-family
    /// directory).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,

    /// Multiple-choice task files: HellaSwag or ARC JSONL, BIG-bench JSON, or JSONL with
    /// `context`, `choices` and `label` (detected per file).
    #[arg(long = "task", num_args = 1.., value_name = "FILE")]
    tasks: Vec<PathBuf>,

    /// Text files (UTF-8) to measure the loss, perplexity and bits per byte of.
    #[arg(long = "text", num_args = 1.., value_name = "FILE")]
    texts: Vec<PathBuf>,

    /// Conversations (JSONL: OpenAI, ShareGPT, Alpaca or prompt/completion) to measure the
    /// held-out loss on the assistant's tokens of, in the model's chat format.
    #[arg(long = "chat", num_args = 1.., value_name = "FILE")]
    chats: Vec<PathBuf>,

    /// Texts longer than the context are scored in context-long windows starting every N
    /// tokens; each token is scored once, with the window's earlier tokens as context
    /// [default: the context length: windows do not overlap].
    #[arg(long, value_name = "N")]
    stride: Option<usize>,

    /// Solved examples of the same task before each question, drawn with --seed.
    #[arg(long, default_value_t = 0, value_name = "K")]
    shots: usize,

    /// Questions scored together in one forward pass (each choice is a row).
    #[arg(long, default_value_t = 8, value_name = "B")]
    batch: usize,

    /// Seed of the few-shot draw.
    #[arg(long, default_value_t = 1234, value_name = "S")]
    seed: u64,

    /// Score only the first N questions of each task (and conversations of each --chat file).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,

    /// Write the report (every metric with its standard error, and each question's scores) as
    /// JSON here.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,

    #[command(flatten)]
    threads: ThreadArgs,
}

pub fn run(args: EvalArgs) -> Result<()> {
    args.threads.install()?;
    if args.limit == Some(0) {
        bail!("--limit must be at least 1");
    }
    if args.batch == 0 || args.batch > 4096 {
        bail!("--batch {} is out of range: choose 1..=4096", args.batch);
    }
    if args.tasks.is_empty() && args.texts.is_empty() && args.chats.is_empty() {
        bail!(
            "give --task FILE... (multiple choice), --text FILE... (perplexity) and/or --chat \
             FILE... (assistant-token loss)"
        );
    }
    let texts = args
        .texts
        .iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {} (UTF-8 text expected)", p.display()))
                .map(|t| (p.display().to_string(), t))
        })
        .collect::<Result<Vec<_>>>()?;
    // Read every task first: a bad file fails before the model is loaded.
    let tasks = args
        .tasks
        .iter()
        .map(|p| load_task(p))
        .collect::<Result<Vec<_>, _>>()?;
    let (mut gpt, tokenizer, _) = super::generate::load_checked(&args.model)?;
    let mut reports: Vec<TaskReport> = Vec::new();
    for task in &tasks {
        let total = args
            .limit
            .map_or(task.questions.len(), |l| l.min(task.questions.len()));
        let bar = items_bar(total as u64, "questions", &task.name);
        let shots = kiem_eval::score::Shots {
            count: args.shots,
            seed: args.seed,
        };
        let options = kiem_eval::score::EvalOptions {
            limit: args.limit,
            shots,
            batch: args.batch,
        };
        let report = evaluate(&mut gpt, &tokenizer, task, options, &mut |done, _| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        reports.push(report);
    }
    let mut text_reports = Vec::new();
    for (name, text) in &texts {
        let bar = items_bar(0, "tokens", "text");
        let report = kiem_eval::lm::evaluate_text(
            &mut gpt,
            &tokenizer,
            name,
            text,
            args.stride,
            &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64)
            },
        )?;
        bar.finish_and_clear();
        text_reports.push(report);
    }
    let mut chat_reports = Vec::new();
    for path in &args.chats {
        let bar = items_bar(0, "conversations", "chat");
        let report = kiem_eval::chat::evaluate_chat(
            &mut gpt,
            &tokenizer,
            path,
            args.limit,
            &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64)
            },
        )?;
        bar.finish_and_clear();
        chat_reports.push(report);
    }
    if !chat_reports.is_empty() {
        println!(
            "{:<40} {:>13} {:>9} {:>8} {:>11}",
            "conversations", "conversations", "tokens", "loss", "perplexity"
        );
        for r in &chat_reports {
            println!(
                "{:<40} {:>13} {:>9} {:>8.4} {:>11.3}",
                r.file, r.conversations, r.tokens, r.loss, r.perplexity
            );
        }
    }
    if !text_reports.is_empty() {
        println!(
            "{:<40} {:>9} {:>8} {:>11} {:>8}",
            "text", "tokens", "loss", "perplexity", "bpb"
        );
        for r in &text_reports {
            println!(
                "{:<40} {:>9} {:>8.4} {:>11.3} {:>8.4}",
                r.text, r.tokens, r.loss, r.perplexity, r.bits_per_byte
            );
        }
    }
    if reports.is_empty() {
        return write_report(&args, &tokenizer, &reports, &text_reports, &chat_reports);
    }
    println!(
        "{:<24} {:<9} {:>6}  {:<15} {:<15} {:<15}",
        "task", "format", "n", "acc", "acc_norm", "acc_bytes"
    );
    for r in &reports {
        let m = |m: kiem_eval::score::Mean| format!("{:.4} ± {:.4}", m.value, m.stderr);
        println!(
            "{:<24} {:<9} {:>6}  {:<15} {:<15} {:<15}",
            r.task,
            r.format,
            r.examples,
            m(r.acc),
            m(r.acc_norm),
            m(r.acc_bytes)
        );
    }
    write_report(&args, &tokenizer, &reports, &text_reports, &chat_reports)
}

fn write_report(
    args: &EvalArgs,
    tokenizer: &Tokenizer,
    reports: &[TaskReport],
    texts: &[kiem_eval::lm::TextReport],
    chats: &[kiem_eval::chat::ChatReport],
) -> Result<()> {
    let Some(out) = &args.out else {
        return Ok(());
    };
    let report = serde_json::json!({
        "model": args.model.display().to_string(),
        "tokenizer": tokenizer.hash(),
        "command": std::env::args().collect::<Vec<_>>(),
        "scoring": "lm-evaluation-harness multiple choice: target delimiter \" \", few-shot delimiter \"\\n\\n\", continuation = encode(context + continuation) after the context's tokens; acc_norm per character, acc_bytes per UTF-8 byte; stderr = sample standard deviation / sqrt(n)",
        "tasks": reports,
        "texts": texts,
        "chat": chats,
    });
    kiem_tokenizer::write_atomic(out, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("report: {}", out.display());
    Ok(())
}
