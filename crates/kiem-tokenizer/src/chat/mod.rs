//! Chat formats: one function renders a conversation to token ids and a loss mask, for training
//! and for prompts at inference, so the two can never disagree. A model with a Hugging Face chat
//! template (an imported instruct model) is rendered with it (see [`jinja`]); models kiem creates
//! use kiem's typed format (DESIGN.md decision 5):
//!
//! ```text
//! <|bos|> <|system_start|> … <|system_end|> <|user_start|> … <|user_end|>
//!         <|assistant_start|> … <|assistant_end|> <|user_start|> …
//! ```
//!
//! Each message's text is encoded on its own, so rendering the first k messages gives a prefix
//! of rendering them all. Assistant text and its `<|assistant_end|>` are trained (the model must
//! learn to end its turn); everything else is context, unless `TrainOn::All`.

pub(crate) mod jinja;

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::{Tokenizer, TokenizerError};
use jinja::JinjaTemplate;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    fn markers(self) -> (&'static str, &'static str) {
        match self {
            Role::System => ("<|system_start|>", "<|system_end|>"),
            Role::User => ("<|user_start|>", "<|user_end|>"),
            Role::Assistant => ("<|assistant_start|>", "<|assistant_end|>"),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// Which tokens are trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrainOn {
    /// Assistant replies and their end-of-turn token.
    #[default]
    Assistant,
    /// Every token after `<|bos|>`.
    All,
}

/// A rendered conversation: `trained[i]` says whether token `i` is a training target (the loss
/// of predicting it from the tokens before it counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub ids: Vec<u32>,
    pub trained: Vec<bool>,
}

/// The chat special tokens of a tokenizer.
#[derive(Debug, Clone, Copy)]
struct ChatIds {
    bos: u32,
    start: [u32; 3],
    end: [u32; 3],
}

fn role_index(role: Role) -> usize {
    match role {
        Role::System => 0,
        Role::User => 1,
        Role::Assistant => 2,
    }
}

fn chat_ids(tokenizer: &Tokenizer) -> Result<ChatIds, TokenizerError> {
    let id = |name: &str| {
        tokenizer.token_to_id(name).ok_or_else(|| {
            TokenizerError::Chat(format!(
                "the tokenizer has no {name} token; fine-tuning adds the chat tokens to a base tokenizer"
            ))
        })
    };
    let mut start = [0; 3];
    let mut end = [0; 3];
    for role in [Role::System, Role::User, Role::Assistant] {
        let (s, e) = role.markers();
        start[role_index(role)] = id(s)?;
        end[role_index(role)] = id(e)?;
    }
    Ok(ChatIds {
        bos: tokenizer.bos_id(),
        start,
        end,
    })
}

/// Checks the shape of a conversation: an optional leading system message, then user and
/// assistant turns alternating, starting with the user.
pub fn validate(messages: &[Message]) -> Result<(), TokenizerError> {
    let bad = |m: String| Err(TokenizerError::Chat(m));
    let mut expected = Role::User;
    for (i, message) in messages.iter().enumerate() {
        if message.role == Role::System {
            if i != 0 {
                return bad(format!(
                    "message {}: a system message may only come first",
                    i + 1
                ));
            }
            continue;
        }
        if message.role != expected {
            return bad(format!(
                "message {} is from the {} but the {} should speak (turns alternate, starting with the user)",
                i + 1,
                message.role,
                expected
            ));
        }
        expected = if expected == Role::User {
            Role::Assistant
        } else {
            Role::User
        };
    }
    Ok(())
}

/// Renders a whole conversation for training: with the model's Hugging Face chat template when
/// it has one, else in kiem's typed format.
pub fn render(
    tokenizer: &Tokenizer,
    messages: &[Message],
    train_on: TrainOn,
) -> Result<Rendered, TokenizerError> {
    validate(messages)?;
    if let Some(template) = tokenizer.jinja_template()? {
        return render_with_template(tokenizer, template, messages, train_on);
    }
    let ids = chat_ids(tokenizer)?;
    let mut out = Rendered {
        ids: vec![ids.bos],
        trained: vec![false],
    };
    for message in messages {
        let r = role_index(message.role);
        let assistant = message.role == Role::Assistant;
        let train_body = assistant || train_on == TrainOn::All;
        out.ids.push(ids.start[r]);
        out.trained.push(train_on == TrainOn::All);
        let body = tokenizer.encode(&message.content);
        out.trained
            .extend(std::iter::repeat_n(train_body, body.len()));
        out.ids.extend(body);
        out.ids.push(ids.end[r]);
        out.trained.push(train_body);
    }
    Ok(out)
}

