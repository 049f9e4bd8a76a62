//! End-to-end tests of training: a SIGKILLed and resumed run matches an uninterrupted one at
//! every step, bad setups fail with clear errors, fine-tuning learns, and `kiem demo --quick`
//! runs the whole recipe.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    failed, kiem, ok, prepare, read_json, run, run_with_input, write_order_conversations,
};

const RUN_FLAGS: &[&str] = &[
    "--data",
    "data",
    "--n-layer",
    "2",
    "--n-head",
    "2",
    "--n-embd",
    "64",
    "--context",
    "64",
    "--micro-batch",
    "4",
    "--batch-tokens",
    "512",
    "--steps",
    "40",
    "--lr",
    "3e-3",
    "--eval-every",
    "10",
    "--eval-tokens",
    "2048",
    "--sample-every",
    "0",
    "--checkpoint-every",
    "20",
    "--threads",
    "2",
    "--seed",
    "7",
];

/// (step, loss) and (step, val_loss) lines of a run, as their exact JSON text.
fn curve(run_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            match v.get("loss") {
                Some(loss) => format!("{} loss {loss} grad {}", v["step"], v["grad_norm"]),
                None => format!("{} val {} bpb {}", v["step"], v["val_loss"], v["val_bpb"]),
            }
        })
        .collect()
}

