//! Hugging Face chat templates: Jinja, rendered the way `transformers` renders them
//! (`apply_chat_template`): trim_blocks and lstrip_blocks on, loop controls, Python string and
//! dict methods, `raise_exception`, `strftime_now`, a `tojson` that is Python's `json.dumps`,
//! the special-token texts and `add_generation_prompt` passed in, `tools` and `documents` none.
//!
//! `{% generation %} … {% endgeneration %}` blocks (how a template marks what the assistant
//! says, for `return_assistant_tokens_mask`) become filter blocks that wrap their output in two
//! Unicode noncharacters; [`JinjaTemplate::render`] removes them and returns where they were.

use std::fmt::Write as _;
use std::ops::Range;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use super::Message;

const NAME: &str = "chat_template";
/// Written around each `{% generation %}` block's output; noncharacters, so no text has them.
const SPAN_START: char = '\u{FDD0}';
const SPAN_END: char = '\u{FDD1}';
/// Most template instructions one rendering may run: a template that loops forever is stopped.
const FUEL: u64 = 20_000_000;

/// A compiled chat template.
pub(crate) struct JinjaTemplate {
    env: Environment<'static>,
    /// Whether the template marks assistant text with `{% generation %}`.
    pub(crate) has_generation: bool,
    /// `bos_token`, `eos_token` … as the model's `tokenizer_config.json` spells them.
    token_texts: Vec<(String, String)>,
    /// The token that ends an assistant turn, found on first use (see `chat::end_of_turn`).
    pub(crate) end_of_turn: std::sync::OnceLock<Option<u32>>,
}

impl std::fmt::Debug for JinjaTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JinjaTemplate")
            .field("has_generation", &self.has_generation)
            .finish()
    }
}

impl JinjaTemplate {
    pub(crate) fn compile(source: &str, token_texts: Vec<(String, String)>) -> Result<Self, Error> {
        let (source, has_generation) = generation_as_filter(source);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_fuel(Some(FUEL));
        env.set_auto_escape_callback(|_| minijinja::AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_filter("kiem_generation", |text: String| {
            format!("{SPAN_START}{text}{SPAN_END}")
        });
        env.add_template_owned(NAME, source)?;
        Ok(Self {
            env,
            has_generation,
            token_texts,
            end_of_turn: std::sync::OnceLock::new(),
        })
    }

    /// The rendered text, and the byte ranges of its `{% generation %}` blocks.
    pub(crate) fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<(String, Vec<Range<usize>>), Error> {
        let mut context: Vec<(String, Value)> = self
            .token_texts
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        context.extend([
            ("messages".into(), Value::from_serialize(messages)),
            ("tools".into(), Value::from(())),
            ("documents".into(), Value::from(())),
            (
                "add_generation_prompt".into(),
                Value::from(add_generation_prompt),
            ),
        ]);
        let context: Value = context.into_iter().collect();
        let marked = self.env.get_template(NAME)?.render(context)?;
        let mut text = String::with_capacity(marked.len());
        let (mut spans, mut depth, mut start) = (Vec::new(), 0usize, 0);
        for c in marked.chars() {
            match c {
                SPAN_START => {
                    if depth == 0 {
                        start = text.len();
                    }
                    depth += 1;
                }
                SPAN_END => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 && text.len() > start {
                        spans.push(start..text.len());
                    }
                }
                c => text.push(c),
            }
        }
        Ok((text, spans))
    }
}

/// Whether a message text holds the characters that mark generation blocks (it must not).
pub(crate) fn has_span_markers(text: &str) -> bool {
    text.contains([SPAN_START, SPAN_END])
}

/// Rewrites `{% generation %}` / `{% endgeneration %}` (with any whitespace control) into a
/// filter block, which renders its body once and hands it to `kiem_generation`.
fn generation_as_filter(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(at) = rest.find("{%") {
        out.push_str(&rest[..at]);
        let tag = &rest[at..];
        let end = tag.find("%}").map(|e| e + 2);
        let rewritten = end.and_then(|end| {
            let inner = &tag[2..end - 2];
            let (open, body) = match inner.strip_prefix(['-', '+']) {
                Some(b) => (&inner[..1], b),
                None => ("", inner),
            };
            let (body, close) = match body.strip_suffix(['-', '+']) {
                Some(b) => (b, &body[body.len() - 1..]),
                None => (body, ""),
            };
            let word = match body.trim() {
                "generation" => "filter kiem_generation",
                "endgeneration" => "endfilter",
                _ => return None,
            };
            Some((format!("{{%{open} {word} {close}%}}"), end))
        });
        match rewritten {
            Some((tag, end)) => {
                found = true;
                out.push_str(&tag);
                rest = &rest[at + end..];
            }
            None => {
                out.push_str("{%");
                rest = &rest[at + 2..];
            }
        }
    }
    out.push_str(rest);
    (out, found)
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `datetime.now().strftime(format)`, in local time.
fn strftime_now(format: String) -> Result<String, Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item<'_>> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: bad format {format:?}"),
        ));
    }
    let mut out = String::new();
    write!(
        out,
        "{}",
        chrono::Local::now().format_with_items(items.iter())
    )
    .map_err(|_| Error::new(ErrorKind::InvalidOperation, "strftime_now: cannot format"))?;
    Ok(out)
}

/// `transformers`' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, with those keyword arguments.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<String, Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match (v.as_i64(), v.as_str()) {
            (Some(n), _) => " ".repeat(n.max(0) as usize),
            (_, Some(s)) => s.to_string(),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be a number or a string",
                ))
            }
        }),
    };
    let (item, key) = match separators {
        Some(v) if !v.is_none() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => (
                    a.as_str().unwrap_or_default().to_string(),
                    b.as_str().unwrap_or_default().to_string(),
                ),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        // Python's defaults: no space before a newline when indenting.
        _ if indent.is_some() => (",".into(), ": ".into()),
        _ => (", ".into(), ": ".into()),
    };
    let style = JsonStyle {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item,
        key,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(value, 0, &mut out)?;
    Ok(out)
}

struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item: String,
    key: String,
    sort_keys: bool,
}

impl JsonStyle {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(indent);
            }
        }
    }

    fn write(&self, value: &Value, depth: usize, out: &mut String) -> Result<(), Error> {
        match value.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if value.is_integer() {
                    out.push_str(&value.to_string());
                } else {
                    out.push_str(&python_float(f64::try_from(value.clone())?));
                }
            }
            ValueKind::String | ValueKind::Plain => self.string(&value.to_string(), out),
            ValueKind::Map => {
                let mut keys: Vec<Value> = value.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                if keys.is_empty() {
                    out.push_str("{}");
                    return Ok(());
                }
                out.push('{');
                for (i, key) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(depth + 1, out);
                    self.string(&key.to_string(), out);
                    out.push_str(&self.key);
                    self.write(&value.get_item(key)?, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = value.try_iter()?.collect();
                if items.is_empty() {
                    out.push_str("[]");
                    return Ok(());
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(depth + 1, out);
                    self.write(item, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push(']');
            }
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: cannot write a {other} value"),
                ))
            }
        }
        Ok(())
    }

    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{unit:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A float as Python's `repr` writes it (`1.0`, `0.1`, `1e+20`, `1e-05`).
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let magnitude = x.abs();
    if x == 0.0 || (1e-4..1e16).contains(&magnitude) {
        let s = format!("{x}");
        return if s.contains('.') { s } else { format!("{s}.0") };
    }
    // Rust writes `1e20` / `1.5e-5`; Python `1e+20` / `1.5e-05`.
    let s = format!("{x:e}");
    let (mantissa, exponent) = s.split_once('e').unwrap_or((&s, "0"));
    let (sign, digits) = match exponent.strip_prefix('-') {
        Some(d) => ('-', d),
        None => ('+', exponent),
    };
    format!("{mantissa}e{sign}{digits:0>2}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Role;

    fn render(source: &str, messages: &[Message], gen: bool) -> String {
        JinjaTemplate::compile(source, vec![("bos_token".into(), "<s>".into())])
            .unwrap()
            .render(messages, gen)
            .unwrap()
            .0
    }

    #[test]
    fn python_json_formatting() {
        let t = r#"{% set x = {"b": [1, 2.5, 1e20, 1e-5, true, none], "a": s, "c": {}} %}{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(ensure_ascii=true, sort_keys=true, separators=(",", ":")) }}"#;
        let mut env = Environment::new();
        env.add_filter("tojson", tojson);
        let out = env
            .render_str(t, minijinja::context! { s => "é\"\n\u{1}😀" })
            .unwrap();
        let expected = [
            r#"{"b": [1, 2.5, 1e+20, 1e-05, true, null], "a": "é\"\n\u0001😀", "c": {}}"#,
            "{\n  \"b\": [\n    1,\n    2.5,\n    1e+20,\n    1e-05,\n    true,\n    null\n  ],\n  \"a\": \"é\\\"\\n\\u0001😀\",\n  \"c\": {}\n}",
            r#"{"a":"\u00e9\"\n\u0001\ud83d\ude00","b":[1,2.5,1e+20,1e-05,true,null],"c":{}}"#,
        ];
        assert_eq!(out, expected.join("|"));
    }

    #[test]
    fn generation_blocks_become_spans_and_whitespace_control_is_kept() {
        let (s, found) = generation_as_filter("a{%- generation -%}b{% endgeneration %}{% if x %}");
        assert!(found);
        assert_eq!(
            s,
            "a{%- filter kiem_generation -%}b{% endfilter %}{% if x %}"
        );
        let t = "{% for m in messages %}[{{ m.role }}]{% if m.role == 'assistant' %}{% generation %}{{ m.content }}</t>{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}";
        let messages = [
            Message::new(Role::User, "hi"),
            Message::new(Role::Assistant, "yo"),
        ];
        let (text, spans) = JinjaTemplate::compile(t, vec![])
            .unwrap()
            .render(&messages, false)
            .unwrap();
        assert_eq!(
            text, "[user]hi[assistant]yo</t>",
            "trim_blocks eats the newline after a tag"
        );
        assert_eq!(spans.len(), 1);
        assert_eq!(&text[spans[0].clone()], "yo</t>");
    }

    #[test]
    fn python_methods_loop_controls_and_errors() {
        let t = "{{ bos_token }}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content.strip().upper() }}{% if m['content'].startswith(' ') %}!{% endif %}{% endfor %}";
        let messages = [
            Message::new(Role::User, "  hey "),
            Message::new(Role::Assistant, "no"),
        ];
        assert_eq!(render(t, &messages, false), "<s>HEY!");
        let t = "{% if messages[0].role != 'system' %}{{ raise_exception('need a system turn') }}{% endif %}";
        let err = JinjaTemplate::compile(t, vec![])
            .unwrap()
            .render(&messages, false)
            .unwrap_err();
        assert!(err.to_string().contains("need a system turn"), "{err}");
        assert!(render("{{ strftime_now('%Y') }}", &messages, false).len() == 4);
        assert!(
            render(
                "{% if tools is none and documents is none %}ok{% endif %}",
                &messages,
                true
            ) == "ok"
        );
    }

    #[test]
    fn runaway_templates_stop() {
        let t = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let err = JinjaTemplate::compile(t, vec![])
            .unwrap()
            .render(&[], false)
            .unwrap_err();
        assert!(err.to_string().contains("fuel"), "{err}");
    }
}
