//! End-to-end tests of `kiem serve` over real sockets: OpenAI response shapes (plain and
//! streamed), errors in OpenAI's error JSON, the API key, batching with a bounded queue, and a
//! disconnecting client freeing its slot.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{kiem, ok, prepare, run};
use serde_json::{json, Value};

/// A small model with kiem's chat tokens (random-ish: the tests check protocol, not wisdom),
/// made once per test binary. Generating with it takes about a millisecond a token.
fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        prepare(&dir);
        ok(run(
            &[
                "pretrain",
                "--data",
                "data",
                "--out",
                "run",
                "--n-layer",
                "4",
                "--n-head",
                "4",
                "--n-embd",
                "256",
                "--context",
                "1024",
                "--micro-batch",
                "1",
                "--steps",
                "2",
                "--sample-every",
                "0",
                "--threads",
                "2",
            ],
            &dir,
        ));
        dir.join("run/model")
    })
}

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_with(model_dir(), args, env)
    }

    fn start_with(model: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = kiem()
            .args(["serve", "--model"])
            .arg(model)
            .args(["--port", "0", "--threads", "2"])
            .args(args)
            .env_remove("KIEM_API_KEY")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let port = loop {
            let line = lines
                .next()
                .expect("kiem serve exited before listening")
                .unwrap();
            if let Some(rest) = line.strip_prefix("listening on http://127.0.0.1:") {
                break rest.split('/').next().unwrap().parse().unwrap();
            }
        };
        // Keep draining stderr so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Server { child, port }
    }

    fn request(&self, method: &str, path: &str, headers: &[&str], body: &[u8]) -> Response {
        let mut stream = self.send(method, path, headers, body);
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).unwrap();
        Response::parse(&raw)
    }

    fn send(&self, method: &str, path: &str, headers: &[&str], body: &[u8]) -> TcpStream {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        stream
    }

    fn post(&self, path: &str, body: &Value) -> Response {
        self.request(
            "POST",
            path,
            &["Content-Type: application/json"],
            body.to_string().as_bytes(),
        )
    }

    fn health(&self) -> Value {
        self.request("GET", "/health", &[], b"").json()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Response {
    status: u16,
    head: String,
    body: String,
}

impl Response {
    fn parse(raw: &[u8]) -> Response {
        let text = String::from_utf8_lossy(raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        Response {
            status,
            head: head.to_string(),
            body: if chunked {
                dechunk(body)
            } else {
                body.to_string()
            },
        }
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// The `data:` payloads of a server-sent event stream.
    fn events(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter_map(|event| {
                event
                    .lines()
                    .find_map(|l| l.strip_prefix("data: ").or(l.strip_prefix("data:")))
                    .map(str::to_string)
            })
            .collect()
    }

    /// An OpenAI error body; returns its message.
    fn error(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{}\n{}", self.head, self.body);
        let v = self.json();
        let message = v["error"]["message"].as_str().expect("error.message");
        assert!(v["error"]["type"].is_string(), "{v}");
        message.to_string()
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

fn chat_body(extra: Value) -> Value {
    let mut body = json!({
        "model": "run",
        "messages": [
            {"role": "system", "content": "You answer customers."},
            {"role": "user", "content": "Where is order 7?"}
        ],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[test]
fn openai_shapes_plain_and_streamed() {
    let server = Server::start(&[], &[]);
    assert_eq!(server.health()["status"], "ok");
    let page = server.request("GET", "/", &[], b"");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>kiem chat</title>"));

    let models = server.request("GET", "/v1/models", &[], b"").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "run");
    assert_eq!(models["data"][0]["object"], "model");
    let one = server.request("GET", "/v1/models/run", &[], b"");
    assert_eq!(one.json()["id"], "run");

    // A plain chat completion.
    let settings = json!({"seed": 7, "temperature": 0.9, "max_tokens": 12});
    let plain = server.post("/v1/chat/completions", &chat_body(settings.clone()));
    assert_eq!(plain.status, 200, "{}", plain.body);
    let v = plain.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(v["created"].is_u64());
    assert_eq!(v["model"], "run");
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap().to_string();
    let finish = choice["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || finish == "length", "{finish}");
    let usage = &v["usage"];
    let completion_tokens = usage["completion_tokens"].as_u64().unwrap();
    assert!(completion_tokens <= 12);
    assert_eq!(finish == "length", completion_tokens == 12);
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 10);
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + completion_tokens
    );

    // The same request streamed gives the same text, chunk by chunk.
    let mut streamed = settings.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let stream = server.post("/v1/chat/completions", &chat_body(streamed));
    assert_eq!(stream.status, 200);
    assert!(stream
        .head
        .to_ascii_lowercase()
        .contains("content-type: text/event-stream"));
    let events = stream.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, text);
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], completion_tokens);
    let finish_chunk = &chunks[chunks.len() - 2];
    assert_eq!(finish_chunk["choices"][0]["finish_reason"], finish);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));

    // Text completions, with ignore_eos for an exact length.
    let body = json!({"model": "run", "prompt": "Line 5: the customer", "max_tokens": 20,
                      "ignore_eos": true, "seed": 1});
    let v = server.post("/v1/completions", &body).json();
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 20);
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let mut body = body;
    body["stream"] = json!(true);
    let events = server.post("/v1/completions", &body).events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let joined: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .map(|c| c["choices"][0]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(joined, text);

    // A stop string ends the text before it.
    if let Some(stop) = text.get(4..6).filter(|s| !s.trim().is_empty()) {
        let mut body = body.clone();
        body["stream"] = json!(false);
        body["stop"] = json!([stop]);
        let v = server.post("/v1/completions", &body).json();
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let cut = v["choices"][0]["text"].as_str().unwrap();
        assert_eq!(cut, &text[..text.find(stop).unwrap()]);
    }
}

/// A Llama-architecture model (grouped-query attention, rotary positions) serves through the
/// same batcher: concurrent completions, a streamed chat reply, bf16 weights.
#[test]
fn a_llama_model_serves_batched_and_streamed() {
    let dir = tempfile::tempdir().unwrap().keep();
    prepare(&dir);
    ok(run(
        &[
            "pretrain",
            "--data",
            "data",
            "--out",
            "run",
            "--arch",
            "llama",
            "--n-layer",
            "2",
            "--n-head",
            "4",
            "--n-embd",
            "64",
            "--context",
            "256",
            "--micro-batch",
            "2",
            "--steps",
            "2",
            "--sample-every",
            "0",
            "--threads",
            "2",
        ],
        &dir,
    ));
    let server = Server::start_with(&dir.join("run/model"), &["--weights", "bf16"], &[]);
    let answers: Vec<Response> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let server = &server;
                scope.spawn(move || {
                    server.post(
                        "/v1/completions",
                        &json!({"model": "run", "prompt": format!("Line {i}: the customer"),
                                "max_tokens": 6, "temperature": 0}),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for answer in &answers {
        assert_eq!(answer.status, 200, "{}", answer.body);
        assert_eq!(answer.json()["choices"][0]["finish_reason"], "length");
    }
    let streamed = server.post(
        "/v1/chat/completions",
        &chat_body(json!({"stream": true, "max_tokens": 5, "seed": 3})),
    );
    assert_eq!(streamed.status, 200, "{}", streamed.body);
    assert_eq!(streamed.events().last().unwrap(), "[DONE]");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_requests_get_openai_errors() {
    let server = Server::start(&["--max-body-bytes", "4096"], &[]);
    let post = |body: &[u8]| {
        server.request(
            "POST",
            "/v1/chat/completions",
            &["Content-Type: application/json"],
            body,
        )
    };
    let message = post(b"{not json").error(400);
    assert!(message.contains("not valid JSON"), "{message}");
    let message = post(br#"{"model": "run", "messages": "hello"}"#).error(400);
    assert!(message.contains("invalid request"), "{message}");
    let message =
        post(&serde_json::to_vec(&chat_body(json!({"temperature": "hot"}))).unwrap()).error(400);
    assert!(message.contains("invalid"), "{message}");
    let message = post(br#"{"messages": [{"role": "user", "content": "hi"}]}"#).error(400);
    assert!(message.contains("model"), "{message}");
    let response = server.post(
        "/v1/chat/completions",
        &chat_body(json!({"model": "gpt-4o"})),
    );
    let message = response.error(404);
    assert!(
        message.contains("gpt-4o") && message.contains("run"),
        "{message}"
    );
    assert_eq!(response.json()["error"]["code"], "model_not_found");
    let message = server
        .post("/v1/chat/completions", &chat_body(json!({"n": 3})))
        .error(400);
    assert!(message.contains("n = 1"), "{message}");
    let message = server
        .post(
            "/v1/chat/completions",
            &chat_body(json!({"temperature": 7})),
        )
        .error(400);
    assert!(message.contains("temperature"), "{message}");
    let message = server
        .post(
            "/v1/chat/completions",
            &chat_body(json!({"messages": [{"role": "tool", "content": "x"}]})),
        )
        .error(400);
    assert!(message.contains("tool"), "{message}");
    // 3000 bytes of text is about 3000 byte-level tokens: more than the 1024-token context.
    let long = json!({"model": "run", "prompt": "x".repeat(3000)});
    let response = server.post("/v1/completions", &long);
    let message = response.error(400);
    assert!(
        message.contains("maximum context length is 1024"),
        "{message}"
    );
    assert_eq!(response.json()["error"]["code"], "context_length_exceeded");
    let message = post(&vec![b' '; 5000]).error(413);
    assert!(message.contains("too large"), "{message}");
    let message = server.request("GET", "/v2/nothing", &[], b"").error(404);
    assert!(message.contains("/v2/nothing"), "{message}");
    // The server is still healthy after all that.
    assert_eq!(server.health()["status"], "ok");
}

#[test]
fn api_key_guards_the_api() {
    for (args, env) in [
        (vec!["--api-key", "s3cret"], vec![]),
        (vec![], vec![("KIEM_API_KEY", "s3cret")]),
    ] {
        let server = Server::start(&args, &env);
        let message = server.request("GET", "/v1/models", &[], b"").error(401);
        assert!(message.contains("Authorization: Bearer"), "{message}");
        server
            .request("GET", "/v1/models", &["Authorization: Bearer wrong"], b"")
            .error(401);
        let body = chat_body(json!({"max_tokens": 2})).to_string();
        server
            .request("POST", "/v1/chat/completions", &[], body.as_bytes())
            .error(401);
        let ok = server.request("GET", "/v1/models", &["Authorization: Bearer s3cret"], b"");
        assert_eq!(ok.status, 200);
        let ok = server.request(
            "POST",
            "/v1/chat/completions",
            &[
                "Authorization: Bearer s3cret",
                "Content-Type: application/json",
            ],
            body.as_bytes(),
        );
        assert_eq!(ok.status, 200, "{}", ok.body);
        // The page and the health check stay open (the page asks for the key).
        assert_eq!(server.request("GET", "/", &[], b"").status, 200);
        assert_eq!(server.health()["status"], "ok");
    }
}

#[test]
fn requests_are_batched_and_a_full_queue_answers_429() {
    let server = Server::start(&["--max-batch", "3", "--queue", "2"], &[]);
    let body = chat_body(json!({"max_tokens": 300, "ignore_eos": true, "seed": 3}));
    let statuses: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    let r = server.post("/v1/chat/completions", &body);
                    (r.status, r.json())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let done: Vec<&Value> = statuses
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, v)| v)
        .collect();
    let busy = statuses.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!(done.len() + busy, 8, "{statuses:?}");
    // Only what holds however the 8 arrivals interleave with the worker: the first is always
    // served, and 3 decoding plus 2 waiting leave at least 3 refused.
    assert!((1..=5).contains(&done.len()), "{statuses:?}");
    assert!(busy >= 3, "8 requests for 5 places: some must be refused");
    for v in &done {
        assert_eq!(v["usage"]["completion_tokens"], 300);
    }
    // Same seed, same prompt: batching does not change the text.
    let first = done[0]["choices"][0]["message"]["content"].clone();
    assert!(done
        .iter()
        .all(|v| v["choices"][0]["message"]["content"] == first));
    // The worker's own record (not sampled from outside): never more than --max-batch together.
    let peak = server.health()["peak_active"].as_u64().unwrap();
    assert!((1..=3).contains(&peak), "{peak} decoded together");
    let (_, refused) = statuses.iter().find(|(s, _)| *s == 429).unwrap();
    assert_eq!(refused["error"]["code"], "rate_limit_exceeded");
}

#[test]
fn a_client_that_disconnects_frees_its_slot() {
    let server = Server::start(&["--max-batch", "1"], &[]);
    let body = chat_body(json!({"max_tokens": 1000, "ignore_eos": true, "stream": true}));
    let mut stream = server.send(
        "POST",
        "/v1/chat/completions",
        &["Content-Type: application/json"],
        body.to_string().as_bytes(),
    );
    // Wait for the first streamed text, then hang up.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"content\":\"") || seen.len() < 2000 {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(server.health()["active"], 1);
    drop(stream);
    let started = Instant::now();
    loop {
        let health = server.health();
        if health["cancelled"] == 1 && health["active"] == 0 {
            assert_eq!(health["completed"], 0, "freed before it finished: {health}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the slot was not freed: {health}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The single slot serves the next request at once.
    let v = server
        .post("/v1/chat/completions", &chat_body(json!({"max_tokens": 3})))
        .json();
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
}

/// The Python interpreter with `openai` and `selenium` (scripts/test.sh installs them into
/// .venv): `$KIEM_PYTHON`, else `.venv/bin/python` at the repository root. None with
/// `KIEM_SKIP_PYTHON=1`.
fn python() -> Option<PathBuf> {
    if std::env::var_os("KIEM_SKIP_PYTHON").is_some() {
        eprintln!("SKIPPED: KIEM_SKIP_PYTHON is set");
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    Some(
        std::env::var_os("KIEM_PYTHON")
            .map_or_else(|| root.join(".venv/bin/python"), PathBuf::from),
    )
}

/// An executable on PATH (or at its usual Debian place).
fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .chain([
                PathBuf::from("/usr/bin"),
                PathBuf::from("/usr/lib/chromium"),
            ])
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

#[test]
fn the_openai_python_client_and_the_chat_page_in_chromium() {
    let Some(python) = python() else { return };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/serve_clients.py");
    let server = Server::start(&["--api-key", "k3y"], &[]);
    let mut command = std::process::Command::new(&python);
    command
        .arg(&script)
        .env("KIEM_URL", format!("http://127.0.0.1:{}", server.port))
        .env("KIEM_API_KEY", "k3y")
        .env("KIEM_MODEL", "run")
        .env("SE_OFFLINE", "true"); // Selenium must not look for drivers online
    let browser = (
        find_program(&["chromium", "chromium-browser"]),
        find_program(&["chromedriver"]),
    );
    match browser {
        (Some(chromium), Some(driver)) => {
            command
                .env("KIEM_CHROMIUM", chromium)
                .env("KIEM_CHROMEDRIVER", driver);
        }
        _ if std::env::var_os("KIEM_REQUIRE_BROWSER").is_some() => {
            panic!("KIEM_REQUIRE_BROWSER is set but chromium or chromedriver is missing")
        }
        _ => eprintln!("SKIPPED the browser test: install Debian's chromium and chromium-driver"),
    }
    let output = command.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {} ({e}): run scripts/test.sh (it sets up .venv) or set KIEM_SKIP_PYTHON=1",
            python.display()
        )
    });
    let report = String::from_utf8_lossy(&output.stderr);
    eprintln!("{report}");
    assert!(
        output.status.success(),
        "Python client tests failed:\n{report}"
    );
}

/// A random-weight Llama model with a ChatML chat template (the Qwen2-style fixture tokenizer
/// and template), fine-tuned by kiem in its own template to answer every order question the same
/// way; made once per test binary.
fn chatml_model() -> &'static (PathBuf, &'static str) {
    static MODEL: OnceLock<(PathBuf, &'static str)> = OnceLock::new();
    MODEL.get_or_init(|| {
        use kiem_engine::config::{Arch, Block, Rope, RopeScaling};
        let answer = "It ships today.";
        let dir = tempfile::tempdir().unwrap().keep();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../kiem-tokenizer/tests/fixtures/chat_templates/chatml_default_system");
        let tokenizer = kiem_tokenizer::Tokenizer::load(fixture.to_str().unwrap()).unwrap();
        let mut block = Block::llama(
            1e-5,
            Rope {
                theta: 10_000.0,
                scaling: RopeScaling::Default,
            },
        );
        block.tied_head = true;
        let config = kiem_engine::ModelConfig {
            arch: Arch::Llama,
            block,
            n_kv_head: Some(2),
            mlp_hidden: Some(192),
            ..kiem_engine::ModelConfig::gpt2(2, 4, 64, 256, tokenizer.vocab_size())
        };
        let mut gpt = kiem_engine::Gpt::new(config).unwrap();
        gpt.init_random(7);
        kiem_train::checkpoint::write_model_files(&dir.join("base"), &gpt, &tokenizer).unwrap();
        common::write_order_conversations(&dir.join("orders.jsonl"), 64, |_| answer.to_string());
        common::write_order_conversations(&dir.join("held_out.jsonl"), 6, |_| answer.to_string());
        ok(run(
            &[
                "finetune",
                "--val-data",
                "held_out.jsonl",
                "--model",
                "base",
                "--data",
                "orders.jsonl",
                "--out",
                "ft",
                "--steps",
                "80",
                "--lr",
                "3e-3",
                "--micro-batch",
                "8",
                "--eval-every",
                "0",
                "--threads",
                "2",
            ],
            &dir,
        ));
        (dir.join("ft/model"), answer)
    })
}

#[test]
fn a_model_with_its_own_chat_template_fine_tunes_chats_and_serves_in_it() {
    let (model, answer) = chatml_model();
    let dir = model.parent().unwrap().parent().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../kiem-tokenizer/tests/fixtures/chat_templates/chatml_default_system");
    let template =
        common::read_json(&fixture.join("tokenizer_config.json"))["chat_template"].clone();
    // The fine-tuned model keeps its template, its token texts and its vocabulary.
    let config = common::read_json(&model.join("tokenizer_config.json"));
    assert_eq!(config["chat_template"], template);
    assert_eq!(config["eos_token"], "<|im_end|>");
    let im_end = 704;
    let generation = common::read_json(&model.join("generation_config.json"));
    assert!(
        generation["eos_token_id"]
            .as_array()
            .unwrap()
            .contains(&json!(im_end)),
        "{generation}"
    );
    assert_eq!(
        common::read_json(&model.join("config.json"))["vocab_size"],
        724
    );
    // The trained tokens are the reply and its <|im_end|>, nothing else.
    let shown = ok(run(
        &[
            "chat-format",
            "show",
            "--tokenizer",
            "ft/model",
            "--data",
            "orders.jsonl",
            "--limit",
            "1",
        ],
        dir,
    ));
    assert!(shown.contains("with the model's chat template"), "{shown}");
    assert!(
        shown.contains(&format!("[[{answer}<|im_end|>]]\n")),
        "{shown}"
    );
    assert_eq!(
        shown.matches("[[").count(),
        2,
        "the legend and one reply: {shown}"
    );
    // generate --chat and chat answer in the template and stop at <|im_end|>, unseen.
    let reply = ok(run(
        &[
            "generate",
            "--model",
            "ft/model",
            "--chat",
            "--prompt",
            "Where is order 9?",
            "--temperature",
            "0",
            "--max-tokens",
            "40",
        ],
        dir,
    ));
    assert_eq!(reply.trim_end(), *answer);
    let replies = common::run_with_input(
        &[
            "chat",
            "--model",
            "ft/model",
            "--system",
            "Be kind.",
            "--temperature",
            "0",
        ],
        dir,
        "Where is order 1?\nWhere is order 2?\n",
    );
    assert_eq!(replies, format!("{answer}\n{answer}\n"));
    // kiem eval's held-out chat loss is finetune's own validation loss of the final model.
    let report = ok(run(
        &[
            "eval",
            "--model",
            "ft/model",
            "--chat",
            "held_out.jsonl",
            "--out",
            "eval.json",
        ],
        dir,
    ));
    assert!(report.contains("held_out.jsonl"), "{report}");
    let loss = common::read_json(&dir.join("eval.json"))["chat"][0]["loss"]
        .as_f64()
        .unwrap();
    let last_val = std::fs::read_to_string(dir.join("ft/metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["val_loss"].as_f64())
        .next_back()
        .unwrap();
    assert!(
        (loss - last_val).abs() < 1e-4 * last_val.max(1.0),
        "{loss} vs finetune's {last_val}"
    );
    // And through the official OpenAI client.
    let Some(python) = python() else { return };
    let server = Server::start_with(model, &[], &[]);
    let output = std::process::Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/chat_template_client.py"))
        .env("KIEM_URL", format!("http://127.0.0.1:{}", server.port))
        .env("KIEM_MODEL", "ft")
        .env("KIEM_ANSWER", answer)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// If the generation thread dies, requests get a 503, /health says so, and the server exits
/// non-zero instead of answering "ok" with nothing behind it (a test hook makes it panic).
#[test]
fn a_dead_generation_worker_is_reported_and_ends_the_server() {
    let mut child = kiem()
        .args(["serve", "--model"])
        .arg(model_dir())
        .args(["--port", "0", "--threads", "1"])
        .env("KIEM_TEST_WORKER_PANIC_AT_STEP", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let port: u16 = loop {
        let line = lines.next().expect("kiem serve exited early").unwrap();
        if let Some(rest) = line.strip_prefix("listening on http://127.0.0.1:") {
            break rest.split('/').next().unwrap().parse().unwrap();
        }
    };
    let rest = std::thread::spawn(move || lines.map(|l| l.unwrap()).collect::<Vec<_>>());
    let mut server = Server { child, port };
    let answer = server.post(
        "/v1/completions",
        &json!({"model": "run", "prompt": "Line", "max_tokens": 20}),
    );
    assert_eq!(answer.status, 503, "{}", answer.body);
    let health = server.request("GET", "/health", &[], b"");
    assert_eq!(health.status, 503, "{}", health.body);
    assert!(
        health
            .body
            .contains("KIEM_TEST_WORKER_PANIC_AT_STEP reached"),
        "{}",
        health.body
    );
    let status = server.child.wait().unwrap();
    assert!(!status.success(), "the server must exit with an error");
    let stderr = rest.join().unwrap().join("\n");
    assert!(stderr.contains("the generation worker failed"), "{stderr}");
}

/// One base, two LoRA adapters, one server: the request's `model` picks the adapter (the bare
/// base stays available), concurrent requests for different adapters share decoding batches,
/// and each reply equals `kiem generate --adapter` with the same settings.
#[test]
fn several_adapters_on_one_server() {
    let base = model_dir();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::write_order_conversations(&dir.join("chat.jsonl"), 24, |i| {
        format!("Order {i} is on its way.")
    });
    for (out, lr) in [("support", "5e-2"), ("sales", "2e-1")] {
        ok(run(
            &[
                "finetune",
                "--model",
                base.to_str().unwrap(),
                "--data",
                "chat.jsonl",
                "--out",
                out,
                "--steps",
                "3",
                "--micro-batch",
                "4",
                "--lr",
                lr,
                "--eval-every",
                "0",
                "--threads",
                "2",
                "--lora-rank",
                "4",
                "--lora-targets",
                "all",
            ],
            dir,
        ));
    }
    let support = dir.join("support/adapter");
    let sales = dir.join("sales/adapter");
    let server = Server::start(
        &[
            "--adapter",
            support.to_str().unwrap(),
            "--adapter",
            &format!("deals={}", sales.display()),
        ],
        &[],
    );
    let models = server.request("GET", "/v1/models", &[], b"").json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["run", "support", "deals"]);
    let prompt = "Where is order 5?";
    let body =
        |model: &str| json!({"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0});
    // All three at once, so they decode in the same batches.
    let replies: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = ["run", "support", "deals"]
            .iter()
            .map(|&m| {
                let server = &server;
                s.spawn(move || {
                    let r = server.post("/v1/completions", &body(m));
                    assert_eq!(r.status, 200, "{}", r.body);
                    let v = r.json();
                    assert_eq!(v["model"], m);
                    v["choices"][0]["text"].as_str().unwrap().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (reply, adapter) in replies.iter().zip([None, Some(&support), Some(&sales)]) {
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            base.display().to_string(),
            "--prompt".into(),
            prompt.into(),
            "--max-tokens".into(),
            "10".into(),
            "--temperature".into(),
            "0".into(),
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter".into(), a.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let want = ok(run(&args, dir));
        assert_eq!(want.trim_end(), reply.trim_end(), "adapter {adapter:?}");
    }
    assert_ne!(replies[1], replies[2], "the adapters differ");
    let missing = server.post("/v1/completions", &body("nope")).error(404);
    assert!(
        missing.contains("`support`") && missing.contains("`deals`"),
        "{missing}"
    );
}