/// Starts kiem with `args` and SIGKILLs it as soon as `checkpoint` exists.
fn kill_at_checkpoint(dir: &Path, args: &[&str], checkpoint: &Path) {
    let mut child = kiem()
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !checkpoint.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

#[test]
fn killed_and_resumed_run_matches_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    prepare(dir);

    let mut whole = vec!["pretrain", "--out", "whole"];
    whole.extend_from_slice(RUN_FLAGS);
    ok(run(&whole, dir));

    let mut killed = vec!["pretrain", "--out", "killed"];
    killed.extend_from_slice(RUN_FLAGS);
    kill_at_checkpoint(dir, &killed, &dir.join("killed/checkpoints/step_00000020"));
    assert!(
        !dir.join("killed/model").exists(),
        "the run was killed before it finished"
    );

    ok(run(
        &["pretrain", "--resume", "killed", "--threads", "2"],
        dir,
    ));
    let (a, b) = (curve(&dir.join("whole")), curve(&dir.join("killed")));
    assert_eq!(a.len(), 40 + 4, "40 steps and 4 evaluations");
    assert_eq!(a, b, "losses must be bit-identical at every step");
    assert!(dir.join("killed/model/model.safetensors").exists());
    assert_eq!(
        std::fs::read(dir.join("whole/model/model.safetensors")).unwrap(),
        std::fs::read(dir.join("killed/model/model.safetensors")).unwrap(),
        "final weights are identical"
    );
    assert!(dir.join("whole/loss.png").exists());
    // Only the last 3 checkpoints are kept (steps 20 and 40 here).
    let kept: Vec<PathBuf> = std::fs::read_dir(dir.join("whole/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
}

/// The Llama block runs the same training loop, checkpoints and exact resume as GPT-2; the
/// model it writes is a `LlamaForCausalLM` directory that kiem generates from and fine-tunes,
/// and whose prompts start with the document token its data started with.
#[test]
fn llama_run_resumes_exactly_generates_and_fine_tunes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    prepare(dir);
    let with = |out: &'static str| {
        let mut args = vec!["pretrain", "--out", out, "--arch", "llama"];
        args.extend_from_slice(RUN_FLAGS);
        let heads = args.iter().position(|&a| a == "--n-head").unwrap() + 1;
        args[heads] = "4";
        args
    };
    let whole = run(&with("whole"), dir);
    let stderr = String::from_utf8_lossy(&whole.stderr).into_owned();
    ok(whole);
    assert!(
        stderr.contains("llama: 2 layers, 4 heads (2 key/value)"),
        "{stderr}"
    );
    kill_at_checkpoint(
        dir,
        &with("killed"),
        &dir.join("killed/checkpoints/step_00000020"),
    );
    ok(run(
        &["pretrain", "--resume", "killed", "--threads", "2"],
        dir,
    ));
    let (a, b) = (curve(&dir.join("whole")), curve(&dir.join("killed")));
    assert_eq!(a, b, "losses must be bit-identical at every step");
    let first_loss =
        |line: &str| -> f64 { line.split_whitespace().nth(2).unwrap().parse().unwrap() };
    assert!(
        first_loss(&a[a.len() - 2]) < first_loss(&a[0]) * 0.7,
        "it learns: {a:?}"
    );
    let config = read_json(&dir.join("whole/model/config.json"));
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["num_key_value_heads"], 2);
    assert_eq!(config["tie_word_embeddings"], true);
    let tokenizer_config = read_json(&dir.join("whole/model/tokenizer_config.json"));
    assert_eq!(tokenizer_config["add_bos_token"], true);
    let text = ok(run(
        &[
            "generate",
            "--model",
            "whole/model",
            "--prompt",
            "Line 4: the customer",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--threads",
            "2",
        ],
        dir,
    ));
    assert!(!text.is_empty());
    write_order_conversations(&dir.join("chat.jsonl"), 12, |_| "It has shipped.".into());
    ok(run(
        &[
            "finetune",
            "--model",
            "whole/model",
            "--data",
            "chat.jsonl",
            "--out",
            "ft",
            "--steps",
            "3",
            "--val-fraction",
            "0",
            "--threads",
            "2",
        ],
        dir,
    ));
    let reply = run_with_input(
        &[
            "chat",
            "--model",
            "ft/model",
            "--max-tokens",
            "3",
            "--weights",
            "bf16",
            "--threads",
            "2",
        ],
        dir,
        "Where is order 3?\n",
    );
    assert_eq!(reply.lines().count(), 1, "{reply}");

    // An embedding with rows beyond the tokenizer (as Qwen2.5 ships): kiem generates only the
    // tokenizer's ids and fine-tunes it without growing it.
    let (model, ids) = kiem_engine::io::load_model_dir(&dir.join("whole/model")).unwrap();
    let padded = model.grow_vocab(model.config.vocab_size + 40).unwrap();
    std::fs::create_dir(dir.join("padded")).unwrap();
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(
            dir.join("whole/model").join(file),
            dir.join("padded").join(file),
        )
        .unwrap();
    }
    let config = kiem_engine::io::hf_config_json(&padded.config, &ids);
    std::fs::write(dir.join("padded/config.json"), config.to_string()).unwrap();
    padded
        .save_safetensors(&dir.join("padded/model.safetensors"))
        .unwrap();
    let text = ok(run(
        &[
            "generate",
            "--model",
            "padded",
            "--prompt",
            "Line 4:",
            "--max-tokens",
            "40",
            "--temperature",
            "2",
            "--seed",
            "1",
            "--threads",
            "2",
        ],
        dir,
    ));
    assert!(!text.is_empty());
    ok(run(
        &[
            "finetune",
            "--model",
            "padded",
            "--data",
            "chat.jsonl",
            "--out",
            "ft-padded",
            "--steps",
            "2",
            "--val-fraction",
            "0",
            "--threads",
            "2",
        ],
        dir,
    ));
    let written = read_json(&dir.join("ft-padded/model/config.json"));
    assert_eq!(written["vocab_size"], padded.config.vocab_size);
}

