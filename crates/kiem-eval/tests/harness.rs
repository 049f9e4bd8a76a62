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

fn generation_expected() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(here().join("tests/fixtures/generation_expected.json")).unwrap(),
    )
    .unwrap()
}

fn close(got: f64, want: &Value, what: &str) {
    let want = want.as_f64().unwrap();
    assert!((got - want).abs() < 1e-9, "{what}: {got} vs {want}");
}

#[test]
fn text_metrics_equal_sacrebleu_and_rouge_score() {
    use kiem_eval::metrics::*;
    let expected = generation_expected();
    let cases = &expected["metric_cases"];
    let (mut chrf_all, mut bleu_all) = (Vec::new(), Vec::new());
    for case in cases["cases"].as_array().unwrap() {
        let p = case["prediction"].as_str().unwrap();
        let refs: Vec<String> = serde_json::from_value(case["references"].clone()).unwrap();
        close(
            exact_match(p, &refs),
            &case["exact_match"],
            &format!("{p:?}: exact match"),
        );
        close(
            rouge_l(p, &refs),
            &case["rouge_l"],
            &format!("{p:?}: ROUGE-L"),
        );
        let c = chrf_stats(p, &refs);
        close(chrf(&[c]), &case["chrf"], &format!("{p:?}: chrF"));
        chrf_all.push(c);
        bleu_all.push(bleu_stats(p, &refs));
    }
    close(chrf(&chrf_all), &cases["chrf"], "corpus chrF");
    close(bleu(&bleu_all), &cases["bleu"], "corpus BLEU");
    // The bootstrap is reproducible and near zero only for a constant metric.
    let a = bootstrap_stderr(&bleu_all, bleu, 200, 1);
    assert_eq!(a, bootstrap_stderr(&bleu_all, bleu, 200, 1));
    assert!(a > 1.0 && a < 50.0, "{a}");
}

#[test]
fn greedy_replies_and_their_scores_equal_the_harness() {
    use kiem_eval::generation::{evaluate_generation, GenerationOptions, PromptFormat};
    let expected = generation_expected();
    let want = &expected["generation"];
    let model = here().join("../kiem/tests/fixtures/hf/tiny_a");
    let (gpt, ids) = kiem_engine::io::load_model_dir(&model).unwrap();
    let tokenizer = Tokenizer::load(model.to_str().unwrap()).unwrap();
    let task = match kiem_eval::tasks::load(&here().join("tests/fixtures/generation_fixture.jsonl"))
        .unwrap()
    {
        kiem_eval::tasks::LoadedTask::Generation(t) => t,
        other => panic!("not a generation task: {other:?}"),
    };
    let options = GenerationOptions {
        limit: None,
        shots: Default::default(),
        batch: 2,
        max_new_tokens: 16,
        stops: vec!["\n\n".into()],
        format: PromptFormat::Plain,
        stop_ids: ids.eos.clone(),
        bootstrap: 100,
        seed: 1,
    };
    let report = evaluate_generation(&gpt, &tokenizer, &task, &options, &mut |_, _| {}).unwrap();
    let answers = want["answers"].as_array().unwrap();
    assert_eq!(report.answers.len(), answers.len());
    for (got, w) in report.answers.iter().zip(answers) {
        assert_eq!(
            got.prediction,
            w["prediction"].as_str().unwrap(),
            "line {}",
            got.line
        );
        close(got.rouge_l, &w["rouge_l"], "ROUGE-L");
        close(got.chrf, &w["chrf"], "chrF");
        close(got.exact_match, &w["exact_match"], "exact match");
    }
    close(report.chrf.value, &want["chrf"], "corpus chrF");
    close(report.bleu.value, &want["bleu"], "corpus BLEU");
    // One at a time, the replies are the same.
    let single = GenerationOptions {
        batch: 1,
        ..options
    };
    let again = evaluate_generation(&gpt, &tokenizer, &task, &single, &mut |_, _| {}).unwrap();
    for (a, b) in report.answers.iter().zip(&again.answers) {
        assert_eq!(a.prediction, b.prediction);
    }
}
