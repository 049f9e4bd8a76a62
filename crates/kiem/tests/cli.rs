//! End-to-end tests of the `kiem` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kiem(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiem"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("kiem runs")
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "kiem failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn failed(output: &Output, needles: &[&str]) -> String {
    assert!(!output.status.success(), "expected failure");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr {stderr:?} lacks {needle:?}"
        );
    }
    stderr
}

fn corpus(dir: &Path) -> PathBuf {
    let path = dir.join("corpus.jsonl");
    let lines: Vec<String> = (0..200)
        .map(|i| {
            serde_json::json!({"text": format!("Customer {i} asked about the roof repair; we answered politely. Café #{i}!")})
                .to_string()
        })
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn train_encode_decode_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir);
    let out = ok(&kiem(
        &[
            "tokenizer",
            "train",
            "--input",
            "corpus.jsonl",
            "--vocab-size",
            "400",
            "--out",
            "tok/tokenizer.json",
        ],
        dir,
    ));
    assert!(out.contains("400-token tokenizer"), "{out}");
    let info = ok(&kiem(&["tokenizer", "info", "--tokenizer", "tok"], dir));
    assert!(
        info.contains("vocab size:  400")
            && info.contains("0=<|bos|>")
            && info.contains("prompts:     start with 0=<|bos|>"),
        "{info}"
    );

    let text = "Customer 7 asked: is the café open?\n";
    for tokenizer in ["tok/tokenizer.json", "gpt2"] {
        let ids = ok(&kiem(
            &[
                "tokenizer",
                "encode",
                "--tokenizer",
                tokenizer,
                "--text",
                text,
            ],
            dir,
        ));
        let decoded = ok(&kiem(
            &["tokenizer", "decode", "--tokenizer", tokenizer, ids.trim()],
            dir,
        ));
        assert_eq!(decoded, text);
    }
    // The tokenizer refuses to overwrite its output unless asked.
    failed(
        &kiem(
            &[
                "tokenizer",
                "train",
                "--input",
                "corpus.jsonl",
                "--vocab-size",
                "300",
                "--out",
                "tok/tokenizer.json",
            ],
            dir,
        ),
        &["already exists", "--overwrite"],
    );
}

#[test]
fn bad_flags_and_inputs_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir);
    failed(
        &kiem(
            &[
                "tokenizer",
                "train",
                "--input",
                "corpus.jsonl",
                "--vocab-size",
                "100",
                "--out",
                "t.json",
            ],
            dir,
        ),
        &["--vocab-size 100", "256"],
    );
    assert!(!dir.join("t.json").exists());

    std::fs::write(
        dir.join("broken.jsonl"),
        "{\"text\":\"ok\"}\n{\"text\":\"unterminated}\n",
    )
    .unwrap();
    failed(
        &kiem(
            &[
                "data",
                "prepare",
                "--input",
                "broken.jsonl",
                "--tokenizer",
                "gpt2",
                "--out",
                "data",
            ],
            dir,
        ),
        &["broken.jsonl:2", "malformed JSON"],
    );
    assert!(!dir.join("data").exists());
    let out = kiem(
        &[
            "data",
            "prepare",
            "--input",
            "broken.jsonl",
            "--tokenizer",
            "gpt2",
            "--out",
            "data",
            "--skip-bad-records",
        ],
        dir,
    );
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped 1 bad record"));

    failed(
        &kiem(
            &[
                "data",
                "prepare",
                "--input",
                "corpus.jsonl",
                "--tokenizer",
                "nope.json",
                "--out",
                "d2",
            ],
            dir,
        ),
        &["nope.json"],
    );
    failed(
        &kiem(
            &[
                "data",
                "prepare",
                "--input",
                "corpus.jsonl",
                "--tokenizer",
                "gpt2",
                "--out",
                "d3",
                "--threads",
                "0",
            ],
            dir,
        ),
        &["--threads 0"],
    );
    failed(
        &kiem(&["data", "inspect", "corpus.jsonl"], dir),
        &["corpus.jsonl"],
    );
}

#[test]
fn prepare_then_inspect() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir);
    let out = ok(&kiem(
        &[
            "data",
            "prepare",
            "--input",
            "corpus.jsonl",
            "--tokenizer",
            "gpt2",
            "--out",
            "data",
            "--val-fraction",
            "0.2",
        ],
        dir,
    ));
    assert!(out.contains("prepared 200 documents"), "{out}");
    let inspect = ok(&kiem(&["data", "inspect", "data"], dir));
    assert!(inspect.contains("is valid"), "{inspect}");
    // The data directory carries its tokenizer, usable wherever a tokenizer is taken.
    let ids = ok(&kiem(
        &[
            "tokenizer",
            "encode",
            "--tokenizer",
            "data",
            "--text",
            "hello",
        ],
        dir,
    ));
    assert_eq!(ids.trim(), "[31373]");
}

