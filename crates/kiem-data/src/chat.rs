//! Fine-tuning data: conversations from JSONL in the formats users already have.
//!
//! - OpenAI: `{"messages": [{"role": "system"|"user"|"assistant", "content": "…"}]}`
//! - ShareGPT: `{"conversations": [{"from": "system"|"human"|"gpt", "value": "…"}]}`
//! - Alpaca: `{"instruction": "…", "input": "…", "output": "…"}`
//! - Prompt/completion (task fine-tuning): `{"prompt": "…", "completion": "…"}`

use std::io::BufRead;
use std::path::Path;

use kiem_tokenizer::chat::{validate, Message, Role};
use serde_json::Value;

use crate::corpus::{
    detect_format, next_line, too_long, BadRecords, Compression, InputFormat, Line,
    MAX_RECORD_BYTES,
};
use crate::{DataError, Location, Position, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChatFormat {
    /// Decide per record from its keys.
    #[default]
    Auto,
    OpenAi,
    ShareGpt,
    Alpaca,
    PromptCompletion,
}

impl std::str::FromStr for ChatFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "auto" => ChatFormat::Auto,
            "openai" | "messages" => ChatFormat::OpenAi,
            "sharegpt" => ChatFormat::ShareGpt,
            "alpaca" => ChatFormat::Alpaca,
            "prompt-completion" | "completion" => ChatFormat::PromptCompletion,
            other => return Err(format!("unknown chat format {other:?}: use auto, openai, sharegpt, alpaca or prompt-completion")),
        })
    }
}

fn detect(object: &serde_json::Map<String, Value>) -> std::result::Result<ChatFormat, String> {
    if object.contains_key("messages") {
        Ok(ChatFormat::OpenAi)
    } else if object.contains_key("conversations") {
        Ok(ChatFormat::ShareGpt)
    } else if object.contains_key("instruction") && object.contains_key("output") {
        Ok(ChatFormat::Alpaca)
    } else if object.contains_key("prompt") && object.contains_key("completion") {
        Ok(ChatFormat::PromptCompletion)
    } else {
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort();
        Err(format!(
            "cannot tell the format from the fields ({}): expected messages, conversations, \
             instruction+output or prompt+completion",
            keys.join(", ")
        ))
    }
}

fn string_field<'a>(
    object: &'a serde_json::Map<String, Value>,
    key: &str,
) -> std::result::Result<&'a str, String> {
    match object.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("field `{key}` must be a string")),
        None => Err(format!("missing field `{key}`")),
    }
}

fn turns(
    list: Option<&Value>,
    key: &str,
    role_key: &str,
    text_key: &str,
) -> std::result::Result<Vec<Message>, String> {
    let Some(Value::Array(items)) = list else {
        return Err(format!("field `{key}` must be an array"));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let object = item
                .as_object()
                .ok_or_else(|| format!("{key}[{i}] must be an object"))?;
            let role =
                match string_field(object, role_key).map_err(|e| format!("{key}[{i}]: {e}"))? {
                    "system" => Role::System,
                    "user" | "human" => Role::User,
                    "assistant" | "gpt" | "bot" | "model" => Role::Assistant,
                    other => return Err(format!("{key}[{i}]: unknown role {other:?}")),
                };
            let content = string_field(object, text_key).map_err(|e| format!("{key}[{i}]: {e}"))?;
            Ok(Message::new(role, content))
        })
        .collect()
}

/// Parses one record into a conversation (checked to alternate user/assistant turns).
pub fn parse_conversation(
    value: &Value,
    format: ChatFormat,
) -> std::result::Result<Vec<Message>, String> {
    let object = value.as_object().ok_or("expected a JSON object")?;
    let format = if format == ChatFormat::Auto {
        detect(object)?
    } else {
        format
    };
    let messages = match format {
        ChatFormat::OpenAi => turns(object.get("messages"), "messages", "role", "content")?,
        ChatFormat::ShareGpt => turns(
            object.get("conversations"),
            "conversations",
            "from",
            "value",
        )?,
        ChatFormat::Alpaca => {
            let instruction = string_field(object, "instruction")?;
            let input = match object.get("input") {
                None | Some(Value::Null) => "",
                Some(Value::String(s)) => s,
                Some(_) => return Err("field `input` must be a string".into()),
            };
            let user = if input.is_empty() {
                instruction.to_string()
            } else {
                format!("{instruction}\n\n{input}")
            };
            vec![
                Message::new(Role::User, user),
                Message::new(Role::Assistant, string_field(object, "output")?),
            ]
        }
        ChatFormat::PromptCompletion => vec![
            Message::new(Role::User, string_field(object, "prompt")?),
            Message::new(Role::Assistant, string_field(object, "completion")?),
        ],
        ChatFormat::Auto => unreachable!("resolved above"),
    };
    if !messages.iter().any(|m| m.role == Role::Assistant) {
        return Err("the conversation has no assistant reply to learn from".into());
    }
    validate(&messages).map_err(|e| e.to_string())?;
    Ok(messages)
}

