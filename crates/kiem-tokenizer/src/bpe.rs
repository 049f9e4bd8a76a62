//! A fast encoder for byte-level BPE tokenizers with the GPT-2 or GPT-4 pre-tokenizer.
//!
//! The `tokenizers` crate is the reference and the file format; this encoder gives the same ids
//! (tests compare the two on random text) several times faster, because
//! - pre-tokenization is a hand-written scanner over character classes instead of a
//!   backtracking regex, and
//! - a piece that is itself a token, and that BPE would not split, is looked up whole; other
//!   pieces are merged with a pair-rank table (lowest rank first, leftmost among equals, as
//!   `tokenizers` does).
//!
//! [`FastBpe::from_json`] returns `None` for any tokenizer outside that shape (other
//! normalizers, pre-tokenizers or model options), which then encodes through `tokenizers`.

use std::collections::BinaryHeap;
use std::sync::OnceLock;

use rustc_hash::FxHashMap;
use serde_json::Value;

use crate::gpt2::unicode_to_byte;

/// Which pre-tokenization regex the tokenizer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pattern {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    Gpt2,
    /// [`crate::GPT4_SPLIT_PATTERN`].
    Gpt4,
}

pub(crate) struct FastBpe {
    pattern: Pattern,
    byte_ids: [u32; 256],
    /// (left id, right id) → (rank, merged id).
    merges: FxHashMap<u64, (u32, u32)>,
    /// Tokens that BPE leaves whole when they form a piece on their own, by their bytes.
    whole: FxHashMap<Vec<u8>, u32>,
}

fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

