//! Text metrics of generated answers against references, computed as the reference tools
//! compute them: exact match (both sides stripped of surrounding whitespace), ROUGE-L F1 as
//! `rouge_score` (lower-cased ASCII alphanumeric tokens, no stemming), chrF as `sacrebleu`'s
//! `CHRF()` (character 6-grams, beta 2, whitespace removed) and BLEU as `sacrebleu`'s `BLEU()`
//! (13a tokenization, 4-grams, exponential smoothing). chrF and BLEU are corpus metrics: they
//! sum per-example statistics before scoring, so their standard error is bootstrapped.

use std::collections::HashMap;
use std::sync::LazyLock;

use regex::Regex;

/// Exact match, 1 or 0: the prediction equals a reference once surrounding whitespace is
/// stripped from both.
pub fn exact_match(prediction: &str, references: &[String]) -> f64 {
    let p = prediction.trim();
    f64::from(u8::from(references.iter().any(|r| r.trim() == p)))
}

/// `rouge_score`'s tokens: lower-cased, every run of characters other than ASCII `a-z0-9` a
/// separator.
fn rouge_tokens(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

/// The length of the longest common subsequence of two token lists.
fn lcs_len(a: &[String], b: &[String]) -> usize {
    let mut row = vec![0usize; b.len() + 1];
    for x in a {
        let mut diagonal = 0;
        for (j, y) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = if x == y {
                diagonal + 1
            } else {
                above.max(row[j])
            };
            diagonal = above;
        }
    }
    row[b.len()]
}

/// ROUGE-L F1 in 0..=1 against the best-matching reference (`rouge_score`'s `score_multi`).
pub fn rouge_l(prediction: &str, references: &[String]) -> f64 {
    let p = rouge_tokens(prediction);
    references
        .iter()
        .map(|r| {
            let r = rouge_tokens(r);
            if p.is_empty() || r.is_empty() {
                return 0.0;
            }
            let lcs = lcs_len(&r, &p) as f64;
            let (precision, recall) = (lcs / p.len() as f64, lcs / r.len() as f64);
            if precision + recall > 0.0 {
                2.0 * precision * recall / (precision + recall)
            } else {
                0.0
            }
        })
        .fold(0.0, f64::max)
}

/// Python's `str.split()` separators: Unicode white space and the ASCII separators
/// U+001C..U+001F.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn python_split(text: &str) -> impl Iterator<Item = &str> {
    text.split(is_python_space).filter(|t| !t.is_empty())
}

const CHRF_ORDER: usize = 6;
const CHRF_BETA: f64 = 2.0;

/// A text without its white space (what chrF reads).
fn without_spaces(text: &str) -> String {
    python_split(text).collect()
}

/// Counts of every character n-gram, n = 1..=6, of a text.
fn char_ngrams(joined: &str) -> Vec<HashMap<&str, usize>> {
    let bounds: Vec<usize> = joined
        .char_indices()
        .map(|(i, _)| i)
        .chain([joined.len()])
        .collect();
    let chars = bounds.len() - 1;
    (1..=CHRF_ORDER)
        .map(|n| {
            let mut counts = HashMap::new();
            for i in 0..(chars + 1).saturating_sub(n) {
                *counts.entry(&joined[bounds[i]..bounds[i + n]]).or_insert(0) += 1;
            }
            counts
        })
        .collect()
}

/// chrF statistics of one example: `[hypothesis, reference, matching]` n-gram counts per order.
pub type ChrfStats = [[u64; 3]; CHRF_ORDER];

fn chrf_from(stats: &ChrfStats) -> f64 {
    let factor = CHRF_BETA * CHRF_BETA;
    let (mut precision, mut recall, mut orders) = (0.0, 0.0, 0);
    for &[hyp, reference, matching] in stats {
        if hyp > 0 && reference > 0 {
            precision += matching as f64 / hyp as f64;
            recall += matching as f64 / reference as f64;
            orders += 1;
        }
    }
    if orders == 0 {
        return 0.0;
    }
    let (precision, recall) = (precision / orders as f64, recall / orders as f64);
    if precision + recall == 0.0 {
        return 0.0;
    }
    100.0 * (1.0 + factor) * precision * recall / (factor * precision + recall)
}