#[test]
fn config_file_supplies_flags_and_command_line_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir);
    std::fs::write(
        dir.join("run.toml"),
        "input = [\"corpus.jsonl\"]\nvocab_size = 300\nout = \"from-config.json\"\n",
    )
    .unwrap();
    ok(&kiem(&["--config", "run.toml", "tokenizer", "train"], dir));
    let info = ok(&kiem(
        &["tokenizer", "info", "--tokenizer", "from-config.json"],
        dir,
    ));
    assert!(info.contains("vocab size:  300"), "{info}");

    ok(&kiem(
        &[
            "tokenizer",
            "train",
            "--config",
            "run.toml",
            "--vocab-size",
            "320",
            "--out",
            "flag.json",
        ],
        dir,
    ));
    let info = ok(&kiem(
        &["tokenizer", "info", "--tokenizer", "flag.json"],
        dir,
    ));
    assert!(info.contains("vocab size:  320"), "{info}");

    std::fs::write(dir.join("bad.toml"), "vocab_sise = 300\n").unwrap();
    failed(
        &kiem(&["--config", "bad.toml", "tokenizer", "train"], dir),
        &["bad.toml", "vocab_sise", "vocab-size"],
    );
    std::fs::write(dir.join("broken.toml"), "vocab_size = \n").unwrap();
    failed(
        &kiem(&["--config", "broken.toml", "tokenizer", "train"], dir),
        &["broken.toml", "TOML"],
    );
}

#[test]
fn every_command_explains_its_flags() {
    let tmp = tempfile::tempdir().unwrap();
    for command in [
        vec!["--help"],
        vec!["tokenizer", "train", "--help"],
        vec!["tokenizer", "encode", "--help"],
        vec!["tokenizer", "decode", "--help"],
        vec!["tokenizer", "info", "--help"],
        vec!["data", "prepare", "--help"],
        vec!["data", "inspect", "--help"],
        vec!["bench", "tokenizer", "--help"],
        vec!["pretrain", "--help"],
        vec!["generate", "--help"],
        vec!["chat", "--help"],
        vec!["finetune", "--help"],
        vec!["chat-format", "show", "--help"],
    ] {
        let help = ok(&kiem(&command, tmp.path()));
        // Each flag line is followed by its explanation (clap prints "--flag <V>  text").
        let is_flag_line = |l: &&str| {
            // Flag lines are indented a little; wrapped explanations much more.
            if l.len() - l.trim_start().len() > 6 {
                return false;
            }
            let l = l.trim_start();
            let Some(rest) = l.strip_prefix("--") else {
                return false;
            };
            let end = rest.find([' ', '<', '=']).unwrap_or(rest.len());
            end > 0
                && rest[..end]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-')
        };
        for line in help.lines().filter(is_flag_line) {
            let explained = line
                .trim()
                .split("  ")
                .filter(|s| !s.trim().is_empty())
                .count()
                >= 2;
            assert!(explained, "{command:?}: flag without explanation: {line:?}");
        }
    }
}