impl FastBpe {
    /// Builds the encoder from a `tokenizer.json` definition, or `None` when it is not a plain
    /// byte-level BPE with one of the two supported pre-tokenizers.
    pub(crate) fn from_json(json: &Value) -> Option<Self> {
        if !json.get("normalizer").is_none_or(Value::is_null) {
            return None;
        }
        let pattern = detect_pattern(json.get("pre_tokenizer")?)?;
        let model = json.get("model")?;
        let is = |key: &str, want: &Value| model.get(key).is_none_or(|v| v == want);
        let empty_or_null = |key: &str| {
            model
                .get(key)
                .is_none_or(|v| v.is_null() || v.as_str() == Some(""))
        };
        if model.get("type")?.as_str()? != "BPE"
            || !is("dropout", &Value::Null)
            || !is("byte_fallback", &Value::Bool(false))
            || !is("ignore_merges", &Value::Bool(false))
            || !empty_or_null("continuing_subword_prefix")
            || !empty_or_null("end_of_word_suffix")
        {
            return None;
        }
        // Added tokens that are not special would be split out of text; only `tokenizers` does that.
        let added = json.get("added_tokens").and_then(Value::as_array);
        if added.is_some_and(|a| {
            a.iter()
                .any(|t| t.get("special") != Some(&Value::Bool(true)))
        }) {
            return None;
        }

        let vocab = model.get("vocab")?.as_object()?;
        let mut by_bytes: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
        by_bytes.reserve(vocab.len());
        for (token, id) in vocab {
            let bytes: Option<Vec<u8>> = token.chars().map(unicode_to_byte).collect();
            by_bytes.insert(bytes?, u32::try_from(id.as_u64()?).ok()?);
        }
        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = *by_bytes.get(&[b as u8][..])?;
        }
        let mut merges = FxHashMap::default();
        for (rank, merge) in model.get("merges")?.as_array()?.iter().enumerate() {
            let (left, right) = match merge {
                Value::String(s) => s.split_once(' ')?,
                Value::Array(pair) if pair.len() == 2 => (pair[0].as_str()?, pair[1].as_str()?),
                _ => return None,
            };
            let id = |token: &str| vocab.get(token)?.as_u64().map(|id| id as u32);
            let merged = id(&format!("{left}{right}"))?;
            merges.insert(pair_key(id(left)?, id(right)?), (rank as u32, merged));
        }
        let mut encoder = FastBpe {
            pattern,
            byte_ids,
            merges,
            whole: FxHashMap::default(),
        };
        let mut out = Vec::new();
        let whole: FxHashMap<Vec<u8>, u32> = by_bytes
            .into_iter()
            .filter(|(bytes, id)| {
                out.clear();
                encoder.merge_piece(bytes, &mut out);
                out.as_slice() == [*id]
            })
            .collect();
        encoder.whole = whole;
        Some(encoder)
    }

    pub(crate) fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3);
        let mut push_piece = |piece: &str| {
            let bytes = piece.as_bytes();
            match self.whole.get(bytes) {
                Some(&id) => out.push(id),
                None => self.merge_piece(bytes, &mut out),
            }
        };
        match self.pattern {
            Pattern::Gpt2 => split_gpt2(text, &mut push_piece),
            Pattern::Gpt4 => split_gpt4(text, &mut push_piece),
        }
        out
    }

    /// Applies the merges to one piece: repeatedly merge the adjacent pair of lowest rank
    /// (leftmost first among equals) until no pair has a merge.
    fn merge_piece(&self, bytes: &[u8], out: &mut Vec<u32>) {
        if bytes.len() <= 48 {
            self.merge_small(bytes, out);
        } else {
            self.merge_large(bytes, out);
        }
    }

    fn merge_small(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let mut ids: Vec<u32> = bytes.iter().map(|&b| self.byte_ids[b as usize]).collect();
        loop {
            let mut best: Option<(u32, usize, u32)> = None;
            for i in 0..ids.len().saturating_sub(1) {
                if let Some(&(rank, merged)) = self.merges.get(&pair_key(ids[i], ids[i + 1])) {
                    if best.is_none_or(|(r, _, _)| rank < r) {
                        best = Some((rank, i, merged));
                    }
                }
            }
            let Some((_, i, merged)) = best else { break };
            ids[i] = merged;
            ids.remove(i + 1);
        }
        out.extend_from_slice(&ids);
    }

    /// Same result as [`Self::merge_small`] in O(n log n): symbols in a linked list, candidate
    /// merges in a heap, stale candidates skipped when popped.
    fn merge_large(&self, bytes: &[u8], out: &mut Vec<u32>) {
        #[derive(PartialEq, Eq, PartialOrd, Ord)]
        struct Candidate {
            // Reversed so the max-heap pops the lowest rank, then the leftmost position.
            rank: std::cmp::Reverse<u32>,
            pos: std::cmp::Reverse<usize>,
            left: u32,
            right: u32,
        }
        let n = bytes.len();
        let mut ids: Vec<u32> = bytes.iter().map(|&b| self.byte_ids[b as usize]).collect();
        let mut alive = vec![true; n];
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut next: Vec<usize> = (1..=n).collect();
        let mut heap = BinaryHeap::new();
        let candidate = |ids: &[u32], i: usize, j: usize| {
            self.merges
                .get(&pair_key(ids[i], ids[j]))
                .map(|&(rank, _)| Candidate {
                    rank: std::cmp::Reverse(rank),
                    pos: std::cmp::Reverse(i),
                    left: ids[i],
                    right: ids[j],
                })
        };
        for i in 0..n - 1 {
            heap.extend(candidate(&ids, i, i + 1));
        }
        while let Some(c) = heap.pop() {
            let i = c.pos.0;
            let j = next[i];
            // Stale: the left symbol was merged away or changed, or its neighbour changed.
            if !alive[i] || j >= n || ids[i] != c.left || ids[j] != c.right {
                continue;
            }
            ids[i] = self.merges[&pair_key(c.left, c.right)].1;
            alive[j] = false;
            next[i] = next[j];
            if next[i] < n {
                prev[next[i]] = i;
            }
            if prev[i] < n {
                heap.extend(candidate(&ids, prev[i], i));
            }
            if next[i] < n {
                heap.extend(candidate(&ids, i, next[i]));
            }
        }
        out.extend((0..n).filter(|&i| alive[i]).map(|i| ids[i]));
    }
}

