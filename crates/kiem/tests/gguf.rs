//! GGUF files end to end: a file's tokenizer encodes as the Hugging Face tokenizer it was made
//! from; `kiem export --format gguf` writes files that llama.cpp's Python package reads back to
//! kiem's keys, types, shapes and values; and every command that takes a model takes a GGUF
//! file, with the same results as the model directory it came from.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{failed, ok, run};
use kiem_engine::gguf::GgufFile;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixture(name: &str) -> String {
    root()
        .join("crates/kiem-engine/tests/fixtures/gguf")
        .join(name)
        .display()
        .to_string()
}

fn expected() -> Value {
    let path = root().join("crates/kiem-engine/tests/fixtures/gguf/expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_files_tokenizer_encodes_as_the_tokenizer_it_was_made_from() {
    let tmp = tempfile::tempdir().unwrap();
    let e = expected();
    for name in ["llama_mixed.gguf", "gpt2_q8.gguf"] {
        for (text, ids) in e[name]["texts"].as_object().unwrap() {
            let got: Vec<u64> = serde_json::from_str(
                ok(run(
                    &[
                        "tokenizer",
                        "encode",
                        "--tokenizer",
                        &fixture(name),
                        "--text",
                        text,
                    ],
                    tmp.path(),
                ))
                .trim(),
            )
            .unwrap();
            let want: Vec<u64> = serde_json::from_value(ids.clone()).unwrap();
            if text.contains("<|begin_of_text|>") && name == "llama_mixed.gguf" {
                // kiem reads a special token's spelling in text as text, never as the token.
                assert!(!got.contains(&want[0]), "{name}: {text:?}: {got:?}");
                assert_eq!(
                    got[got.len() - want.len() + 1..],
                    want[1..],
                    "{name}: {text:?}"
                );
            } else {
                assert_eq!(got, want, "{name}: {text:?}");
            }
        }
    }
}

/// kiem's `python` for interop checks (`$KIEM_PYTHON`, else the repository's `.venv`), or
/// `None` with a printed reason (a failure when `KIEM_REQUIRE_PYTHON` is set, as in CI).
fn python_with_gguf() -> Option<PathBuf> {
    let python = std::env::var_os("KIEM_PYTHON")
        .map_or_else(|| root().join(".venv/bin/python"), PathBuf::from);
    let has = Command::new(&python)
        .args(["-c", "import gguf"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has {
        return Some(python);
    }
    let reason = format!(
        "{} cannot import gguf (scripts/test.sh installs requirements-dev.txt into .venv)",
        python.display()
    );
    assert!(
        std::env::var_os("KIEM_REQUIRE_PYTHON").is_none(),
        "{reason}"
    );
    eprintln!("SKIPPED: {reason}");
    None
}

#[test]
fn exported_files_read_back_in_gguf_py_as_kiem_wrote_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = run(
        &[
            "export",
            "--model",
            &fixture("llama_mixed.gguf"),
            "--type",
            "q8_0",
            "--out",
            "q8.gguf",
        ],
        dir,
    );
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(
        log.contains("wrote q8.gguf") && log.contains("Q8_0"),
        "{log}"
    );
    let file = GgufFile::open(&dir.join("q8.gguf")).unwrap();
    let Some(python) = python_with_gguf() else {
        return;
    };
    let script = root().join("crates/kiem/tests/python/gguf_reads_kiem.py");
    let output = Command::new(python)
        .arg(script)
        .arg(dir.join("q8.gguf"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout).unwrap();
    let keys = &seen["keys"];
    for (key, kind) in [
        ("general.architecture", "STRING"),
        ("general.file_type", "UINT32"),
        ("llama.context_length", "UINT32"),
        ("llama.embedding_length", "UINT32"),
        ("llama.block_count", "UINT32"),
        ("llama.feed_forward_length", "UINT32"),
        ("llama.attention.head_count", "UINT32"),
        ("llama.attention.head_count_kv", "UINT32"),
        ("llama.rope.dimension_count", "UINT32"),
        ("llama.rope.freq_base", "FLOAT32"),
        ("llama.attention.layer_norm_rms_epsilon", "FLOAT32"),
        ("tokenizer.ggml.model", "STRING"),
        ("tokenizer.ggml.pre", "STRING"),
        ("tokenizer.ggml.tokens", "ARRAY[STRING]"),
        ("tokenizer.ggml.token_type", "ARRAY[INT32]"),
        ("tokenizer.ggml.merges", "ARRAY[STRING]"),
        ("tokenizer.ggml.bos_token_id", "UINT32"),
        ("tokenizer.ggml.eos_token_id", "UINT32"),
        ("tokenizer.ggml.add_bos_token", "BOOL"),
        ("tokenizer.chat_template", "STRING"),
    ] {
        assert_eq!(keys[key]["type"], kind, "{key}: {}", keys[key]);
    }
    assert_eq!(keys["general.architecture"]["value"], "llama");
    assert_eq!(keys["tokenizer.ggml.pre"]["value"], "llama-bpe");
    assert_eq!(keys["general.file_type"]["value"], 7);
    let tensors = seen["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), file.tensors.len());
    for (theirs, ours) in tensors.iter().zip(&file.tensors) {
        assert_eq!(theirs["name"], ours.name.as_str());
        assert_eq!(theirs["type"], ours.kind.name(), "{}", ours.name);
        let shape: Vec<u64> = serde_json::from_value(theirs["shape"].clone()).unwrap();
        assert_eq!(shape, ours.dims, "{}: ne", ours.name);
        let values = file.read_f32(ours);
        let theirs = theirs["values"].as_array().unwrap();
        assert_eq!(theirs.len(), values.len());
        for (a, b) in values.iter().zip(theirs) {
            assert!(
                (a - b.as_f64().unwrap() as f32).abs() <= 1e-6,
                "{}",
                ours.name
            );
        }
    }
}

#[test]
fn commands_take_gguf_files_and_agree_with_the_directory_they_came_from() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let hf = root().join("crates/kiem/tests/fixtures/hf/tiny_a");
    let hf = hf.display().to_string();
    ok(run(
        &[
            "export",
            "--model",
            &hf,
            "--type",
            "f32",
            "--out",
            "tiny.gguf",
        ],
        dir,
    ));
    let greedy = |model: &str| {
        ok(run(
            &[
                "generate",
                "--model",
                model,
                "--prompt",
                "The roof",
                "--temperature",
                "0",
                "--max-tokens",
                "12",
            ],
            dir,
        ))
    };
    assert_eq!(greedy("tiny.gguf"), greedy(&hf), "the same greedy text");
    let task = root()
        .join("crates/kiem-eval/tests/fixtures/arc_fixture.jsonl")
        .display()
        .to_string();
    let score = |model: &str, out: &str| {
        ok(run(
            &["eval", "--model", model, "--task", &task, "--out", out],
            dir,
        ));
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(out)).unwrap()).unwrap();
        r["tasks"][0]["questions"][0]["scores"][0]["loglikelihood"]
            .as_f64()
            .unwrap()
    };
    assert!((score("tiny.gguf", "a.json") - score(&hf, "b.json")).abs() < 1e-5);
    // A quantized Llama with a chat template chats in it.
    let out = ok(run(
        &[
            "generate",
            "--model",
            &fixture("llama_mixed.gguf"),
            "--chat",
            "--prompt",
            "Hi",
            "--temperature",
            "0",
            "--max-tokens",
            "4",
        ],
        dir,
    ));
    assert!(!out.contains("<|eot_id|>"), "{out}");
    // Fine-tuned from the file (weights dequantized to fp32), then exported again.
    let chat = root()
        .join("crates/kiem/demo/construction_company_faq_en.sharegpt.jsonl")
        .display()
        .to_string();
    ok(run(
        &[
            "finetune",
            "--model",
            &fixture("llama_mixed.gguf"),
            "--data",
            &chat,
            "--out",
            "ft",
            "--steps",
            "2",
            "--threads",
            "2",
        ],
        dir,
    ));
    ok(run(
        &[
            "export", "--model", "ft/model", "--type", "q4_1", "--out", "ft.gguf",
        ],
        dir,
    ));
    // LoRA on the file keeps its base in the file's blocks; a resumed run reads them the same
    // way and ends bit for bit where the uninterrupted run did.
    let lora_run = |out: &str| {
        let mixed = fixture("llama_mixed.gguf");
        let args = [
            "finetune",
            "--model",
            &mixed,
            "--data",
            &chat,
            "--out",
            out,
            "--steps",
            "3",
            "--lora-rank",
            "2",
            "--checkpoint-every",
            "1",
            "--keep-checkpoints",
            "3",
            "--threads",
            "2",
        ];
        let output = run(&args, dir);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        ok(output);
        stderr
    };
    let log = lora_run("qlora");
    assert!(
        log.contains("kept as the file stores them (fp32+q5_1+q4_1+q4_k+q6_k+q4_0+q5_0;"),
        "{log}"
    );
    assert_eq!(
        common::read_json(&dir.join("qlora/run.json"))["base_as_stored"],
        true
    );
    lora_run("cut");
    std::fs::remove_dir_all(dir.join("cut/checkpoints/step_00000003")).unwrap();
    std::fs::remove_dir_all(dir.join("cut/adapter")).unwrap();
    ok(run(&["finetune", "--resume", "cut", "--threads", "2"], dir));
    let adapter = |run_dir: &str| {
        std::fs::read(dir.join(run_dir).join("adapter/adapter_model.safetensors")).unwrap()
    };
    assert!(
        adapter("qlora") == adapter("cut"),
        "the resumed adapters differ"
    );
    let back = GgufFile::open(&dir.join("ft.gguf")).unwrap();
    assert_eq!(
        back.get("tokenizer.chat_template"),
        GgufFile::open(Path::new(&fixture("llama_mixed.gguf")))
            .unwrap()
            .get("tokenizer.chat_template"),
        "the template travels"
    );
    // A file that is not GGUF, and a quantized export of rows that are not whole blocks.
    std::fs::write(dir.join("fake.gguf"), b"not a model").unwrap();
    failed(
        run(&["generate", "--model", "fake.gguf", "--prompt", "x"], dir),
        &["fake.gguf", "not a GGUF file"],
    );
    let out = run(
        &[
            "export", "--model", &hf, "--type", "q4_0", "--out", "q4.gguf",
        ],
        dir,
    );
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(out);
    assert!(log.contains("kept in F32"), "{log}");
    failed(
        run(
            &[
                "export", "--model", &hf, "--type", "q3_k", "--out", "x.gguf",
            ],
            dir,
        ),
        &["q3_k"],
    );
}

/// Peak resident memory of `kiem args` (wait4's ru_maxrss: anonymous and file pages), bytes.
#[cfg(target_os = "linux")]
fn peak_memory(args: &[&str], dir: &Path) -> u64 {
    // Waited for with wait4 below, which reports the peak.
    #[allow(clippy::zombie_processes)]
    let child = common::kiem()
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for the child spawned above, which nothing else waits for.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "kiem {args:?} failed"
    );
    usage.ru_maxrss as u64 * 1024
}

