//! Data-parallel jobs under `mpirun` (build with `--features mpi`; needs Open MPI's `mpirun`):
//! two processes of one thread train what one process of one thread trains, loss for loss and
//! weight for weight, with and without ZeRO-1, for pre-training, fine-tuning and LoRA; a job
//! whose process is killed ends (no hang) and resumes to the bits of an uninterrupted one; data
//! prepared by three processes holds the tokens one process writes.
#![cfg(feature = "mpi")]

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{failed, kiem, ok, prepare, run, write_order_conversations};
use kiem_engine::io::read_tensors;

/// `mpirun -n RANKS kiem ARGS` in `dir` (as root too: CI containers run as root).
fn mpirun(ranks: usize, args: &[&str], dir: &Path) -> Command {
    let mut command = Command::new("mpirun");
    command
        .args(["--oversubscribe", "-n", &ranks.to_string()])
        .arg(env!("CARGO_BIN_EXE_kiem"))
        .args(args)
        .current_dir(dir)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        // One machine: keep Open MPI off the network interfaces a container may lack.
        .env("OMPI_MCA_btl", "self,vader")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    command
}

fn mpi_run(ranks: usize, args: &[&str], dir: &Path) -> Output {
    mpirun(ranks, args, dir).output().expect("mpirun runs")
}

const PRETRAIN: &[&str] = &[
    "pretrain",
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
    "2",
    "--batch-tokens",
    "512",
    // AdamW scales every weight's step to about the learning rate, so a weight whose gradient
    // is near zero and differs in its last bits between the two ways of summing moves apart by
    // up to lr a step: measured 5-7e-6 after 20 steps at 3e-3, 1.3-1.9e-6 at 1e-3 (3 seeds).
    "--lr",
    "1e-3",
    "--eval-every",
    "10",
    "--eval-tokens",
    "2048",
    "--sample-every",
    "0",
    "--threads",
    "1",
    "--seed",
    "7",
];

/// Every metrics line of a run: (step, kind, value) for train loss, gradient norm and
/// validation loss.
fn metrics(run_dir: &Path) -> Vec<(u64, &'static str, f64)> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = v["step"].as_u64().unwrap();
        for key in ["loss", "grad_norm", "val_loss"] {
            if let Some(x) = v.get(key).and_then(|x| x.as_f64()) {
                out.push((step, key, x));
            }
        }
    }
    out
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-12)
}

/// Steps and checkpoints of the short runs.
const TWENTY_STEPS: &[&str] = &["--steps", "20", "--checkpoint-every", "10"];

/// Same metrics within `tol` relative, and the same weights within `tol` absolute in the two
/// safetensors files. Not bit for bit: one process adds a micro-batch's gradients onto the
/// previous one's inside the backward kernels, two processes add two finished sums.
fn assert_same_training(dir: &Path, a: &str, b: &str, weights: &str, tol: f64) {
    let (ma, mb) = (metrics(&dir.join(a)), metrics(&dir.join(b)));
    assert_eq!(ma.len(), mb.len(), "{a} and {b} logged different steps");
    assert!(ma.iter().any(|m| m.1 == "val_loss"), "no evaluation logged");
    for (x, y) in ma.iter().zip(&mb) {
        assert_eq!((x.0, x.1), (y.0, y.1));
        assert!(
            relative(x.2, y.2) <= tol,
            "step {} {}: {a} {} vs {b} {}",
            x.0,
            x.1,
            x.2,
            y.2
        );
    }
    let ta = read_tensors(&dir.join(a).join(weights)).unwrap();
    let tb = read_tensors(&dir.join(b).join(weights)).unwrap();
    assert_eq!(ta.len(), tb.len());
    let mut largest = 0f64;
    for (name, (shape, x)) in &ta {
        let (shape_b, y) = &tb[name];
        assert_eq!(shape, shape_b, "{name}");
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            let difference = (p - q).abs() as f64;
            assert!(difference <= tol, "{name}[{i}]: {a} {p} vs {b} {q}");
            largest = largest.max(difference);
        }
    }
    eprintln!("{a} vs {b}: weights differ by at most {largest:e}");
}

