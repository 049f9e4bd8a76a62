//! End-to-end tests of `prepare`: every input format, the split, determinism, bad input.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use kiem_data::corpus::CorpusOptions;
use kiem_data::prepare::{encode_parallel, prepare, DataDir, PrepareOptions, PrepareReport};
use kiem_data::shard::Shard;
use kiem_data::DataError;
use kiem_tokenizer::Tokenizer;

fn gpt2() -> &'static Tokenizer {
    static GPT2: OnceLock<Tokenizer> = OnceLock::new();
    GPT2.get_or_init(Tokenizer::gpt2)
}

fn options(inputs: Vec<PathBuf>, out: PathBuf) -> PrepareOptions {
    PrepareOptions {
        inputs,
        out,
        val_fraction: 0.0,
        corpus: CorpusOptions::default(),
        skip_bad_records: false,
        shard_tokens: 1_000_000,
        overwrite: false,
    }
}

fn run(tokenizer: &Tokenizer, options: &PrepareOptions) -> Result<PrepareReport, DataError> {
    prepare(
        tokenizer,
        options,
        Arc::new(AtomicBool::new(false)),
        &mut |_| {},
    )
}

/// The documents stored in a split, decoded (each starts with BOS).
fn documents(dir: &Path, split: &str) -> Vec<String> {
    let data = DataDir::open(dir).unwrap();
    let tokenizer = data.tokenizer().unwrap();
    let shards = if split == "train" {
        &data.train
    } else {
        &data.val
    };
    let tokens: Vec<u32> = shards.iter().flat_map(Shard::to_vec).collect();
    let bos = tokenizer.bos_id();
    if tokens.is_empty() {
        return Vec::new();
    }
    assert_eq!(tokens[0], bos, "the split starts with a document");
    tokens[1..]
        .split(|&t| t == bos)
        .map(|doc| tokenizer.decode(doc).unwrap())
        .collect()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn write_parquet(path: &Path, column: &str, rows: &[Option<&str>]) {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    let schema =
        format!("message doc {{ OPTIONAL BYTE_ARRAY {column} (UTF8); REQUIRED INT32 id; }}");
    let schema = Arc::new(parse_message_type(&schema).unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .set_max_row_group_size(2)
            .build(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    for chunk in rows.chunks(2) {
        let mut group = writer.next_row_group().unwrap();
        let values: Vec<ByteArray> = chunk
            .iter()
            .flatten()
            .map(|s| ByteArray::from(*s))
            .collect();
        let defs: Vec<i16> = chunk.iter().map(|r| i16::from(r.is_some())).collect();
        let mut col = group.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>()
            .write_batch(&values, Some(&defs), None)
            .unwrap();
        col.close().unwrap();
        let mut col = group.next_column().unwrap().unwrap();
        let ids: Vec<i32> = (0..chunk.len() as i32).collect();
        col.typed::<parquet::data_type::Int32Type>()
            .write_batch(&ids, None, None)
            .unwrap();
        col.close().unwrap();
        group.close().unwrap();
    }
    writer.close().unwrap();
}

#[test]
fn every_input_format_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    let nested = corpus.join("nested");
    std::fs::create_dir_all(&nested).unwrap();
    std::fs::write(corpus.join("a.txt"), "Plain text document.\nSecond line.\n").unwrap();
    std::fs::write(corpus.join("b.md"), "# Markdown\n\nbody").unwrap();
    std::fs::write(
        nested.join("c.jsonl"),
        "{\"text\":\"json one\",\"id\":1}\n\n{\"id\":2,\"text\":\"json two \u{e9}\"}\r\n",
    )
    .unwrap();
    std::fs::write(
        nested.join("d.jsonl.gz"),
        gzip(b"{\"text\":\"gzipped json\"}\n"),
    )
    .unwrap();
    std::fs::write(
        nested.join("e.txt.zst"),
        zstd::encode_all(&b"zstd text"[..], 3).unwrap(),
    )
    .unwrap();
    write_parquet(
        &nested.join("f.parquet"),
        "text",
        &[
            Some("parquet row 0"),
            Some("parquet row 1"),
            Some("parquet row 2"),
        ],
    );
    let parquet_bytes = std::fs::read(nested.join("f.parquet")).unwrap();
    std::fs::write(nested.join("g.parquet.gz"), gzip(&parquet_bytes)).unwrap();
    std::fs::write(corpus.join("notes.csv"), "ignored").unwrap();
    std::fs::write(corpus.join(".hidden.txt"), "ignored").unwrap();

    let out = tmp.path().join("data");
    let report = run(gpt2(), &options(vec![corpus.clone()], out.clone())).unwrap();
    let mut docs = documents(&out, "train");
    docs.sort();
    let mut expected = vec![
        "Plain text document.\nSecond line.\n",
        "# Markdown\n\nbody",
        "json one",
        "json two \u{e9}",
        "gzipped json",
        "zstd text",
        "parquet row 0",
        "parquet row 1",
        "parquet row 2",
        "parquet row 0",
        "parquet row 1",
        "parquet row 2",
    ];
    expected.sort();
    assert_eq!(docs, expected);
    let m = &report.manifest;
    assert_eq!(m.train.documents, 12);
    assert_eq!(m.input_files, 7);
    assert_eq!(report.ignored_inputs, vec![corpus.join("notes.csv")]);
    let bytes: usize = expected.iter().map(|d| d.len()).sum();
    assert_eq!(m.train.bytes, bytes as u64);
    let tokens: usize = expected.iter().map(|d| gpt2().encode(d).len() + 1).sum();
    assert_eq!(m.train.tokens, tokens as u64);
    assert_eq!(m.tokenizer.hash, gpt2().hash());
    // Nothing but the data is left in the parent directory.
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn blank_lines_split_documents_and_validation_split_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let text: String = (0..400)
        .map(|i| format!("Paragraph {i} first line.\nParagraph {i} second line.\n\n  \n"))
        .collect();
    let input = tmp.path().join("paras.txt");
    std::fs::write(&input, &text).unwrap();

    let mut opts = options(vec![input], tmp.path().join("one"));
    opts.corpus.split_on_blank_lines = true;
    opts.val_fraction = 0.25;
    opts.shard_tokens = 1000;
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let report = one_thread.install(|| run(gpt2(), &opts)).unwrap();
    let m = &report.manifest;
    assert_eq!(m.train.documents + m.val.documents, 400);
    let val_share = m.val.documents as f64 / 400.0;
    assert!((0.15..0.35).contains(&val_share), "val share {val_share}");
    assert!(m.train.shards.len() > 3, "shards of 1000 tokens");
    let train = documents(&opts.out, "train");
    let val = documents(&opts.out, "val");
    assert_eq!(
        train[0],
        "Paragraph 0 first line.\nParagraph 0 second line.\n"
    );
    assert!(val.iter().all(|d| !train.contains(d)));

    // Same bytes with more threads.
    let mut again = opts.clone();
    again.out = tmp.path().join("two");
    let three_threads = rayon::ThreadPoolBuilder::new()
        .num_threads(3)
        .build()
        .unwrap();
    three_threads.install(|| run(gpt2(), &again)).unwrap();
    for entry in std::fs::read_dir(&opts.out).unwrap() {
        let name = entry.unwrap().file_name();
        let a = std::fs::read(opts.out.join(&name)).unwrap();
        let b = std::fs::read(again.out.join(&name)).unwrap();
        assert!(a == b, "{name:?} differs between thread counts");
    }
}

#[test]
fn long_documents_read_in_pieces_give_the_same_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let text: String = (0..300)
        .map(|i| format!("Line {i}: the quick brown fox, isn't it?\n  indented {i}\n\n"))
        .collect();
    let input = tmp.path().join("long.txt");
    std::fs::write(&input, &text).unwrap();
    let whole = gpt2().encode(&text);

    let mut opts = options(vec![input], tmp.path().join("pieces"));
    opts.corpus.piece_bytes = 500;
    let report = run(gpt2(), &opts).unwrap();
    let m = &report.manifest;
    assert_eq!(m.train.documents, 1, "the pieces make one document");
    assert_eq!(m.train.tokens, whole.len() as u64 + 1);
    assert_eq!(m.train.bytes, text.len() as u64);
    assert_eq!(documents(&opts.out, "train"), vec![text.clone()]);
    let data = DataDir::open(&opts.out).unwrap();
    let stored: Vec<u32> = data.train.iter().flat_map(Shard::to_vec).collect();
    assert_eq!(&stored[1..], &whole[..]);
}

#[test]
fn parallel_segments_tokenize_exactly_on_real_text() {
    // The demo's books (Austen, State of the Union addresses), which ship in the repository.
    let books = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kiem/demo/books.txt.zst");
    let bytes = zstd::decode_all(std::fs::File::open(&books).unwrap()).unwrap();
    let mut end = 1_500_000;
    while bytes[end] & 0xC0 == 0x80 {
        end -= 1; // not inside a UTF-8 sequence
    }
    let text = String::from_utf8(bytes[..end].to_vec()).unwrap();
    let trained = kiem_tokenizer::train(
        text.split("\n\n").map(str::to_string).take(2000),
        &kiem_tokenizer::TrainOptions {
            vocab_size: 2000,
            min_frequency: 0,
            show_progress: false,
        },
    )
    .unwrap();
    for tokenizer in [gpt2(), &trained] {
        assert_eq!(encode_parallel(tokenizer, &text), tokenizer.encode(&text));
    }
}

fn expect_error(opts: &PrepareOptions, needles: &[&str]) -> String {
    let err = run(gpt2(), opts).unwrap_err().to_string();
    for needle in needles {
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
    assert!(!opts.out.exists(), "no output after an error");
    let parent = opts.out.parent().unwrap();
    let partial = std::fs::read_dir(parent)
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().contains("partial"));
    assert!(!partial, "no staging directory left behind");
    err
}

#[test]
fn bad_records_are_errors_naming_file_and_line_or_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = tmp.path().join("chat.jsonl");
    std::fs::write(
        &jsonl,
        "{\"text\":\"fine\"}\n{\"text\": broken}\n{\"body\":\"x\"}\n{\"text\":7}\n{\"text\":\"also fine\"}\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let opts = options(vec![jsonl.clone()], out.clone());
    expect_error(&opts, &["chat.jsonl:2", "malformed JSON"]);

    let mut skipping = opts.clone();
    skipping.skip_bad_records = true;
    let report = run(gpt2(), &skipping).unwrap();
    assert_eq!(report.bad.count, 3);
    assert!(
        report.bad.examples[1].contains("chat.jsonl:3")
            && report.bad.examples[1].contains("no field `text`")
    );
    assert!(report.bad.examples[2].contains("is a number"));
    assert_eq!(report.manifest.skipped_records, 3);
    assert_eq!(documents(&out, "train"), vec!["fine", "also fine"]);

    // Invalid UTF-8 in a text file names the line.
    let txt = tmp.path().join("latin1.txt");
    std::fs::write(&txt, b"ok line\nsecond line\ncaf\xe9\n").unwrap();
    expect_error(
        &options(vec![txt], tmp.path().join("o2")),
        &["latin1.txt:3", "UTF-8"],
    );

    // A Parquet file without the column lists the columns it has; a null value names its row.
    let pq = tmp.path().join("rows.parquet");
    write_parquet(&pq, "content", &[Some("a"), None, Some("c")]);
    expect_error(
        &options(vec![pq.clone()], tmp.path().join("o3")),
        &["rows.parquet", "no column `text`", "content, id"],
    );
    let mut by_content = options(vec![pq], tmp.path().join("o4"));
    by_content.corpus.text_field = "content".into();
    expect_error(&by_content, &["rows.parquet: row 1", "null"]);

    // A file that is not Parquet at all.
    let fake = tmp.path().join("fake.parquet");
    std::fs::write(&fake, "not parquet").unwrap();
    expect_error(
        &options(vec![fake], tmp.path().join("o5")),
        &["fake.parquet", "Parquet"],
    );
}

#[test]
fn empty_or_unusable_inputs_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    expect_error(
        &options(vec![empty], tmp.path().join("o1")),
        &["empty corpus"],
    );

    let csv = tmp.path().join("table.csv");
    std::fs::write(&csv, "a,b").unwrap();
    expect_error(
        &options(vec![csv], tmp.path().join("o2")),
        &["table.csv", "unsupported"],
    );

    expect_error(
        &options(vec![tmp.path().join("missing.txt")], tmp.path().join("o3")),
        &["missing.txt"],
    );

    let txt = tmp.path().join("a.txt");
    std::fs::write(&txt, "text").unwrap();
    let mut bad_fraction = options(vec![txt.clone()], tmp.path().join("o4"));
    bad_fraction.val_fraction = 1.5;
    expect_error(&bad_fraction, &["--val-fraction"]);

    // An existing non-empty output is kept unless --overwrite.
    let out = tmp.path().join("existing");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "precious").unwrap();
    let err = run(gpt2(), &options(vec![txt.clone()], out.clone())).unwrap_err();
    assert!(err.to_string().contains("--overwrite"));
    assert!(out.join("keep.txt").exists());
    let mut overwrite = options(vec![txt], out.clone());
    overwrite.overwrite = true;
    run(gpt2(), &overwrite).unwrap();
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("manifest.json").exists());
}

