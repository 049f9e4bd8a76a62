//! Round trip through llama.cpp: a model kiem trained, exported as GGUF (f32 and q8_0), continues
//! a prompt in llama.cpp's `llama-simple` (greedy) exactly as `kiem generate` does from the same
//! file, for the Llama and GPT-2 architectures; and, with KIEM_LLAMA_QUANTIZE, files llama.cpp's
//! own `llama-quantize` made from kiem's f32 export (Q4_K_M, Q5_K_M, Q6_K, Q5_0, Q5_1) decode
//! in kiem as in llama.cpp. Opt-in: llama.cpp is not a dependency; set KIEM_LLAMA_SIMPLE to a
//! `llama-simple` binary (bench/llamacpp.py says how to build it, and `llama-quantize`).

mod common;

use std::path::Path;
use std::process::Command;

use common::{ok, run};

/// A small model of `arch` pre-trained briefly (so its greedy choices are not near ties) on a
/// corpus in the GPT-2 vocabulary, `width` wide, in `dir/OUT/model`.
fn trained_model(dir: &Path, arch: &str, width: usize, out: &str) {
    if !dir.join("data").exists() {
        let words = "the parcel left the warehouse on monday and the courier brought it to the \
                     customer who asked for a refund because the invoice showed the wrong address"
            .split(' ')
            .collect::<Vec<_>>();
        let corpus: Vec<String> = (0..400)
            .map(|i| {
                (0..48)
                    .map(|j| words[(i * 5 + j * (1 + i % 3)) % words.len()])
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        std::fs::write(dir.join("corpus.txt"), corpus.join("\n\n")).unwrap();
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
            ],
            dir,
        ));
    }
    ok(run(
        &[
            "pretrain",
            "--data",
            "data",
            "--out",
            out,
            "--arch",
            arch,
            "--n-layer",
            "2",
            "--n-head",
            "2",
            "--n-embd",
            &width.to_string(),
            "--context",
            "128",
            "--micro-batch",
            "4",
            "--batch-tokens",
            "512",
            "--steps",
            "30",
            "--lr",
            "3e-3",
            "--eval-every",
            "0",
            "--sample-every",
            "0",
            "--threads",
            "2",
            "--seed",
            "3",
        ],
        dir,
    ));
}

/// Continues two prompts greedily from `file` in kiem and in `llama-simple`, and asserts the
/// same text.
fn continues_alike(dir: &Path, simple: &std::ffi::OsStr, file: &str) {
    for prompt in ["the parcel left", "a refund because the invoice"] {
        let kiem = ok(run(
            &[
                "generate",
                "--model",
                file,
                "--prompt",
                prompt,
                "--max-tokens",
                "16",
                "--temperature",
                "0",
            ],
            dir,
        ));
        let out = Command::new(simple)
            .args(["-m", file, "-n", "16", prompt])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "llama-simple failed on {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // llama-simple prints the prompt's tokens (GPT-2's BOS first) and then the
        // continuation.
        let theirs = String::from_utf8_lossy(&out.stdout);
        let theirs = theirs.trim_end();
        let theirs = theirs.strip_prefix("<|endoftext|>").unwrap_or(theirs);
        assert!(
            kiem.trim().len() >= 16,
            "{file}: kiem continued {prompt:?} with only {kiem:?}"
        );
        let ours = format!("{prompt}{}", kiem.trim_end());
        assert_eq!(
            theirs, ours,
            "{file}: llama.cpp and kiem continue differently"
        );
    }
}

#[test]
fn llama_cpp_continues_exported_models_as_kiem_does() {
    let Some(simple) = std::env::var_os("KIEM_LLAMA_SIMPLE") else {
        assert!(
            std::env::var_os("KIEM_REQUIRE_LLAMA_CPP").is_none(),
            "KIEM_REQUIRE_LLAMA_CPP is set but KIEM_LLAMA_SIMPLE is not"
        );
        eprintln!("SKIPPED: set KIEM_LLAMA_SIMPLE to llama.cpp's llama-simple binary");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for arch in ["llama", "gpt2"] {
        trained_model(dir, arch, 128, arch);
        for kind in ["f32", "q8_0"] {
            let file = format!("{arch}-{kind}.gguf");
            let model = format!("{arch}/model");
            ok(run(
                &[
                    "export", "--format", "gguf", "--type", kind, "--model", &model, "--out", &file,
                ],
                dir,
            ));
            continues_alike(dir, &simple, &file);
        }
    }
    let Some(quantize) = std::env::var_os("KIEM_LLAMA_QUANTIZE") else {
        eprintln!("SKIPPED the K quants: set KIEM_LLAMA_QUANTIZE to llama.cpp's llama-quantize");
        return;
    };
    // Rows of 256 weights, so that llama-quantize writes K blocks.
    trained_model(dir, "llama", 256, "wide");
    ok(run(
        &[
            "export",
            "--format",
            "gguf",
            "--type",
            "f32",
            "--model",
            "wide/model",
            "--out",
            "wide-f32.gguf",
        ],
        dir,
    ));
    for kind in ["Q4_K_M", "Q5_K_M", "Q6_K", "Q5_0", "Q5_1"] {
        let file = format!("wide-{kind}.gguf");
        let out = Command::new(&quantize)
            .args(["wide-f32.gguf", &file, kind])
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "llama-quantize failed on {kind}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        continues_alike(dir, &simple, &file);
    }
}