#[test]
fn chat_format_show_marks_trained_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    corpus(dir);
    ok(&kiem(
        &[
            "tokenizer",
            "train",
            "--input",
            "corpus.jsonl",
            "--vocab-size",
            "300",
            "--out",
            "tok.json",
        ],
        dir,
    ));
    std::fs::write(
        dir.join("chat.jsonl"),
        "{\"conversations\":[{\"from\":\"human\",\"value\":\"Is the roof fixed?\"},{\"from\":\"gpt\",\"value\":\"Yes.\"}]}\n\
         {\"instruction\":\"Say hi\",\"output\":\"hi\"}\n",
    )
    .unwrap();
    let out = ok(&kiem(
        &[
            "chat-format",
            "show",
            "--data",
            "chat.jsonl",
            "--tokenizer",
            "tok.json",
        ],
        dir,
    ));
    assert!(out.contains("2 conversations"), "{out}");
    assert!(out.contains("<|user_start|>Is the roof fixed?<|user_end|><|assistant_start|>[[Yes.<|assistant_end|>]]"), "{out}");
    assert!(out.contains("[[hi<|assistant_end|>]]"), "{out}");
    let all = ok(&kiem(
        &[
            "chat-format",
            "show",
            "--data",
            "chat.jsonl",
            "--tokenizer",
            "tok.json",
            "--train-on",
            "all",
        ],
        dir,
    ));
    assert!(all.contains("<|bos|>[[<|user_start|>Is the roof"), "{all}");

    std::fs::write(
        dir.join("bad.jsonl"),
        "{\"messages\":[{\"role\":\"assistant\",\"content\":\"x\"}]}\n",
    )
    .unwrap();
    failed(
        &kiem(
            &[
                "chat-format",
                "show",
                "--data",
                "bad.jsonl",
                "--tokenizer",
                "tok.json",
            ],
            dir,
        ),
        &["bad.jsonl:1", "user should speak"],
    );
    // A base tokenizer without chat tokens or template: shown as fine-tuning will train it.
    let base = ok(&kiem(
        &[
            "chat-format",
            "show",
            "--data",
            "chat.jsonl",
            "--tokenizer",
            "gpt2",
        ],
        dir,
    ));
    assert!(
        base.contains("with the chat tokens fine-tuning adds (<|user_start|>")
            && base.contains("<|endoftext|><|user_start|>Is the roof fixed?")
            && base.contains("[[Yes.<|assistant_end|>]]"),
        "{base}"
    );
}

/// `kiem bench generate` times decoding per repetition and, between its steps, streams the
/// weights to measure the bandwidth of the same moments; the bound and the reported fraction
/// follow from those figures.
#[test]
fn bench_generate_compares_each_repetition_with_the_bandwidth_between_its_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/tiny_a");
    let model = model.to_str().unwrap();
    let mut bytes = Vec::new();
    for weights in ["fp32", "bf16"] {
        let args = [
            "bench",
            "generate",
            "--model",
            model,
            "--batch",
            "1",
            "2",
            "--prompt-tokens",
            "4",
            "--tokens",
            "6",
            "--repeat",
            "3",
            "--weights",
            weights,
            "--threads",
            "2",
            "--json",
        ];
        let report: serde_json::Value =
            serde_json::from_str(&ok(&kiem(&args, tmp.path()))).unwrap();
        let decode = report["decode"].as_array().unwrap();
        assert_eq!(decode.len(), 2);
        let bytes_per_token = report["bytes_per_token"].as_f64().unwrap();
        let mut fractions = Vec::new();
        let mut best_bandwidth = 0f64;
        for (d, batch) in decode.iter().zip([1u64, 2]) {
            assert_eq!(d["batch"], batch);
            // The first token of each sequence comes from the prefill step; 5 are decoded.
            assert_eq!(d["tokens"], 5 * batch);
            let repetitions = d["repetitions"].as_array().unwrap();
            assert_eq!(repetitions.len(), 3);
            for r in repetitions {
                let (rate, bandwidth) = (
                    r["tokens_per_second"].as_f64().unwrap(),
                    r["read_bandwidth"].as_f64().unwrap(),
                );
                assert!(rate > 0.0 && rate.is_finite() && bandwidth > 0.0 && bandwidth.is_finite());
                best_bandwidth = best_bandwidth.max(bandwidth);
                if batch == 1 {
                    fractions.push(rate * bytes_per_token / bandwidth);
                }
            }
            let fastest = repetitions
                .iter()
                .map(|r| r["tokens_per_second"].as_f64().unwrap())
                .fold(0.0, f64::max);
            assert!((d["tokens_per_second"].as_f64().unwrap() / fastest - 1.0).abs() < 1e-9);
        }
        assert_eq!(report["read_bandwidth"].as_f64().unwrap(), best_bandwidth);
        let bound = report["bandwidth_bound_tokens_per_second"]
            .as_f64()
            .unwrap();
        assert!((bound * bytes_per_token / best_bandwidth - 1.0).abs() < 1e-9);
        fractions.sort_by(f64::total_cmp);
        let median = report["bandwidth_fraction"].as_f64().unwrap();
        assert!(
            (median / fractions[1] - 1.0).abs() < 1e-9,
            "{median} vs {fractions:?}"
        );
        assert_eq!(report["weights"], weights);
        bytes.push(bytes_per_token);
    }
    // Weights (the embedding padded to 50304 rows, all of which the head reads; not the
    // positions, of which a step reads a row) plus the KV cache at mid-length (4 + 6/2
    // positions × 2 layers × 16 channels × K and V × 4 bytes); bf16 matrices and head are
    // half the bytes, norms and biases stay fp32.
    let matrices = 50304.0 * 16.0 + 2.0 * 12.0 * 16.0 * 16.0;
    let vectors = 2.0 * 13.0 * 16.0 + 2.0 * 16.0;
    let cache = 7.0 * 2.0 * 16.0 * 2.0 * 4.0;
    assert_eq!(
        bytes,
        [
            4.0 * (matrices + vectors) + cache,
            2.0 * matrices + 4.0 * vectors + cache
        ]
    );
}