fn detect_pattern(pre: &Value) -> Option<Pattern> {
    let kind = pre.get("type")?.as_str()?;
    let byte_level = |v: &Value, use_regex: bool| {
        v.get("type").and_then(Value::as_str) == Some("ByteLevel")
            && v.get("add_prefix_space") == Some(&Value::Bool(false))
            && v.get("use_regex")
                .is_none_or(|u| u == &Value::Bool(use_regex))
    };
    match kind {
        "ByteLevel" if byte_level(pre, true) => Some(Pattern::Gpt2),
        "Sequence" => {
            let steps = pre.get("pretokenizers")?.as_array()?;
            let [split, bytes] = steps.as_slice() else {
                return None;
            };
            let is_gpt4_split = split.get("type")?.as_str()? == "Split"
                && split.get("pattern")?.get("Regex")?.as_str()? == crate::GPT4_SPLIT_PATTERN
                && split.get("behavior")?.as_str()? == "Isolated"
                && split.get("invert") == Some(&Value::Bool(false));
            (is_gpt4_split && byte_level(bytes, false)).then_some(Pattern::Gpt4)
        }
        _ => None,
    }
}

/// Character classes of the pre-tokenization regexes, from the same Unicode tables the `regex`
/// crates use: `\p{L}` letters, `\p{N}` numbers, `\s` white space.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

struct ClassTable {
    /// Sorted, disjoint (start, end inclusive, class) ranges for non-ASCII characters.
    ranges: Vec<(u32, u32, Class)>,
    ascii: [Class; 128],
}

fn class_table() -> &'static ClassTable {
    static TABLE: OnceLock<ClassTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let ranges_of = |pattern: &str| -> Vec<(u32, u32)> {
            let hir = regex_syntax::parse(pattern).expect("valid class");
            match hir.kind() {
                regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(class)) => {
                    class
                        .ranges()
                        .iter()
                        .map(|r| (r.start() as u32, r.end() as u32))
                        .collect()
                }
                _ => unreachable!("{pattern} is a Unicode class"),
            }
        };
        let mut ranges: Vec<(u32, u32, Class)> = Vec::new();
        for (pattern, class) in [
            (r"\p{L}", Class::Letter),
            (r"\p{N}", Class::Number),
            (r"\s", Class::Space),
        ] {
            ranges.extend(ranges_of(pattern).into_iter().map(|(a, b)| (a, b, class)));
        }
        ranges.sort_unstable_by_key(|r| r.0);
        let mut ascii = [Class::Other; 128];
        for (c, slot) in ascii.iter_mut().enumerate() {
            *slot = lookup(&ranges, c as u32);
        }
        ClassTable { ranges, ascii }
    })
}

fn lookup(ranges: &[(u32, u32, Class)], c: u32) -> Class {
    match ranges.binary_search_by(|&(start, end, _)| {
        if end < c {
            std::cmp::Ordering::Less
        } else if start > c {
            std::cmp::Ordering::Greater
        } else {
            std::cmp::Ordering::Equal
        }
    }) {
        Ok(i) => ranges[i].2,
        Err(_) => Class::Other,
    }
}

/// A text as characters with their classes, for the scanners.
struct Scan<'a> {
    text: &'a str,
    table: &'static ClassTable,
}

impl<'a> Scan<'a> {
    /// The character at byte offset `i` and its length, or `None` at the end.
    #[inline]
    fn at(&self, i: usize) -> Option<(char, usize, Class)> {
        let b = *self.text.as_bytes().get(i)?;
        if b < 128 {
            return Some((b as char, 1, self.table.ascii[b as usize]));
        }
        let c = self.text[i..].chars().next().expect("i is a char boundary");
        Some((c, c.len_utf8(), lookup(&self.table.ranges, c as u32)))
    }

    /// End of the run of characters of class `class` starting at `i`.
    #[inline]
    fn run(&self, mut i: usize, class: Class) -> usize {
        while let Some((_, len, k)) = self.at(i) {
            if k != class {
                break;
            }
            i += len;
        }
        i
    }

    /// End of the run of "other" characters (not letter, number or space) starting at `i`.
    #[inline]
    fn run_other(&self, i: usize) -> usize {
        self.run(i, Class::Other)
    }

