//! Scoring multiple-choice questions as lm-evaluation-harness does for causal models: each
//! choice is the continuation `" " + choice` of the context; context and continuation are
//! encoded together and split after the context's own token count (trailing whitespace of the
//! context moves into the continuation); the score is the sum of the continuation tokens' log
//! probabilities. `acc` takes the best score, `acc_norm` the best score per character of the
//! choice, `acc_bytes` per UTF-8 byte.

use kiem_engine::infer::KvCache;
use kiem_engine::Gpt;
use kiem_tokenizer::Tokenizer;
use serde::Serialize;

use crate::tasks::{Question, Task};
use crate::Result;

/// The delimiter between context and choice (the harness' `target_delimiter`).
pub const TARGET_DELIMITER: &str = " ";
/// The delimiter between few-shot examples and the question (the harness' `fewshot_delimiter`).
pub const FEWSHOT_DELIMITER: &str = "\n\n";

/// How questions are asked: with how many solved examples of the same task before each.
#[derive(Debug, Clone, Copy, Default)]
pub struct Shots {
    pub count: usize,
    /// Seeds the draw of the examples (each question's draw depends on it and the question's
    /// index only, so results do not depend on --limit or the order of evaluation).
    pub seed: u64,
}

/// The indices of the solved examples shown before item `index` of a task of `len` items:
/// `shots.count` others (at most all of them), drawn from `shots.seed` and `index` alone.
pub fn draw_examples(len: usize, index: usize, shots: Shots) -> Vec<usize> {
    let count = shots.count.min(len.saturating_sub(1));
    if count == 0 {
        return Vec::new();
    }
    let mut rng =
        kiem_engine::rng::Rng::new(shots.seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    // A partial Fisher-Yates shuffle of the other items' indices.
    let mut pool: Vec<usize> = (0..len).filter(|&i| i != index).collect();
    for i in 0..count {
        let j = i + (rng.next_u64() % (pool.len() - i) as u64) as usize;
        pool.swap(i, j);
    }
    pool.truncate(count);
    pool
}

/// `question` preceded by `shots.count` other questions of the task, each with its answer.
pub fn with_examples(task: &Task, index: usize, shots: Shots) -> Question {
    let question = &task.questions[index];
    let drawn = draw_examples(task.questions.len(), index, shots);
    if drawn.is_empty() {
        return question.clone();
    }
    let mut context = String::new();
    for i in drawn {
        let example = &task.questions[i];
        context.push_str(&example.context);
        context.push_str(TARGET_DELIMITER);
        context.push_str(&example.choices[example.gold]);
        context.push_str(FEWSHOT_DELIMITER);
    }
    context.push_str(&question.context);
    Question {
        context,
        ..question.clone()
    }
}

/// Context and continuation tokens of one request, split as the harness splits them.
pub fn encode_pair(
    tokenizer: &Tokenizer,
    context: &str,
    continuation: &str,
) -> (Vec<u32>, Vec<u32>) {
    // Python's rstrip(): trailing whitespace moves from the context into the continuation.
    let kept = context.trim_end().len();
    let (context, moved) = context.split_at(kept);
    let continuation = format!("{moved}{continuation}");
    if context.is_empty() {
        // An empty context is the prefix token (BOS where the model has one).
        let prefix = tokenizer
            .prompt_prefix()
            .first()
            .copied()
            .unwrap_or_else(|| tokenizer.eos_id().unwrap_or(tokenizer.bos_id()));
        return (vec![prefix], tokenizer.encode(&continuation));
    }
    let whole = tokenizer.encode_prompt(&format!("{context}{continuation}"));
    let context_ids = tokenizer.encode_prompt(context);
    let split = context_ids.len().min(whole.len());
    (context_ids, whole[split..].to_vec())
}

/// One choice's score: the summed log probability of its tokens, and whether greedy decoding
/// would have produced them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ChoiceScore {
    pub loglikelihood: f64,
    pub greedy: bool,
}