#[test]
fn data_dir_detects_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let txt = tmp.path().join("a.txt");
    std::fs::write(&txt, "some text to tokenize").unwrap();
    let out = tmp.path().join("data");
    run(gpt2(), &options(vec![txt], out.clone())).unwrap();
    assert!(DataDir::open(&out).is_ok());

    let shard = out.join("train_000000.bin");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 2]).unwrap();
    let err = DataDir::open(&out).unwrap_err().to_string();
    assert!(
        err.contains("train_000000.bin") && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(&shard, &bytes).unwrap();

    let other = kiem_tokenizer::train(
        ["other text".to_string()].into_iter(),
        &kiem_tokenizer::TrainOptions {
            vocab_size: 260,
            min_frequency: 0,
            show_progress: false,
        },
    )
    .unwrap();
    other.save(&out.join("tokenizer.json")).unwrap();
    let err = DataDir::open(&out)
        .unwrap()
        .tokenizer()
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not match"), "{err}");

    let err = DataDir::open(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("no manifest.json"), "{err}");
}

/// A JSONL line or blank-line block over the record limit is a bad record naming its file and
/// line (memory stays bounded: the record is never held whole), or skipped and counted.
#[test]
fn records_over_the_size_limit_are_bad_records() {
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = tmp.path().join("big.jsonl");
    let long = format!("{{\"text\":\"{}\"}}", "x".repeat(500));
    std::fs::write(
        &jsonl,
        format!("{{\"text\":\"a\"}}\n{long}\n{{\"text\":\"b\"}}\n"),
    )
    .unwrap();
    let txt = tmp.path().join("big.txt");
    let block = "word ".repeat(30) + "\n";
    std::fs::write(
        &txt,
        format!(
            "short\n\n{}\nnext\n\n{}tail\n",
            block.repeat(3),
            "y".repeat(400)
        ),
    )
    .unwrap();
    for (input, line, kept) in [
        (jsonl, 2, vec!["a", "b"]),
        (txt, 3, vec!["short\n", "next\n"]),
    ] {
        let mut opts = options(vec![input.clone()], tmp.path().join("out"));
        opts.corpus.split_on_blank_lines = true;
        opts.corpus.max_record_bytes = 200;
        let name = input.file_name().unwrap().to_string_lossy().into_owned();
        expect_error(
            &opts,
            &[&format!("{name}:{line}"), "record longer than 200 bytes"],
        );
        opts.skip_bad_records = true;
        let report = run(gpt2(), &opts).unwrap();
        assert!(report.bad.count >= 1, "{name}");
        assert_eq!(documents(&opts.out, "train"), kept, "{name}");
        std::fs::remove_dir_all(&opts.out).unwrap();
    }
}