    /// For a whitespace run starting at `i`: its end, and the start of its last character.
    fn space_run(&self, mut i: usize) -> (usize, usize) {
        let mut last = i;
        while let Some((_, len, k)) = self.at(i) {
            if k != Class::Space {
                break;
            }
            last = i;
            i += len;
        }
        (i, last)
    }

    fn class_at(&self, i: usize) -> Option<Class> {
        self.at(i).map(|(_, _, k)| k)
    }
}

/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
pub(crate) fn split_gpt2<'a>(text: &'a str, emit: &mut impl FnMut(&'a str)) {
    let s = Scan {
        text,
        table: class_table(),
    };
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some((c, len, class)) = s.at(i) {
        let end = if c == '\'' && contraction_gpt2(&bytes[i + 1..]) > 0 {
            i + 1 + contraction_gpt2(&bytes[i + 1..])
        } else {
            // An optional leading space joins a following letter, number or other run.
            let (start, k) = if c == ' ' {
                match s.class_at(i + 1) {
                    Some(next) if next != Class::Space => (i + 1, next),
                    _ => (i, class),
                }
            } else {
                (i, class)
            };
            match k {
                Class::Letter | Class::Number | Class::Other => s.run(start, k),
                Class::Space => {
                    let (run_end, last) = s.space_run(i);
                    // `\s+(?!\S)`: the run minus its last character when a non-space follows
                    // and that leaves something; else `\s+`.
                    if run_end < text.len() && last > i {
                        last
                    } else {
                        run_end
                    }
                }
            }
        };
        debug_assert!(end > i, "progress at {i} ({c:?}, {len})");
        emit(&text[i..end]);
        i = end;
    }
}

/// Length of a GPT-2 contraction suffix after `'` (`s t re ve m ll d`), or 0.
fn contraction_gpt2(rest: &[u8]) -> usize {
    match rest {
        [b's' | b't' | b'm' | b'd', ..] => 1,
        [b'r', b'e', ..] | [b'v', b'e', ..] | [b'l', b'l', ..] => 2,
        _ => 0,
    }
}

/// Length of a GPT-4 contraction suffix after `'` (`(?i:[sdmt]|ll|ve|re)`), or 0. Case-folding
/// is Unicode's: `ſ` (U+017F) folds to `s` and `K` (U+212A) to `k` (no `k` here).
fn contraction_gpt4(rest: &str) -> usize {
    let mut chars = rest.chars();
    let first = chars.next();
    let second = chars.next();
    let eq = |c: Option<char>, want: char| c.is_some_and(|c| c.to_ascii_lowercase() == want);
    match first {
        Some('ſ') => 'ſ'.len_utf8(),
        Some(c) if matches!(c.to_ascii_lowercase(), 's' | 'd' | 'm' | 't') => 1,
        Some(c) if c.eq_ignore_ascii_case(&'l') && eq(second, 'l') => 2,
        Some(c) if c.eq_ignore_ascii_case(&'v') && eq(second, 'e') => 2,
        Some(c) if c.eq_ignore_ascii_case(&'r') && eq(second, 'e') => 2,
        _ => 0,
    }
}

