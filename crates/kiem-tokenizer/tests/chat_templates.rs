//! Hugging Face chat templates rendered by kiem against `transformers`' `apply_chat_template`
//! (fixtures made by tests/fixtures/chat_templates/make_fixtures.py; see its docstring).

use std::path::{Path, PathBuf};

use kiem_tokenizer::chat::{end_of_turn, render, render_prompt, Message, Role, TrainOn};
use kiem_tokenizer::Tokenizer;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat_templates")
}

fn expected() -> Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn tokenizer(template: &str) -> Tokenizer {
    Tokenizer::load(fixtures().join(template).to_str().unwrap()).unwrap()
}

fn messages(case: &Value) -> Vec<Message> {
    serde_json::from_value(case["messages"].clone()).unwrap()
}

#[test]
fn ids_and_assistant_masks_equal_transformers() {
    let expected = expected();
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 30);
    for case in cases {
        let name = format!("{} / {}", case["template"], case["conversation"]);
        let tok = tokenizer(case["template"].as_str().unwrap());
        let messages = messages(case);
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        if case["add_generation_prompt"].as_bool().unwrap() {
            assert_eq!(
                render_prompt(&tok, &messages).unwrap(),
                ids,
                "{name} prompt"
            );
            continue;
        }
        let rendered = render(&tok, &messages, TrainOn::Assistant).unwrap();
        assert_eq!(rendered.ids, ids, "{name}");
        let mask: Vec<bool> = case["assistant_mask"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_u64() == Some(1))
            .collect();
        assert_eq!(rendered.trained, mask, "{name}: trained tokens");
        // Each reply's last trained token is the end-of-turn token.
        let end = end_of_turn(&tok).unwrap();
        let replies = messages
            .iter()
            .filter(|m| m.role == Role::Assistant)
            .count();
        let ends = (0..ids.len())
            .filter(|&i| mask[i] && !mask.get(i + 1).copied().unwrap_or(false))
            .filter(|&i| ids[i] == end)
            .count();
        assert_eq!(
            ends, replies,
            "{name}: every reply ends with its end-of-turn token"
        );
        let all = render(&tok, &messages, TrainOn::All).unwrap();
        assert_eq!(all.ids, ids);
        assert!(!all.trained[0] && all.trained[1..].iter().all(|&t| t));
    }
}

#[test]
fn end_of_turn_comes_from_the_template() {
    for (template, token) in [
        ("chatml_default_system", "<|im_end|>"),
        ("llama3_headers", "<|eot_id|>"),
        ("smollm_generation", "<|im_end|>"),
        ("strict_roles", "<|endoftext|>"),
        ("python_features", "<|im_end|>"),
    ] {
        let tok = tokenizer(template);
        assert_eq!(
            end_of_turn(&tok).unwrap(),
            tok.token_to_id(token).unwrap(),
            "{template}"
        );
    }
}

#[test]
fn a_template_that_raises_names_itself_and_the_message() {
    for error in expected()["errors"].as_array().unwrap() {
        let tok = tokenizer(error["template"].as_str().unwrap());
        let messages = messages(error);
        let message = format!("message {}", error["message"]);
        let err = render(&tok, &messages, TrainOn::Assistant)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&message), "{err}");
        // kiem's own alternation check may speak first; the template's message otherwise.
        if messages[0].role == Role::System {
            assert!(
                err.contains(error["contains"].as_str().unwrap())
                    && err.contains("strict_roles/tokenizer_config.json"),
                "{err}"
            );
        }
    }
}

/// A temporary model directory with the qwen2 look-alike tokenizer and `template`.
fn with_template(template: &str) -> (tempfile::TempDir, Tokenizer) {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("chatml_default_system");
    std::fs::copy(
        src.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap())
            .unwrap();
    config["chat_template"] = template.into();
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let tok = Tokenizer::load(dir.path().to_str().unwrap()).unwrap();
    (dir, tok)
}

#[test]
fn templates_that_rewrite_earlier_turns_are_refused_unless_marked() {
    // Earlier replies are shortened (as reasoning templates drop old thoughts).
    let rewriting = "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}{{ m.content[:2] }}{% else %}{% GEN %}{{ m.content }}<|im_end|>{% ENDGEN %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let conversation = [
        Message::new(Role::User, "hi"),
        Message::new(Role::Assistant, "hello there"),
        Message::new(Role::User, "bye"),
        Message::new(Role::Assistant, "goodbye"),
    ];
    let plain = rewriting
        .replace("{% GEN %}", "")
        .replace("{% ENDGEN %}", "");
    let (_dir, tok) = with_template(&plain);
    let err = render(&tok, &conversation, TrainOn::Assistant)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not prefix-stable at message 2") && err.contains("--train-on all"),
        "{err}"
    );
    assert!(render(&tok, &conversation, TrainOn::All).is_ok());
    // With {% generation %} markers the spans come from the template itself.
    let marked = rewriting
        .replace("{% GEN %}", "{% generation %}")
        .replace("{% ENDGEN %}", "{% endgeneration %}");
    let (_dir, tok) = with_template(&marked);
    let r = render(&tok, &conversation, TrainOn::Assistant).unwrap();
    let trained: Vec<u32> = r
        .ids
        .iter()
        .zip(&r.trained)
        .filter(|(_, &t)| t)
        .map(|(&id, _)| id)
        .collect();
    let text = tok.decode(&trained).unwrap();
    assert!(text.contains("goodbye<|im_end|>"), "{text}");
    assert!(!text.contains("bye<|im_end|>hi"), "{text}");
}

#[test]
fn broken_templates_and_marker_characters_fail_clearly() {
    let (_dir, tok) = with_template("{% for m in messages %}{{ m.content }");
    let err = render(
        &tok,
        &[
            Message::new(Role::User, "x"),
            Message::new(Role::Assistant, "y"),
        ],
        TrainOn::Assistant,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("does not compile") && err.contains("tokenizer_config.json"),
        "{err}"
    );
    let tok = tokenizer("chatml_default_system");
    let err = render_prompt(&tok, &[Message::new(Role::User, "a\u{FDD0}b")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("message 1"), "{err}");
}
