//! Turning a stream of token ids into text as it is generated: only whole UTF-8 characters are
//! emitted, and text that could be the start of a stop string is held back until it is clear.

use crate::Tokenizer;

pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    /// Bytes of an incomplete character at the end.
    pending: Vec<u8>,
    /// Decoded text so far.
    text: String,
    /// Bytes of `text` already returned.
    shown: usize,
    /// Bytes of `text` the stop matchers have seen.
    scanned: usize,
    stops: Vec<StopMatcher>,
}

/// A stop string with its Knuth–Morris–Pratt table and how much of it the text so far ends
/// with, so each decoded byte is looked at once (amortized) whatever the stop's length.
struct StopMatcher {
    pattern: Vec<u8>,
    /// `fallback[i]`: the longest proper prefix of `pattern[..=i]` that is also its suffix.
    fallback: Vec<usize>,
    /// Bytes at the end of the text scanned so far that begin the pattern.
    matched: usize,
}

impl StopMatcher {
    fn new(stop: &str) -> Self {
        let pattern = stop.as_bytes().to_vec();
        let mut fallback = vec![0; pattern.len()];
        let mut k = 0;
        for i in 1..pattern.len() {
            while k > 0 && pattern[i] != pattern[k] {
                k = fallback[k - 1];
            }
            if pattern[i] == pattern[k] {
                k += 1;
            }
            fallback[i] = k;
        }
        Self {
            pattern,
            fallback,
            matched: 0,
        }
    }

    /// Continues over `more` text: the offset in `more` where the stop string ends, if it
    /// completes there (the text and the stop are UTF-8, so where it starts is a character
    /// boundary, as is where a held-back start begins).
    fn feed(&mut self, more: &[u8]) -> Option<usize> {
        let mut k = self.matched;
        for (i, &b) in more.iter().enumerate() {
            while k > 0 && b != self.pattern[k] {
                k = self.fallback[k - 1];
            }
            if b == self.pattern[k] {
                k += 1;
            }
            if k == self.pattern.len() {
                self.matched = k;
                return Some(i + 1);
            }
        }
        self.matched = k;
        None
    }
}