/// [`crate::GPT4_SPLIT_PATTERN`]:
/// `'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+`
pub(crate) fn split_gpt4<'a>(text: &'a str, emit: &mut impl FnMut(&'a str)) {
    let s = Scan {
        text,
        table: class_table(),
    };
    let bytes = text.as_bytes();
    let newlines = |mut j: usize| {
        while matches!(bytes.get(j), Some(b'\r' | b'\n')) {
            j += 1;
        }
        j
    };
    let mut i = 0;
    while let Some((c, len, class)) = s.at(i) {
        let end = 'piece: {
            if c == '\'' {
                let n = contraction_gpt4(&text[i + 1..]);
                if n > 0 {
                    break 'piece i + 1 + n;
                }
            }
            // `[^\r\n\p{L}\p{N}]?+\p{L}+`
            if class == Class::Letter {
                break 'piece s.run(i, Class::Letter);
            }
            if class != Class::Number
                && c != '\r'
                && c != '\n'
                && s.class_at(i + len) == Some(Class::Letter)
            {
                break 'piece s.run(i + len, Class::Letter);
            }
            // `\p{N}{1,3}`
            if class == Class::Number {
                let mut j = i;
                for _ in 0..3 {
                    match s.at(j) {
                        Some((_, l, Class::Number)) => j += l,
                        _ => break,
                    }
                }
                break 'piece j;
            }
            // ` ?[^\s\p{L}\p{N}]++[\r\n]*`
            if class == Class::Other {
                break 'piece newlines(s.run_other(i));
            }
            if c == ' ' && s.class_at(i + 1) == Some(Class::Other) {
                break 'piece newlines(s.run_other(i + 1));
            }
            // Whitespace from here on.
            let (run_end, last) = s.space_run(i);
            // `\s*[\r\n]`: up to the run's last newline.
            if let Some(nl) = bytes[i..run_end]
                .iter()
                .rposition(|&b| b == b'\r' || b == b'\n')
            {
                break 'piece i + nl + 1;
            }
            // `\s+(?!\S)` then `\s+`.
            if run_end < text.len() && last > i {
                last
            } else {
                run_end
            }
        };
        debug_assert!(end > i, "progress at {i} ({c:?})");
        emit(&text[i..end]);
        i = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pieces(pattern: Pattern, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut push = |p: &str| out.push(p.to_string());
        match pattern {
            Pattern::Gpt2 => split_gpt2(text, &mut push),
            Pattern::Gpt4 => split_gpt4(text, &mut push),
        }
        out
    }

    /// The reference: the same regexes run by fancy-regex (which supports the lookahead and
    /// possessive quantifiers).
    fn regex_pieces(pattern: Pattern, text: &str) -> Vec<String> {
        static GPT2: OnceLock<fancy_regex::Regex> = OnceLock::new();
        static GPT4: OnceLock<fancy_regex::Regex> = OnceLock::new();
        let re = match pattern {
            Pattern::Gpt2 => GPT2.get_or_init(|| {
                fancy_regex::Regex::new(
                    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
                )
                .unwrap()
            }),
            Pattern::Gpt4 => {
                GPT4.get_or_init(|| fancy_regex::Regex::new(crate::GPT4_SPLIT_PATTERN).unwrap())
            }
        };
        re.find_iter(text)
            .map(|m| m.unwrap().as_str().to_string())
            .collect()
    }

    const AWKWARD: &str =
        "aZ09 '\n\t\r.,!?-_éüßçø中文日本語한국어🦀😀👩‍⚕️\u{301}\u{a0}\u{2028}\u{3000}٣४ſK";

    #[test]
    fn scanners_match_the_regexes_on_examples() {
        let examples = [
            "Hello world, it's 2024!  Don't   stop\n\n  \tnow.\r\n",
            "x  \n y'S 'LL 'Ve 'ſ 12345678 ...\"quoted\"\n\n\nend   ",
            "   leading spaces and trailing   ",
            "tabs\t\tand\u{a0}nbsp\u{3000}ideographic space",
            "'''s ''ll' 'x '",
            "\r\n\r\n  \r\n x",
            "",
            " ",
            "🦀🦀 crab's 🦀",
        ];
        for pattern in [Pattern::Gpt2, Pattern::Gpt4] {
            for text in examples {
                assert_eq!(
                    pieces(pattern, text),
                    regex_pieces(pattern, text),
                    "{pattern:?} {text:?}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn scanners_match_the_regexes(indices in prop::collection::vec(0usize..1000, 0..40)) {
            let alphabet: Vec<char> = AWKWARD.chars().collect();
            let text: String = indices.iter().map(|&i| alphabet[i % alphabet.len()]).collect();
            for pattern in [Pattern::Gpt2, Pattern::Gpt4] {
                prop_assert_eq!(pieces(pattern, &text), regex_pieces(pattern, &text));
            }
        }

        #[test]
        fn scanners_match_the_regexes_on_any_text(text in any::<String>()) {
            for pattern in [Pattern::Gpt2, Pattern::Gpt4] {
                prop_assert_eq!(pieces(pattern, &text), regex_pieces(pattern, &text));
            }
        }
    }
}
