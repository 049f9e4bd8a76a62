//! `kiem serve`: an OpenAI-compatible HTTP API (chat and text completions, streaming as
//! server-sent events) and a chat page, over one model decoded with continuous batching.

mod api;
mod worker;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use kiem_engine::sampling::GenerateOptions;
use kiem_tokenizer::chat::render_prompt;
use kiem_tokenizer::Tokenizer;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use self::api::{ApiError, ChatRequest, CompletionRequest, Settings};
use self::worker::{Job, JobEvent, Queue};
use super::generate::WeightsArgs;
use crate::ThreadArgs;
use kiem_tokenizer::chat::reply_stop_ids;

const PAGE: &str = include_str!("page.html");

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model directory (Hugging Face GPT-2 or Llama family) or GGUF file; a chat model for
    /// /v1/chat/completions.
    #[arg(long, value_name = "DIR|FILE")]
    model: PathBuf,

    /// Address to listen on (loopback by default; 0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1", value_name = "ADDR")]
    host: String,

    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8080, value_name = "PORT")]
    port: u16,

    /// Require `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long, env = "KIEM_API_KEY", hide_env_values = true, value_name = "KEY")]
    api_key: Option<String>,

    /// Model id clients send in "model" [default: the model directory's name].
    #[arg(long, value_name = "NAME")]
    model_name: Option<String>,

    /// Requests decoded together (each holds a KV cache for the full context).
    #[arg(long, default_value_t = 8, value_name = "N")]
    max_batch: usize,

    /// Requests that may wait for a slot; more are answered 429.
    #[arg(long, default_value_t = 64, value_name = "N")]
    queue: usize,

    /// Largest request body accepted (bytes).
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES")]
    max_body_bytes: usize,

    /// Seconds a request may take in all, queueing and generation included.
    #[arg(long, default_value_t = 300, value_name = "SECONDS")]
    timeout: u64,

    #[command(flatten)]
    weights: WeightsArgs,

    #[command(flatten)]
    threads: ThreadArgs,
}

