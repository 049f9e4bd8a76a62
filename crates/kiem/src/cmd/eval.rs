//! `kiem eval`: multiple-choice benchmark tasks scored as lm-evaluation-harness scores them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use kiem_eval::score::{evaluate, TaskReport};
use kiem_eval::tasks::load_task;
use kiem_tokenizer::Tokenizer;

use crate::ThreadArgs;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The model to evaluate (a kiem run's model, or a Hugging Face GPT-2 or Llama-family
    /// directory).
    #[arg(long, value_name = "DIR")]
    model: PathBuf,

    /// Multiple-choice task files: HellaSwag or ARC JSONL, BIG-bench JSON, or JSONL with
    /// `context`, `choices` and `label` (detected per file).
    #[arg(long = "task", required = true, num_args = 1.., value_name = "FILE")]
    tasks: Vec<PathBuf>,

    /// Score only the first N questions of each task.
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
    // Read every task first: a bad file fails before the model is loaded.
    let tasks = args
        .tasks
        .iter()
        .map(|p| load_task(p))
        .collect::<Result<Vec<_>, _>>()?;
    let (mut gpt, _) = kiem_engine::io::load_model_dir(&args.model)?;
    let tokenizer = Tokenizer::load(
        args.model
            .to_str()
            .context("model path is not valid UTF-8")?,
    )
    .with_context(|| format!("{} has no usable tokenizer", args.model.display()))?;
    if tokenizer.vocab_size() > gpt.config.vocab_size {
        bail!(
            "{}: the tokenizer has {} tokens but the model's vocabulary is only {}",
            args.model.display(),
            tokenizer.vocab_size(),
            gpt.config.vocab_size
        );
    }
    let mut reports: Vec<TaskReport> = Vec::new();
    for task in &tasks {
        let total = args
            .limit
            .map_or(task.questions.len(), |l| l.min(task.questions.len()));
        let bar = if crate::progress::quiet() {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(total as u64)
        };
        bar.set_style(
            ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} questions, ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(task.name.clone());
        bar.enable_steady_tick(Duration::from_millis(200));
        let report = evaluate(&mut gpt, &tokenizer, task, args.limit, &mut |done, _| {
            bar.set_position(done as u64)
        })?;
        bar.finish_and_clear();
        reports.push(report);
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
    if let Some(out) = &args.out {
        let report = serde_json::json!({
            "model": args.model.display().to_string(),
            "tokenizer": tokenizer.hash(),
            "command": std::env::args().collect::<Vec<_>>(),
            "scoring": "lm-evaluation-harness multiple choice: target delimiter \" \", continuation = encode(context + continuation) after the context's tokens; acc_norm per character, acc_bytes per UTF-8 byte; stderr = sample standard deviation / sqrt(n)",
            "tasks": reports,
        });
        kiem_tokenizer::write_atomic(out, serde_json::to_string_pretty(&report)?.as_bytes())
            .with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!("report: {}", out.display());
    }
    Ok(())
}