/// One example's chrF statistics against the reference that scores best on its own
/// (`sacrebleu`: the first of equal scores).
pub fn chrf_stats(prediction: &str, references: &[String]) -> ChrfStats {
    let prediction = without_spaces(prediction);
    let hyp = char_ngrams(&prediction);
    let mut best: Option<(f64, ChrfStats)> = None;
    for reference in references {
        let reference = without_spaces(reference);
        let refs = char_ngrams(&reference);
        let mut stats = [[0u64; 3]; CHRF_ORDER];
        for (n, (h, r)) in hyp.iter().zip(&refs).enumerate() {
            let total: usize = h.values().sum();
            let matching: usize = h
                .iter()
                .map(|(g, &c)| r.get(g).map_or(0, |&rc| c.min(rc)))
                .sum();
            stats[n] = [
                if r.is_empty() { 0 } else { total as u64 },
                r.values().sum::<usize>() as u64,
                matching as u64,
            ];
        }
        let score = chrf_sentence_f(&stats);
        if best.as_ref().is_none_or(|(b, _)| score > *b) {
            best = Some((score, stats));
        }
    }
    best.map_or([[0; 3]; CHRF_ORDER], |(_, s)| s)
}

/// sacrebleu's per-order f-score sum, which it uses only to pick the best reference.
fn chrf_sentence_f(stats: &ChrfStats) -> f64 {
    let (eps, factor) = (1e-16, CHRF_BETA * CHRF_BETA);
    stats
        .iter()
        .map(|&[hyp, reference, matching]| {
            let precision = if hyp > 0 {
                matching as f64 / hyp as f64
            } else {
                eps
            };
            let recall = if reference > 0 {
                matching as f64 / reference as f64
            } else {
                eps
            };
            let denominator = factor * precision + recall;
            if denominator > 0.0 {
                (1.0 + factor) * precision * recall / denominator
            } else {
                eps
            }
        })
        .sum()
}

/// Corpus chrF (0..=100) of summed per-example statistics.
pub fn chrf(stats: &[ChrfStats]) -> f64 {
    let mut total = [[0u64; 3]; CHRF_ORDER];
    for s in stats {
        for (t, x) in total.iter_mut().zip(s) {
            for k in 0..3 {
                t[k] += x[k];
            }
        }
    }
    chrf_from(&total)
}

const BLEU_ORDER: usize = 4;

/// BLEU statistics of one example: hypothesis length, closest reference length, then matching
/// and total n-grams per order.
pub type BleuStats = [u64; 2 + 2 * BLEU_ORDER];

/// sacrebleu's 13a tokenization (mteval-v13a, as WMT uses it).
fn tokenize_13a(text: &str) -> String {
    static RULES: LazyLock<[(Regex, &str); 4]> = LazyLock::new(|| {
        let rule = |pattern: &str, replacement| (Regex::new(pattern).expect("valid"), replacement);
        [
            rule(r"([\{-~\[-` -&\(-\+:-@/])", " $1 "),
            rule(r"([^0-9])([\.,])", "$1 $2 "),
            rule(r"([\.,])([^0-9])", " $1 $2"),
            rule(r"([0-9])(-)", "$1 $2 "),
        ]
    });
    let mut line = text
        .trim_end_matches(is_python_space)
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let mut line = format!(" {line} ");
    for (pattern, replacement) in RULES.iter() {
        line = pattern.replace_all(&line, *replacement).into_owned();
    }
    python_split(&line).collect::<Vec<_>>().join(" ")
}

/// Counts of every word n-gram, n = 1..=4, and the word count.
fn word_ngrams(tokens: &[&str]) -> (HashMap<Vec<String>, u64>, usize) {
    let mut counts = HashMap::new();
    for n in 1..=BLEU_ORDER {
        for gram in tokens.windows(n) {
            let gram: Vec<String> = gram.iter().map(|s| s.to_string()).collect();
            *counts.entry(gram).or_insert(0) += 1;
        }
    }
    (counts, tokens.len())
}