struct App {
    /// The base model's id, then each served adapter's (the index picks the adapter).
    models: Vec<String>,
    tokenizer: Arc<Tokenizer>,
    context: usize,
    /// Ids that end a text completion (the model's end-of-text token).
    stop_ids: Vec<u32>,
    /// Ids that end a chat reply, when the model was fine-tuned for chat.
    chat_stop_ids: Option<Vec<u32>>,
    api_key: Option<String>,
    queue: Queue,
    queue_size: usize,
    timeout: Duration,
    created: u64,
    /// Large requests being prepared (parsed, rendered, tokenized) at once: half the threads,
    /// so floods of huge prompts cannot take the cores decoding needs.
    preparing: Arc<tokio::sync::Semaphore>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    let threads = args.threads.install()?;
    if args.max_batch == 0 || args.max_batch > 1024 {
        bail!(
            "--max-batch {} is out of range: choose 1..=1024",
            args.max_batch
        );
    }
    if args.queue == 0 {
        bail!("--queue must be at least 1");
    }
    if args.timeout == 0 {
        bail!("--timeout must be at least 1 second");
    }
    if args.api_key.as_deref() == Some("") {
        bail!("--api-key (or KIEM_API_KEY) is empty");
    }
    // Every --adapter is served beside the bare base, unmerged, under its own model id.
    let (mut gpt, tokenizer, stop_ids) =
        super::generate::load_for_decoding(&args.model, &args.weights, None)?;
    let name = args
        .model_name
        .clone()
        .unwrap_or_else(|| default_model_name(&args.model));
    let mut models = vec![name];
    for spec in &args.weights.adapter {
        let (id, dir) = adapter_id(spec);
        let lora = kiem_engine::lora::Lora::load_peft(&dir, &gpt.config)
            .with_context(|| format!("--adapter {spec}"))?;
        if models.contains(&id) {
            bail!("--adapter {spec}: the model id `{id}` is taken; name it: --adapter NAME=DIR");
        }
        gpt.add_served_adapter(lora)?;
        models.push(id);
    }
    let context = gpt.config.context;
    let chat_stop_ids = reply_stop_ids(&tokenizer, stop_ids.clone());
    if let Err(e) = &chat_stop_ids {
        eprintln!("note: this model cannot chat ({e}): /v1/chat/completions answers 400; use /v1/completions");
    }
    let chat_stop_ids = chat_stop_ids.ok();
    let tokenizer = Arc::new(tokenizer);
    let queue = worker::start(gpt, tokenizer.clone(), args.max_batch, args.queue);
    let app = Arc::new(App {
        models,
        tokenizer,
        context,
        stop_ids,
        chat_stop_ids,
        api_key: args.api_key.clone(),
        queue,
        queue_size: args.queue,
        timeout: Duration::from_secs(args.timeout),
        created: unix_time(),
        preparing: Arc::new(tokio::sync::Semaphore::new((threads / 2).max(1))),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(app, args, threads))
}

async fn serve(app: Arc<App>, args: ServeArgs, threads: usize) -> Result<()> {
    let address = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    let local: SocketAddr = listener.local_addr()?;
    if !local.ip().is_loopback() && app.api_key.is_none() {
        eprintln!(
            "warning: listening on {} without --api-key: anyone who can reach this address can use the model",
            local.ip()
        );
    }
    let adapters = if app.models.len() > 1 {
        format!(" and adapters `{}`", app.models[1..].join("`, `"))
    } else {
        String::new()
    };
    eprintln!(
        "kiem serve: model `{}` ({}){adapters}, context {}, up to {} requests at once, {} threads",
        app.models[0],
        args.model.display(),
        app.context,
        args.max_batch,
        threads
    );
    eprintln!("listening on http://{local}/ (chat page at /, API at /v1; Ctrl-C stops)");

    let app_stats = app.queue.stats.clone();
    let v1 = Router::new()
        .route("/models", get(models))
        .route("/models/{id}", get(model))
        .route("/chat/completions", post(chat_completions))
        .route("/completions", post(completions))
        .layer(middleware::from_fn_with_state(app.clone(), authorize));
    let router = Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/health", get(health))
        .nest("/v1", v1)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(app.clone(), time_limit))
        .layer(DefaultBodyLimit::max(args.max_body_bytes))
        .with_state(app);
    let stats = app_stats;
    axum::serve(listener, router)
        .with_graceful_shutdown({
            let stats = stats.clone();
            async move {
                while !super::interrupted() && stats.failure.get().is_none() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if let Some(failure) = stats.failure.get() {
                    // Answer 503 at /health for a moment (monitors see why), then stop.
                    eprintln!("error: the generation worker failed ({failure}); stopping");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        })
        .await
        .context("the server failed")?;
    if let Some(failure) = stats.failure.get() {
        bail!("the generation worker failed ({failure}); the server stopped");
    }
    eprintln!("kiem serve: stopped");
    Ok(())
}

/// An adapter's model id and directory: `NAME=DIR`, or `DIR` served under its name
/// (`runs/support/adapter` as `support`).
fn adapter_id(spec: &str) -> (String, PathBuf) {
    match spec.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !name.contains('/') => {
            (name.to_string(), PathBuf::from(dir))
        }
        _ => {
            let dir = PathBuf::from(spec);
            let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
            let id = match name(&dir) {
                Some(n) if n == "adapter" => dir.parent().and_then(name).unwrap_or(n),
                Some(n) => n,
                None => spec.to_string(),
            };
            (id, dir)
        }
    }
}

/// `runs/demo/chat/model` is served as `chat`; other directories by their own name.
fn default_model_name(dir: &Path) -> String {
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    match name(dir) {
        Some(n) if n == "model" => dir.parent().and_then(name).unwrap_or(n),
        Some(n) => n,
        None => "kiem".into(),
    }
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", api::random_u64())
}

async fn authorize(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|given| same_secret(given.as_bytes(), key.as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                if given.is_none() {
                    "missing API key: send the header `Authorization: Bearer KEY`"
                } else {
                    "incorrect API key"
                },
            )
            .with_code("invalid_api_key")
            .into_response();
        }
    }
    next.run(request).await
}

/// Compares a presented key with the real one in time that depends only on the presented
/// key's length, so response times reveal nothing about the real key's bytes.
fn same_secret(given: &[u8], key: &[u8]) -> bool {
    let mut differ = given.len() ^ key.len();
    for (i, &g) in given.iter().enumerate() {
        let k = key.get(i).copied().unwrap_or(!g);
        differ |= usize::from(std::hint::black_box(g ^ k));
    }
    differ == 0
}

/// Bounds the time to a response (reading the body included); streams bound themselves.
async fn time_limit(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    match tokio::time::timeout(app.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "the request took longer than {} seconds",
                app.timeout.as_secs()
            ),
        )
        .into_response(),
    }
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!(
            "no such endpoint: {} {} (see GET /v1/models, POST /v1/chat/completions, POST /v1/completions)",
            request.method(),
            request.uri().path()
        ),
    )
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let stats = &app.queue.stats;
    if let Some(failure) = stats.failure.get() {
        let body = json!({"status": "error", "model": app.models[0], "error": format!("the generation worker failed: {failure}")});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(json!({
        "status": "ok",
        "model": app.models[0],
        "adapters": app.models[1..],
        "active": stats.active.load(Ordering::SeqCst),
        "waiting": stats.waiting.load(Ordering::SeqCst),
        "completed": stats.completed.load(Ordering::Relaxed),
        "cancelled": stats.cancelled.load(Ordering::Relaxed),
        "peak_active": stats.peak_active.load(Ordering::SeqCst),
    }))
    .into_response()
}