/// Renders the prompt for the assistant's next reply: the conversation so far (ending with a
/// user message) and the start of an assistant turn (the template's generation prompt, or
/// `<|assistant_start|>`).
pub fn render_prompt(
    tokenizer: &Tokenizer,
    messages: &[Message],
) -> Result<Vec<u32>, TokenizerError> {
    if messages.last().map(|m| m.role) != Some(Role::User) {
        return Err(TokenizerError::Chat(
            "a prompt must end with a user message".into(),
        ));
    }
    if let Some(template) = tokenizer.jinja_template()? {
        validate(messages)?;
        let text = render_text(tokenizer, template, messages, true)?.0;
        return Ok(tokenizer.encode_chat(&text)?.ids);
    }
    let mut ids = render(tokenizer, messages, TrainOn::Assistant)?.ids;
    ids.push(chat_ids(tokenizer)?.start[role_index(Role::Assistant)]);
    Ok(ids)
}

/// A Jinja chat template (Hugging Face `tokenizer_config.json`) that renders what [`render`] and
/// [`render_prompt`] render: `bos_token`, then each message between its role's markers, then
/// `<|assistant_start|>` with `add_generation_prompt`. Like [`validate`], it accepts a system
/// message only first; `developer` is read as `system`, as `kiem serve` does.
pub const CHAT_TEMPLATE: &str = include_str!("../../assets/chat_template.jinja");

/// The token that ends an assistant turn (generation stops there): `<|assistant_end|>` in
/// kiem's format; with a Hugging Face template, the first special token the template writes after
/// an assistant reply (`<|im_end|>`, `<|eot_id|>`, `</s>` …), else the model's `eos_token`.
pub fn end_of_turn(tokenizer: &Tokenizer) -> Result<u32, TokenizerError> {
    let Some(template) = tokenizer.jinja_template()? else {
        return Ok(chat_ids(tokenizer)?.end[role_index(Role::Assistant)]);
    };
    template
        .end_of_turn
        .get_or_init(|| probe_end_of_turn(tokenizer, template))
        .or(tokenizer.eos_id())
        .ok_or_else(|| {
            TokenizerError::Chat(format!(
                "{}: cannot tell which token ends an assistant turn (the template writes no special \
                 token after a reply and the tokenizer names no eos_token)",
                template_origin(tokenizer)
            ))
        })
}

/// The ids that end an assistant reply: the model's own end ids (`eos_ids`), its end-of-turn
/// token, and any other special token (a model that starts another turn or document has
/// finished its reply).
pub fn reply_stop_ids(
    tokenizer: &Tokenizer,
    mut eos_ids: Vec<u32>,
) -> Result<Vec<u32>, TokenizerError> {
    eos_ids.push(end_of_turn(tokenizer)?);
    eos_ids.extend((0..tokenizer.vocab_size() as u32).filter(|&id| tokenizer.is_special(id)));
    eos_ids.sort_unstable();
    eos_ids.dedup();
    Ok(eos_ids)
}

/// Whether chats with this tokenizer use kiem's typed format (rather than a Hugging Face
/// template): then fine-tuning adds kiem's chat tokens to a base tokenizer.
pub fn uses_typed_format(tokenizer: &Tokenizer) -> Result<bool, TokenizerError> {
    Ok(tokenizer.jinja_template()?.is_none())
}