/// A conversation and where it came from.
#[derive(Debug, Clone)]
pub struct Example {
    pub location: Location,
    pub messages: Vec<Message>,
}

/// Reads every conversation of a JSONL file (optionally .gz/.zst). Bad records are errors
/// naming file and line, or skipped and counted with `skip_bad_records`.
pub fn read_conversations(
    path: &Path,
    format: ChatFormat,
    skip_bad_records: bool,
    bad: &mut BadRecords,
) -> Result<Vec<Example>> {
    read_conversations_bounded(path, format, skip_bad_records, bad, MAX_RECORD_BYTES)
}

/// [`read_conversations`] with lines of at most `limit` bytes.
fn read_conversations_bounded(
    path: &Path,
    format: ChatFormat,
    skip_bad_records: bool,
    bad: &mut BadRecords,
    limit: usize,
) -> Result<Vec<Example>> {
    let compression = match detect_format(path) {
        Some((InputFormat::Jsonl, c)) => c,
        _ => {
            return Err(DataError::file(
                path,
                "conversations must be a .jsonl file (optionally .gz or .zst)",
            ));
        }
    };
    let file = std::fs::File::open(path).map_err(DataError::io(path))?;
    let mut reader: Box<dyn BufRead> = match compression {
        Compression::None => Box::new(std::io::BufReader::new(file)),
        Compression::Gzip => Box::new(std::io::BufReader::new(flate2::read::MultiGzDecoder::new(
            file,
        ))),
        Compression::Zstd => Box::new(std::io::BufReader::new(
            zstd::stream::read::Decoder::new(file).map_err(DataError::io(path))?,
        )),
    };
    let name: std::sync::Arc<Path> = std::sync::Arc::from(path);
    let mut out = Vec::new();
    let mut line = Vec::new();
    for i in 0.. {
        let read = next_line(&mut *reader, &mut line, limit).map_err(DataError::io(path))?;
        if read == Line::End {
            break;
        }
        if read == Line::Read && crate::corpus::is_blank_record(&line) {
            continue;
        }
        let location = Location {
            file: name.clone(),
            position: Position::Line(i as u64 + 1),
        };
        let text = match read {
            Line::TooLong => Err(too_long(limit)),
            _ => std::str::from_utf8(&line)
                .map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to() + 1)),
        };
        let parsed = text
            .and_then(|text| {
                serde_json::from_str::<Value>(text).map_err(|e| format!("malformed JSON: {e}"))
            })
            .and_then(|value| parse_conversation(&value, format));
        match parsed {
            Ok(messages) => out.push(Example { location, messages }),
            Err(message) => {
                bad.skip_or_fail(DataError::Record { location, message }, skip_bad_records)?
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_format_parses_to_the_same_conversation() {
        let expected = vec![
            Message::new(Role::User, "Hi?"),
            Message::new(Role::Assistant, "Hello."),
        ];
        for record in [
            json!({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}),
            json!({"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}),
            json!({"instruction": "Hi?", "input": "", "output": "Hello."}),
            json!({"prompt": "Hi?", "completion": "Hello."}),
        ] {
            assert_eq!(
                parse_conversation(&record, ChatFormat::Auto).unwrap(),
                expected,
                "{record}"
            );
        }
        let alpaca = json!({"instruction": "Translate", "input": "Hallo", "output": "Hello"});
        assert_eq!(
            parse_conversation(&alpaca, ChatFormat::Alpaca).unwrap()[0].content,
            "Translate\n\nHallo"
        );
        let system = json!({"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]});
        assert_eq!(
            parse_conversation(&system, ChatFormat::OpenAi)
                .unwrap()
                .len(),
            3
        );
    }

    #[test]
    fn bad_records_say_what_is_wrong() {
        let err = |v: Value, f: ChatFormat| parse_conversation(&v, f).unwrap_err();
        assert!(err(json!({"text": "x"}), ChatFormat::Auto).contains("cannot tell the format"));
        assert!(
            err(json!({"messages": [{"role": "user"}]}), ChatFormat::Auto)
                .contains("messages[0]: missing field `content`")
        );
        assert!(err(
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            ChatFormat::Auto
        )
        .contains("unknown role"));
        assert!(err(
            json!({"messages": [{"role": "user", "content": "x"}]}),
            ChatFormat::Auto
        )
        .contains("no assistant reply"));
        assert!(
            err(json!({"prompt": 3, "completion": "x"}), ChatFormat::Auto)
                .contains("must be a string")
        );
        assert!(err(json!({"messages": "x"}), ChatFormat::Auto).contains("must be an array"));
        let e = err(
            json!({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}),
            ChatFormat::Auto,
        );
        assert!(e.contains("alternate"), "{e}");
    }

    #[test]
    fn lines_of_any_white_space_are_blank() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.jsonl");
        let good = r#"{"prompt":"q","completion":"a"}"#;
        std::fs::write(&path, format!("\u{b}\n{good}\n\u{a0} \t\n\u{2028}\n{good}")).unwrap();
        let mut bad = BadRecords::default();
        let kept = read_conversations(&path, ChatFormat::Auto, false, &mut bad).unwrap();
        assert_eq!((kept.len(), bad.count), (2, 0));
    }

    #[test]
    fn files_report_file_and_line_or_skip_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.jsonl");
        std::fs::write(&path, "{\"prompt\":\"a\",\"completion\":\"b\"}\n\n{broken\n{\"prompt\":\"c\",\"completion\":\"d\"}\n").unwrap();
        let mut bad = BadRecords::default();
        let err = read_conversations(&path, ChatFormat::Auto, false, &mut bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chat.jsonl:3") && err.contains("malformed JSON"),
            "{err}"
        );
        let examples = read_conversations(&path, ChatFormat::Auto, true, &mut bad).unwrap();
        assert_eq!(examples.len(), 2);
        assert_eq!(bad.count, 1);
        assert_eq!(
            examples[1].location.to_string(),
            format!("{}:4", path.display())
        );
    }
}

#[cfg(test)]
mod bounded_tests {
    use super::*;

    #[test]
    fn a_line_over_the_limit_names_its_line_and_can_be_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.jsonl");
        let long = format!(
            "{{\"prompt\":\"{}\",\"completion\":\"b\"}}",
            "a".repeat(300)
        );
        std::fs::write(&path, format!("{{\"prompt\":\"a\",\"completion\":\"b\"}}\n{long}\n{{\"prompt\":\"c\",\"completion\":\"d\"}}")).unwrap();
        let mut bad = BadRecords::default();
        let err = read_conversations_bounded(&path, ChatFormat::Auto, false, &mut bad, 100)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("chat.jsonl:2") && err.contains("longer than 100 bytes"),
            "{err}"
        );
        let kept =
            read_conversations_bounded(&path, ChatFormat::Auto, true, &mut bad, 100).unwrap();
        assert_eq!(kept.len(), 2);
        assert_eq!(
            kept[1].location.to_string(),
            format!("{}:3", path.display())
        );
    }

    #[test]
    fn next_line_keeps_lines_up_to_the_limit() {
        let text = b"12345\nabcdef\r\n123456789\nlast-no-newline-long";
        let mut reader = std::io::BufReader::with_capacity(4, &text[..]);
        let mut line = Vec::new();
        let mut got = Vec::new();
        loop {
            match next_line(&mut reader, &mut line, 6).unwrap() {
                Line::End => break,
                Line::TooLong => got.push("<too long>".to_string()),
                Line::Read => got.push(String::from_utf8(line.clone()).unwrap()),
            }
        }
        assert_eq!(got, ["12345\n", "abcdef\r\n", "<too long>", "<too long>"]);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Any line of a conversation file, JSON or not, is a conversation or a bad record
        /// naming its line: never a panic, and skipping keeps the good ones in order.
        #[test]
        fn any_lines_parse_or_are_counted(
            lines in proptest::collection::vec(
                prop_oneof![
                    Just(r#"{"prompt":"q","completion":"a"}"#.to_string()),
                    Just(r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#.to_string()),
                    r#"\{"(messages|conversations|prompt|instruction)":[^\n]{0,30}"#,
                    "[^\n]{0,40}",
                ],
                0..12,
            )
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.jsonl");
            std::fs::write(&path, lines.join("\n")).unwrap();
            let mut bad = BadRecords::default();
            let kept = read_conversations(&path, ChatFormat::Auto, true, &mut bad).unwrap();
            let blank = lines.iter().filter(|l| l.trim().is_empty()).count();
            prop_assert_eq!(kept.len() + bad.count as usize + blank, lines.len());
            let mut fresh = BadRecords::default();
            match read_conversations(&path, ChatFormat::Auto, false, &mut fresh) {
                Ok(all) => prop_assert_eq!(all.len(), kept.len()),
                Err(e) => prop_assert!(e.to_string().contains("c.jsonl:"), "{}", e),
            }
        }
    }
}
