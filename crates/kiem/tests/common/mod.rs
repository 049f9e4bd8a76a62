//! Helpers shared by the end-to-end tests: run the kiem binary and check its outcome.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

pub fn kiem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiem"))
}

pub fn run(args: &[&str], dir: &Path) -> Output {
    kiem()
        .args(args)
        .current_dir(dir)
        .output()
        .expect("kiem runs")
}

pub fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "kiem failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

pub fn failed(output: Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "expected failure; stderr: {stderr}"
    );
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "stderr {stderr:?} lacks {needle:?}"
        );
    }
}

/// A small corpus, a byte-level tokenizer and prepared shards in `dir/data`.
pub fn prepare(dir: &Path) {
    let text: String = (0..3000)
        .map(|i| {
            format!(
                "Line {i}: the customer asked about order {} and we replied.\n\n",
                i * 7 % 1000
            )
        })
        .collect();
    std::fs::write(dir.join("corpus.txt"), text).unwrap();
    ok(run(
        &[
            "tokenizer",
            "train",
            "--input",
            "corpus.txt",
            "--vocab-size",
            "300",
            "--out",
            "tok.json",
        ],
        dir,
    ));
    ok(run(
        &[
            "data",
            "prepare",
            "--input",
            "corpus.txt",
            "--split-on-blank-lines",
            "--tokenizer",
            "tok.json",
            "--out",
            "data",
            "--val-fraction",
            "0.1",
        ],
        dir,
    ));
}

/// Runs `kiem ARGS` in `dir` with `input` on standard input; returns its standard output.
pub fn run_with_input(args: &[&str], dir: &Path, input: &str) -> String {
    let mut child = kiem()
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiem runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("kiem reads its input");
    ok(child.wait_with_output().expect("kiem finishes"))
}

/// Writes `count` one-exchange conversations in OpenAI's format to `path`: "Where is order
/// {i}?" answered by `answer(i)`.
pub fn write_order_conversations(path: &Path, count: usize, answer: impl Fn(usize) -> String) {
    let lines: String = (0..count)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "user", "content": format!("Where is order {i}?")},
                {"role": "assistant", "content": answer(i)}
            ]})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(path, lines).expect("conversations written");
}

/// A JSON file's contents.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