/// What [`StreamDecoder::push`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// New text to show.
    pub text: String,
    /// A stop string appeared; `text` ends right before it and generation should end.
    pub stopped: bool,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer, stops: &[String]) -> Self {
        Self {
            tokenizer,
            pending: Vec::new(),
            text: String::new(),
            shown: 0,
            scanned: 0,
            stops: stops
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| StopMatcher::new(s))
                .collect(),
        }
    }

    /// All text decoded so far (including any held back).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Adds one token and returns the text that can now be shown. Special tokens (chat
    /// markers, `<|bos|>`) are control signals, not text: they show nothing.
    pub fn push(&mut self, id: u32) -> Chunk {
        if !self.tokenizer.is_special(id) {
            self.pending.extend(self.tokenizer.decode_bytes(&[id]));
        }
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    self.text.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    self.text.push_str(
                        std::str::from_utf8(&self.pending[..valid]).expect("valid prefix"),
                    );
                    match e.error_len() {
                        // Not UTF-8 at all: show a replacement character and go on.
                        Some(bad) => {
                            self.text.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                        // An incomplete character: wait for the next token.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        // Each stop matcher continues over this token's new text only.
        let new = &self.text.as_bytes()[self.scanned..];
        let first_stop = self
            .stops
            .iter_mut()
            .filter_map(|s| {
                let len = s.pattern.len();
                s.feed(new).map(|end| self.scanned + end - len)
            })
            .min();
        self.scanned = self.text.len();
        if let Some(at) = first_stop {
            let fresh = &self.text[self.shown..];
            let chunk = fresh[..at.saturating_sub(self.shown)].to_string();
            self.shown = self.text.len();
            // Nothing after a stop string is shown, not even an unfinished character.
            self.pending.clear();
            return Chunk {
                text: chunk,
                stopped: true,
            };
        }
        // Hold back the longest tail that is the start of a stop string.
        let held = self.stops.iter().map(|s| s.matched).max().unwrap_or(0);
        let safe = (self.text.len() - held).max(self.shown);
        let chunk = self.text[self.shown..safe].to_string();
        self.shown = safe;
        Chunk {
            text: chunk,
            stopped: false,
        }
    }

    /// Text still held back once generation ends (a partial stop string, or bytes of an
    /// unfinished character shown as U+FFFD).
    pub fn finish(&mut self) -> String {
        let mut rest = self.text[self.shown..].to_string();
        if !self.pending.is_empty() {
            rest.push(char::REPLACEMENT_CHARACTER);
            self.pending.clear();
        }
        self.shown = self.text.len();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(text: &str, stops: &[&str]) -> (Vec<String>, bool, String) {
        let tok = Tokenizer::gpt2();
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut dec = StreamDecoder::new(&tok, &stops);
        let mut chunks = Vec::new();
        for id in tok.encode(text) {
            let c = dec.push(id);
            chunks.push(c.text);
            if c.stopped {
                return (chunks, true, String::new());
            }
        }
        (chunks, false, dec.finish())
    }

    #[test]
    fn streams_whole_characters_and_reassembles_the_text() {
        let text = "héllo 🦀 wörld, 中文!";
        let (chunks, stopped, rest) = stream(text, &[]);
        assert!(!stopped);
        assert_eq!(chunks.concat() + &rest, text);
        // GPT-2 splits the crab into byte tokens: the first ones show nothing (half a
        // character is held back), the last shows it whole, and no byte is lost or replaced.
        assert!(Tokenizer::gpt2().encode("🦀").len() > 1);
        assert!(chunks.iter().any(String::is_empty));
        assert!(chunks.iter().any(|c| c.contains('🦀')));
        assert!(!chunks.concat().contains(char::REPLACEMENT_CHARACTER));
    }

    #[test]
    fn stop_strings_cut_the_text_and_partial_matches_are_held_back() {
        let (chunks, stopped, _) = stream("Answer: yes\nUser: next question", &["\nUser:"]);
        assert!(stopped);
        assert_eq!(chunks.concat(), "Answer: yes");
        let (chunks, stopped, rest) = stream("a line\nUs", &["\nUser:"]);
        assert!(!stopped);
        assert_eq!(
            chunks.concat(),
            "a line",
            "the possible start of a stop string waits"
        );
        assert_eq!(rest, "\nUs", "and is released at the end");
    }

    #[test]
    fn self_overlapping_stops_and_tails_are_found() {
        // "aab" inside "aaab" (the naive restart would miss it); the tail "aa" of "xaa" may
        // start "aab" and waits.
        let (chunks, stopped, _) = stream("xaaab tail", &["aab"]);
        assert!(stopped);
        assert_eq!(chunks.concat(), "xa");
        let (chunks, stopped, rest) = stream("xaa", &["aab", "q"]);
        assert!(!stopped);
        assert_eq!((chunks.concat().as_str(), rest.as_str()), ("x", "aa"));
    }

    #[test]
    fn long_stop_strings_cost_linear_time() {
        // A 100 kB stop string that the text keeps almost matching: the former hold-back check
        // was quadratic in its length on every token.
        let stop = "ab".repeat(50_000) + "!";
        let text = "ab".repeat(20_000);
        // (No timing assertion: a quadratic regression shows as this test hanging.)
        let (chunks, stopped, rest) = stream(&text, &[&stop]);
        assert!(!stopped);
        assert_eq!(chunks.concat() + &rest, text);
        assert_eq!(
            chunks.concat(),
            "",
            "all of it may still start the stop string"
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Whatever the text and stop strings, generation stops at the first token after which
        /// the text holds a stop string, and shows the text before the earliest such
        /// occurrence (all of it when none occurs), exactly as a plain search says.
        #[test]
        fn output_is_the_text_before_the_first_stop(
            text in "[ab é\n]{0,60}",
            stops in proptest::collection::vec("[ab é]{1,5}", 0..4),
        ) {
            static GPT2: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
            let tok = GPT2.get_or_init(Tokenizer::gpt2);
            let mut dec = StreamDecoder::new(tok, &stops);
            let mut shown = String::new();
            let mut stopped = false;
            for id in tok.encode(&text) {
                let chunk = dec.push(id);
                shown.push_str(&chunk.text);
                if chunk.stopped {
                    stopped = true;
                    break;
                }
            }
            if !stopped {
                shown.push_str(&dec.finish());
            }
            let mut so_far = Vec::new();
            let mut first = None;
            for id in tok.encode(&text) {
                so_far.extend(tok.decode_bytes(&[id]));
                first = stops
                    .iter()
                    .filter_map(|s| so_far.windows(s.len()).position(|w| w == s.as_bytes()))
                    .min();
                if first.is_some() {
                    break;
                }
            }
            match first {
                Some(at) => {
                    prop_assert!(stopped);
                    prop_assert_eq!(shown, &text[..at]);
                }
                None => {
                    prop_assert!(!stopped);
                    prop_assert_eq!(shown, text);
                }
            }
        }
    }
}
