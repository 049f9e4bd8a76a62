//! Multiple-choice task files, read into questions the way lm-evaluation-harness builds them:
//!
//! - HellaSwag JSONL (`ctx_a`, `ctx_b`, `activity_label`, `endings`, `label`): the harness'
//!   `hellaswag` preprocessing (`[title]` artefacts, bracketed text, double spaces).
//! - ARC-style JSONL (`question`, `choices.text`/`choices.label`, `answerKey`): context
//!   `"Question: {question}\nAnswer:"`.
//! - BIG-bench JSON tasks (`examples` with `input` and `target_scores`): the task's
//!   `task_prefix` (if any) and the input as written (BIG-bench's own Q:/A: and choice-list
//!   formatting is not applied), the choices in file order, the answer the first of the highest
//!   score.
//! - Plain JSONL `{"context", "choices", "label"}`.
//!
//! The format is detected per file. A bad record is an error naming its file and line.

use std::path::Path;

use serde_json::{Map, Value};

use crate::{EvalError, Result};

/// One question: the context, the choices (each scored as `" " + choice`) and the answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub context: String,
    pub choices: Vec<String>,
    pub gold: usize,
    /// Line of the record in its file (1-based; the example's index + 1 for BIG-bench JSON).
    pub line: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskFormat {
    HellaSwag,
    Arc,
    BigBench,
    Plain,
}

impl TaskFormat {
    pub fn name(self) -> &'static str {
        match self {
            TaskFormat::HellaSwag => "hellaswag",
            TaskFormat::Arc => "arc",
            TaskFormat::BigBench => "bigbench",
            TaskFormat::Plain => "plain",
        }
    }
}

/// A multiple-choice task read from one file.
#[derive(Debug, Clone)]
pub struct Task {
    /// The file's name without extension.
    pub name: String,
    pub format: TaskFormat,
    pub questions: Vec<Question>,
}

/// Reads a task file, detecting its format.
pub fn load_task(path: &Path) -> Result<Task> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: file.clone(),
        source,
    })?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| file.clone());
    let bad = |line: usize, message: String| EvalError::Record {
        file: file.clone(),
        line,
        message,
    };
    let whole: Option<Value> = serde_json::from_str(&text).ok();
    let (format, questions) = match whole {
        Some(Value::Object(task)) if task.contains_key("examples") => {
            let order: ScoreOrder = serde_json::from_str(&text).unwrap_or_default();
            (
                TaskFormat::BigBench,
                bigbench(&task, &order).map_err(|(i, m)| bad(i, m))?,
            )
        }
        _ => jsonl(&text).map_err(|(i, m)| bad(i, m))?,
    };
    if questions.is_empty() {
        return Err(EvalError::Task(format!(
            "{file}: the task has no questions"
        )));
    }
    Ok(Task {
        name,
        format,
        questions,
    })
}

type Parsed<T> = std::result::Result<T, (usize, String)>;

fn jsonl(text: &str) -> Parsed<(TaskFormat, Vec<Question>)> {
    let mut format = None;
    let mut questions = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(line).map_err(|e| (line_no, format!("malformed JSON: {e}")))?;
        let object = value
            .as_object()
            .ok_or((line_no, "expected a JSON object".to_string()))?;
        let this = match format {
            Some(f) => f,
            None => {
                let detected = detect(object).map_err(|m| (line_no, m))?;
                format = Some(detected);
                detected
            }
        };
        let question = match this {
            TaskFormat::HellaSwag => hellaswag(object),
            TaskFormat::Arc => arc(object),
            TaskFormat::Plain => plain(object),
            TaskFormat::BigBench => unreachable!("BIG-bench tasks are one JSON document"),
        }
        .map_err(|m| (line_no, m))?;
        questions.push(Question {
            line: line_no,
            ..question
        });
    }
    Ok((format.unwrap_or(TaskFormat::Plain), questions))
}

fn detect(object: &Map<String, Value>) -> std::result::Result<TaskFormat, String> {
    let has = |k: &str| object.contains_key(k);
    if has("ctx_a") && has("endings") {
        Ok(TaskFormat::HellaSwag)
    } else if has("question") && has("choices") && has("answerKey") {
        Ok(TaskFormat::Arc)
    } else if has("context") && has("choices") && has("label") {
        Ok(TaskFormat::Plain)
    } else {
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        Err(format!(
            "unsupported task format (fields: {}): expected HellaSwag (ctx_a, endings, label), \
             ARC (question, choices, answerKey), plain (context, choices, label), or a BIG-bench \
             JSON task (examples)",
            keys.join(", ")
        ))
    }
}

fn string<'a>(object: &'a Map<String, Value>, key: &str) -> std::result::Result<&'a str, String> {
    match object.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(format!("field `{key}` must be a string")),
        None => Err(format!("missing field `{key}`")),
    }
}

