//! kiem's tokenizer.json files load in the Python `tokenizers` package and give identical ids.
//!
//! Needs Python with `tokenizers` (scripts/test.sh installs it into .venv). The interpreter is
//! `$KIEM_PYTHON`, else `.venv/bin/python` at the repository root, else `python3`. Set
//! `KIEM_SKIP_PYTHON=1` to skip deliberately (the test then says so).

use std::path::{Path, PathBuf};
use std::process::Command;

use kiem_tokenizer::{train, Tokenizer, TrainOptions};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> Option<PathBuf> {
    if std::env::var_os("KIEM_SKIP_PYTHON").is_some() {
        eprintln!("SKIPPED: KIEM_SKIP_PYTHON is set");
        return None;
    }
    if let Some(p) = std::env::var_os("KIEM_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = repo_root().join(".venv/bin/python");
    Some(if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    })
}

/// Deterministic pseudo-random strings drawn from awkward alphabets.
fn random_texts(count: usize) -> Vec<String> {
    let alphabet: Vec<char> =
        "aZ09 '\n\t\r.,!?-_éüßçø中文日本語한국어🦀😀👩‍⚕️\u{301}\u{a0}\u{2028}\u{3000}٣४"
            .chars()
            .collect();
    let words = [
        "the",
        " the",
        "'s",
        "'ll",
        "  ",
        "\n\n",
        "<|bos|>",
        "<|endoftext|>",
        "123456",
        "don't",
    ];
    let mut state = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..count)
        .map(|_| {
            let len = (next() % 60) as usize;
            (0..len)
                .map(|_| {
                    if next() % 4 == 0 {
                        words[(next() % words.len() as u64) as usize].to_string()
                    } else {
                        alphabet[(next() % alphabet.len() as u64) as usize].to_string()
                    }
                })
                .collect()
        })
        .collect()
}

#[test]
fn python_tokenizers_gives_identical_ids() {
    let Some(python) = python() else { return };
    let corpus: Vec<String> = std::fs::read_to_string(
        repo_root().join("crates/kiem-tokenizer/tests/data/tiktoken_testplans.txt"),
    )
    .unwrap()
    .lines()
    .filter_map(|l| l.strip_prefix("Sample: "))
    .map(str::to_string)
    .collect();
    let mut texts = random_texts(400);
    texts.extend(corpus.iter().cloned());
    texts.push(String::new());
    texts.push(" ".repeat(50) + "x" + &"\n".repeat(7) + "  y  ");

    let dir = tempfile::tempdir().unwrap();
    let trained = train(
        corpus.iter().cloned().chain(random_texts(300)),
        &TrainOptions {
            vocab_size: 1000,
            min_frequency: 0,
            show_progress: false,
        },
    )
    .unwrap();
    let gpt2 = Tokenizer::gpt2();
    let mut paths = serde_json::Map::new();
    let mut cases = serde_json::Map::new();
    for (name, tokenizer) in [("trained", &trained), ("gpt2", &gpt2)] {
        let path = dir.path().join(format!("{name}.json"));
        tokenizer.save(&path).unwrap();
        paths.insert(name.into(), path.to_str().unwrap().into());
        let list: Vec<serde_json::Value> = texts
            .iter()
            .map(|t| serde_json::json!([t, tokenizer.encode(t)]))
            .collect();
        cases.insert(name.into(), list.into());
    }
    let spec = dir.path().join("cases.json");
    std::fs::write(
        &spec,
        serde_json::json!({"tokenizers": paths, "cases": cases}).to_string(),
    )
    .unwrap();
    let script = repo_root().join("crates/kiem-tokenizer/tests/python/check_hf_tokenizers.py");
    let output = Command::new(&python)
        .arg(&script)
        .arg(&spec)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e}; install Python 3 or set KIEM_PYTHON",
                python.display()
            )
        });
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "Python `tokenizers` disagrees with kiem (or is missing: `pip install tokenizers`, or run \
         scripts/test.sh):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(" 0 mismatches"), "{stdout}");
}