/// The tokenizer fine-tuning renders conversations with: the model's own when it has a chat
/// template (an imported instruct model keeps its format), else a copy with kiem's chat tokens
/// added where missing (their names are returned; the model's embedding must grow to match).
pub fn for_fine_tuning(tokenizer: Tokenizer) -> Result<(Tokenizer, Vec<String>), TokenizerError> {
    if !uses_typed_format(&tokenizer)? {
        return Ok((tokenizer, Vec::new()));
    }
    let missing: Vec<&str> = crate::SPECIAL_TOKENS[1..]
        .iter()
        .copied()
        .filter(|t| tokenizer.token_to_id(t).is_none())
        .collect();
    if missing.is_empty() {
        return Ok((tokenizer, Vec::new()));
    }
    let grown = tokenizer.with_special_tokens(&missing)?;
    Ok((grown, missing.iter().map(|t| t.to_string()).collect()))
}

fn template_origin(tokenizer: &Tokenizer) -> String {
    tokenizer
        .chat_template()
        .map(|t| format!("chat template {}", t.origin.display()))
        .unwrap_or_else(|| "chat template".into())
}

/// Renders with the template; a failure names the first message whose rendering fails.
fn render_text(
    tokenizer: &Tokenizer,
    template: &JinjaTemplate,
    messages: &[Message],
    add_generation_prompt: bool,
) -> Result<(String, Vec<Range<usize>>), TokenizerError> {
    if let Some(i) = messages
        .iter()
        .position(|m| jinja::has_span_markers(&m.content))
    {
        return Err(TokenizerError::Chat(format!(
            "message {}: contains U+FDD0 or U+FDD1, which are not text",
            i + 1
        )));
    }
    template
        .render(messages, add_generation_prompt)
        .map_err(|error| {
            let failing =
                (1..=messages.len()).find(|&k| template.render(&messages[..k], false).is_err());
            let place = match failing {
                Some(k) => format!("message {} ({})", k, messages[k - 1].role),
                None if add_generation_prompt => "the generation prompt".into(),
                None => "the conversation".into(),
            };
            TokenizerError::Chat(format!(
                "{} cannot render {place}: {error}",
                template_origin(tokenizer)
            ))
        })
}

/// A conversation rendered with a Hugging Face template. The trained tokens are those that
/// overlap an assistant span (as `transformers`' assistant mask marks them): the template's
/// `{% generation %}` blocks, or else each reply from the end of the generation prompt to its
/// end-of-turn token, found by rendering prefixes of the conversation.
fn render_with_template(
    tokenizer: &Tokenizer,
    template: &JinjaTemplate,
    messages: &[Message],
    train_on: TrainOn,
) -> Result<Rendered, TokenizerError> {
    let (text, marked) = render_text(tokenizer, template, messages, false)?;
    let spans = match train_on {
        TrainOn::All => Vec::new(),
        TrainOn::Assistant if template.has_generation => marked,
        TrainOn::Assistant => spans_by_prefix(tokenizer, template, messages, &text)?,
    };
    let crate::ChatEncoding { ids, offsets } = tokenizer.encode_chat(&text)?;
    let trained = offsets
        .iter()
        .enumerate()
        .map(|(i, &(start, end))| match train_on {
            TrainOn::All => i > 0,
            TrainOn::Assistant => spans.iter().any(|s| start < s.end && s.start < end),
        })
        .collect();
    Ok(Rendered { ids, trained })
}

fn spans_by_prefix(
    tokenizer: &Tokenizer,
    template: &JinjaTemplate,
    messages: &[Message],
    full: &str,
) -> Result<Vec<Range<usize>>, TokenizerError> {
    let end_text = end_of_turn(tokenizer)
        .ok()
        .and_then(|id| tokenizer.id_to_token(id));
    let mut spans = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if message.role != Role::Assistant {
            continue;
        }
        let before = render_text(tokenizer, template, &messages[..i], true)?.0;
        let after = render_text(tokenizer, template, &messages[..=i], false)?.0;
        if !after.starts_with(&before) || !full.starts_with(&after) {
            return Err(TokenizerError::Chat(format!(
                "{} is not prefix-stable at message {}: rendering the conversation up to it does \
                 not begin the same way as rendering it whole (the template rewrites earlier turns \
                 or writes a different generation prompt), so kiem cannot tell which tokens are the \
                 assistant's. Add {{% generation %}} markers to the template, or train with \
                 --train-on all",
                template_origin(tokenizer),
                i + 1
            )));
        }
        let reply = &after[before.len()..];
        let end = end_text
            .as_deref()
            .and_then(|t| reply.rfind(t).map(|at| at + t.len()))
            .unwrap_or(reply.len());
        spans.push(before.len()..before.len() + end);
    }
    Ok(spans)
}

