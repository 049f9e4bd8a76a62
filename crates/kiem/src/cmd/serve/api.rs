//! OpenAI wire format: request bodies, their checks, and errors in OpenAI's error JSON.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use kiem_engine::sampling::{FinishReason, SamplingParams};
use kiem_tokenizer::chat::{Message, Role};
use serde::Deserialize;
use serde_json::{json, Value};

/// An error as OpenAI sends it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    /// 404 for a model id this server does not serve.
    pub fn model_not_found(asked: &str, served: &[String]) -> Self {
        let served: Vec<String> = served.iter().map(|m| format!("`{m}`")).collect();
        let mut error = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "The model `{asked}` does not exist; this server serves {}",
                served.join(", ")
            ),
        )
        .with_code("model_not_found");
        error.param = Some("model");
        error
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// `content` of a chat message: a string, or OpenAI's list of parts (text parts only).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// The sampling and length fields that chat and text completions share.
#[derive(Debug, Deserialize)]
pub struct Sampling {
    pub model: Option<String>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    /// kiem extension: sample among the K most likely tokens.
    pub top_k: Option<usize>,
    /// kiem extension: penalize tokens already present (1 = off).
    pub repetition_penalty: Option<f32>,
    /// kiem (and vLLM) extension: do not stop at the end-of-text or end-of-turn token.
    pub ignore_eos: Option<bool>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub stop: Option<Stop>,
    pub seed: Option<i64>,
    pub n: Option<u64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub logprobs: Option<Value>,
    pub best_of: Option<u64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// `prompt` of a text completion: a string or a list holding one string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// The longest stop sequence accepted (held-back text is at most this long).
pub const MAX_STOP_BYTES: usize = 1024;

/// Parses a JSON body into `T` in one pass, answering malformed JSON, a body that is not an
/// object and wrong types with a 400.
pub fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let starts_object = body
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b'{');
        if e.is_syntax() || e.is_eof() {
            ApiError::invalid(format!("the request body is not valid JSON: {e}"), None)
        } else if !starts_object {
            ApiError::invalid("the request body must be a JSON object", None)
        } else {
            ApiError::invalid(format!("invalid request: {e}"), None)
        }
    })
}

/// Checked generation settings of one request.
#[derive(Debug)]
pub struct Settings {
    /// Which served model the request asked for: its index in the served list.
    pub model: usize,
    pub params: SamplingParams,
    pub max_tokens: Option<usize>,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

impl Sampling {
    /// Checks the fields against what kiem supports and the models it serves (the base model,
    /// then each adapter).
    pub fn settings(&self, served_models: &[String]) -> Result<Settings, ApiError> {
        let model = match &self.model {
            None => {
                return Err(ApiError::invalid(
                    "you must provide a model parameter",
                    Some("model"),
                ))
            }
            Some(m) => served_models
                .iter()
                .position(|s| s == m)
                .ok_or_else(|| ApiError::model_not_found(m, served_models))?,
        };
        if self.n.is_some_and(|n| n != 1) || self.best_of.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
        }
        for (value, name) in [
            (self.frequency_penalty, "frequency_penalty"),
            (self.presence_penalty, "presence_penalty"),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::invalid(
                    format!("{name} is not supported (use repetition_penalty)"),
                    None,
                ));
            }
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
        {
            return Err(ApiError::invalid(
                "logprobs are not supported",
                Some("logprobs"),
            ));
        }
        if self.echo == Some(true) || self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("echo and suffix are not supported", None));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                format!("temperature {temperature} is out of range: 0 to 2"),
                Some("temperature"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                format!("top_p {top_p} is out of range: above 0, at most 1"),
                Some("top_p"),
            ));
        }
        let stops = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(list)) => list.clone(),
        };
        if stops.len() > 4 {
            return Err(ApiError::invalid("at most 4 stop sequences", Some("stop")));
        }
        if let Some(long) = stops.iter().find(|s| s.len() > MAX_STOP_BYTES) {
            return Err(ApiError::invalid(
                format!(
                    "a stop sequence of {} bytes is too long: at most {MAX_STOP_BYTES}",
                    long.len()
                ),
                Some("stop"),
            ));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if max_tokens == Some(0) {
            return Err(ApiError::invalid(
                "max_tokens must be at least 1",
                Some("max_tokens"),
            ));
        }
        let params = SamplingParams {
            temperature,
            top_k: self.top_k.unwrap_or(0),
            top_p,
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            seed: match self.seed {
                Some(seed) => seed as u64,
                None => random_u64(),
            },
        };
        params
            .validate()
            .map_err(|e| ApiError::invalid(e.to_string(), None))?;
        let stream = self.stream.unwrap_or(false);
        Ok(Settings {
            model,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            params,
            max_tokens: max_tokens.map(|n| n.min(usize::MAX as u64) as usize),
            stops,
            stream,
            include_usage: stream
                && self
                    .stream_options
                    .as_ref()
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
        })
    }
}

