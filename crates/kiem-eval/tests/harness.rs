//! kiem's multiple-choice scoring against lm-evaluation-harness itself (fixtures made by
//! tests/fixtures/make_fixtures.py with the harness' HFLM on a transformers GPT-2 model).

use std::path::{Path, PathBuf};

use kiem_eval::score::evaluate;
use kiem_eval::tasks::load_task;
use kiem_tokenizer::Tokenizer;
use serde_json::Value;

fn here() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

#[test]
fn loglikelihoods_and_accuracies_equal_the_harness() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(here().join("tests/fixtures/expected.json")).unwrap(),
    )
    .unwrap();
    let model = here().join("../kiem/tests/fixtures/hf/tiny_a");
    let (mut gpt, _) = kiem_engine::io::load_model_dir(&model).unwrap();
    let tokenizer = Tokenizer::load(model.to_str().unwrap()).unwrap();
    let tasks = expected["tasks"].as_object().unwrap();
    assert_eq!(tasks.len(), 4);
    for (name, want) in tasks {
        let task = load_task(
            &here()
                .join("tests/fixtures")
                .join(want["file"].as_str().unwrap()),
        )
        .unwrap();
        let questions = want["questions"].as_array().unwrap();
        assert_eq!(task.questions.len(), questions.len(), "{name}");
        for (q, w) in task.questions.iter().zip(questions) {
            assert_eq!(q.context, w["context"].as_str().unwrap(), "{name}: context");
            let choices: Vec<String> = serde_json::from_value(w["choices"].clone()).unwrap();
            assert_eq!(q.choices, choices, "{name}: choices");
            assert_eq!(q.gold as u64, w["gold"].as_u64().unwrap(), "{name}: gold");
        }
        let report = evaluate(
            &mut gpt,
            &tokenizer,
            &task,
            Default::default(),
            &mut |_, _| {},
        )
        .unwrap();
        // Questions scored together in one pass give the same scores.
        let batched = evaluate(
            &mut gpt,
            &tokenizer,
            &task,
            kiem_eval::score::EvalOptions {
                batch: 4,
                ..Default::default()
            },
            &mut |_, _| {},
        )
        .unwrap();
        for (a, b) in report.questions.iter().zip(&batched.questions) {
            for (x, y) in a.scores.iter().zip(&b.scores) {
                assert!(
                    (x.loglikelihood - y.loglikelihood).abs() < 1e-5,
                    "{name}: batched"
                );
            }
        }
        for (got, w) in report.questions.iter().zip(questions) {
            for (i, score) in got.scores.iter().enumerate() {
                let ll = w["loglikelihoods"][i].as_f64().unwrap();
                assert!(
                    (score.loglikelihood - ll).abs() < 1e-4,
                    "{name} line {}: choice {i}: {} vs the harness' {ll}",
                    got.line,
                    score.loglikelihood
                );
                assert_eq!(
                    score.greedy,
                    w["greedy"][i].as_bool().unwrap(),
                    "{name}: greedy"
                );
            }
            for key in ["pred", "pred_norm", "pred_bytes"] {
                let mine = match key {
                    "pred" => got.pred,
                    "pred_norm" => got.pred_norm,
                    _ => got.pred_bytes,
                };
                assert_eq!(mine as u64, w[key].as_u64().unwrap(), "{name}: {key}");
            }
        }
        for (metric, mean) in [
            ("acc", report.acc),
            ("acc_norm", report.acc_norm),
            ("acc_bytes", report.acc_bytes),
        ] {
            let value = want[metric]["value"].as_f64().unwrap();
            let stderr = want[metric]["stderr"].as_f64().unwrap();
            assert!((mean.value - value).abs() < 1e-12, "{name} {metric}");
            assert!(
                (mean.stderr - stderr).abs() < 1e-12,
                "{name} {metric} stderr"
            );
        }
    }
}

/// Perplexity: a text inside the context equals one forward pass; a longer one is scored in
/// windows that score every token after the first exactly once, whatever the stride.
#[test]
fn texts_are_scored_token_by_token_in_windows() {
    let model = here().join("../kiem/tests/fixtures/hf/tiny_a");
    let (mut gpt, _) = kiem_engine::io::load_model_dir(&model).unwrap();
    let tokenizer = Tokenizer::load(model.to_str().unwrap()).unwrap();
    let short = "The roof was repaired on Monday.";
    let report =
        kiem_eval::lm::evaluate_text(&mut gpt, &tokenizer, "short", short, None, &mut |_, _| {})
            .unwrap();
    let ids = tokenizer.encode_prompt(short);
    let targets: Vec<Option<u32>> = ids[1..].iter().map(|&t| Some(t)).collect();
    let (sum, count) = gpt
        .forward(&ids[..ids.len() - 1], &targets, 1, ids.len() - 1, None)
        .unwrap();
    assert_eq!(report.tokens, count);
    assert!((report.loss - sum / count as f64).abs() < 1e-12);
    assert!(
        (report.bits_per_byte - sum / std::f64::consts::LN_2 / short.len() as f64).abs() < 1e-12
    );
    let long = "Customers asked about roofs, gutters, permits and paint. ".repeat(12);
    let n = tokenizer.encode_prompt(&long).len();
    assert!(n > 2 * gpt.config.context);
    let mut losses = Vec::new();
    for stride in [64, 40, 1] {
        let r = kiem_eval::lm::evaluate_text(
            &mut gpt,
            &tokenizer,
            "long",
            &long,
            Some(stride),
            &mut |_, _| {},
        )
        .unwrap();
        assert_eq!(r.tokens, n - 1, "stride {stride}");
        losses.push(r.loss);
    }
    // More context per token changes the loss (the model attends to it).
    assert_ne!(losses[0], losses[2]);
    let err =
        kiem_eval::lm::evaluate_text(&mut gpt, &tokenizer, "x", &long, Some(65), &mut |_, _| {})
            .unwrap_err();
    assert!(err.to_string().contains("--stride 65"), "{err}");
}