/// Scores continuations after their contexts. Requests that share a context (a question's
/// choices, consecutive in `requests`) compute it once: the context is run into a KV cache, and
/// each continuation continues from a copy of it, all sequences of a call in one pass. A
/// request longer than the model's context is scored as the harness does, on its last
/// `context + 1` tokens, in a full forward pass.
pub fn loglikelihoods(
    gpt: &mut Gpt,
    requests: &[(Vec<u32>, Vec<u32>)],
) -> Result<Vec<ChoiceScore>> {
    let window = gpt.config.context;
    let fits = |(context, continuation): &(Vec<u32>, Vec<u32>)| {
        !continuation.is_empty() && context.len() + continuation.len() <= window + 1
    };
    let (cached, windowed): (Vec<usize>, Vec<usize>) =
        (0..requests.len()).partition(|&i| fits(&requests[i]));
    let mut scores = vec![None; requests.len()];
    let pick = |indices: &[usize]| -> Vec<(Vec<u32>, Vec<u32>)> {
        indices.iter().map(|&i| requests[i].clone()).collect()
    };
    if !cached.is_empty() {
        let got = loglikelihoods_cached(gpt, &pick(&cached))?;
        for (&i, score) in cached.iter().zip(got) {
            scores[i] = Some(score);
        }
    }
    if !windowed.is_empty() {
        let got = loglikelihoods_windowed(gpt, &pick(&windowed))?;
        for (&i, score) in windowed.iter().zip(got) {
            scores[i] = Some(score);
        }
    }
    Ok(scores
        .into_iter()
        .map(|s| s.expect("every request scored"))
        .collect())
}

/// The log probability of `target` under a row of logits, and whether it is the row's first
/// largest logit (the harness' greedy check).
fn score_token(row: &[f32], target: u32) -> (f64, bool) {
    let (mut best, mut max) = (0, f32::NEG_INFINITY);
    for (i, &x) in row.iter().enumerate() {
        if x > max {
            (best, max) = (i, x);
        }
    }
    let sum: f64 = row.iter().map(|&x| f64::from(x - max).exp()).sum();
    let logprob = f64::from(row[target as usize] - max) - sum.ln();
    (logprob, best == target as usize)
}

/// Continuations that fit the model's context whole, each after a KV cache of its context.
fn loglikelihoods_cached(
    gpt: &mut Gpt,
    requests: &[(Vec<u32>, Vec<u32>)],
) -> Result<Vec<ChoiceScore>> {
    let (vp, vocab) = (gpt.config.padded_vocab(), gpt.config.vocab_size);
    // Runs of requests with the same context: (context, first request, requests).
    let mut groups: Vec<(&[u32], usize, usize)> = Vec::new();
    for (i, (context, _)) in requests.iter().enumerate() {
        match groups.last_mut() {
            Some((shared, _, count)) if *shared == context.as_slice() => *count += 1,
            _ => groups.push((context, i, 1)),
        }
    }
    let mut shared: Vec<KvCache> = groups.iter().map(|_| KvCache::new(gpt)).collect();
    let contexts: Vec<&[u32]> = groups.iter().map(|g| g.0).collect();
    // The logits after each context predict each of its continuations' first token.
    let after_context = gpt.forward_cached(&mut shared, &contexts)?;
    let mut caches = Vec::with_capacity(requests.len());
    for (g, &(_, _, count)) in groups.iter().enumerate() {
        caches.extend(std::iter::repeat_n(&shared[g], count).cloned());
    }
    drop(shared);
    let inputs: Vec<&[u32]> = requests
        .iter()
        .map(|(_, continuation)| &continuation[..continuation.len() - 1])
        .collect();
    let rows = gpt.forward_cached_every(&mut caches, &inputs)?;
    let mut scores = Vec::with_capacity(requests.len());
    let mut row = 0;
    for (g, &(_, first, count)) in groups.iter().enumerate() {
        for (_, continuation) in &requests[first..first + count] {
            let mut score = ChoiceScore {
                loglikelihood: 0.0,
                greedy: true,
            };
            for (j, &target) in continuation.iter().enumerate() {
                let logits = if j == 0 {
                    &after_context[g * vp..][..vocab]
                } else {
                    row += 1;
                    &rows[(row - 1) * vp..][..vocab]
                };
                let (logprob, greedy) = score_token(logits, target);
                score.loglikelihood += logprob;
                score.greedy &= greedy;
            }
            scores.push(score);
        }
    }
    Ok(scores)
}