fn model_object(app: &App, id: &str) -> Value {
    json!({"id": id, "object": "model", "created": app.created, "owned_by": "kiem"})
}

async fn models(State(app): State<Arc<App>>) -> Json<Value> {
    let data: Vec<Value> = app.models.iter().map(|m| model_object(&app, m)).collect();
    Json(json!({"object": "list", "data": data}))
}

async fn model(
    State(app): State<Arc<App>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !app.models.contains(&id) {
        return Err(ApiError::model_not_found(&id, &app.models));
    }
    Ok(Json(model_object(&app, &id)))
}

/// The request body, with a too-large or unreadable body answered in OpenAI's error JSON.
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is too large".to_string()
        } else {
            format!("cannot read the request body: {}", rejection.body_text())
        };
        ApiError::new(status, "invalid_request_error", message)
    })
}

/// Bodies up to this size are prepared at once; larger ones take turns (`App::preparing`).
const SMALL_BODY: usize = 64 << 10;

/// Runs a request's CPU work (parsing up to the body limit, rendering, tokenizing) on the
/// blocking pool, so the few async threads keep serving every other connection. Large bodies
/// (costly to tokenize) are prepared at most `App::preparing` at once, so a flood of huge
/// prompts neither takes the cores decoding needs nor delays small requests.
async fn off_runtime<T: Send + 'static>(
    app: &App,
    body_len: usize,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let permit = if body_len > SMALL_BODY {
        Some(app.preparing.clone().acquire_owned().await.map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("preparing the request failed: {e}"),
            )
        })?)
    } else {
        None
    };
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("preparing the request failed: {e}"),
        )
    })?
}

async fn chat_completions(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let prepare = app.clone();
    let (prompt, stop_ids, settings) = off_runtime(&app, body.len(), move || {
        let app = prepare;
        let request: ChatRequest = api::parse_body(&body)?;
        let settings = request.sampling.settings(&app.models)?;
        let Some(stop_ids) = app.chat_stop_ids.clone() else {
            return Err(ApiError::invalid(
                "this model cannot chat (it has no chat template and was not fine-tuned for chat): use /v1/completions",
                Some("model"),
            ));
        };
        let messages = api::messages(&request)?;
        let prompt = render_prompt(&app.tokenizer, &messages)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
        Ok((prompt, stop_ids, settings))
    })
    .await?;
    generate(app, prompt, stop_ids, settings, Kind::Chat).await
}

async fn completions(
    State(app): State<Arc<App>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let prepare = app.clone();
    let (prompt, settings) = off_runtime(&app, body.len(), move || {
        let app = prepare;
        let request: CompletionRequest = api::parse_body(&body)?;
        let settings = request.sampling.settings(&app.models)?;
        let text = api::prompt_text(&request.prompt)?;
        // Like `kiem generate`: the prompt starts as the model's tokenizer rules say. An empty
        // prompt starts a document (as OpenAI's completions start one from <|endoftext|>).
        let mut prompt = app.tokenizer.encode_prompt(text);
        if prompt.is_empty() {
            prompt.push(app.tokenizer.bos_id());
        }
        Ok((prompt, settings))
    })
    .await?;
    let stop_ids = app.stop_ids.clone();
    generate(app, prompt, stop_ids, settings, Kind::Text).await
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Text,
}

