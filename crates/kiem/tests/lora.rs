//! End to end: a LoRA fine-tune trains adapters only, resumes exactly after SIGKILL, writes
//! PEFT's files, and its adapter is used by generate, eval and merge.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{failed, kiem, ok, prepare, read_json, run};

/// A briefly pre-trained GPT-2 base in `dir/base/model` and conversations in `dir/chat.jsonl`.
fn base_and_chats(dir: &Path) {
    prepare(dir);
    ok(run(
        &[
            "pretrain",
            "--out",
            "base",
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
            "6",
            "--lr",
            "3e-3",
            "--eval-every",
            "0",
            "--sample-every",
            "0",
            "--threads",
            "2",
            "--seed",
            "7",
        ],
        dir,
    ));
    let chats: String = (0..40)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Where is order {i}?{}", " please".repeat(i % 4))},
                {"role": "assistant", "content": format!("Order {i} shipped on day {}.", i % 7)}
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.join("chat.jsonl"), chats).unwrap();
}

fn curve(run_dir: &Path) -> Vec<String> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!(
                "{} {} {} {}",
                v["step"], v["loss"], v["grad_norm"], v["val_loss"]
            )
        })
        .collect()
}

const LORA_FLAGS: &[&str] = &[
    "--model",
    "base/model",
    "--data",
    "chat.jsonl",
    "--steps",
    "16",
    "--micro-batch",
    "4",
    "--grad-accum",
    "2",
    "--lr",
    "1e-2",
    "--eval-every",
    "8",
    "--checkpoint-every",
    "4",
    "--threads",
    "2",
    "--lora-rank",
    "4",
    "--lora-alpha",
    "8",
    "--lora-dropout",
    "0.1",
    "--lora-targets",
    "c_attn,c_proj,c_fc",
];

