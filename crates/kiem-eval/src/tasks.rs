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
//! and generation tasks (a prompt and reference answers, scored on the greedy reply):
//!
//! - JSONL with `prompt` (or `input`) and `reference` (a string) or `references` (a list).
//! - BIG-bench JSON tasks whose examples have `target` (a string or a list) instead of
//!   `target_scores`.
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
    /// Prompt/reference JSONL.
    Generation,
    /// A BIG-bench JSON task with `target` answers.
    BigBenchGeneration,
}

impl TaskFormat {
    pub fn name(self) -> &'static str {
        match self {
            TaskFormat::HellaSwag => "hellaswag",
            TaskFormat::Arc => "arc",
            TaskFormat::BigBench => "bigbench",
            TaskFormat::Plain => "plain",
            TaskFormat::Generation => "generation",
            TaskFormat::BigBenchGeneration => "bigbench-generation",
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

/// One generation example: the prompt and the answers a reply is scored against.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub prompt: String,
    pub references: Vec<String>,
    /// Line of the record in its file (1-based; the example's index + 1 for BIG-bench JSON).
    pub line: usize,
}

/// A generation task read from one file.
#[derive(Debug, Clone)]
pub struct GenerationTask {
    /// The file's name without extension.
    pub name: String,
    pub format: TaskFormat,
    pub examples: Vec<Example>,
}

/// A task file of either kind.
#[derive(Debug, Clone)]
pub enum LoadedTask {
    MultipleChoice(Task),
    Generation(GenerationTask),
}

impl LoadedTask {
    pub fn name(&self) -> &str {
        match self {
            LoadedTask::MultipleChoice(t) => &t.name,
            LoadedTask::Generation(t) => &t.name,
        }
    }

    /// Questions or examples in the task.
    pub fn len(&self) -> usize {
        match self {
            LoadedTask::MultipleChoice(t) => t.questions.len(),
            LoadedTask::Generation(t) => t.examples.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads a multiple-choice task file, detecting its format.
pub fn load_task(path: &Path) -> Result<Task> {
    match load(path)? {
        LoadedTask::MultipleChoice(task) => Ok(task),
        LoadedTask::Generation(_) => Err(EvalError::Task(format!(
            "{}: a generation task (prompt and references), not multiple choice",
            path.display()
        ))),
    }
}

/// Reads a task file of either kind, detecting its format.
pub fn load(path: &Path) -> Result<LoadedTask> {
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
    let parsed = match whole {
        Some(Value::Object(task)) if task.contains_key("examples") => {
            let order: ScoreOrder = serde_json::from_str(&text).unwrap_or_default();
            bigbench(&task, &order).map_err(|(i, m)| bad(i, m))?
        }
        _ => jsonl(&text).map_err(|(i, m)| bad(i, m))?,
    };
    if parsed.is_empty() {
        return Err(EvalError::Task(format!(
            "{file}: the task has no questions"
        )));
    }
    Ok(match parsed {
        Parsed::Questions(format, questions) => LoadedTask::MultipleChoice(Task {
            name,
            format,
            questions,
        }),
        Parsed::Examples(format, examples) => LoadedTask::Generation(GenerationTask {
            name,
            format,
            examples,
        }),
    })
}

/// What a task file holds.
enum Parsed {
    Questions(TaskFormat, Vec<Question>),
    Examples(TaskFormat, Vec<Example>),
}

impl Parsed {
    fn is_empty(&self) -> bool {
        match self {
            Parsed::Questions(_, q) => q.is_empty(),
            Parsed::Examples(_, e) => e.is_empty(),
        }
    }
}

/// A record's error: its line and the message.
type AtLine<T> = std::result::Result<T, (usize, String)>;

/// The JSON objects of a JSONL text with their line numbers (blank lines skipped).
fn objects(text: &str) -> impl Iterator<Item = AtLine<(usize, Map<String, Value>)>> + '_ {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(object)) => Ok((i + 1, object)),
            Ok(_) => Err((i + 1, "expected a JSON object".to_string())),
            Err(e) => Err((i + 1, format!("malformed JSON: {e}"))),
        })
}

fn jsonl(text: &str) -> AtLine<Parsed> {
    let mut records = objects(text).peekable();
    let format = match records.peek() {
        None => return Ok(Parsed::Questions(TaskFormat::Plain, Vec::new())),
        Some(Err(e)) => return Err(e.clone()),
        Some(Ok((line, object))) => detect(object).map_err(|m| (*line, m))?,
    };
    if format == TaskFormat::Generation {
        let examples = records
            .map(|record| {
                let (line, object) = record?;
                example(&object)
                    .map(|e| Example { line, ..e })
                    .map_err(|m| (line, m))
            })
            .collect::<AtLine<Vec<_>>>()?;
        return Ok(Parsed::Examples(format, examples));
    }
    let questions = records
        .map(|record| {
            let (line, object) = record?;
            match format {
                TaskFormat::HellaSwag => hellaswag(&object),
                TaskFormat::Arc => arc(&object),
                _ => plain(&object),
            }
            .map(|q| Question { line, ..q })
            .map_err(|m| (line, m))
        })
        .collect::<AtLine<Vec<_>>>()?;
    Ok(Parsed::Questions(format, questions))
}

/// The first of `keys` the record has.
fn first_key<'a>(object: &Map<String, Value>, keys: &[&'a str]) -> Option<&'a str> {
    keys.iter().copied().find(|k| object.contains_key(*k))
}