fn cpu_has_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn cpu_is_intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86-64 CPU.
        let leaf = unsafe { std::arch::x86_64::__cpuid(0) };
        let vendor: Vec<u8> = [leaf.ebx, leaf.edx, leaf.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        vendor == b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// bf16 matrix products: the run records its precision, resumes bit-identically after a
/// SIGKILL, and learns as the fp32 run does; CPUs without AVX512-BF16 get a clear error, and
/// `--precision auto` falls back to fp32 on them (and on Intel CPUs without AMX in use).
#[test]
fn bf16_run_resumes_exactly_and_tracks_fp32() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    prepare(dir);
    let with = |out: &'static str, precision: &'static str| {
        let mut args = vec!["pretrain", "--out", out, "--precision", precision];
        args.extend_from_slice(RUN_FLAGS);
        args
    };
    // auto takes bf16 where it outruns fp32 (AMX tiles in use, or AVX512-BF16 off Intel),
    // else fp32, and records which.
    let auto = run(&with("auto", "auto"), dir);
    let stderr = String::from_utf8_lossy(&auto.stderr).into_owned();
    ok(auto);
    let amx_in_use = std::env::var("KIEM_BF16").as_deref() == Ok("amx")
        && kiem_engine::bf16_gemm::amx_supported();
    let resolved = if cpu_has_bf16() && (amx_in_use || !cpu_is_intel()) {
        "bf16"
    } else {
        "fp32"
    };
    assert_eq!(read_json(&dir.join("auto/run.json"))["precision"], resolved);
    assert!(stderr.contains(&format!("{resolved} matmuls")), "{stderr}");
    failed(run(&with("odd", "fp16"), dir), &["fp32, bf16 or auto"]);
    if !cpu_has_bf16() {
        failed(run(&with("bf16", "bf16"), dir), &["AVX512-BF16"]);
        return;
    }
    ok(run(&with("fp32", "fp32"), dir));
    ok(run(&with("bf16", "bf16"), dir));
    // A KIEM_BF16 naming no backend is said, with what runs instead, and the run goes on.
    let noted = kiem()
        .args(with("noted", "bf16"))
        .env("KIEM_BF16", "tiles")
        .current_dir(dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&noted.stderr).into_owned();
    ok(noted);
    assert!(
        stderr.contains("KIEM_BF16=\"tiles\" names no backend") && stderr.contains("AVX512-BF16"),
        "{stderr}"
    );
    let config = read_json(&dir.join("bf16/run.json"));
    assert_eq!(config["precision"], "bf16");
    kill_at_checkpoint(
        dir,
        &with("killed", "bf16"),
        &dir.join("killed/checkpoints/step_00000020"),
    );
    failed(
        run(
            &["pretrain", "--resume", "killed", "--precision", "fp32"],
            dir,
        ),
        &["--precision"],
    );
    ok(run(
        &["pretrain", "--resume", "killed", "--threads", "2"],
        dir,
    ));
    let (whole, resumed) = (curve(&dir.join("bf16")), curve(&dir.join("killed")));
    assert_eq!(whole, resumed, "bf16 losses are bit-identical after resume");
    let last_val = |run: &str| -> f64 {
        let line = curve(&dir.join(run)).pop().unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    let (fp32, bf16) = (last_val("fp32"), last_val("bf16"));
    assert_ne!(
        curve(&dir.join("fp32")),
        whole,
        "bf16 products round differently"
    );
    assert!(
        (fp32 - bf16).abs() < 0.02 * fp32,
        "final validation loss: fp32 {fp32} vs bf16 {bf16}"
    );
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    prepare(dir);
    let child = kiem()
        .args([
            "pretrain",
            "--data",
            "data",
            "--out",
            "run",
            "--n-layer",
            "1",
            "--n-head",
            "1",
            "--n-embd",
            "16",
            "--context",
            "32",
            "--steps",
            "1000000",
            "--checkpoint-every",
            "0",
            "--eval-every",
            "0",
            "--sample-every",
            "0",
            "--threads",
            "1",
        ])
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = dir.join("run/metrics.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics)
        .map(|m| m.lines().count())
        .unwrap_or(0)
        < 3
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "training did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("interrupted after") && stdout.contains("--resume run"),
        "{stdout}"
    );
    let checkpoints: Vec<_> = std::fs::read_dir(dir.join("run/checkpoints"))
        .unwrap()
        .collect();
    assert_eq!(
        checkpoints.len(),
        1,
        "one checkpoint written at the interruption"
    );
}

#[test]
fn bad_setups_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    prepare(dir);
    let base = [
        "--n-layer",
        "1",
        "--n-head",
        "1",
        "--n-embd",
        "16",
        "--threads",
        "1",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec!["pretrain".into()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.extend(base.iter().map(|s| s.to_string()));
        if !extra.contains(&"--steps") {
            v.extend(["--steps".to_string(), "2".to_string()]);
        }
        v
    };
    let go = |args: Vec<String>| run(&args.iter().map(String::as_str).collect::<Vec<_>>(), dir);

    failed(
        go(with(&["--data", "missing", "--out", "r1"])),
        &["missing", "kiem data prepare"],
    );
    failed(
        go(with(&["--data", ".", "--out", "r2"])),
        &["no manifest.json"],
    );
    failed(
        go(with(&[
            "--data",
            "data",
            "--out",
            "r3",
            "--context",
            "100000",
        ])),
        &["fewer than one sequence"],
    );
    failed(
        go(with(&[
            "--data",
            "data",
            "--out",
            "r4",
            "--micro-batch",
            "2000000",
            "--context",
            "32",
        ])),
        &["GiB"],
    );
    failed(
        go(with(&[
            "--data",
            "data",
            "--out",
            "r5",
            "--batch-tokens",
            "100",
        ])),
        &["--batch-tokens 100"],
    );
    failed(
        go(with(&[
            "--data",
            "data",
            "--out",
            "r6",
            "--lr",
            "1e6",
            "--grad-clip",
            "0",
            "--steps",
            "50",
            "--checkpoint-every",
            "1",
        ])),
        &["diverged", "Last good checkpoint"],
    );
    failed(
        run(&["pretrain", "--resume", "nowhere"], dir),
        &["nowhere", "run.json"],
    );
    ok(go(with(&[
        "--data",
        "data",
        "--out",
        "r7",
        "--context",
        "32",
    ])));
    failed(
        run(&["pretrain", "--resume", "r7", "--lr", "1"], dir),
        &["--lr", "cannot change"],
    );
    failed(
        go(with(&["--data", "data", "--out", "r7", "--context", "32"])),
        &["already holds a run", "--resume"],
    );
    // Extending a finished run continues it.
    ok(run(
        &[
            "pretrain",
            "--resume",
            "r7",
            "--steps",
            "3",
            "--threads",
            "1",
        ],
        dir,
    ));
    let lines = std::fs::read_to_string(dir.join("r7/metrics.jsonl")).unwrap();
    assert!(lines.contains("\"step\":3"), "{lines}");
}

#[test]
fn generate_streams_seeded_text_from_a_trained_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    prepare(dir);
    ok(run(
        &[
            "pretrain",
            "--data",
            "data",
            "--out",
            "run",
            "--n-layer",
            "1",
            "--n-head",
            "2",
            "--n-embd",
            "32",
            "--context",
            "64",
            "--steps",
            "30",
            "--lr",
            "3e-3",
            "--threads",
            "1",
        ],
        dir,
    ));
    let gen = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            "run/model",
            "--prompt",
            "Line 12: the customer",
            "--max-tokens",
            "20",
            "--threads",
            "1",
        ];
        args.extend_from_slice(extra);
        run(&args, dir)
    };
    let a = ok(gen(&["--seed", "5"]));
    let b = ok(gen(&["--seed", "5"]));
    assert_eq!(a, b, "same seed, same text");
    assert!(!a.is_empty());
    let greedy = ok(gen(&["--temperature", "0"]));
    assert_eq!(
        greedy,
        ok(gen(&["--temperature", "0", "--seed", "9"])),
        "greedy ignores the seed"
    );
    // bf16 weights: seeded and repeatable too (the values differ from fp32 in the last bits).
    let bf16 = ok(gen(&["--seed", "5", "--weights", "bf16"]));
    assert!(!bf16.is_empty());
    assert_eq!(bf16, ok(gen(&["--seed", "5", "--weights", "bf16"])));
    failed(gen(&["--weights", "int3"]), &["--weights"]);
    // A stop string cuts the output before it.
    let first_char = a.chars().next().unwrap().to_string();
    let stopped = ok(gen(&["--seed", "5", "--stop", &first_char]));
    assert_eq!(stopped, "");

    failed(gen(&["--top-p", "0"]), &["top_p"]);
    failed(
        run(&["generate", "--model", "data", "--prompt", "x"], dir),
        &["no config.json"],
    );
    failed(
        run(&["generate", "--model", "nowhere", "--prompt", "x"], dir),
        &["nowhere", "does not exist"],
    );
    let long = "word ".repeat(200);
    failed(
        run(
            &["generate", "--model", "run/model", "--prompt", &long],
            dir,
        ),
        &["context"],
    );
}

