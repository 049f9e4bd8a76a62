//! GGUF files against llama.cpp's Python package and `transformers` (fixtures made by
//! tests/fixtures/gguf/make_fixtures.py): every tensor type dequantizes as gguf-py does, the
//! reference quantizers give gguf-py's bytes, models load to transformers' logits, a written
//! file reads back to the same model, and corrupt files fail with errors, never panics.

use std::path::{Path, PathBuf};

use kiem_engine::gguf::quants::{dequantize, quantize, GgmlType};
use kiem_engine::gguf::{load_gguf_model, write_gguf, ExportType, GgufFile, MetaValue};
use kiem_engine::Gpt;
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn type_named(name: &str) -> GgmlType {
    let all = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];
    *all.iter().find(|t| t.name() == name).unwrap()
}

#[test]
fn every_type_dequantizes_as_gguf_py_and_quantizes_to_its_bytes() {
    let e = expected();
    let cases = e["quants"]["dequantize"].as_object().unwrap();
    assert_eq!(cases.len(), 11);
    for (name, case) in cases {
        let t = type_named(name);
        let bytes = hex(case["bytes"].as_str().unwrap());
        let want = floats(&case["values"]);
        let mut got = vec![0f32; want.len()];
        dequantize(t, &bytes, &mut got);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{name} value {i}: {a} vs gguf-py's {b}"
            );
        }
    }
    for (name, case) in e["quants"]["quantize"].as_object().unwrap() {
        let t = type_named(name);
        let values = floats(&case["values"]);
        let want = hex(case["bytes"].as_str().unwrap());
        assert_eq!(
            quantize(t, &values),
            want,
            "{name}: bytes differ from gguf-py's"
        );
    }
}

/// A model's logits for `tokens` (vocabulary columns only).
fn logits(gpt: &mut Gpt, tokens: &[u32]) -> Vec<Vec<f32>> {
    let targets = vec![None; tokens.len()];
    gpt.forward(tokens, &targets, 1, tokens.len(), None)
        .unwrap();
    let (vp, v) = (gpt.config.padded_vocab(), gpt.config.vocab_size);
    gpt.logits()
        .unwrap()
        .chunks(vp)
        .map(|row| row[..v].to_vec())
        .collect()
}

fn check_logits(gpt: &mut Gpt, want: &Value, what: &str) {
    let tokens: Vec<u32> = want["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let got = logits(gpt, &tokens);
    let want: Vec<Vec<f32>> = want["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.len(), w.len(), "{what}: vocabulary");
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(
        worst < 1e-4,
        "{what}: max logit difference {worst} from transformers"
    );
}

#[test]
fn models_load_to_the_logits_transformers_gets_from_the_same_file() {
    let e = expected();
    for name in ["llama_mixed.gguf", "gpt2_q8.gguf"] {
        let file = GgufFile::open(&fixture(name)).unwrap();
        let (mut gpt, ids) = load_gguf_model(&file).unwrap();
        assert!(
            ids.bos.is_some() && !ids.eos.is_empty(),
            "{name}: special ids"
        );
        check_logits(&mut gpt, &e[name], name);
    }
    let file = GgufFile::open(&fixture("llama_mixed.gguf")).unwrap();
    let (gpt, _) = load_gguf_model(&file).unwrap();
    assert_eq!(
        (
            gpt.config.n_head,
            gpt.config.kv_heads(),
            gpt.config.block.tied_head
        ),
        (4, 2, false)
    );
}

/// The file's tokenizer and other non-model metadata, to write back.
fn tokenizer_metadata(file: &GgufFile) -> Vec<(String, MetaValue)> {
    file.metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .cloned()
        .collect()
}

#[test]
fn written_files_read_back_to_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama_mixed.gguf", "gpt2_q8.gguf"] {
        let file = GgufFile::open(&fixture(name)).unwrap();
        let (mut gpt, _) = load_gguf_model(&file).unwrap();
        let tokens = [5u32, 9, 2, 77, 31];
        let original = logits(&mut gpt, &tokens);
        let out = tmp.path().join(format!("f32-{name}"));
        write_gguf(&gpt, &tokenizer_metadata(&file), ExportType::F32, "t", &out).unwrap();
        let written = GgufFile::open(&out).unwrap();
        assert_eq!(written.version, 3);
        assert_eq!(
            written.get("tokenizer.ggml.tokens"),
            file.get("tokenizer.ggml.tokens")
        );
        let (mut back, _) = load_gguf_model(&written).unwrap();
        assert_eq!(
            logits(&mut back, &tokens),
            original,
            "{name}: f32 round trip is exact"
        );
        // Q8_0: matrices quantized with the reference quantizer, each value within half a
        // step of its block; the model still predicts nearly the same.
        let out = tmp.path().join(format!("q8-{name}"));
        write_gguf(
            &gpt,
            &tokenizer_metadata(&file),
            ExportType::Q8_0,
            "t",
            &out,
        )
        .unwrap();
        let written = GgufFile::open(&out).unwrap();
        let q8 = written
            .tensors
            .iter()
            .filter(|t| t.kind == GgmlType::Q8_0)
            .count();
        assert!(q8 >= 8, "{name}: {q8} Q8_0 tensors");
        for t in &written.tensors {
            let want = if t.dims.len() == 1 || t.name == "position_embd.weight" {
                GgmlType::F32
            } else {
                GgmlType::Q8_0
            };
            assert_eq!(t.kind, want, "{name}: {}", t.name);
        }
        let (mut back, _) = load_gguf_model(&written).unwrap();
        let q = logits(&mut back, &tokens);
        let worst = q
            .iter()
            .flatten()
            .zip(original.iter().flatten())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(worst < 0.05, "{name}: q8_0 logits moved by {worst}");
    }
}