/// `kiem demo --write-data` gives the README's examples their data: the files are written (and
/// rewritten harmlessly), a different file is never overwritten, and the commands the README
/// runs on them work.
#[test]
fn demo_data_written_out_feeds_the_readme_examples() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for _ in 0..2 {
        let out = ok(&kiem(&["demo", "--write-data", "data"], dir));
        assert!(out.contains("CC-BY-4.0"), "{out}");
    }
    let readme = std::fs::read_to_string(dir.join("data/README.md")).unwrap();
    assert!(readme.contains("Zaragoza AB") && readme.contains("public-domain"));
    std::fs::write(dir.join("data/README.md"), "mine").unwrap();
    failed(
        &kiem(&["demo", "--write-data", "data"], dir),
        &[
            "data/README.md exists with other contents",
            "nothing was overwritten",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("data/README.md")).unwrap(),
        "mine"
    );
    ok(&kiem(
        &[
            "tokenizer",
            "train",
            "--input",
            "data/books.txt",
            "--split-on-blank-lines",
            "--vocab-size",
            "400",
            "--out",
            "tok/tokenizer.json",
        ],
        dir,
    ));
    ok(&kiem(
        &[
            "data",
            "prepare",
            "--input",
            "data/books.txt",
            "--split-on-blank-lines",
            "--tokenizer",
            "tok/tokenizer.json",
            "--out",
            "shards",
            "--val-fraction",
            "0.01",
        ],
        dir,
    ));
    let shown = ok(&kiem(
        &[
            "chat-format",
            "show",
            "--data",
            "data/construction_company_faq_en.sharegpt.jsonl",
            "--tokenizer",
            "tok/tokenizer.json",
            "--limit",
            "1",
        ],
        dir,
    ));
    assert!(shown.contains("503 conversations"), "{shown}");
}

/// `kiem eval` scores task files of every format on a model directory: a table on stdout, a
/// JSON report with each metric's standard error, and bad task files refused by file and line
/// before the model is loaded.
#[test]
fn eval_scores_tasks_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join("kiem/tests/fixtures/hf/tiny_a");
    let fixtures = root.join("kiem-eval/tests/fixtures");
    let task = |name: &str| fixtures.join(name).display().to_string();
    let model_arg = model.display().to_string();
    let out = ok(&kiem(
        &[
            "eval",
            "--model",
            &model_arg,
            "--task",
            &task("arc_fixture.jsonl"),
            &task("bigbench_fixture.json"),
            &task("generation_fixture.jsonl"),
            "--limit",
            "2",
            "--max-new-tokens",
            "8",
            "--out",
            "report.json",
        ],
        dir,
    ));
    assert!(
        out.contains("arc_fixture") && out.contains("bigbench") && out.contains("±"),
        "{out}"
    );
    assert!(
        out.contains("generation_fixture") && out.contains("chrF"),
        "{out}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    let tasks = report["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2);
    assert_eq!(tasks[0]["examples"], 2);
    assert!(tasks[0]["acc"]["stderr"].as_f64().is_some());
    assert_eq!(
        tasks[1]["questions"][0]["scores"].as_array().unwrap().len(),
        3
    );
    let generation = &report["generation"][0];
    assert_eq!(generation["prompt_format"], "plain", "a base model");
    assert_eq!(generation["answers"].as_array().unwrap().len(), 2);
    assert!(generation["bleu"]["stderr"].as_f64().is_some());
    std::fs::write(
        dir.join("bad.jsonl"),
        "{\"context\": \"c\", \"choices\": [\"a\"], \"label\": 0}\n",
    )
    .unwrap();
    failed(
        &kiem(&["eval", "--model", "nowhere", "--task", "bad.jsonl"], dir),
        &["bad.jsonl:1", "at least two choices"],
    );
    std::fs::write(dir.join("empty.jsonl"), "\n").unwrap();
    failed(
        &kiem(
            &["eval", "--model", &model_arg, "--task", "empty.jsonl"],
            dir,
        ),
        &["empty.jsonl", "no questions"],
    );
}
