//! `kiem demo`: the whole recipe on data embedded in the binary. It runs the same command lines
//! a user would type (and prints them), so every step can be repeated and varied by hand.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use kiem_data::chat::{read_conversations, ChatFormat};
use kiem_data::corpus::BadRecords;
use kiem_tokenizer::chat::{render_prompt, Role};

use super::chat::ChatModel;
use super::generate::SamplingArgs;
use super::interrupted;
use crate::ThreadArgs;

/// Public-domain books for pre-training (see crates/kiem/demo/README.md; made by
/// scripts/make_demo_data.py).
const BOOKS: &[u8] = include_bytes!("../../demo/books.txt.zst");
/// Zaragoza AB's construction-company customer FAQ (CC-BY-4.0), in ShareGPT format.
const FAQ: &str = include_str!("../../demo/construction_company_faq_en.sharegpt.jsonl");
/// Every this-many-th FAQ conversation is held out from fine-tuning, to ask the model.
const HOLD_OUT_EVERY: usize = 20;
/// Marks a directory as the demo's own, so a rerun may replace it.
const MARKER: &str = "kiem-demo.json";

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// A one-minute version (tiny model, few steps): checks the whole pipeline, learns little.
    #[arg(long)]
    quick: bool,

    /// Where the data, tokenizer, runs and models go (an earlier demo there is replaced).
    #[arg(long, default_value = "runs/demo", value_name = "DIR")]
    out: PathBuf,

    /// Only write the demo's data files (books, customer FAQ, their licenses) to DIR, for the
    /// README's examples and your own experiments; nothing is trained.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["quick", "questions"])]
    write_data: Option<PathBuf>,

    /// Held-out customer questions to ask the fine-tuned model [default: 5, 3 with --quick].
    #[arg(long, value_name = "N")]
    questions: Option<usize>,

    #[command(flatten)]
    threads: ThreadArgs,
}

/// Sizes of one demo variant.
struct Plan {
    vocab_size: usize,
    depth: usize,
    context: usize,
    pretrain_steps: u64,
    finetune_epochs: u64,
    finetune_lr: f32,
    questions: usize,
}

const FULL: Plan = Plan {
    vocab_size: 4096,
    depth: 4,
    context: 256,
    pretrain_steps: 500,
    finetune_epochs: 6,
    finetune_lr: 1e-3,
    questions: 5,
};

const QUICK: Plan = Plan {
    vocab_size: 1024,
    depth: 2,
    context: 128,
    pretrain_steps: 200,
    finetune_epochs: 3,
    finetune_lr: 1e-3,
    questions: 3,
};