/// A fresh random number (for unseeded sampling and request ids).
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS once per process and then varies per instance.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The conversation of a chat request in kiem's typed roles.
pub fn messages(request: &ChatRequest) -> Result<Vec<Message>, ApiError> {
    if request.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages must not be empty",
            Some("messages"),
        ));
    }
    request
        .messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role {other:?} is not supported (system, developer, user, assistant)"),
                        Some("messages"),
                    ))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::invalid(
                                    format!("messages[{i}]: content parts of type {kind:?} are not supported (text only)"),
                                    Some("messages"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(Message::new(role, content))
        })
        .collect()
}

pub fn prompt_text(prompt: &Prompt) -> Result<&str, ApiError> {
    match prompt {
        Prompt::One(s) => Ok(s),
        Prompt::Many(list) if list.len() == 1 => Ok(&list[0]),
        Prompt::Many(_) => Err(ApiError::invalid(
            "prompt must be one string (batches of prompts are not supported; send concurrent requests)",
            Some("prompt"),
        )),
    }
}

pub fn finish_reason(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// JSON values of the kinds clients send, nested a little.
    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| serde_json::json!(f)),
            ".{0,40}".prop_map(Value::from),
            Just(Value::from("x".repeat(5000))),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("role".to_string()),
                        Just("content".to_string()),
                        Just("type".to_string()),
                        Just("text".to_string()),
                        ".{0,8}",
                    ],
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    const FIELDS: [&str; 14] = [
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "repetition_penalty",
        "ignore_eos",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Whatever the body, a request is either accepted or answered with a 400 in OpenAI's
        /// shape: never a panic, never another status.
        #[test]
        fn any_body_is_accepted_or_a_400(
            fields in proptest::collection::vec((0..FIELDS.len(), value()), 0..8),
            raw in proptest::collection::vec(any::<u8>(), 0..64),
            use_raw in any::<bool>(),
            right_model in any::<bool>(),
        ) {
            let body: Vec<u8> = if use_raw {
                raw
            } else {
                let mut object: serde_json::Map<String, Value> =
                    fields.into_iter().map(|(i, v)| (FIELDS[i].to_string(), v)).collect();
                if right_model {
                    // Past the model check, so the other fields are examined too.
                    object.insert("model".into(), Value::from("m"));
                }
                serde_json::to_vec(&object).unwrap()
            };
            let check = |r: Result<(), ApiError>| match r {
                Ok(()) => Ok(()),
                Err(e) if e.status == StatusCode::BAD_REQUEST || e.status == StatusCode::NOT_FOUND => Ok(()),
                Err(e) => Err(TestCaseError::fail(format!("status {}", e.status))),
            };
            check(parse_body::<ChatRequest>(&body).and_then(|r| {
                r.sampling.settings(&["m".to_string()])?;
                messages(&r).map(|_| ())
            }))?;
            check(parse_body::<CompletionRequest>(&body).and_then(|r| {
                r.sampling.settings(&["m".to_string()])?;
                prompt_text(&r.prompt).map(|_| ())
            }))?;
        }
    }

    #[test]
    fn api_keys_compare_whole() {
        use super::super::same_secret;
        assert!(same_secret(b"k3y", b"k3y"));
        assert!(!same_secret(b"k3", b"k3y"));
        assert!(!same_secret(b"k3yy", b"k3y"));
        assert!(!same_secret(b"k3x", b"k3y"));
        assert!(!same_secret(b"", b"k3y"));
    }

    #[test]
    fn stop_sequences_are_bounded_in_number_and_length() {
        let settings = |stop: Value| {
            let body = serde_json::json!({"model": "m", "prompt": "x", "stop": stop});
            parse_body::<CompletionRequest>(body.to_string().as_bytes())
                .unwrap()
                .sampling
                .settings(&["m".to_string()])
        };
        assert!(settings(serde_json::json!(["a", "b", "c", "d"])).is_ok());
        assert!(settings(serde_json::json!(["a", "b", "c", "d", "e"])).is_err());
        assert!(settings(serde_json::json!("s".repeat(MAX_STOP_BYTES))).is_ok());
        let err = settings(serde_json::json!("s".repeat(MAX_STOP_BYTES + 1))).unwrap_err();
        assert!(err.message.contains("too long"), "{}", err.message);
    }
}