/// Response shapes of one completion.
struct Shape {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Shape {
    fn chunk(&self, text: Option<&str>, finish: Option<&str>, role: bool) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                }
                if let Some(text) = text {
                    delta["content"] = json!(text);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Text => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion.chunk", Kind::Text => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    fn whole(&self, text: String, finish: &str, usage: Value) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Kind::Text => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": match self.kind { Kind::Chat => "chat.completion", Kind::Text => "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        })
    }
}

async fn generate(
    app: Arc<App>,
    prompt: Vec<u32>,
    stop_ids: Vec<u32>,
    settings: Settings,
    kind: Kind,
) -> Result<Response, ApiError> {
    let prompt_tokens = prompt.len();
    if prompt_tokens >= app.context {
        return Err(ApiError::invalid(
            format!(
                "This model's maximum context length is {} tokens, but the prompt has {prompt_tokens} tokens \
                 (no room left to generate). Shorten the prompt or the conversation.",
                app.context
            ),
            Some("messages"),
        )
        .with_code("context_length_exceeded"));
    }
    let room = app.context - prompt_tokens;
    let max_tokens = settings.max_tokens.map_or(room, |n| n.min(room));
    let (events, receiver) = tokio::sync::mpsc::unbounded_channel();
    let job = Job {
        prompt,
        options: GenerateOptions {
            max_tokens,
            sampling: settings.params,
            // ignore_eos: generate exactly max_tokens (load tests need fixed lengths).
            stop_ids: if settings.ignore_eos {
                Vec::new()
            } else {
                stop_ids
            },
        },
        stops: settings.stops,
        // Model 0 is the bare base; model i the served adapter i - 1.
        adapter: settings.model.checked_sub(1),
        events,
    };
    match app.queue.submit(job) {
        Ok(()) => {}
        Err(worker::Refused::Busy) => {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                format!(
                    "the server is busy ({} requests are already waiting); retry shortly",
                    app.queue_size
                ),
            )
            .with_code("rate_limit_exceeded"));
        }
        Err(worker::Refused::Stopped) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the generation worker has stopped; restart the server",
            ))
        }
    }
    let shape = Shape {
        kind,
        id: request_id(match kind {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        }),
        created: unix_time(),
        model: app.models[settings.model].clone(),
    };
    let deadline = tokio::time::Instant::now() + app.timeout;
    if settings.stream {
        return Ok(stream_response(
            shape,
            receiver,
            prompt_tokens,
            settings.include_usage,
            deadline,
        ));
    }
    let mut receiver = receiver;
    let mut text = String::new();
    loop {
        match tokio::time::timeout_at(deadline, receiver.recv()).await {
            Ok(Some(JobEvent::Text(t))) => text.push_str(&t),
            Ok(Some(JobEvent::Done {
                finish,
                completion_tokens,
            })) => {
                let body = shape.whole(
                    text,
                    api::finish_reason(finish),
                    api::usage(prompt_tokens, completion_tokens),
                );
                return Ok(Json(body).into_response());
            }
            Ok(Some(JobEvent::Failed(message))) => {
                return Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    format!("generation failed: {message}"),
                ))
            }
            Ok(None) => {
                return Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "the generation worker stopped",
                ))
            }
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    "generation took longer than the server's --timeout",
                ))
            }
        }
    }
}

/// Streams a completion as server-sent events: a role chunk (chat), text chunks, a chunk with
/// the finish reason, optionally a usage chunk, then `data: [DONE]`. Dropping the stream (the
/// client left) drops `receiver`, which frees the request's slot at the next decoding step.
fn stream_response(
    shape: Shape,
    receiver: UnboundedReceiver<JobEvent>,
    prompt_tokens: usize,
    include_usage: bool,
    deadline: tokio::time::Instant,
) -> Response {
    struct StreamState {
        shape: Shape,
        receiver: UnboundedReceiver<JobEvent>,
        queued: VecDeque<String>,
        done: bool,
    }
    let mut queued = VecDeque::new();
    if matches!(shape.kind, Kind::Chat) {
        queued.push_back(with_usage(shape.chunk(Some(""), None, true), include_usage));
    }
    let state = StreamState {
        shape,
        receiver,
        queued,
        done: false,
    };
    let stream = futures_util::stream::unfold(state, move |mut st| async move {
        loop {
            if let Some(data) = st.queued.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), st));
            }
            if st.done {
                return None;
            }
            let event = tokio::time::timeout_at(deadline, st.receiver.recv()).await;
            match event {
                Ok(Some(JobEvent::Text(text))) => st.queued.push_back(with_usage(
                    st.shape.chunk(Some(&text), None, false),
                    include_usage,
                )),
                Ok(Some(JobEvent::Done {
                    finish,
                    completion_tokens,
                })) => {
                    let last = st
                        .shape
                        .chunk(None, Some(api::finish_reason(finish)), false);
                    st.queued.push_back(with_usage(last, include_usage));
                    if include_usage {
                        let mut usage = st.shape.chunk(None, None, false);
                        usage["choices"] = json!([]);
                        usage["usage"] = api::usage(prompt_tokens, completion_tokens);
                        st.queued.push_back(usage.to_string());
                    }
                    st.queued.push_back("[DONE]".into());
                    st.done = true;
                }
                other => {
                    let message = match other {
                        Ok(Some(JobEvent::Failed(m))) => format!("generation failed: {m}"),
                        Err(_) => "generation took longer than the server's --timeout".into(),
                        _ => "the generation worker stopped".into(),
                    };
                    let error =
                        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message);
                    st.queued.push_back(error.body().to_string());
                    st.queued.push_back("[DONE]".into());
                    st.done = true;
                }
            }
        }
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// With `stream_options.include_usage`, every chunk carries `"usage": null` (as OpenAI's do).
fn with_usage(mut chunk: Value, include_usage: bool) -> String {
    if include_usage {
        chunk["usage"] = Value::Null;
    }
    chunk.to_string()
}