pub fn run(args: DemoArgs) -> Result<()> {
    if let Some(dir) = &args.write_data {
        return write_data(dir);
    }
    let threads = args.threads.install()?;
    let plan = if args.quick { QUICK } else { FULL };
    let questions = args.questions.unwrap_or(plan.questions);
    let out = &args.out;
    let started = Instant::now();
    println!(
        "kiem demo{}: pre-train a small GPT on public-domain books, fine-tune it into a customer-service \
         chatbot on a construction company's FAQ, then ask it questions it has not seen. \
         Everything goes to {} ({threads} threads).",
        if args.quick { " --quick" } else { "" },
        out.display()
    );
    let files = unpack(out)?;
    let path = |p: &Path| p.display().to_string();
    let (tokenizer, shards) = (out.join("tokenizer.json"), out.join("shards"));
    let (base, chat) = (out.join("base"), out.join("chat"));
    let thread_flag = ["--threads".to_string(), threads.to_string()];

    let mut steps: Vec<(&str, Vec<String>)> = vec![
        (
            "train a byte-level BPE tokenizer on the books",
            strings(&[
                "tokenizer",
                "train",
                "--input",
                &path(&files.books),
                "--split-on-blank-lines",
                "--vocab-size",
                &plan.vocab_size.to_string(),
                "--out",
                &path(&tokenizer),
            ]),
        ),
        (
            "tokenize the books into training shards",
            strings(&[
                "data",
                "prepare",
                "--input",
                &path(&files.books),
                "--split-on-blank-lines",
                "--tokenizer",
                &path(&tokenizer),
                "--out",
                &path(&shards),
                "--val-fraction",
                "0.05",
            ]),
        ),
        (
            "pre-train a GPT on the books (unlabeled text: it learns English)",
            strings(&[
                "pretrain",
                "--data",
                &path(&shards),
                "--out",
                &path(&base),
                "--depth",
                &plan.depth.to_string(),
                "--context",
                &plan.context.to_string(),
                "--steps",
                &plan.pretrain_steps.to_string(),
                "--eval-every",
                &(plan.pretrain_steps / 4).to_string(),
                "--sample-every",
                &(plan.pretrain_steps / 2).to_string(),
            ]),
        ),
        (
            "fine-tune it on the customer FAQ (labeled conversations: it learns the job)",
            strings(&[
                "finetune",
                "--model",
                &path(&base.join("model")),
                "--data",
                &path(&files.faq_train),
                "--val-data",
                &path(&files.faq_held_out),
                "--out",
                &path(&chat),
                "--epochs",
                &plan.finetune_epochs.to_string(),
                "--lr",
                &plan.finetune_lr.to_string(),
                "--eval-every",
                "0",
            ]),
        ),
    ];
    let total = steps.len() + 1;
    for (i, (what, argv)) in steps.iter_mut().enumerate() {
        println!("\n[{}/{total}] {what}\n$ kiem {}", i + 1, argv.join(" "));
        argv.extend_from_slice(&thread_flag);
        let step_started = Instant::now();
        crate::run_command_line(argv)?;
        if interrupted() {
            bail!("the demo was interrupted; run `kiem demo` again to start over");
        }
        println!("({:.0}s)", step_started.elapsed().as_secs_f64());
    }

    println!("\n[{total}/{total}] ask the chatbot customer questions it was not trained on");
    let model_dir = chat.join("model");
    let model = ChatModel::load(&model_dir, Default::default())?;
    let mut bad = BadRecords::default();
    let held_out = read_conversations(&files.faq_held_out, ChatFormat::ShareGpt, false, &mut bad)?;
    let sampling = SamplingArgs {
        max_tokens: 120,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.1,
        seed: Some(0),
        stops: Vec::new(),
    };
    for example in held_out.iter().take(questions) {
        let question = &example.messages[0];
        let expected = example
            .messages
            .iter()
            .find(|m| m.role == Role::Assistant)
            .map_or("", |m| m.content.as_str());
        let prompt = render_prompt(&model.tokenizer, std::slice::from_ref(question))?;
        if prompt.len() >= model.gpt.config.context {
            continue;
        }
        println!("\ncustomer: {}", question.content);
        print!("kiem:     ");
        let mut stdout = std::io::stdout();
        let reply = model.reply(prompt, &sampling, Some(&mut stdout))?;
        if reply.trim().is_empty() {
            print!("(no answer)");
        }
        println!("\nFAQ says: {expected}");
    }

    let (before, after) = held_out_losses(&chat)?;
    println!(
        "\nHeld-out assistant-token loss on {} unseen FAQ conversations (nats per token, lower is better):\n  \
         pre-trained base model  {before:.3}\n  fine-tuned chatbot      {after:.3}  ({:.0}% lower)",
        held_out.len(),
        100.0 * (1.0 - after / before)
    );
    if args.quick {
        println!(
            "(--quick trains for seconds: expect broken answers; `kiem demo` trains for minutes)"
        );
    }
    println!(
        "\nDone in {:.0}s. Talk to it:\n  kiem chat --model {}\nContinue a prompt with the base model:\n  \
         kiem generate --model {} --prompt \"It is a truth\"\nRuns, metrics and loss plots: {}, {}",
        started.elapsed().as_secs_f64(),
        model_dir.display(),
        base.join("model").display(),
        base.display(),
        chat.display()
    );
    Ok(())
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The demo's input files, written under `out/data`.
struct DemoFiles {
    books: PathBuf,
    faq_train: PathBuf,
    faq_held_out: PathBuf,
}

/// Prepares `out` (replacing an earlier demo, refusing anything else) and writes the embedded
/// data into it.
/// The demo data's sources and licenses.
const DATA_README: &str = include_str!("../../demo/README.md");

/// Writes the embedded data files to `dir`; an existing file with other contents is kept and
/// reported, never overwritten.
fn write_data(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let books = zstd::decode_all(BOOKS).context("the embedded books are corrupt")?;
    let files: [(&str, &[u8]); 3] = [
        ("books.txt", &books),
        ("construction_company_faq_en.sharegpt.jsonl", FAQ.as_bytes()),
        ("README.md", DATA_README.as_bytes()),
    ];
    for (name, bytes) in files {
        let path = dir.join(name);
        match std::fs::read(&path) {
            Ok(existing) if existing == bytes => {}
            Ok(_) => bail!(
                "{} exists with other contents: choose another directory (nothing was overwritten)",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                kiem_tokenizer::write_atomic(&path, bytes)
                    .with_context(|| format!("cannot write {}", path.display()))?
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
        println!("{}", path.display());
    }
    println!(
        "books.txt: public-domain books, one paragraph a line, blank-line-separated; the FAQ is \
         CC-BY-4.0 by Zaragoza AB (see README.md there)"
    );
    Ok(())
}

fn unpack(out: &Path) -> Result<DemoFiles> {
    if out.exists() {
        let is_empty_dir = std::fs::read_dir(out)
            .map(|mut entries| entries.next().is_none())
            .unwrap_or(false);
        if out.join(MARKER).is_file() {
            std::fs::remove_dir_all(out)
                .with_context(|| format!("cannot remove the earlier demo in {}", out.display()))?;
        } else if !is_empty_dir {
            bail!(
                "{} exists and is not an earlier kiem demo: choose another --out",
                out.display()
            );
        }
    }
    let data = out.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("cannot create {}", data.display()))?;
    let marker = serde_json::json!({ "kiem_version": env!("CARGO_PKG_VERSION") });
    std::fs::write(out.join(MARKER), marker.to_string())?;
    let files = DemoFiles {
        books: data.join("books.txt.zst"),
        faq_train: data.join("faq_train.jsonl"),
        faq_held_out: data.join("faq_held_out.jsonl"),
    };
    std::fs::write(&files.books, BOOKS)?;
    let (mut train, mut held_out) = (String::new(), String::new());
    for (i, line) in FAQ.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let split = if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY / 2 {
            &mut held_out
        } else {
            &mut train
        };
        split.push_str(line);
        split.push('\n');
    }
    std::fs::write(&files.faq_train, train)?;
    std::fs::write(&files.faq_held_out, held_out)?;
    println!(
        "data: {} (public-domain books), {} and {} (customer FAQ by Zaragoza AB, CC-BY-4.0)",
        files.books.display(),
        files.faq_train.display(),
        files.faq_held_out.display()
    );
    Ok(files)
}

/// The fine-tuning run's held-out loss before its first step (the base model) and at its end.
fn held_out_losses(run_dir: &Path) -> Result<(f64, f64)> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let evals: Vec<f64> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|v| v["val_loss"].as_f64())
        .collect();
    match (evals.first(), evals.last()) {
        (Some(&first), Some(&last)) if evals.len() >= 2 => Ok((first, last)),
        _ => bail!("{} lacks the base and final evaluations", path.display()),
    }
}