/// One example's BLEU statistics: n-grams clipped by their most frequent count in any
/// reference, length against the closest reference length (the shorter on a tie).
pub fn bleu_stats(prediction: &str, references: &[String]) -> BleuStats {
    let mut ref_counts: HashMap<Vec<String>, u64> = HashMap::new();
    let mut ref_lens = Vec::new();
    for reference in references {
        let tokenized = tokenize_13a(reference);
        let tokens: Vec<&str> = python_split(&tokenized).collect();
        let (counts, len) = word_ngrams(&tokens);
        ref_lens.push(len);
        for (gram, count) in counts {
            let slot = ref_counts.entry(gram).or_insert(0);
            *slot = (*slot).max(count);
        }
    }
    let tokenized = tokenize_13a(prediction);
    let tokens: Vec<&str> = python_split(&tokenized).collect();
    let (counts, hyp_len) = word_ngrams(&tokens);
    let mut closest: Option<(usize, usize)> = None;
    for &len in &ref_lens {
        let diff = hyp_len.abs_diff(len);
        closest = match closest {
            Some((d, l)) if d < diff || (d == diff && l <= len) => Some((d, l)),
            _ => Some((diff, len)),
        };
    }
    let mut stats = [0u64; 2 + 2 * BLEU_ORDER];
    stats[0] = hyp_len as u64;
    stats[1] = closest.map_or(0, |(_, l)| l) as u64;
    for (gram, count) in counts {
        let n = gram.len() - 1;
        stats[2 + BLEU_ORDER + n] += count;
        stats[2 + n] += ref_counts.get(&gram).map_or(0, |&r| count.min(r));
    }
    stats
}

/// Corpus BLEU (0..=100) of summed per-example statistics, with sacrebleu's default
/// exponential smoothing.
pub fn bleu(stats: &[BleuStats]) -> f64 {
    let mut total = [0u64; 2 + 2 * BLEU_ORDER];
    for s in stats {
        for (t, x) in total.iter_mut().zip(s) {
            *t += x;
        }
    }
    let (sys_len, ref_len) = (total[0] as f64, total[1] as f64);
    let (correct, counts) = (&total[2..2 + BLEU_ORDER], &total[2 + BLEU_ORDER..]);
    let brevity = if sys_len < ref_len {
        if sys_len > 0.0 {
            (1.0 - ref_len / sys_len).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    if correct.iter().all(|&c| c == 0) {
        return 0.0;
    }
    let mut precisions = [0.0f64; BLEU_ORDER];
    let mut smooth = 1.0;
    for n in 0..BLEU_ORDER {
        if counts[n] == 0 {
            break;
        }
        precisions[n] = if correct[n] == 0 {
            smooth *= 2.0;
            100.0 / (smooth * counts[n] as f64)
        } else {
            100.0 * correct[n] as f64 / counts[n] as f64
        };
    }
    // sacrebleu's my_log: a zero precision counts as a very small log.
    let log = |p: f64| if p == 0.0 { -9_999_999_999.0 } else { p.ln() };
    brevity * (precisions.iter().map(|&p| log(p)).sum::<f64>() / BLEU_ORDER as f64).exp()
}

/// The standard deviation of a corpus metric over `resamples` bootstrap resamples of the
/// examples (drawn with replacement, seeded: the same inputs give the same figure).
pub fn bootstrap_stderr<S: Copy>(
    stats: &[S],
    metric: impl Fn(&[S]) -> f64,
    resamples: usize,
    seed: u64,
) -> f64 {
    if stats.len() < 2 || resamples < 2 {
        return 0.0;
    }
    let mut rng = kiem_engine::rng::Rng::new(seed);
    let mut sample = Vec::with_capacity(stats.len());
    let scores: Vec<f64> = (0..resamples)
        .map(|_| {
            sample.clear();
            sample.extend(
                (0..stats.len()).map(|_| stats[(rng.next_u64() % stats.len() as u64) as usize]),
            );
            metric(&sample)
        })
        .collect();
    let mean = scores.iter().sum::<f64>() / resamples as f64;
    (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (resamples - 1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn small_cases_by_hand() {
        assert_eq!(exact_match("  Paris\n", &refs(&["Paris"])), 1.0);
        assert_eq!(exact_match("paris", &refs(&["Paris"])), 0.0);
        assert_eq!(rouge_l("the cat sat", &refs(&["The cat, sat!"])), 1.0);
        assert_eq!(rouge_l("", &refs(&["x"])), 0.0);
        assert_eq!(
            lcs_len(&refs(&["a", "b", "c", "d"]), &refs(&["b", "d", "a"])),
            2
        );
        assert_eq!(
            tokenize_13a("Hello, world. 3.5-4"),
            "Hello , world . 3.5 - 4"
        );
        let same = bleu_stats("a b c d e", &refs(&["a b c d e"]));
        assert!((bleu(&[same]) - 100.0).abs() < 1e-9);
        assert!((chrf(&[chrf_stats("abc def", &refs(&["abcdef"]))]) - 100.0).abs() < 1e-9);
        assert_eq!(bleu(&[bleu_stats("x", &refs(&["y"]))]), 0.0);
    }
}