#[test]
fn lora_finetune_resumes_exactly_and_its_adapter_is_used_everywhere() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    base_and_chats(dir);
    let base_weights = std::fs::read(dir.join("base/model/model.safetensors")).unwrap();
    let args = |out: &'static str| -> Vec<&str> {
        ["finetune", "--out", out]
            .iter()
            .chain(LORA_FLAGS)
            .copied()
            .collect()
    };
    let output = kiem()
        .args(args("whole"))
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("LoRA: rank 4, alpha 8"), "{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("--adapter"), "{stdout}");

    // The adapters in PEFT's format; no full model written.
    let adapter = dir.join("whole/adapter");
    let config = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["fan_in_fan_out"], true);
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["c_attn", "c_fc", "c_proj"])
    );
    assert!(adapter.join("adapter_model.safetensors").exists());
    assert!(!dir.join("whole/model").exists());
    assert!(!dir
        .join("whole/checkpoints/step_00000016/model.safetensors")
        .exists());
    assert_eq!(
        std::fs::read(dir.join("base/model/model.safetensors")).unwrap(),
        base_weights,
        "the base is untouched"
    );
    // Held-out loss falls from the base's.
    let vals: Vec<f64> = curve(&dir.join("whole"))
        .iter()
        .filter_map(|l| l.split(' ').nth(3)?.parse().ok())
        .collect();
    assert!(
        vals.len() == 3 && vals[2] < vals[0],
        "validation losses {vals:?}"
    );

    // SIGKILL after the checkpoint at step 4, resume: the same run bit for bit.
    let mut child = kiem()
        .args(args("killed"))
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !dir.join("killed/checkpoints/step_00000004").exists() {
        assert!(started.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !dir.join("killed/adapter").exists(),
        "the run was killed before it finished"
    );
    ok(run(
        &["finetune", "--resume", "killed", "--threads", "2"],
        dir,
    ));
    assert_eq!(curve(&dir.join("whole")), curve(&dir.join("killed")));
    assert_eq!(
        std::fs::read(adapter.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(dir.join("killed/adapter/adapter_model.safetensors")).unwrap(),
        "final adapters are identical"
    );

    // The adapter merged at load equals the merged model, in generate and eval.
    let greedy = [
        "--prompt",
        "Where is order 3?",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
    ];
    let with_adapter: Vec<&str> = [
        "generate",
        "--model",
        "base/model",
        "--adapter",
        "whole/adapter",
    ]
    .iter()
    .chain(&greedy)
    .copied()
    .collect();
    let adapted = ok(run(&with_adapter, dir));
    ok(run(
        &[
            "merge",
            "--model",
            "base/model",
            "--adapter",
            "whole/adapter",
            "--out",
            "merged",
        ],
        dir,
    ));
    let merged_args: Vec<&str> = ["generate", "--model", "merged"]
        .iter()
        .chain(&greedy)
        .copied()
        .collect();
    assert_eq!(ok(run(&merged_args, dir)), adapted);
    let plain_args: Vec<&str> = ["generate", "--model", "base/model"]
        .iter()
        .chain(&greedy)
        .copied()
        .collect();
    assert_ne!(
        ok(run(&plain_args, dir)),
        adapted,
        "the adapter changes the model"
    );
    let eval = |extra: &[&str]| -> f64 {
        let mut a = vec![
            "eval",
            "--chat",
            "chat.jsonl",
            "--out",
            "report.json",
            "--threads",
            "2",
        ];
        a.extend_from_slice(extra);
        ok(run(&a, dir));
        let report = read_json(&dir.join("report.json"));
        let loss = report.to_string();
        let v: Vec<f64> = report["chat"]
            .as_array()
            .map(|a| a.iter().filter_map(|c| c["loss"].as_f64()).collect())
            .unwrap_or_default();
        *v.first()
            .unwrap_or_else(|| panic!("no chat loss in {loss}"))
    };
    let merged_loss = eval(&["--model", "merged"]);
    let adapted_loss = eval(&["--model", "base/model", "--adapter", "whole/adapter"]);
    assert!(
        (merged_loss - adapted_loss).abs() < 1e-4,
        "{merged_loss} vs {adapted_loss}"
    );
    // Bad adapters and flags fail clearly.
    failed(
        run(
            &[
                "merge",
                "--model",
                "base/model",
                "--adapter",
                "nowhere",
                "--out",
                "x",
            ],
            dir,
        ),
        &["nowhere", "adapter_config.json"],
    );
    failed(
        run(
            &["finetune", "--out", "bad"]
                .iter()
                .chain(LORA_FLAGS)
                .copied()
                .chain(["--lora-targets", "q_proj"])
                .collect::<Vec<_>>(),
            dir,
        ),
        &["q_proj", "c_attn"],
    );
    let mut zero: Vec<&str> = ["finetune", "--out", "bad"]
        .iter()
        .chain(LORA_FLAGS)
        .copied()
        .collect();
    let at = zero.iter().position(|a| *a == "--lora-rank").unwrap();
    zero[at + 1] = "0";
    failed(run(&zero, dir), &["--lora-rank 0"]);
}

/// `--pack`: fewer, fuller rows; a packed run (full, and QLoRA: LoRA on a base kept as Q4_0
/// blocks) learns and resumes bit for bit.
#[test]
fn packed_finetune_learns_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    base_and_chats(dir);
    let flags = [
        "--model",
        "base/model",
        "--data",
        "chat.jsonl",
        "--steps",
        "8",
        "--micro-batch",
        "2",
        "--lr",
        "1e-2",
        "--eval-every",
        "4",
        "--checkpoint-every",
        "4",
        "--threads",
        "2",
        "--pack",
    ];
    let args = |out: &'static str, extra: &[&'static str]| -> Vec<&'static str> {
        let mut a = vec!["finetune", "--out", out];
        a.extend_from_slice(&flags);
        a.extend_from_slice(extra);
        a
    };
    let lora = [
        "--lora-rank",
        "4",
        "--lora-dropout",
        "0.1",
        "--base-weights",
        "q4_0",
    ];
    ok(run(&args("full", &[]), dir));
    let output = run(&args("whole", &lora), dir);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    ok(output);
    assert!(stderr.contains("kept as q4_0"), "{stderr}");
    let config = read_json(&dir.join("whole/run.json"));
    assert_eq!(config["pack"], true);
    assert_eq!(config["base_weights"], "q4_0");
    let vals = |run_dir: &str| -> Vec<f64> {
        curve(&dir.join(run_dir))
            .iter()
            .filter_map(|l| l.split(' ').nth(3)?.parse().ok())
            .collect()
    };
    for run_dir in ["full", "whole"] {
        let v = vals(run_dir);
        assert!(
            v.len() == 3 && v[2] < v[0],
            "{run_dir}: validation losses {v:?}"
        );
    }
    // Packed rows hold more tokens than one conversation: tokens per step exceed 2 rows' worth
    // of the longest conversation's share.
    let metrics = std::fs::read_to_string(dir.join("whole/metrics.jsonl")).unwrap();
    let first: serde_json::Value =
        serde_json::from_str(metrics.lines().find(|l| l.contains("\"loss\"")).unwrap()).unwrap();
    assert!(first["tokens"].as_u64().unwrap() > 2 * 20, "{first}");

    let mut child = kiem()
        .args(args("killed", &lora))
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !dir.join("killed/checkpoints/step_00000004").exists() {
        assert!(started.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!dir.join("killed/adapter").exists());
    ok(run(
        &["finetune", "--resume", "killed", "--threads", "2"],
        dir,
    ));
    assert_eq!(curve(&dir.join("whole")), curve(&dir.join("killed")));
    failed(
        run(&["finetune", "--resume", "killed", "--pack"], dir),
        &["--resume"],
    );
    // The adapters apply to the full-precision base as well.
    ok(run(
        &[
            "generate",
            "--model",
            "base/model",
            "--adapter",
            "killed/adapter",
            "--prompt",
            "Where is order 3?",
            "--max-tokens",
            "4",
        ],
        dir,
    ));
    failed(
        run(&args("bad", &["--base-weights", "q4_0"]), dir),
        &["--lora-rank"],
    );
    failed(
        run(
            &args("bad", &["--lora-rank", "4", "--base-weights", "q3"]),
            dir,
        ),
        &["q3", "q4_0"],
    );
    // A width that is not whole 32-weight blocks is refused before the run writes anything.
    ok(run(
        &[
            "pretrain",
            "--out",
            "narrow",
            "--data",
            "data",
            "--n-layer",
            "1",
            "--n-head",
            "2",
            "--n-embd",
            "48",
            "--context",
            "64",
            "--steps",
            "1",
            "--eval-every",
            "0",
            "--sample-every",
            "0",
            "--threads",
            "2",
        ],
        dir,
    ));
    let mut narrow = args("bad", &lora);
    narrow[4] = "narrow/model";
    failed(run(&narrow, dir), &["q4_0", "32", "bf16"]);
    assert!(
        !dir.join("bad").exists(),
        "nothing written for a refused run"
    );
}