#[test]
fn two_processes_pretrain_as_one_with_and_without_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    prepare(dir);
    let short = [PRETRAIN, TWENTY_STEPS].concat();
    ok(run(&[&short[..], &["--out", "solo"]].concat(), dir));
    ok(mpi_run(2, &[&short[..], &["--out", "duo"]].concat(), dir));
    ok(mpi_run(
        2,
        &[&short[..], &["--out", "zero", "--zero", "1"]].concat(),
        dir,
    ));
    for run_dir in ["duo", "zero"] {
        assert_same_training(dir, "solo", run_dir, "model/model.safetensors", 1e-5);
    }
    // A ZeRO checkpoint holds the whole optimizer state (gathered to rank 0 as it is written):
    // with two processes the same sums, so the same bits as the unsharded job's.
    let moments = |run: &str| {
        read_tensors(
            &dir.join(run)
                .join("checkpoints/step_00000020/trainer_state/optimizer.safetensors"),
        )
        .unwrap()
    };
    assert_eq!(moments("duo"), moments("zero"));
    // So one process continues a ZeRO job.
    let resumed = ok(run(&["pretrain", "--resume", "zero", "--steps", "24"], dir));
    assert!(resumed.contains("trained 24 steps"), "{resumed}");
}

/// Kills one process of a job as soon as `checkpoint` exists; the job must end by itself.
fn kill_a_rank_at_checkpoint(dir: &Path, args: &[&str], checkpoint: &Path) -> Output {
    let child = mpirun(2, args, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
    // The ranks are mpirun's children (its orted-less local launch).
    let ranks = String::from_utf8(
        Command::new("pgrep")
            .args(["-P", &child.id().to_string()])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let victim = ranks.lines().last().expect("mpirun has rank processes");
    assert!(Command::new("kill")
        .args(["-9", victim])
        .status()
        .unwrap()
        .success());
    let waited = Instant::now();
    let output = child.wait_with_output().unwrap();
    assert!(
        waited.elapsed() < Duration::from_secs(60),
        "the job took {:?} to end after a rank died",
        waited.elapsed()
    );
    output
}

#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes_bit_for_bit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    prepare(dir);
    let long = [PRETRAIN, &["--steps", "400", "--checkpoint-every", "200"]].concat();
    ok(mpi_run(2, &[&long[..], &["--out", "whole"]].concat(), dir));
    let killed = kill_a_rank_at_checkpoint(
        dir,
        &[&long[..], &["--out", "killed"]].concat(),
        &dir.join("killed/checkpoints/step_00000200/trainer_state"),
    );
    assert!(!killed.status.success(), "the job survived a killed rank");
    ok(mpi_run(2, &["pretrain", "--resume", "killed"], dir));
    assert_eq!(metrics(&dir.join("whole")), metrics(&dir.join("killed")));
    assert_eq!(
        std::fs::read(dir.join("whole/model/model.safetensors")).unwrap(),
        std::fs::read(dir.join("killed/model/model.safetensors")).unwrap()
    );
}

#[test]
fn two_processes_fine_tune_as_one_fully_and_with_lora() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    prepare(dir);
    ok(run(
        &[PRETRAIN, &["--out", "base", "--steps", "4"]].concat(),
        dir,
    ));
    write_order_conversations(&dir.join("chats.jsonl"), 48, |i| {
        format!("Order {i} ships on day {}.", i % 7)
    });
    let finetune = [
        "finetune",
        "--model",
        "base/model",
        "--data",
        "chats.jsonl",
        "--micro-batch",
        "2",
        "--grad-accum",
        "2",
        "--steps",
        "8",
        "--eval-every",
        "4",
        "--threads",
        "1",
        "--seed",
        "3",
    ];
    ok(run(&[&finetune[..], &["--out", "full1"]].concat(), dir));
    ok(mpi_run(
        2,
        &[&finetune[..], &["--out", "full2"]].concat(),
        dir,
    ));
    assert_same_training(dir, "full1", "full2", "model/model.safetensors", 1e-5);
    let lora = [&finetune[..], &["--lora-rank", "4"]].concat();
    ok(run(&[&lora[..], &["--out", "lora1"]].concat(), dir));
    ok(mpi_run(
        2,
        &[&lora[..], &["--out", "lora2", "--zero", "1"]].concat(),
        dir,
    ));
    assert_same_training(
        dir,
        "lora1",
        "lora2",
        "adapter/adapter_model.safetensors",
        1e-5,
    );
}