#[test]
fn finetune_a_gpt2_tokenizer_model_grows_chat_tokens_and_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let text: String = (0..400)
        .map(|i| format!("Order {i} was shipped on day {}.\n\n", i % 7))
        .collect();
    std::fs::write(dir.join("corpus.txt"), text).unwrap();
    ok(run(
        &[
            "data",
            "prepare",
            "--input",
            "corpus.txt",
            "--split-on-blank-lines",
            "--tokenizer",
            "gpt2",
            "--out",
            "data",
            "--val-fraction",
            "0.1",
        ],
        dir,
    ));
    // Benchmark tasks scored during training: one multiple choice, one generation (FAQ-style
    // questions the fine-tune below teaches the answer to).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let choice_task = root.join("kiem-eval/tests/fixtures/plain_fixture.jsonl");
    let faq: String = (100..106)
        .map(|i| {
            serde_json::json!({"prompt": format!("Where is order {i}?"), "reference": "It has shipped."})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.join("faq.jsonl"), faq).unwrap();
    let choice_arg = choice_task.display().to_string();
    let out = run(
        &[
            "pretrain",
            "--data",
            "data",
            "--out",
            "base",
            "--n-layer",
            "1",
            "--n-head",
            "2",
            "--n-embd",
            "32",
            "--context",
            "48",
            "--steps",
            "5",
            "--eval-every",
            "2",
            "--eval-tasks",
            &choice_arg,
            "faq.jsonl",
            "--eval-task-limit",
            "3",
            "--threads",
            "2",
        ],
        dir,
    );
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(
        log.contains("plain_fixture (3 examples): acc_norm"),
        "{log}"
    );
    let task_lines: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.join("base/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("tasks").is_some())
            .collect();
    let steps: Vec<u64> = task_lines
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [2, 4, 5], "scored at each evaluation and the end");
    let last = &task_lines[2]["tasks"];
    assert_eq!(last["plain_fixture"]["examples"], 3);
    assert!((0.0..=1.0).contains(&last["plain_fixture"]["acc"].as_f64().unwrap()));
    assert!(last["faq"]["rouge_l"].as_f64().is_some() && last["faq"]["bleu"].as_f64().is_some());
    // The plot grows a panel for the task scores.
    let png = std::fs::read(dir.join("base/loss.png")).unwrap();
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!(height, 860, "loss.png with the task panel");
    // `kiem eval --text` on the prepared data directory: its validation split, as training
    // measured it.
    let out = ok(run(
        &[
            "eval",
            "--model",
            "base/model",
            "--text",
            "data",
            "--out",
            "lm.json",
        ],
        dir,
    ));
    assert!(out.contains("bpb"), "{out}");
    let lm = read_json(&dir.join("lm.json"));
    let val_bytes = read_json(&dir.join("data/manifest.json"))["val"]["bytes"].clone();
    assert_eq!(lm["texts"][0]["bytes"], val_bytes);
    let final_val = std::fs::read_to_string(dir.join("base/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["val_loss"].as_f64())
        .next_back()
        .unwrap();
    let measured = lm["texts"][0]["loss"].as_f64().unwrap();
    assert!(
        (measured - final_val).abs() < 0.05 * final_val,
        "eval --text DIR {measured} vs training's validation loss {final_val}"
    );
    write_order_conversations(&dir.join("chat.jsonl"), 60, |_| "It has shipped.".into());
    let out = run(
        &[
            "finetune",
            "--model",
            "base/model",
            "--data",
            "chat.jsonl",
            "--out",
            "ft",
            "--epochs",
            "20",
            "--lr",
            "1e-2",
            "--eval-every",
            "0",
            "--eval-tasks",
            "faq.jsonl",
            "--threads",
            "2",
        ],
        dir,
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(stderr.contains("added 6 chat tokens"), "{stderr}");
    let config = read_json(&dir.join("ft/model/config.json"));
    assert_eq!(config["vocab_size"], 50257 + 6);
    let info = ok(run(&["tokenizer", "info", "--tokenizer", "ft/model"], dir));
    assert!(info.contains("50262=<|system_end|>"), "{info}");
    // Held-out assistant-token loss: the base model's (step 0) against the fine-tuned one's.
    let evals: Vec<f64> = std::fs::read_to_string(dir.join("ft/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["val_loss"].as_f64())
        .collect();
    assert!(evals.len() >= 2, "{evals:?}");
    assert!(
        evals[evals.len() - 1] < evals[0] * 0.5,
        "loss falls substantially: {evals:?}"
    );
    // The FAQ task, answered in the chat format: the base model (step 0) does not give the
    // answer, the fine-tuned one does.
    let faq_scores: Vec<f64> = std::fs::read_to_string(dir.join("ft/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["tasks"]["faq"]["exact_match"]
                .as_f64()
        })
        .collect();
    assert_eq!(faq_scores.len(), 2, "{faq_scores:?}");
    assert!(faq_scores[0] < 0.5 && faq_scores[1] > 0.5, "{faq_scores:?}");
    failed(
        run(
            &[
                "finetune",
                "--model",
                "base/model",
                "--data",
                "corpus.txt",
                "--out",
                "ft2",
            ],
            dir,
        ),
        &["corpus.txt", ".jsonl"],
    );
}

#[test]
fn quick_demo_runs_the_whole_recipe_and_replaces_only_its_own_output() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Anything that is not an earlier demo is left alone.
    std::fs::create_dir(dir.join("mine")).unwrap();
    std::fs::write(dir.join("mine/notes.txt"), "keep").unwrap();
    failed(
        run(&["demo", "--quick", "--out", "mine"], dir),
        &["mine exists and is not an earlier kiem demo"],
    );
    assert!(dir.join("mine/notes.txt").exists());
    // An earlier demo's directory is replaced.
    std::fs::create_dir(dir.join("demo")).unwrap();
    std::fs::write(dir.join("demo/kiem-demo.json"), "{}").unwrap();
    std::fs::write(dir.join("demo/stale.txt"), "old").unwrap();
    let started = Instant::now();
    let stdout = ok(run(
        &["demo", "--quick", "--out", "demo", "--threads", "2"],
        dir,
    ));
    eprintln!("kiem demo --quick took {:?}", started.elapsed());
    assert!(!dir.join("demo/stale.txt").exists());
    for step in [
        "$ kiem tokenizer train",
        "$ kiem data prepare",
        "$ kiem pretrain",
        "$ kiem finetune",
    ] {
        assert!(stdout.contains(step), "no {step:?} in:\n{stdout}");
    }
    assert_eq!(stdout.matches("\ncustomer: ").count(), 3, "{stdout}");
    assert_eq!(stdout.matches("\nFAQ says: ").count(), 3, "{stdout}");
    let loss = |label: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap();
        line.trim_start()[label.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (base, tuned) = (loss("pre-trained base model"), loss("fine-tuned chatbot"));
    assert!(
        tuned < base * 0.9,
        "fine-tuning did not lower the held-out loss: {base} -> {tuned}"
    );
    assert!(
        stdout.contains("kiem chat --model demo/chat/model"),
        "{stdout}"
    );
    let held_out = std::fs::read_to_string(dir.join("demo/data/faq_held_out.jsonl")).unwrap();
    let train = std::fs::read_to_string(dir.join("demo/data/faq_train.jsonl")).unwrap();
    assert_eq!(held_out.lines().count() + train.lines().count(), 503);
    assert!(held_out.lines().all(|q| !train.contains(q)));
    // The fine-tuned model answers through the chat command too.
    let reply = run_with_input(
        &[
            "chat",
            "--model",
            "demo/chat/model",
            "--max-tokens",
            "8",
            "--seed",
            "1",
        ],
        dir,
        "Do I need a building permit?\n",
    );
    assert_eq!(reply.lines().count(), 1, "{reply}");
}

#[test]
fn killed_and_resumed_finetune_matches_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    prepare(dir);
    // A briefly pre-trained base: the run flags with 4 steps.
    let base: Vec<&str> = {
        let mut args = vec!["pretrain", "--out", "base"];
        let mut flags = RUN_FLAGS.iter();
        while let Some(&flag) = flags.next() {
            let value = *flags.next().unwrap();
            args.extend_from_slice(&[flag, if flag == "--steps" { "4" } else { value }]);
        }
        args
    };
    ok(run(&base, dir));
    // Conversations of varied length, so batches have varied padding.
    let chats: String = (0..40)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Where is order {i}?{}", " please".repeat(i % 5))},
                {"role": "assistant", "content": format!("Order {i} shipped on day {}.", i % 7)}
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.join("chat.jsonl"), chats).unwrap();
    let flags = [
        "--model",
        "base/model",
        "--data",
        "chat.jsonl",
        "--steps",
        "18",
        "--micro-batch",
        "3",
        "--grad-accum",
        "2",
        "--lr",
        "2e-3",
        "--eval-every",
        "6",
        "--checkpoint-every",
        "6",
        "--threads",
        "2",
    ];
    let whole: Vec<&str> = ["finetune", "--out", "whole"]
        .iter()
        .chain(&flags)
        .copied()
        .collect();
    ok(run(&whole, dir));
    let killed: Vec<&str> = ["finetune", "--out", "killed"]
        .iter()
        .chain(&flags)
        .copied()
        .collect();
    kill_at_checkpoint(dir, &killed, &dir.join("killed/checkpoints/step_00000006"));
    assert!(
        !dir.join("killed/model").exists(),
        "the run was killed before it finished"
    );
    ok(run(
        &["finetune", "--resume", "killed", "--threads", "2"],
        dir,
    ));
    let (a, b) = (curve(&dir.join("whole")), curve(&dir.join("killed")));
    assert_eq!(a.len(), 18 + 4, "18 steps, the base evaluation and 3 more");
    assert_eq!(a, b, "losses must be bit-identical at every step");
    assert_eq!(
        std::fs::read(dir.join("whole/model/model.safetensors")).unwrap(),
        std::fs::read(dir.join("killed/model/model.safetensors")).unwrap(),
        "final weights are identical"
    );
}

/// A checkpoint records what computed its matrix products; resuming on another path (here the
/// baseline-SIMD build's, as a run moved to another machine would) warns that the losses may
/// differ in their last bits.
#[test]
fn resuming_on_another_matmul_path_warns() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    prepare(dir);
    let tiny = [
        "--data",
        "data",
        "--out",
        "run",
        "--n-layer",
        "1",
        "--n-head",
        "1",
        "--n-embd",
        "16",
        "--context",
        "32",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
        "--threads",
        "1",
    ];
    let first = kiem()
        .arg("pretrain")
        .args(tiny)
        .args(["--steps", "2"])
        .env("KIEM_SIMD", "baseline")
        .current_dir(dir)
        .output()
        .unwrap();
    ok(first);
    let checkpoints = dir.join("run/checkpoints");
    let latest = std::fs::read_dir(&checkpoints)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let state = read_json(&latest.join("trainer_state/state.json"));
    let recorded = state["trainer"]["matmul_path"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(recorded.ends_with("baseline x86-64"), "{recorded}");
    let resumed = kiem()
        .args(["pretrain", "--resume", "run", "--steps", "3"])
        .env_remove("KIEM_SIMD")
        .current_dir(dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr).into_owned();
    ok(resumed);
    assert!(
        stderr.contains(&format!("trained with matrix products on {recorded}"))
            && stderr.contains("last bits"),
        "{stderr}"
    );
}