/// Scores continuations after their contexts, all in one forward pass: each row is the last
/// `context + 1` tokens of context and continuation, without its last token.
fn loglikelihoods_windowed(
    gpt: &mut Gpt,
    requests: &[(Vec<u32>, Vec<u32>)],
) -> Result<Vec<ChoiceScore>> {
    let window = gpt.config.context;
    let rows: Vec<(Vec<u32>, usize)> = requests
        .iter()
        .map(|(context, continuation)| {
            let whole: Vec<u32> = context.iter().chain(continuation).copied().collect();
            let kept = &whole[whole.len().saturating_sub(window + 1)..];
            let input = kept[..kept.len().saturating_sub(1)].to_vec();
            (input, continuation.len().min(kept.len().saturating_sub(1)))
        })
        .collect();
    let seq = rows
        .iter()
        .map(|(input, _)| input.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let mut tokens = Vec::with_capacity(rows.len() * seq);
    let mut targets = Vec::with_capacity(rows.len() * seq);
    for ((input, scored), (context, continuation)) in rows.iter().zip(requests) {
        let whole: Vec<u32> = context.iter().chain(continuation).copied().collect();
        let next = &whole[whole.len() - input.len()..];
        tokens.extend_from_slice(input);
        tokens.extend(std::iter::repeat_n(0, seq - input.len()));
        // Position p predicts the token after it; only the continuation's are scored.
        targets.extend((0..input.len()).map(|p| (p + scored >= input.len()).then(|| next[p])));
        targets.extend(std::iter::repeat_n(None, seq - input.len()));
    }
    gpt.forward(&tokens, &targets, rows.len(), seq, None)?;
    let logits = gpt.logits()?;
    let (vp, vocab) = (gpt.config.padded_vocab(), gpt.config.vocab_size);
    Ok((0..rows.len())
        .map(|r| {
            let mut score = ChoiceScore {
                loglikelihood: 0.0,
                greedy: true,
            };
            for p in r * seq..(r + 1) * seq {
                if let Some(target) = targets[p] {
                    let (logprob, greedy) = score_token(&logits[p * vp..][..vocab], target);
                    score.loglikelihood += logprob;
                    score.greedy &= greedy;
                }
            }
            score
        })
        .collect())
}

/// One question's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Scored {
    pub line: usize,
    pub gold: usize,
    pub scores: Vec<ChoiceScore>,
    pub pred: usize,
    pub pred_norm: usize,
    pub pred_bytes: usize,
}

/// The first index of the largest value (numpy's argmax).
fn argmax(values: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::NEG_INFINITY);
    for (i, v) in values.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// Scores one question (all its choices in one pass).
pub fn score_question(gpt: &mut Gpt, tokenizer: &Tokenizer, question: &Question) -> Result<Scored> {
    Ok(score_questions(gpt, tokenizer, std::slice::from_ref(question))?.remove(0))
}

/// Scores questions together: every choice of every question is a row of one forward pass.
pub fn score_questions(
    gpt: &mut Gpt,
    tokenizer: &Tokenizer,
    questions: &[Question],
) -> Result<Vec<Scored>> {
    let requests: Vec<(Vec<u32>, Vec<u32>)> = questions
        .iter()
        .flat_map(|q| {
            q.choices
                .iter()
                .map(move |c| encode_pair(tokenizer, &q.context, &format!("{TARGET_DELIMITER}{c}")))
        })
        .collect();
    let mut scores = loglikelihoods(gpt, &requests)?.into_iter();
    Ok(questions
        .iter()
        .map(|question| {
            let scores: Vec<ChoiceScore> = scores.by_ref().take(question.choices.len()).collect();
            let ll = || scores.iter().map(|s| s.loglikelihood);
            let chars = question.choices.iter().map(|c| c.chars().count() as f64);
            let bytes = question.choices.iter().map(|c| c.len() as f64);
            Scored {
                line: question.line,
                gold: question.gold,
                pred: argmax(ll()),
                pred_norm: argmax(ll().zip(chars).map(|(l, n)| l / n)),
                pred_bytes: argmax(ll().zip(bytes).map(|(l, n)| l / n)),
                scores,
            }
        })
        .collect())
}