fn strings(value: Option<&Value>, what: &str) -> std::result::Result<Vec<String>, String> {
    let list = value
        .and_then(Value::as_array)
        .ok_or(format!("`{what}` must be a list of strings"))?;
    list.iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or(format!("`{what}` must be a list of strings"))
        })
        .collect()
}

/// An answer index: a number or a string of digits, inside the choices.
fn index(value: Option<&Value>, key: &str, choices: usize) -> std::result::Result<usize, String> {
    let n = match value {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or(format!("`{key}` must be the index of a choice"))?;
    usize::try_from(n)
        .ok()
        .filter(|&n| n < choices)
        .ok_or(format!("`{key}` {n} is not one of the {choices} choices"))
}

fn checked(
    context: String,
    choices: Vec<String>,
    gold: usize,
) -> std::result::Result<Question, String> {
    if choices.len() < 2 {
        return Err("a question needs at least two choices".into());
    }
    Ok(Question {
        context,
        choices,
        gold,
        line: 0,
    })
}

fn plain(object: &Map<String, Value>) -> std::result::Result<Question, String> {
    let choices = strings(object.get("choices"), "choices")?;
    let gold = index(object.get("label"), "label", choices.len())?;
    checked(string(object, "context")?.to_string(), choices, gold)
}

fn arc(object: &Map<String, Value>) -> std::result::Result<Question, String> {
    let choices = object
        .get("choices")
        .and_then(Value::as_object)
        .ok_or("`choices` must be an object with `text` and `label` lists")?;
    let texts = strings(choices.get("text"), "choices.text")?;
    let labels = strings(choices.get("label"), "choices.label")?;
    if labels.len() != texts.len() {
        return Err("`choices.text` and `choices.label` differ in length".into());
    }
    let key = string(object, "answerKey")?;
    let gold = labels.iter().position(|l| l == key).ok_or(format!(
        "answerKey {key:?} is not among the labels {labels:?}"
    ))?;
    let context = format!("Question: {}\nAnswer:", string(object, "question")?);
    checked(context, texts, gold)
}

fn hellaswag(object: &Map<String, Value>) -> std::result::Result<Question, String> {
    let ctx = format!(
        "{} {}",
        string(object, "ctx_a")?,
        python_capitalize(string(object, "ctx_b")?)
    );
    let query = hellaswag_preprocess(&format!("{}: {ctx}", string(object, "activity_label")?));
    let choices: Vec<String> = strings(object.get("endings"), "endings")?
        .iter()
        .map(|e| hellaswag_preprocess(e))
        .collect();
    let gold = index(object.get("label"), "label", choices.len())?;
    checked(query, choices, gold)
}

/// Python's `str.capitalize`: the first character upper case, the rest lower case.
fn python_capitalize(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(first) => first
            .to_uppercase()
            .chain(chars.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

/// The harness' HellaSwag `preprocess`: strip, `" [title]"` → `". "`, drop every `[...]`
/// (non-greedy, within a line), then one pass of `"  "` → `" "`.
fn hellaswag_preprocess(text: &str) -> String {
    let text = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find([']', '\n']) {
            Some(close) if after.as_bytes()[close] == b']' => rest = &after[close + 1..],
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

/// The choices of each BIG-bench example in file order (a JSON map loses it).
#[derive(Default, serde::Deserialize)]
struct ScoreOrder {
    #[serde(default)]
    examples: Vec<ExampleOrder>,
}

#[derive(Default, serde::Deserialize)]
struct ExampleOrder {
    #[serde(default)]
    target_scores: Option<KeysInOrder>,
}

#[derive(Default)]
struct KeysInOrder(Vec<String>);

impl<'de> serde::Deserialize<'de> for KeysInOrder {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = KeysInOrder;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<KeysInOrder, A::Error> {
                let mut keys = Vec::new();
                while let Some((key, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                    keys.push(key);
                }
                Ok(KeysInOrder(keys))
            }
        }
        d.deserialize_map(Keys)
    }
}

fn bigbench(task: &Map<String, Value>, order: &ScoreOrder) -> Parsed<Vec<Question>> {
    let examples = task
        .get("examples")
        .and_then(Value::as_array)
        .ok_or((0, "`examples` must be a list".to_string()))?;
    let mut questions = Vec::new();
    for (i, example) in examples.iter().enumerate() {
        let at = |m: String| (i + 1, format!("example {}: {m}", i + 1));
        let object = example
            .as_object()
            .ok_or_else(|| at("expected an object".into()))?;
        let Some(scores) = object.get("target_scores").and_then(Value::as_object) else {
            // Generation examples (`target` only) are not multiple choice.
            return Err(at(
                "no `target_scores`: only multiple-choice BIG-bench tasks are supported".into(),
            ));
        };
        let keys: Vec<&String> = match order.examples.get(i).and_then(|e| e.target_scores.as_ref())
        {
            Some(KeysInOrder(keys)) if keys.len() == scores.len() => keys.iter().collect(),
            _ => scores.keys().collect(),
        };
        let mut choices = Vec::new();
        let mut best: Option<(usize, f64)> = None;
        for (j, choice) in keys.into_iter().enumerate() {
            let score = scores[choice.as_str()]
                .as_f64()
                .ok_or_else(|| at(format!("target score of {choice:?} is not a number")))?;
            if best.is_none_or(|(_, b)| score > b) {
                best = Some((j, score));
            }
            choices.push(choice.clone());
        }
        let input = string(object, "input").map_err(at)?;
        // The task's instruction, when it has one, comes first (as BIG-bench prompts do).
        let context = match task.get("task_prefix").and_then(Value::as_str) {
            Some(prefix) => format!("{prefix}{input}"),
            None => input.to_string(),
        };
        let question = checked(context, choices, best.map_or(0, |(j, _)| j)).map_err(at)?;
        questions.push(Question {
            line: i + 1,
            ..question
        });
    }
    Ok(questions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn every_format_reads_as_the_harness_builds_it() {
        let (_d, p) = write(
            "hs.jsonl",
            r#"{"activity_label": "Roof repair", "ctx_a": "A man climbs a ladder.", "ctx_b": "HE [step] checks  the tiles", "endings": ["[title] He nails  them.", "He sings."], "label": "0"}"#,
        );
        let t = load_task(&p).unwrap();
        assert_eq!(t.format, TaskFormat::HellaSwag);
        let q = &t.questions[0];
        assert_eq!(
            q.context,
            "Roof repair: A man climbs a ladder. He checks the tiles"
        );
        assert_eq!(q.choices, [" He nails them.", "He sings."]);
        assert_eq!((q.gold, q.line), (0, 1));

        let (_d, p) = write(
            "arc.jsonl",
            "\n{\"question\": \"Which is hot?\", \"choices\": {\"text\": [\"ice\", \"fire\"], \"label\": [\"A\", \"B\"]}, \"answerKey\": \"B\"}\n",
        );
        let t = load_task(&p).unwrap();
        assert_eq!(t.format, TaskFormat::Arc);
        assert_eq!(t.questions[0].context, "Question: Which is hot?\nAnswer:");
        assert_eq!((t.questions[0].gold, t.questions[0].line), (1, 2));

        let (_d, p) = write(
            "bb.json",
            r#"{"canary": "x", "examples": [{"input": "2+2=", "target_scores": {"3": 0, "4": 1, "5": 1}}]}"#,
        );
        let t = load_task(&p).unwrap();
        assert_eq!((t.format, t.name.as_str()), (TaskFormat::BigBench, "bb"));
        assert_eq!(t.questions[0].choices, ["3", "4", "5"]);
        assert_eq!(t.questions[0].gold, 1, "the first of the highest scores");

        let (_d, p) = write(
            "p.jsonl",
            r#"{"context": "c", "choices": ["a", "b"], "label": 1}"#,
        );
        assert_eq!(load_task(&p).unwrap().format, TaskFormat::Plain);
    }

    #[test]
    fn bad_and_empty_tasks_fail_naming_file_and_line() {
        let err = |name: &str, text: &str| {
            let (_d, p) = write(name, text);
            load_task(&p).unwrap_err().to_string()
        };
        let e = err(
            "t.jsonl",
            "{\"context\": \"c\", \"choices\": [\"a\", \"b\"], \"label\": 0}\n{broken\n",
        );
        assert!(
            e.contains("t.jsonl:2") && e.contains("malformed JSON"),
            "{e}"
        );
        let e = err(
            "t.jsonl",
            "{\"context\": \"c\", \"choices\": [\"a\", \"b\"], \"label\": 5}\n",
        );
        assert!(
            e.contains("t.jsonl:1") && e.contains("not one of the 2 choices"),
            "{e}"
        );
        let e = err("t.jsonl", "{\"text\": \"x\"}\n");
        assert!(
            e.contains("unsupported task format") && e.contains("text"),
            "{e}"
        );
        let e = err("t.jsonl", "\n\n");
        assert!(e.contains("no questions"), "{e}");
        let e = err("t.json", r#"{"examples": [{"input": "q", "target": "a"}]}"#);
        assert!(
            e.contains("t.json:1") && e.contains("only multiple-choice"),
            "{e}"
        );
    }

    #[test]
    fn hellaswag_preprocessing_matches_python() {
        assert_eq!(
            hellaswag_preprocess("  a [x] b [unclosed c  "),
            "a b [unclosed c"
        );
        assert_eq!(
            hellaswag_preprocess("x   y"),
            "x  y",
            "one pass of double spaces"
        );
        assert_eq!(python_capitalize("hELLO wORLD"), "Hello world");
    }
}