/// `kiem generate` on a 4-bit file never holds the model's fp32 size, not even while loading:
/// the parameter buffer's pages for the file's matrices are never touched (the process's
/// allocator maps large buffers lazily; mimalloc alone zeroed them by hand, and a 67 MB Q4_0
/// file of 116M parameters peaked at 685 MB).
#[cfg(target_os = "linux")]
#[test]
fn generating_from_a_4_bit_file_peaks_near_its_size() {
    use kiem_engine::config::{Arch, Block, Rope, RopeScaling};
    use kiem_engine::gguf::{write_gguf, ExportType};
    use kiem_engine::{Gpt, ModelConfig};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mixed = GgufFile::open(Path::new(&fixture("llama_mixed.gguf"))).unwrap();
    let tokenizer: Vec<_> = mixed
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .cloned()
        .collect();
    let rope = Rope {
        theta: 10_000.0,
        scaling: RopeScaling::Default,
    };
    // About 50M parameters (fp32: 200 MB), the fixture's 713-token vocabulary.
    let config = ModelConfig {
        arch: Arch::Llama,
        block: Block::llama(1e-5, rope),
        n_kv_head: Some(4),
        mlp_hidden: Some(2048),
        ..ModelConfig::gpt2(8, 8, 640, 256, 713)
    };
    let path = dir.join("q4.gguf");
    let fp32_bytes = {
        let mut gpt = Gpt::new(config).unwrap();
        gpt.init_random(1);
        write_gguf(&gpt, &tokenizer, ExportType::Q4_0, "t", &path).unwrap();
        4 * gpt.num_parameters() as u64
    };
    let file_bytes = std::fs::metadata(&path).unwrap().len();
    let path = path.display().to_string();
    let args = [
        "generate",
        "--model",
        &path,
        "--prompt",
        "hello",
        "--max-tokens",
        "8",
        "--threads",
        "2",
    ];
    // The child starts as a copy of this process, whose peak it inherits: reset this one's
    // (writing the model made it large).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let peak = peak_memory(&args, dir);
    let mib = |b: u64| b / (1 << 20);
    eprintln!(
        "peak {} MiB, file {} MiB, fp32 {} MiB",
        mib(peak),
        mib(file_bytes),
        mib(fp32_bytes)
    );
    // The file's pages, its blocks in memory, and the program itself (about 50 MB); the fp32
    // parameters alone would be 161 MiB.
    assert!(
        peak < 2 * file_bytes + (64 << 20) && peak < fp32_bytes * 3 / 4,
        "peak {} MiB for a {} MiB file (fp32: {} MiB)",
        mib(peak),
        mib(file_bytes),
        mib(fp32_bytes)
    );
}