const PROMPT_KEYS: [&str; 2] = ["prompt", "input"];
const REFERENCE_KEYS: [&str; 2] = ["reference", "references"];

/// References: a string or a non-empty list of strings.
fn references(value: Option<&Value>, key: &str) -> std::result::Result<Vec<String>, String> {
    let list = match value {
        Some(Value::String(s)) => vec![s.clone()],
        other => strings(other, key)?,
    };
    if list.is_empty() {
        return Err(format!("`{key}` has no reference"));
    }
    Ok(list)
}

fn example(object: &Map<String, Value>) -> std::result::Result<Example, String> {
    let prompt_key = first_key(object, &PROMPT_KEYS).ok_or("missing field `prompt`")?;
    let reference_key =
        first_key(object, &REFERENCE_KEYS).ok_or("missing field `reference` (or `references`)")?;
    Ok(Example {
        prompt: string(object, prompt_key)?.to_string(),
        references: references(object.get(reference_key), reference_key)?,
        line: 0,
    })
}

fn detect(object: &Map<String, Value>) -> std::result::Result<TaskFormat, String> {
    let has = |k: &str| object.contains_key(k);
    if has("ctx_a") && has("endings") {
        Ok(TaskFormat::HellaSwag)
    } else if has("question") && has("choices") && has("answerKey") {
        Ok(TaskFormat::Arc)
    } else if has("context") && has("choices") && has("label") {
        Ok(TaskFormat::Plain)
    } else if first_key(object, &PROMPT_KEYS).is_some()
        && first_key(object, &REFERENCE_KEYS).is_some()
    {
        Ok(TaskFormat::Generation)
    } else {
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        Err(format!(
            "unsupported task format (fields: {}): expected HellaSwag (ctx_a, endings, label), \
             ARC (question, choices, answerKey), plain (context, choices, label), generation \
             (prompt, reference or references), or a BIG-bench JSON task (examples)",
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

fn bigbench(task: &Map<String, Value>, order: &ScoreOrder) -> AtLine<Parsed> {
    let examples = task
        .get("examples")
        .and_then(Value::as_array)
        .ok_or((0, "`examples` must be a list".to_string()))?;
    // The task's instruction, when it has one, comes first (as BIG-bench prompts do).
    let prefix = task
        .get("task_prefix")
        .and_then(Value::as_str)
        .unwrap_or("");
    let generative = examples
        .first()
        .and_then(Value::as_object)
        .is_some_and(|e| !e.contains_key("target_scores") && e.contains_key("target"));
    if generative {
        let examples = examples
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let at = |m: String| (i + 1, format!("example {}: {m}", i + 1));
                let object = e
                    .as_object()
                    .ok_or_else(|| at("expected an object".into()))?;
                Ok(Example {
                    prompt: format!("{prefix}{}", string(object, "input").map_err(at)?),
                    references: references(object.get("target"), "target").map_err(at)?,
                    line: i + 1,
                })
            })
            .collect::<AtLine<Vec<_>>>()?;
        return Ok(Parsed::Examples(TaskFormat::BigBenchGeneration, examples));
    }
    let mut questions = Vec::new();
    for (i, example) in examples.iter().enumerate() {
        let at = |m: String| (i + 1, format!("example {}: {m}", i + 1));
        let object = example
            .as_object()
            .ok_or_else(|| at("expected an object".into()))?;
        let Some(scores) = object.get("target_scores").and_then(Value::as_object) else {
            return Err(at(
                "no `target_scores`: every example of a multiple-choice task needs them".into(),
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
        let context = format!("{prefix}{input}");
        let question = checked(context, choices, best.map_or(0, |(j, _)| j)).map_err(at)?;
        questions.push(Question {
            line: i + 1,
            ..question
        });
    }
    Ok(Parsed::Questions(TaskFormat::BigBench, questions))
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
        assert!(e.contains("a generation task"), "{e}");
        let e = err(
            "t.json",
            r#"{"examples": [{"input": "q", "target_scores": {"a": 1, "b": 0}}, {"input": "r", "target": "a"}]}"#,
        );
        assert!(e.contains("t.json:2") && e.contains("target_scores"), "{e}");
        let gen_err = |text: &str| {
            let (_d, p) = write("g.jsonl", text);
            load(&p).unwrap_err().to_string()
        };
        let e = gen_err(
            "{\"prompt\": \"p\", \"reference\": \"r\"}\n{\"prompt\": 3, \"reference\": \"r\"}\n",
        );
        assert!(
            e.contains("g.jsonl:2") && e.contains("`prompt` must be a string"),
            "{e}"
        );
        let e = gen_err("{\"prompt\": \"p\", \"references\": []}\n");
        assert!(e.contains("g.jsonl:1") && e.contains("no reference"), "{e}");
        let e = gen_err("{\"prompt\": \"p\", \"reference\": \"r\"}\n{\"prompt\": \"p\"}\n");
        assert!(
            e.contains("g.jsonl:2") && e.contains("missing field `reference`"),
            "{e}"
        );
    }

    #[test]
    fn generation_tasks_read_prompts_and_references() {
        let generation = |name: &str, text: &str| {
            let (_d, p) = write(name, text);
            match load(&p).unwrap() {
                LoadedTask::Generation(t) => t,
                other => panic!("{other:?}"),
            }
        };
        let t = generation(
            "faq.jsonl",
            "{\"prompt\": \"Q: hours?\\nA:\", \"reference\": \"9 to 5\"}\n\n{\"input\": \"Q: where?\", \"references\": [\"Lund\", \"in Lund\"]}\n",
        );
        assert_eq!((t.format, t.name.as_str()), (TaskFormat::Generation, "faq"));
        assert_eq!(
            t.examples,
            [
                Example {
                    prompt: "Q: hours?\nA:".into(),
                    references: vec!["9 to 5".into()],
                    line: 1
                },
                Example {
                    prompt: "Q: where?".into(),
                    references: vec!["Lund".into(), "in Lund".into()],
                    line: 3
                }
            ]
        );
        let t = generation(
            "bbg.json",
            r#"{"task_prefix": "Answer. ", "examples": [{"input": "2+2?", "target": ["4", "four"]}, {"input": "3+3?", "target": "6"}]}"#,
        );
        assert_eq!(t.format, TaskFormat::BigBenchGeneration);
        assert_eq!(t.examples[0].prompt, "Answer. 2+2?");
        assert_eq!(t.examples[0].references, ["4", "four"]);
        assert_eq!((t.examples[1].references.len(), t.examples[1].line), (1, 2));
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