/// A prepared directory's token stream per split, in manifest order, and its counts.
fn tokens_of(dir: &Path) -> (Vec<u32>, Vec<u32>, serde_json::Value) {
    let data = kiem_data::prepare::DataDir::open(dir).unwrap();
    let stream = |shards: &[kiem_data::shard::Shard]| -> Vec<u32> {
        shards.iter().flat_map(|s| s.to_vec()).collect()
    };
    let m = &data.manifest;
    let counts = serde_json::json!([
        m.train.documents,
        m.train.tokens,
        m.train.bytes,
        m.val.documents,
        m.val.tokens,
        m.val.bytes,
        m.skipped_records,
        m.empty_documents,
        m.input_files,
        m.tokenizer.hash,
    ]);
    (stream(&data.train), stream(&data.val), counts)
}

#[test]
fn data_prepared_by_three_processes_holds_one_process_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    prepare(dir);
    // Files of different sizes and formats, one with a bad record and one empty.
    let corpus = dir.join("corpus");
    std::fs::create_dir(&corpus).unwrap();
    for f in 0..7 {
        let text: String = (0..40 * (f + 1))
            .map(|i| format!("File {f} line {i}: order {} shipped.\n\n", i * 13 % 97))
            .collect();
        std::fs::write(corpus.join(format!("part{f}.txt")), text).unwrap();
    }
    let records: String = (0..50)
        .map(|i| format!("{{\"text\": \"record {i} of the jsonl file\"}}\n"))
        .collect();
    std::fs::write(corpus.join("records.jsonl"), records + "{broken\n").unwrap();
    std::fs::write(corpus.join("void.txt"), "").unwrap();
    let args = |out: &'static str| {
        vec![
            "data",
            "prepare",
            "--input",
            "corpus",
            "--split-on-blank-lines",
            "--skip-bad-records",
            "--tokenizer",
            "tok.json",
            "--val-fraction",
            "0.2",
            "--shard-tokens",
            "500",
            "--threads",
            "1",
            "--out",
            out,
        ]
    };
    ok(run(&args("one"), dir));
    let printed = ok(mpi_run(3, &args("three"), dir));
    assert!(printed.contains("3 processes x 1 thread)"), "{printed}");
    assert_eq!(printed.matches("prepared ").count(), 1, "{printed}");
    let (one, three) = (tokens_of(&dir.join("one")), tokens_of(&dir.join("three")));
    assert!(!one.1.is_empty(), "no validation tokens");
    assert_eq!(one, three);
    // Each process wrote its own shards; no staging or count files are left behind.
    let names: Vec<String> = std::fs::read_dir(dir.join("three"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("train_r0002_")),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.starts_with('.')), "{names:?}");
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // A bad record fails the job when not skipped, naming the file.
    let strict: Vec<&str> = args("strict")
        .into_iter()
        .filter(|a| *a != "--skip-bad-records")
        .collect();
    failed(mpi_run(3, &strict, dir), &["records.jsonl"]);
    assert!(!dir.join("strict").exists());
}

#[test]
fn jobs_refuse_what_they_cannot_share() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    prepare(dir);
    // Three processes cannot share two micro-batches a step evenly.
    failed(
        mpi_run(
            3,
            &[PRETRAIN, TWENTY_STEPS, &["--out", "odd"]].concat(),
            dir,
        ),
        &["3 processes"],
    );
    failed(
        mpi_run(2, &["generate", "--model", "nope", "--prompt", "hi"], dir),
        &["only `kiem pretrain`, `kiem finetune` and `kiem data prepare`"],
    );
    // Each failing process names itself; the job ends.
    failed(
        mpi_run(2, &["pretrain", "--resume", "missing"], dir),
        &["(rank 0 of 2)", "missing is not a kiem run directory"],
    );
    // One process refuses a ZeRO stage it does not have too.
    failed(
        kiem()
            .args([PRETRAIN, TWENTY_STEPS, &["--out", "z2", "--zero", "2"]].concat())
            .current_dir(dir)
            .output()
            .unwrap(),
        &["--zero 2"],
    );
}
