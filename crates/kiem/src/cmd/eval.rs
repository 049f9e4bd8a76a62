//! `kiem eval`: multiple-choice benchmark tasks scored as lm-evaluation-harness scores them,
//! generation tasks scored against their references, the loss, perplexity and bits per byte of
//! texts, and the held-out loss of conversations.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kiem_eval::generation::{
    evaluate_generation, GenerationOptions, GenerationReport, PromptFormat,
};
use kiem_eval::score::{evaluate, Mean, TaskReport};
use kiem_eval::tasks::LoadedTask;
use kiem_tokenizer::Tokenizer;

use crate::progress::items_bar;
use crate::ThreadArgs;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The model to evaluate (a kiem run's model, a Hugging Face GPT-2 or Llama-family
    /// directory, or a GGUF file).
    #[arg(long, value_name = "DIR|FILE")]
    model: PathBuf,

    /// A LoRA adapter directory (PEFT's format) merged into --model's weights at load.
    #[arg(long, value_name = "DIR")]
    adapter: Option<PathBuf>,

    /// Task files, detected per file. Multiple choice: HellaSwag or ARC JSONL, BIG-bench JSON,
    /// or JSONL with `context`, `choices` and `label`. Generation: JSONL with `prompt` and
    /// `reference` (or `references`), or BIG-bench JSON with `target` answers.
    #[arg(long = "task", num_args = 1.., value_name = "FILE")]
    tasks: Vec<PathBuf>,

    /// Text files (UTF-8) to measure the loss, perplexity and bits per byte of, or data
    /// directories made by `kiem data prepare` (their validation split is measured).
    #[arg(long = "text", num_args = 1.., value_name = "FILE|DIR")]
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

    /// Generation tasks: most tokens of each reply.
    #[arg(long, default_value_t = 256, value_name = "N")]
    max_new_tokens: usize,

    /// Generation tasks: a reply ends before this text (repeatable) [default: "\n\n" for
    /// plain prompts, none for chat prompts, which end at the end-of-turn token].
    #[arg(long = "stop", value_name = "TEXT")]
    stops: Vec<String>,

    /// Generation tasks: how prompts are written. `chat`: as a user message in the model's
    /// chat template; `plain`: as text; `auto`: chat when the model has a chat template or
    /// was fine-tuned for chat.
    #[arg(long, default_value = "auto", value_parser = ["auto", "plain", "chat"], value_name = "F")]
    prompt_format: String,

    /// Generation tasks: bootstrap resamples for the standard error of chrF and BLEU.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    bootstrap: usize,

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
            "give --task FILE... (multiple choice or generation), --text FILE... (perplexity) \
             and/or --chat FILE... (assistant-token loss)"
        );
    }
    // A text file is read now (a bad one fails before the model loads); a data directory
    // when it is scored.
    let texts = args
        .texts
        .iter()
        .map(|p| {
            if p.is_dir() {
                return Ok((p.clone(), None));
            }
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {} (UTF-8 text expected)", p.display()))
                .map(|t| (p.clone(), Some(t)))
        })
        .collect::<Result<Vec<_>>>()?;
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    if args.bootstrap > 100_000 {
        bail!(
            "--bootstrap {} is out of range: choose 0..=100000",
            args.bootstrap
        );
    }
    // Read every task first: a bad file fails before the model is loaded.
    let loaded = args
        .tasks
        .iter()
        .map(|p| kiem_eval::tasks::load(p))
        .collect::<Result<Vec<_>, _>>()?;
    let (mut gpt, tokenizer, stop_ids) =
        super::generate::load_checked(&args.model, args.adapter.as_deref())?;
    let mut reports: Vec<TaskReport> = Vec::new();
    let (mut tasks, mut generation_tasks) = (Vec::new(), Vec::new());
    for task in loaded {
        match task {
            LoadedTask::MultipleChoice(t) => tasks.push(t),
            LoadedTask::Generation(t) => generation_tasks.push(t),
        }
    }
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
    for (path, text) in &texts {
        let bar = items_bar(0, "tokens", "text");
        let mut progress = |done: usize, total: usize| {
            bar.set_length(total as u64);
            bar.set_position(done as u64)
        };
        let report = match text {
            Some(text) => kiem_eval::lm::evaluate_text(
                &mut gpt,
                &tokenizer,
                &path.display().to_string(),
                text,
                args.stride,
                &mut progress,
            )?,
            None => kiem_eval::lm::evaluate_data_dir(
                &mut gpt,
                &tokenizer,
                path,
                args.stride,
                &mut progress,
            )?,
        };
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
    let mut generation_reports = Vec::new();
    if !generation_tasks.is_empty() {
        let options = generation_options(&args, &tokenizer, stop_ids)?;
        // Generation only decodes from here on: lay the weights out for it.
        gpt.transpose_for_decoding();
        for task in &generation_tasks {
            let total = args
                .limit
                .map_or(task.examples.len(), |l| l.min(task.examples.len()));
            let bar = items_bar(total as u64, "examples", &task.name);
            let report = evaluate_generation(&gpt, &tokenizer, task, &options, &mut |done, _| {
                bar.set_position(done as u64)
            })?;
            bar.finish_and_clear();
            generation_reports.push(report);
        }
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
    // Task names as wide as the longest.
    let w = reports
        .iter()
        .map(|r| r.task.len())
        .chain(generation_reports.iter().map(|r| r.task.len()))
        .chain([24])
        .max()
        .unwrap_or(24);
    if !generation_reports.is_empty() {
        println!(
            "{:<w$} {:<6} {:>6}  {:<15} {:<15} {:<13} {:<13}",
            "generation task", "prompt", "n", "exact_match", "rouge_l", "chrF", "BLEU"
        );
        for r in &generation_reports {
            println!(
                "{:<w$} {:<6} {:>6}  {:<15} {:<15} {:<13} {:<13}",
                r.task,
                match r.prompt_format {
                    PromptFormat::Plain => "plain",
                    PromptFormat::Chat => "chat",
                },
                r.examples,
                fraction(r.exact_match),
                fraction(r.rouge_l),
                percent(r.chrf),
                percent(r.bleu)
            );
        }
    }
    let outputs = Outputs {
        tasks: &reports,
        generation: &generation_reports,
        texts: &text_reports,
        chats: &chat_reports,
    };
    if reports.is_empty() {
        return write_report(&args, &tokenizer, &outputs);
    }
    println!(
        "{:<w$} {:<9} {:>6}  {:<15} {:<15} {:<15}",
        "task", "format", "n", "acc", "acc_norm", "acc_bytes"
    );
    for r in &reports {
        let m = fraction;
        println!(
            "{:<w$} {:<9} {:>6}  {:<15} {:<15} {:<15}",
            r.task,
            r.format,
            r.examples,
            m(r.acc),
            m(r.acc_norm),
            m(r.acc_bytes)
        );
    }
    write_report(&args, &tokenizer, &outputs)
}

/// A 0..=1 metric with its standard error.
fn fraction(m: Mean) -> String {
    format!("{:.4} ± {:.4}", m.value, m.stderr)
}

/// A 0..=100 metric with its standard error.
fn percent(m: Mean) -> String {
    format!("{:.2} ± {:.2}", m.value, m.stderr)
}

/// How generation tasks are run, from the flags and what the model is.
fn generation_options(
    args: &EvalArgs,
    tokenizer: &Tokenizer,
    stop_ids: Vec<u32>,
) -> Result<GenerationOptions> {
    let chat_stops = kiem_tokenizer::chat::reply_stop_ids(tokenizer, stop_ids.clone());
    let format = match (args.prompt_format.as_str(), &chat_stops) {
        ("plain", _) | ("auto", Err(_)) => PromptFormat::Plain,
        (_, Ok(_)) => PromptFormat::Chat,
        (_, Err(e)) => bail!(
            "--prompt-format chat: {}: {e}; the model has no chat template and was not \
             fine-tuned for chat",
            args.model.display()
        ),
    };
    let (stop_ids, default_stops) = match format {
        PromptFormat::Chat => (chat_stops?, Vec::new()),
        // The harness' default `until` is the few-shot delimiter.
        PromptFormat::Plain => (
            stop_ids,
            vec![kiem_eval::score::FEWSHOT_DELIMITER.to_string()],
        ),
    };
    Ok(GenerationOptions {
        limit: args.limit,
        shots: kiem_eval::score::Shots {
            count: args.shots,
            seed: args.seed,
        },
        batch: args.batch,
        max_new_tokens: args.max_new_tokens,
        stops: if args.stops.is_empty() {
            default_stops
        } else {
            args.stops.clone()
        },
        format,
        stop_ids,
        bootstrap: args.bootstrap,
        seed: args.seed,
    })
}

/// Every report of one run.
struct Outputs<'a> {
    tasks: &'a [TaskReport],
    generation: &'a [GenerationReport],
    texts: &'a [kiem_eval::lm::TextReport],
    chats: &'a [kiem_eval::chat::ChatReport],
}

fn write_report(args: &EvalArgs, tokenizer: &Tokenizer, outputs: &Outputs) -> Result<()> {
    let Some(out) = &args.out else {
        return Ok(());
    };
    let report = serde_json::json!({
        "model": args.model.display().to_string(),
        "tokenizer": tokenizer.hash(),
        "command": std::env::args().collect::<Vec<_>>(),
        "scoring": "lm-evaluation-harness multiple choice: target delimiter \" \", few-shot delimiter \"\\n\\n\", continuation = encode(context + continuation) after the context's tokens; acc_norm per character, acc_bytes per UTF-8 byte; stderr = sample standard deviation / sqrt(n)",
        "generation_scoring": "greedy decoding until a stop string or end token; exact_match: equal after stripping surrounding whitespace; rouge_l: rouge_score ROUGE-L F1 (no stemming), best reference; chrf: sacrebleu CHRF() corpus score; bleu: sacrebleu BLEU() corpus score (13a, exp smoothing); stderr of chrf and bleu: bootstrap over examples",
        "tasks": outputs.tasks,
        "generation": outputs.generation,
        "texts": outputs.texts,
        "chat": outputs.chats,
    });
    kiem_tokenizer::write_atomic(out, serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("report: {}", out.display());
    Ok(())
}
