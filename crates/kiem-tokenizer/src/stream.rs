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
    stops: Vec<String>,
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
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
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
        let fresh = &self.text[self.shown..];
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| fresh.find(s.as_str()))
            .min()
        {
            let chunk = fresh[..at].to_string();
            self.shown = self.text.len();
            // Nothing after a stop string is shown, not even an unfinished character.
            self.pending.clear();
            return Chunk {
                text: chunk,
                stopped: true,
            };
        }
        // Hold back the longest tail that is the start of a stop string.
        let mut safe = self.text.len();
        for stop in &self.stops {
            let longest = stop.len().min(fresh.len());
            for len in (1..=longest).rev() {
                let tail = self.text.len() - len;
                if self.text.is_char_boundary(tail) && stop.starts_with(&self.text[tail..]) {
                    safe = safe.min(tail);
                    break;
                }
            }
        }
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
        // GPT-2 splits the crab into byte tokens: no chunk holds half a character.
        assert!(chunks
            .iter()
            .all(|c| std::str::from_utf8(c.as_bytes()).is_ok()));
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
}