/// Renders a user turn and an assistant reply, and takes the first special token written after
/// the reply.
fn probe_end_of_turn(tokenizer: &Tokenizer, template: &JinjaTemplate) -> Option<u32> {
    const PROBE: &str = "kiem probe reply";
    let conversation = [
        Message::new(Role::User, "Hello"),
        Message::new(Role::Assistant, PROBE),
    ];
    let (text, _) = template.render(&conversation, false).ok()?;
    let tail = &text[text.rfind(PROBE)? + PROBE.len()..];
    let encoding = tokenizer.encode_chat(tail).ok()?;
    encoding
        .ids
        .into_iter()
        .find(|&id| tokenizer.is_special(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        crate::train(
            ["hello there how are you doing today".to_string()].into_iter(),
            &crate::TrainOptions {
                vocab_size: 300,
                min_frequency: 0,
                show_progress: false,
            },
        )
        .unwrap()
    }

    fn conversation() -> Vec<Message> {
        vec![
            Message::new(Role::System, "Be brief."),
            Message::new(Role::User, "hello there"),
            Message::new(Role::Assistant, "how are you"),
            Message::new(Role::User, "doing today?"),
            Message::new(Role::Assistant, "fine"),
        ]
    }

    #[test]
    fn assistant_turns_and_their_end_token_are_trained() {
        let tok = tokenizer();
        let r = render(&tok, &conversation(), TrainOn::Assistant).unwrap();
        assert_eq!(r.ids.len(), r.trained.len());
        let trained_text: Vec<String> = r
            .ids
            .iter()
            .zip(&r.trained)
            .filter(|(_, &t)| t)
            .map(|(&id, _)| String::from_utf8(tok.decode_bytes(&[id])).unwrap())
            .collect();
        assert_eq!(
            trained_text.concat(),
            "how are you<|assistant_end|>fine<|assistant_end|>"
        );
        assert_eq!(r.ids[0], tok.bos_id());
        let all = render(&tok, &conversation(), TrainOn::All).unwrap();
        assert!(all.trained[1..].iter().all(|&t| t));
        assert!(!all.trained[0]);
    }

    #[test]
    fn rendering_is_prefix_stable_and_prompts_end_with_assistant_start() {
        let tok = tokenizer();
        let conv = conversation();
        let full = render(&tok, &conv, TrainOn::Assistant).unwrap();
        for k in 1..=conv.len() {
            let part = render(&tok, &conv[..k], TrainOn::Assistant).unwrap();
            assert_eq!(
                part.ids[..],
                full.ids[..part.ids.len()],
                "first {k} messages"
            );
            assert_eq!(part.trained[..], full.trained[..part.ids.len()]);
        }
        let prompt = render_prompt(&tok, &conv[..4]).unwrap();
        let upto = render(&tok, &conv[..4], TrainOn::Assistant).unwrap();
        assert_eq!(prompt[..upto.ids.len()], upto.ids[..]);
        assert_eq!(
            prompt.last(),
            tok.token_to_id("<|assistant_start|>").as_ref()
        );
        assert!(
            full.ids.starts_with(&prompt),
            "the prompt is a prefix of the trained rendering"
        );
    }

    #[test]
    fn malformed_conversations_and_tokenizers_without_chat_tokens_fail() {
        let tok = tokenizer();
        let err = render(
            &tok,
            &[Message::new(Role::Assistant, "hi")],
            TrainOn::Assistant,
        )
        .unwrap_err();
        assert!(err.to_string().contains("message 1"), "{err}");
        let err = validate(&[
            Message::new(Role::User, "a"),
            Message::new(Role::System, "b"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("system"), "{err}");
        let gpt2 = Tokenizer::gpt2();
        let err = render(&gpt2, &conversation(), TrainOn::Assistant).unwrap_err();
        assert!(err.to_string().contains("<|system_start|>"), "{err}");
        assert!(
            render_prompt(&tok, &conversation()).is_err(),
            "prompt must end with the user"
        );
    }
}