/// A metric's mean over the questions and its standard error (the sample standard deviation
/// over √n, as the harness reports it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Mean {
    pub value: f64,
    pub stderr: f64,
}

impl Mean {
    pub fn of(values: &[f64]) -> Mean {
        let n = values.len() as f64;
        let value = values.iter().sum::<f64>() / n.max(1.0);
        let stderr = if values.len() > 1 {
            (values.iter().map(|v| (v - value).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() / n.sqrt()
        } else {
            0.0
        };
        Mean { value, stderr }
    }
}

/// A task's report.
#[derive(Debug, Clone, Serialize)]
pub struct TaskReport {
    pub task: String,
    pub format: &'static str,
    pub examples: usize,
    pub shots: usize,
    pub acc: Mean,
    pub acc_norm: Mean,
    pub acc_bytes: Mean,
    pub questions: Vec<Scored>,
}

/// How a task is evaluated.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    /// Score only the first this many questions.
    pub limit: Option<usize>,
    pub shots: Shots,
    /// Questions scored together in one forward pass.
    pub batch: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            limit: None,
            shots: Shots::default(),
            batch: 1,
        }
    }
}

/// Scores the first `limit` questions of a task, each after `shots` solved examples, `batch`
/// at a time, calling `progress(done, total)` after each batch.
pub fn evaluate(
    gpt: &mut Gpt,
    tokenizer: &Tokenizer,
    task: &Task,
    options: EvalOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<TaskReport> {
    let shots = options.shots;
    let total = options
        .limit
        .map_or(task.questions.len(), |l| l.min(task.questions.len()));
    let mut questions = Vec::with_capacity(total);
    for start in (0..total).step_by(options.batch.max(1)) {
        let end = (start + options.batch.max(1)).min(total);
        let batch: Vec<Question> = (start..end)
            .map(|i| with_examples(task, i, shots))
            .collect();
        questions.extend(score_questions(gpt, tokenizer, &batch)?);
        progress(end, total);
    }
    let hits = |pick: fn(&Scored) -> usize| -> Vec<f64> {
        questions
            .iter()
            .map(|q| f64::from(u8::from(pick(q) == q.gold)))
            .collect()
    };
    Ok(TaskReport {
        task: task.name.clone(),
        format: task.format.name(),
        examples: total,
        shots: shots.count,
        acc: Mean::of(&hits(|q| q.pred)),
        acc_norm: Mean::of(&hits(|q| q.pred_norm)),
        acc_bytes: Mean::of(&hits(|q| q.pred_bytes)),
        questions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::TaskFormat;

    fn task() -> Task {
        let q = |c: &str, a: &str| Question {
            context: c.into(),
            choices: vec!["x".into(), a.into()],
            gold: 1,
            line: 0,
        };
        Task {
            name: "t".into(),
            format: TaskFormat::Plain,
            questions: vec![q("Q0", "A0"), q("Q1", "A1"), q("Q2", "A2"), q("Q3", "A3")],
        }
    }

    #[test]
    fn few_shot_examples_are_other_solved_questions_drawn_reproducibly() {
        let t = task();
        let shots = Shots { count: 2, seed: 7 };
        let q = with_examples(&t, 1, shots);
        assert!(q.context.ends_with("\n\nQ1"), "{:?}", q.context);
        let examples: Vec<&str> = q.context.split("\n\n").collect();
        assert_eq!(examples.len(), 3);
        for e in &examples[..2] {
            let n = &e[1..2];
            assert_ne!(n, "1", "never the question itself");
            assert_eq!(*e, format!("Q{n} A{n}"), "question, delimiter, gold answer");
        }
        assert_eq!(
            with_examples(&t, 1, shots).context,
            q.context,
            "reproducible"
        );
        assert_eq!(
            with_examples(&t, 1, Shots { count: 9, seed: 7 })
                .context
                .matches("\n\n")
                .count(),
            3
        );
        assert_eq!(with_examples(&t, 2, Shots::default()).context, "Q2");
    }
}