#[test]
fn corrupt_and_truncated_files_fail_with_errors() {
    let bytes = std::fs::read(fixture("llama_mixed.gguf")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bad.gguf");
    let open = |data: &[u8]| {
        std::fs::write(&path, data).unwrap();
        GgufFile::open(&path).and_then(|f| load_gguf_model(&f).map(|_| ()))
    };
    // Truncated anywhere: an error naming the file.
    for cut in (0..bytes.len())
        .step_by(bytes.len() / 97)
        .chain([4, 8, 23, 24])
    {
        let err = open(&bytes[..cut]).expect_err("truncated file accepted");
        assert!(err.to_string().contains("bad.gguf"), "{err}");
    }
    // Flipped bytes in the header and tensor directory: never a panic.
    let header_end = 40_000.min(bytes.len());
    for i in (0..header_end).step_by(37) {
        let mut data = bytes.clone();
        data[i] ^= 0xA5;
        let _ = open(&data);
    }
    // A lying count is refused before anything is allocated for it.
    let mut data = bytes.clone();
    data[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = open(&data).unwrap_err().to_string();
    assert!(err.contains("claims"), "{err}");
    let mut data = bytes.clone();
    data[4..8].copy_from_slice(&1u32.to_le_bytes());
    assert!(open(&data).unwrap_err().to_string().contains("version 1"));
    assert!(open(b"GGML\x03\0\0\0")
        .unwrap_err()
        .to_string()
        .contains("not a GGUF"));
}

#[test]
fn unsupported_architectures_and_types_are_named() {
    let file = GgufFile::open(&fixture("gpt2_q8.gguf")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // A file whose architecture is renamed.
    let (gpt, _) = load_gguf_model(&file).unwrap();
    let out = tmp.path().join("m.gguf");
    write_gguf(&gpt, &[], ExportType::F32, "t", &out).unwrap();
    let mut bytes = std::fs::read(&out).unwrap();
    let at = bytes.windows(4).position(|w| w == b"gpt2").unwrap();
    bytes[at..at + 4].copy_from_slice(b"gptX");
    std::fs::write(&out, &bytes).unwrap();
    let err = load_gguf_model(&GgufFile::open(&out).unwrap())
        .err()
        .expect("an unknown architecture is refused")
        .to_string();
    assert!(
        err.contains("gptX") && err.contains("not supported"),
        "{err}"
    );
    assert!(GgmlType::from_id(16).unwrap_err().contains("IQ"));
}

/// A LoRA run on a quantized file keeps its base's layer matrices as the file stores them,
/// read straight from the blocks (every quantized kind, Q5_0, Q5_1 and Q6_K included): the
/// logits are those of the model loaded in fp32, the fp32 matrices are never made, and only
/// adapters train.
#[test]
fn a_quantized_file_is_a_frozen_base_as_it_is() {
    use kiem_engine::gguf::load_gguf_frozen_base;
    use kiem_engine::lora::{Lora, LoraSpec};
    let tmp = tempfile::tempdir().unwrap();
    let mixed = GgufFile::open(&fixture("llama_mixed.gguf")).unwrap();
    let (gpt, _) = load_gguf_model(&mixed).unwrap();
    let mut files = vec![
        (
            fixture("llama_mixed.gguf"),
            "fp32+q4_1+q4_k+q4_0+q5_0+q5_1+q6_k",
        ),
        (fixture("gpt2_q8.gguf"), "q8_0+fp32"),
    ];
    for (export, forms) in [
        (ExportType::Q4_0, "q4_0"),
        (ExportType::Q4_1, "q4_1"),
        (ExportType::BF16, "bf16"),
    ] {
        let out = tmp.path().join(format!("{forms}.gguf"));
        write_gguf(&gpt, &tokenizer_metadata(&mixed), export, "t", &out).unwrap();
        files.push((out, forms));
    }
    for (path, forms) in files {
        let file = GgufFile::open(&path).unwrap();
        let (mut loaded, _) = load_gguf_model(&file).unwrap();
        // More rows than decoding's thin products take: dense products of the weights.
        let tokens: Vec<u32> = (0..24u32).map(|i| i * 13 % 50).collect();
        let want = logits(&mut loaded, &tokens);
        let (mut base, _) = load_gguf_frozen_base(&file).unwrap();
        let sorted = |forms: &str| {
            let mut v: Vec<String> = forms.split('+').map(str::to_string).collect();
            v.sort();
            v
        };
        assert_eq!(sorted(&base.weight_forms()), sorted(forms), "{path:?}");
        let fp32_matrices: usize = base.layer_matrices().iter().map(|(r, _)| 4 * r.len()).sum();
        assert!(
            base.frozen_base_bytes() * 2 <= fp32_matrices,
            "{path:?}: {} bytes kept",
            base.frozen_base_bytes()
        );
        let got = logits(&mut base, &tokens);
        let (worst, scale) = got
            .iter()
            .flatten()
            .zip(want.iter().flatten())
            .fold((0f32, 0f32), |(m, s), (a, b)| {
                (m.max((a - b).abs()), s.max(b.abs()))
            });
        assert!(
            worst <= 1e-5,
            "{path:?}: the frozen base moved logits by {worst} (largest {scale})"
        );
        // Only adapters train: the base alone cannot take gradients.
        let targets: Vec<Option<u32>> = tokens.iter().map(|&t| Some(t)).collect();
        base.forward(&tokens, &targets, 1, tokens.len(), Some(1.0))
            .unwrap();
        let err = base.backward().unwrap_err().to_string();
        assert!(err.contains("adapters"), "{err}");
        let spec = LoraSpec {
            rank: 2,
            alpha: 2.0,
            dropout: 0.0,
            use_rslora: false,
            targets: vec!["all".into()],
        };
        base.set_lora(Some(Lora::new(&base.config, spec, 1).unwrap()))
            .unwrap();
        base.forward(&tokens, &targets, 1, tokens.len(), Some(1.0))
            .unwrap();
        base.backward().unwrap();
        assert!(base.set_lora(None).is_err(), "the adapters stay");
    }
}

/// A quantized file decodes from its blocks as they are: its matrices never become fp32 (their
/// parameters read 0), decoding reads about the file's bytes, and the logits are those of the
/// fp32 model holding the file's dequantized weights, up to the 8-bit rounding of the inputs
/// of thin products (a long prefill, whose products dequantize, matches closely).
#[test]
fn a_quantized_file_decodes_from_its_blocks() {
    use kiem_engine::gguf::load_gguf_for_decoding;
    use kiem_engine::infer::KvCache;
    let tmp = tempfile::tempdir().unwrap();
    let mixed = GgufFile::open(&fixture("llama_mixed.gguf")).unwrap();
    let (gpt, _) = load_gguf_model(&mixed).unwrap();
    let mut files = vec![fixture("llama_mixed.gguf"), fixture("gpt2_q8.gguf")];
    for export in [
        ExportType::Q4_0,
        ExportType::Q4_1,
        ExportType::Q8_0,
        ExportType::BF16,
    ] {
        let out = tmp.path().join(format!("{export:?}.gguf"));
        write_gguf(&gpt, &tokenizer_metadata(&mixed), export, "t", &out).unwrap();
        files.push(out);
    }
    // A tied GPT-2 whose embedding (and so its repeated output.weight) is quantized.
    let gpt2 = GgufFile::open(&fixture("gpt2_q8.gguf")).unwrap();
    let (gpt2_model, _) = load_gguf_model(&gpt2).unwrap();
    let out = tmp.path().join("gpt2-q8_0.gguf");
    write_gguf(
        &gpt2_model,
        &tokenizer_metadata(&gpt2),
        ExportType::Q8_0,
        "t",
        &out,
    )
    .unwrap();
    files.push(out);
    for path in files {
        let file = GgufFile::open(&path).unwrap();
        let (compact, _) = load_gguf_for_decoding(&file).unwrap();
        let (mut plain, _) = load_gguf_model(&file).unwrap();
        let fp32_bytes = plain.decoding_weight_bytes();
        plain.transpose_for_decoding();
        let forms = compact.weight_forms();
        // (gpt2_q8's F16 embeddings, the head among them, are fp32.)
        assert!(
            forms.contains("q") || forms.contains("bf16"),
            "{path:?}: {forms}"
        );
        let ratio = compact.decoding_weight_bytes() as f64 / fp32_bytes as f64;
        assert!(
            ratio < 0.65,
            "{path:?} ({forms}): reads {ratio} of fp32's bytes"
        );
        // The layer matrices were never written in fp32 (the mixed file's products with an
        // F16 or F32 part are fp32 whole).
        if !path.ends_with("llama_mixed.gguf") {
            let values = compact.decoding_weights();
            for (range, _) in compact.layer_matrices() {
                assert!(values[range].iter().all(|&v| v == 0.0), "{path:?}");
            }
        }
        let tokens: Vec<u32> = (0..80u32).map(|i| i * 13 % 50).collect();
        // Steps of one sequence (thin products), then two sequences of 40 tokens in one pass
        // (80 rows: the layers' products are wide, in integers where the CPU has AVX-512 VNNI,
        // else dequantized; the head's, of the two last rows, is thin). Both quantize the
        // inputs to 8 bits, as llama.cpp does.
        let steps: Vec<Vec<&[u32]>> =
            vec![vec![&tokens[..6]], vec![&tokens[6..7]], vec![&tokens[7..8]]];
        let long: Vec<Vec<&[u32]>> = vec![vec![&tokens[..40], &tokens[40..]]];
        for (passes, tolerance) in [(steps, 0.05), (long, 0.05)] {
            let sequences = passes[0].len();
            let mut a_caches: Vec<KvCache> =
                (0..sequences).map(|_| KvCache::new(&compact)).collect();
            let mut b_caches: Vec<KvCache> = (0..sequences).map(|_| KvCache::new(&plain)).collect();
            for pass in passes {
                let a = compact.forward_cached(&mut a_caches, &pass).unwrap();
                let b = plain.forward_cached(&mut b_caches, &pass).unwrap();
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = a
                    .iter()
                    .zip(&b)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    diff <= tolerance * scale.max(1.0),
                    "{path:?} ({forms}), {} rows: {diff} (logits up to {scale})",
                    pass.iter().map(|p| p.len()).sum::<usize>()
                );
            }
        }
    }
}
