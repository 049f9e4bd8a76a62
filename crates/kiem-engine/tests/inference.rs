//! KV-cache inference equals the full forward pass; sampling is seeded and does what it says.

use kiem_engine::config::{Arch, Block, Rope, RopeScaling};
use kiem_engine::infer::KvCache;
use kiem_engine::kernels::DecodingWeights;
use kiem_engine::rng::Rng;
use kiem_engine::sampling::{sample, Control, FinishReason, GenerateOptions, SamplingParams};
use kiem_engine::{Gpt, ModelConfig};

fn model() -> Gpt {
    model_of(ModelConfig::gpt2(2, 2, 16, 24, 37))
}

/// A Llama with grouped-query attention (4 query heads sharing 2 key/value heads), an explicit
/// head size, q/k/v biases and an untied head.
fn llama_config(n_embd: usize, context: usize) -> ModelConfig {
    let rope = Rope {
        theta: 10_000.0,
        scaling: RopeScaling::Default,
    };
    let mut block = Block::llama(1e-5, rope);
    block.qkv_bias = true;
    ModelConfig {
        arch: Arch::Qwen2,
        block,
        n_kv_head: Some(2),
        head_dim: Some(n_embd / 2),
        mlp_hidden: Some(3 * n_embd),
        ..ModelConfig::gpt2(2, 4, n_embd, context, 37)
    }
}

/// The models every inference test runs on: GPT-2 and a Llama-family block.
fn models() -> [Gpt; 2] {
    [model(), model_of(llama_config(16, 24))]
}

fn model_of(config: ModelConfig) -> Gpt {
    let mut gpt = Gpt::new(config).unwrap();
    gpt.init_random(3);
    let mut rng = Rng::new(4);
    for x in gpt.params_mut().unwrap().iter_mut() {
        *x += rng.normal() * 0.2;
    }
    gpt
}

/// Logits at every position by the training forward pass, `[len, vocab]`.
fn full_logits(gpt: &mut Gpt, tokens: &[u32]) -> Vec<Vec<f32>> {
    let targets = vec![None; tokens.len()];
    gpt.forward(tokens, &targets, 1, tokens.len(), None)
        .unwrap();
    let vp = gpt.config.padded_vocab();
    let v = gpt.config.vocab_size;
    gpt.logits()
        .unwrap()
        .chunks(vp)
        .map(|row| row[..v].to_vec())
        .collect()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= 1e-5, "{what}: max abs diff {diff}");
}

#[test]
fn prefill_then_decode_matches_full_forward() {
    for gpt in models() {
        prefill_then_decode_matches_full_forward_for(gpt);
    }
}

fn prefill_then_decode_matches_full_forward_for(mut gpt: Gpt) {
    let tokens: Vec<u32> = (0..20).map(|i| (i * 11 % 37) as u32).collect();
    let reference = full_logits(&mut gpt, &tokens);
    let (vp, v) = (gpt.config.padded_vocab(), gpt.config.vocab_size);
    // Prefill 7 tokens, then one at a time.
    let mut cache = [KvCache::new(&gpt)];
    let logits = gpt.forward_cached(&mut cache, &[&tokens[..7]]).unwrap();
    assert_close(&logits[..v], &reference[6], "after prefill");
    for t in 7..tokens.len() {
        let logits = gpt
            .forward_cached(&mut cache, &[&tokens[t..t + 1]])
            .unwrap();
        assert_close(&logits[..v], &reference[t], &format!("decode position {t}"));
        assert_eq!(logits.len(), vp);
    }
    assert_eq!(cache[0].len(), 20);
    // Past the context: a clear error, not a panic.
    let err = gpt
        .forward_cached(&mut cache, &[&[1u32; 5][..]])
        .unwrap_err()
        .to_string();
    assert!(err.contains("do not fit"), "{err}");
}

/// Decoding's attention keeps heads of 64 and 128 values in registers a block of positions at
/// a time (other widths through memory): past a block's end, both still match the full pass.
#[test]
fn decoding_heads_of_64_and_128_match_full_forward() {
    for head_dim in [64, 128] {
        let mut gpt = model_of(ModelConfig {
            head_dim: Some(head_dim),
            ..llama_config(32, 96)
        });
        let tokens: Vec<u32> = (0..90).map(|i| (i * 11 % 37) as u32).collect();
        let reference = full_logits(&mut gpt, &tokens);
        let v = gpt.config.vocab_size;
        let mut cache = [KvCache::new(&gpt)];
        gpt.forward_cached(&mut cache, &[&tokens[..3]]).unwrap();
        for t in 3..tokens.len() {
            let logits = gpt
                .forward_cached(&mut cache, &[&tokens[t..t + 1]])
                .unwrap();
            let what = format!("head width {head_dim}, decode position {t}");
            assert_close(&logits[..v], &reference[t], &what);
        }
    }
}

#[test]
fn batched_sequences_match_one_at_a_time() {
    for gpt in models() {
        batched_sequences_match_one_at_a_time_for(gpt);
    }
}

fn batched_sequences_match_one_at_a_time_for(mut gpt: Gpt) {
    let a: Vec<u32> = vec![1, 2, 3, 4, 5];
    let b: Vec<u32> = vec![9, 8, 7];
    let ra = full_logits(&mut gpt, &a);
    let rb = full_logits(&mut gpt, &b);
    let v = gpt.config.vocab_size;
    let vp = gpt.config.padded_vocab();
    let mut caches = [KvCache::new(&gpt), KvCache::new(&gpt)];
    let logits = gpt.forward_cached(&mut caches, &[&a[..], &b[..]]).unwrap();
    assert_close(&logits[..v], &ra[4], "sequence a");
    assert_close(&logits[vp..vp + v], &rb[2], "sequence b");
    // Uneven steps: only b advances.
    let logits = gpt.forward_cached(&mut caches, &[&[], &[6]]).unwrap();
    let rb2 = full_logits(&mut gpt, &[9, 8, 7, 6]);
    assert!(logits[..v].iter().all(|&x| x == 0.0));
    assert_close(&logits[vp..vp + v], &rb2[3], "sequence b after a skip");
}

#[test]
fn every_rows_logits_after_a_shared_cached_context() {
    for gpt in models() {
        every_rows_logits_after_a_shared_cached_context_for(gpt);
    }
}

/// A context cached once, cloned, and continued two ways gives every position's logits as a
/// full forward pass of context + continuation does.
fn every_rows_logits_after_a_shared_cached_context_for(mut gpt: Gpt) {
    let context: Vec<u32> = vec![3, 1, 4, 1, 5];
    let (a, b): (Vec<u32>, Vec<u32>) = (vec![9, 2, 6], vec![5, 3]);
    let (v, vp) = (gpt.config.vocab_size, gpt.config.padded_vocab());
    let mut shared = [KvCache::new(&gpt)];
    let last = gpt
        .forward_cached_every(&mut shared, &[&context[..]])
        .unwrap();
    assert_eq!(last.len(), context.len() * vp);
    let mut caches = [shared[0].clone(), shared[0].clone()];
    let logits = gpt
        .forward_cached_every(&mut caches, &[&a[..], &b[..]])
        .unwrap();
    assert_eq!(logits.len(), (a.len() + b.len()) * vp);
    for (k, (cont, offset)) in [(&a, 0), (&b, a.len())].into_iter().enumerate() {
        let whole: Vec<u32> = context.iter().chain(cont.iter()).copied().collect();
        let reference = full_logits(&mut gpt, &whole);
        for i in 0..context.len() {
            assert_close(&last[i * vp..i * vp + v], &reference[i], "context row");
        }
        for i in 0..cont.len() {
            let row = &logits[(offset + i) * vp..][..v];
            assert_close(
                row,
                &reference[context.len() + i],
                &format!("continuation {k} row {i}"),
            );
        }
    }
    assert!(gpt
        .forward_cached_every(&mut caches, &[&[], &[]])
        .unwrap()
        .is_empty());
}

/// Prompts long enough that cached attention takes them a block of rows at a time (a 37-row
/// context: a full block of 32 and a partial one; a 10-row continuation of it, beside a 3-row
/// one taken row by row in the same pass) give the full forward pass's logits.
#[test]
fn long_prompts_attend_in_blocks_as_the_full_forward_does() {
    for mut gpt in [
        model_of(ModelConfig::gpt2(2, 2, 16, 64, 37)),
        model_of(llama_config(16, 64)),
    ] {
        let context: Vec<u32> = (0..37u32).map(|i| (i * 7 + 3) % 37).collect();
        let a: Vec<u32> = (0..10u32).map(|i| (i * 5 + 1) % 37).collect();
        let b: Vec<u32> = vec![4, 8, 15];
        let (v, vp) = (gpt.config.vocab_size, gpt.config.padded_vocab());
        let mut shared = [KvCache::new(&gpt)];
        let first = gpt
            .forward_cached_every(&mut shared, &[&context[..]])
            .unwrap();
        let reference = full_logits(&mut gpt, &context);
        for (i, want) in reference.iter().enumerate() {
            assert_close(
                &first[i * vp..i * vp + v],
                want,
                &format!("context row {i}"),
            );
        }
        let mut caches = [shared[0].clone(), shared[0].clone()];
        let logits = gpt
            .forward_cached_every(&mut caches, &[&a[..], &b[..]])
            .unwrap();
        for (cont, offset) in [(&a, 0), (&b, a.len())] {
            let whole: Vec<u32> = context.iter().chain(cont.iter()).copied().collect();
            let reference = full_logits(&mut gpt, &whole);
            for i in 0..cont.len() {
                assert_close(
                    &logits[(offset + i) * vp..][..v],
                    &reference[context.len() + i],
                    &format!("continuation at {offset}, row {i}"),
                );
            }
        }
    }
}

#[test]
fn greedy_generation_follows_the_argmax_and_batches_agree() {
    let mut gpt = model();
    let options = GenerateOptions {
        max_tokens: 6,
        sampling: SamplingParams {
            temperature: 0.0,
            ..Default::default()
        },
        stop_ids: vec![],
    };
    let prompt = vec![5u32, 6, 7];
    let single = gpt
        .generate(std::slice::from_ref(&prompt), &options, &mut |_, _| {
            Control::Continue
        })
        .unwrap();
    // Check against the full forward pass token by token.
    let mut seq = prompt.clone();
    for &tok in &single[0].tokens {
        let logits = full_logits(&mut gpt, &seq);
        let last = logits.last().unwrap();
        let best = (0..last.len())
            .max_by(|&i, &j| last[i].total_cmp(&last[j]))
            .unwrap() as u32;
        assert_eq!(tok, best);
        seq.push(tok);
    }
    assert_eq!(single[0].finish, FinishReason::Length);
    let batch = gpt
        .generate(&[vec![1, 2], prompt.clone()], &options, &mut |_, _| {
            Control::Continue
        })
        .unwrap();
    assert_eq!(
        batch[1], single[0],
        "a prompt generates the same alone or in a batch"
    );
}

#[test]
fn seeds_stops_and_limits() {
    let gpt = model();
    let sampling = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        seed: 42,
    };
    let options = GenerateOptions {
        max_tokens: 10,
        sampling,
        stop_ids: vec![],
    };
    let run = |o: &GenerateOptions| {
        gpt.generate(&[vec![1, 2, 3]], o, &mut |_, _| Control::Continue)
            .unwrap()
    };
    assert_eq!(run(&options), run(&options), "same seed, same tokens");
    let mut other = options.clone();
    other.sampling.seed = 43;
    assert_ne!(run(&options)[0].tokens, run(&other)[0].tokens);

    // A stop id ends the sequence without being emitted.
    let first = run(&options)[0].tokens[0];
    let mut stopping = options.clone();
    stopping.stop_ids = vec![first];
    let stopped = run(&stopping);
    assert_eq!(stopped[0].tokens, Vec::<u32>::new());
    assert_eq!(stopped[0].finish, FinishReason::Stop);

    // The callback can stop a sequence (stop strings work this way).
    let mut seen = 0;
    let out = gpt
        .generate(&[vec![1]], &options, &mut |_, _| {
            seen += 1;
            if seen == 3 {
                Control::Stop
            } else {
                Control::Continue
            }
        })
        .unwrap();
    assert_eq!(
        (out[0].tokens.len(), out[0].finish),
        (3, FinishReason::Stop)
    );

    // The context limit ends generation with "length".
    let mut long = options.clone();
    long.max_tokens = 1000;
    let out = run(&long);
    assert_eq!(out[0].tokens.len(), gpt.config.context - 3);
    assert_eq!(out[0].finish, FinishReason::Length);
    let err = gpt
        .generate(&[vec![1; 30]], &options, &mut |_, _| Control::Continue)
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than the model's context"), "{err}");
}

#[test]
fn top_k_top_p_and_repetition_penalty() {
    let logits = [0.0f32, 3.0, 2.9, -1.0, 1.0];
    let mut rng = Rng::new(1);
    let mut draw = |params: SamplingParams, history: &[u32]| -> Vec<u32> {
        let mut seen: Vec<u32> = (0..400)
            .map(|_| sample(&logits, &params, history, &mut rng))
            .collect();
        seen.sort();
        seen.dedup();
        seen
    };
    let base = SamplingParams {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        seed: 0,
    };
    assert_eq!(draw(SamplingParams { top_k: 2, ..base }, &[]), vec![1, 2]);
    assert_eq!(draw(SamplingParams { top_p: 0.3, ..base }, &[]), vec![1]);
    assert_eq!(
        draw(
            SamplingParams {
                temperature: 0.0,
                ..base
            },
            &[]
        ),
        vec![1]
    );
    // A strong penalty on token 1 makes token 2 the greedy choice.
    assert_eq!(
        draw(
            SamplingParams {
                temperature: 0.0,
                repetition_penalty: 2.0,
                ..base
            },
            &[1]
        ),
        vec![2]
    );
    assert!(SamplingParams { top_p: 0.0, ..base }.validate().is_err());
    assert!(SamplingParams {
        temperature: -1.0,
        ..base
    }
    .validate()
    .is_err());
}

/// Buffers are reused across shapes (fine-tuning batches vary in length): a model that has run
/// a larger and a smaller batch computes the same loss and gradients as a fresh one.
#[test]
fn varying_batch_shapes_reuse_buffers_without_changing_results() {
    let run = |gpt: &mut Gpt, batch: usize, seq: usize| {
        let tokens: Vec<u32> = (0..batch * seq).map(|i| (i * 7 % 37) as u32).collect();
        let targets: Vec<Option<u32>> = (0..batch * seq)
            .map(|i| (i % 3 != 0).then_some((i * 5 % 37) as u32))
            .collect();
        gpt.zero_grad();
        let (loss, count) = gpt
            .forward(&tokens, &targets, batch, seq, Some(0.1))
            .unwrap();
        gpt.backward().unwrap();
        (
            loss,
            count,
            gpt.grads.clone(),
            gpt.logit_gradients().unwrap().to_vec(),
        )
    };
    let mut fresh = model();
    let expected = run(&mut fresh, 2, 9);
    let mut reused = model();
    run(&mut reused, 3, 24);
    run(&mut reused, 1, 5);
    let got = run(&mut reused, 2, 9);
    assert_eq!(expected.0.to_bits(), got.0.to_bits(), "loss");
    assert_eq!(expected.1, got.1);
    assert_eq!(expected.2, got.2, "gradients");
    assert_eq!(expected.3, got.3, "logit gradients");
}

/// Continuous batching: a sequence's tokens do not depend on which others share its steps,
/// whether they joined before it, after it, or left early.
#[test]
fn sequences_joining_and_leaving_a_batch_do_not_change_each_other() {
    use kiem_engine::batch::{Batcher, Event};
    let gpt = model();
    let options = |seed: u64, max_tokens: usize| GenerateOptions {
        max_tokens,
        sampling: SamplingParams {
            temperature: 0.9,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed,
        },
        stop_ids: Vec::new(),
    };
    let alone = |prompt: Vec<u32>, seed: u64, max_tokens: usize| {
        let mut batcher = Batcher::new(&gpt);
        batcher.add(0, prompt, options(seed, max_tokens)).unwrap();
        let mut tokens = Vec::new();
        while !batcher.is_empty() {
            batcher
                .step(&mut |_, e| {
                    if let Event::Token(t) = e {
                        tokens.push(t);
                    }
                    Control::Continue
                })
                .unwrap();
        }
        tokens
    };
    let (pa, pb, pc) = (vec![1, 2, 3], vec![4, 5, 6, 7, 8, 9], vec![10]);
    let expected = [
        alone(pa.clone(), 11, 12),
        alone(pb.clone(), 22, 9),
        alone(pc.clone(), 33, 4),
    ];

    let mut batcher = Batcher::new(&gpt);
    let mut got: [Vec<u32>; 3] = Default::default();
    let mut finished = [None; 3];
    let mut record = |id: u64, e: Event| {
        match e {
            Event::Token(t) => got[id as usize].push(t),
            Event::Finished(reason) => finished[id as usize] = Some(reason),
        }
        Control::Continue
    };
    batcher.add(0, pa, options(11, 12)).unwrap();
    batcher.step(&mut record).unwrap();
    batcher.step(&mut record).unwrap();
    batcher.add(1, pb, options(22, 9)).unwrap(); // joins mid-way, prefilled with 0's decode step
    batcher.step(&mut record).unwrap();
    batcher.add(2, pc, options(33, 4)).unwrap();
    assert_eq!(batcher.len(), 3);
    while !batcher.is_empty() {
        batcher.step(&mut record).unwrap();
    }
    assert_eq!(got, expected);
    assert_eq!(finished, [Some(FinishReason::Length); 3]);

    // Cancelling frees the slot at once and leaves the others untouched.
    let mut batcher = Batcher::new(&gpt);
    batcher.add(7, vec![1, 2, 3], options(11, 12)).unwrap();
    batcher.add(8, vec![5, 5], options(1, 50)).unwrap();
    let mut tokens = Vec::new();
    batcher
        .step(&mut |id, e| {
            if let (7, Event::Token(t)) = (id, e) {
                tokens.push(t);
            }
            Control::Continue
        })
        .unwrap();
    assert!(batcher.cancel(8));
    assert!(!batcher.cancel(8));
    assert_eq!(batcher.len(), 1);
    while !batcher.is_empty() {
        batcher
            .step(&mut |id, e| {
                assert_eq!(id, 7);
                if let Event::Token(t) = e {
                    tokens.push(t);
                }
                Control::Continue
            })
            .unwrap();
    }
    assert_eq!(tokens, expected[0]);
    // Bad prompts are refused before they join.
    let mut batcher = Batcher::new(&gpt);
    assert!(batcher.add(1, vec![], options(1, 1)).is_err());
    assert!(batcher.add(1, vec![99], options(1, 1)).is_err());
    assert!(batcher.add(1, vec![0; 25], options(1, 1)).is_err());
}

/// A model transposed for decoding computes the same logits (prefill, decode and the full
/// forward pass), and refuses what needs the files' layout: training, saving, growing.
#[test]
fn transposed_for_decoding_matches_and_refuses_training() {
    for config in [model().config, llama_config(16, 24)] {
        transposed_for_decoding_matches_and_refuses_training_for(config);
    }
}

fn transposed_for_decoding_matches_and_refuses_training_for(config: ModelConfig) {
    let mut gpt = model_of(config);
    let tokens: Vec<u32> = (0..12).map(|i| (i * 5 % 37) as u32).collect();
    let reference = full_logits(&mut gpt, &tokens);
    let mut decoding = model_of(config);
    decoding.transpose_for_decoding();
    decoding.transpose_for_decoding(); // idempotent
    let v = gpt.config.vocab_size;
    for (t, row) in full_logits(&mut decoding, &tokens).iter().enumerate() {
        assert_close(row, &reference[t], &format!("full forward, position {t}"));
    }
    let mut cache = [KvCache::new(&decoding)];
    let logits = decoding
        .forward_cached(&mut cache, &[&tokens[..5]])
        .unwrap();
    assert_close(&logits[..v], &reference[4], "after prefill");
    for t in 5..tokens.len() {
        let logits = decoding
            .forward_cached(&mut cache, &[&tokens[t..t + 1]])
            .unwrap();
        assert_close(&logits[..v], &reference[t], &format!("decode position {t}"));
    }
    let targets: Vec<Option<u32>> = tokens.iter().map(|&t| Some(t)).collect();
    decoding
        .forward(&tokens, &targets, 1, tokens.len(), Some(1.0))
        .unwrap();
    let refused = |err: String| assert!(err.contains("transposed for decoding"), "{err}");
    refused(decoding.backward().unwrap_err().to_string());
    refused(decoding.grow_vocab(40).err().unwrap().to_string());
    let dir = tempfile::tempdir().unwrap();
    refused(
        decoding
            .save_safetensors(&dir.path().join("m.safetensors"))
            .unwrap_err()
            .to_string(),
    );
}

/// Decoding from bf16 weights gives exactly the fp32 kernels' results on the bf16-rounded
/// weights (it only reads fewer bytes), close to the fp32 model's, in prefill and decode.
#[test]
fn bf16_weights_decode_exactly_as_fp32_on_the_rounded_weights() {
    for config in [ModelConfig::gpt2(2, 2, 64, 24, 37), llama_config(64, 24)] {
        bf16_weights_decode_exactly_for(config);
    }
}

fn bf16_weights_decode_exactly_for(config: ModelConfig) {
    let mut original = Gpt::new(config).unwrap();
    original.init_random(11);
    let mut bf16 = Gpt::new(config).unwrap();
    bf16.params_mut()
        .unwrap()
        .copy_from_slice(original.params().unwrap());
    bf16.use_compact_weights(DecodingWeights::Bf16);
    let ratio = bf16.decoding_weight_bytes() as f64 / original.decoding_weight_bytes() as f64;
    assert!(
        (0.5..0.6).contains(&ratio),
        "bf16 reads {ratio} of fp32's bytes"
    );
    // The same values in fp32 (the matrices and head rounded), decoded by the fp32 kernels.
    let mut rounded = Gpt::new(config).unwrap();
    rounded
        .params_mut()
        .unwrap()
        .copy_from_slice(original.params().unwrap());
    rounded.transpose_for_decoding();
    let mut matrices = rounded.layer_matrices();
    matrices.push((rounded.layout.head_weights(), config.n_embd));
    let mut values = rounded.decoding_weights().to_vec();
    for (range, _) in matrices {
        for x in &mut values[range] {
            *x = kiem_engine::bf16_gemm::from_bf16(kiem_engine::bf16_gemm::to_bf16(*x));
        }
    }
    rounded = model_with_decoding_weights(config, &values);
    for (r, b) in values.iter().zip(&bf16.dequantized_decoding_weights()) {
        assert_eq!(r.to_bits(), b.to_bits());
    }
    original.transpose_for_decoding();
    let tokens: Vec<u32> = (0..14).map(|i| (i * 7 % 37) as u32).collect();
    let mut caches = [
        KvCache::new(&bf16),
        KvCache::new(&rounded),
        KvCache::new(&original),
    ];
    let step = |caches: &mut [KvCache], chunk: &[u32]| -> Vec<Vec<f32>> {
        vec![
            bf16.forward_cached(&mut caches[0..1], &[chunk]).unwrap(),
            rounded.forward_cached(&mut caches[1..2], &[chunk]).unwrap(),
            original
                .forward_cached(&mut caches[2..3], &[chunk])
                .unwrap(),
        ]
    };
    for chunk in [&tokens[..6], &tokens[6..7], &tokens[7..8], &tokens[8..9]] {
        let [b, r, o]: [Vec<f32>; 3] = step(&mut caches, chunk).try_into().unwrap();
        assert_eq!(b, r, "bf16 weights = fp32 kernels on rounded weights");
        let scale = o.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = b
            .iter()
            .zip(&o)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff < 0.05 * scale.max(1.0),
            "bf16 vs fp32 weights: {diff} (scale {scale})"
        );
    }
}

/// The quantized thin product (inputs quantized to Q8_0, integer block dot products) stays
/// within the inputs' quantization error of the fp32 product on the dequantized weights, and
/// gives each row the same bits alone or with others; quantized decoding stays close to fp32
/// decoding of a model holding the dequantized weights; and it reads about a quarter (Q8_0) or
/// a seventh (Q4_0) of the bytes.
#[test]
fn quantized_weights_decode_close_to_fp32_on_the_dequantized_weights() {
    use kiem_engine::kernels::{
        matmul_thin_quant, Cpu, Kernels, QuantKind, QuantMatrix, WeightLayout,
    };
    let random = |n: usize, seed: u64| -> Vec<f32> {
        let mut rng = kiem_engine::rng::Rng::new(seed);
        (0..n).map(|_| rng.normal()).collect()
    };
    for kind in [
        QuantKind::Q8_0,
        QuantKind::Q4_0,
        QuantKind::Q4_1,
        QuantKind::Q4_K,
    ] {
        let (c_in, c_out) = (256, 40);
        let q = QuantMatrix::quantize(kind, &random(c_in * c_out, 1), c_in, c_out).unwrap();
        assert!(
            QuantMatrix::quantize(kind, &random(40, 1), 20, 2).is_none(),
            "partial blocks"
        );
        let w = q.dequantize();
        let inp = random(5 * c_in, 2);
        let bias = random(c_out, 3);
        let mut want = vec![0f32; 5 * c_out];
        Cpu::FP32.matmul_forward(
            &mut want,
            &inp,
            &w,
            WeightLayout::OutIn,
            Some(&bias),
            c_in,
            c_out,
        );
        let mut got = vec![0f32; 5 * c_out];
        matmul_thin_quant(&mut got, &inp, &q, Some(&bias), c_in, c_out);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff < 0.02 * scale,
            "{kind:?}: {diff} (outputs up to {scale})"
        );
        let mut one = vec![0f32; c_out];
        matmul_thin_quant(
            &mut one,
            &inp[2 * c_in..3 * c_in],
            &q,
            Some(&bias),
            c_in,
            c_out,
        );
        assert_eq!(one, got[2 * c_out..3 * c_out], "{kind:?}: a row alone");
        // Within the quantization step of the original weights.
        let original = random(c_in * c_out, 1);
        let worst = w
            .iter()
            .zip(&original)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let limit = match kind {
            QuantKind::Q8_0 => 0.03,
            QuantKind::Q4_0 => 0.6,
            // A step over each block's range instead of over twice its largest magnitude.
            QuantKind::Q4_1 | QuantKind::Q4_K => 0.45,
            _ => unreachable!("only kinds with quantizers are made here"),
        };
        assert!(worst < limit, "{kind:?}: {worst}");
    }
    for config in [ModelConfig::gpt2(2, 2, 64, 24, 37), llama_config(64, 24)] {
        for kind in [
            DecodingWeights::Q8_0,
            DecodingWeights::Q4_0,
            DecodingWeights::Q4_1,
            DecodingWeights::Q4_K,
        ] {
            let mut original = Gpt::new(config).unwrap();
            original.init_random(11);
            let fp32_bytes = original.decoding_weight_bytes();
            let mut quant = Gpt::new(config).unwrap();
            quant
                .params_mut()
                .unwrap()
                .copy_from_slice(original.params().unwrap());
            quant.use_compact_weights(kind);
            let ratio = quant.decoding_weight_bytes() as f64 / fp32_bytes as f64;
            assert!(ratio < 0.6, "{kind:?}: reads {ratio} of fp32's bytes");
            // The fp32 copy of the matrices is gone.
            for (range, _) in quant.layer_matrices() {
                assert!(quant.decoding_weights()[range].iter().all(|&x| x == 0.0));
            }
            // A model holding the dequantized weights, decoded by the fp32 kernels.
            let plain = model_with_decoding_weights(config, &quant.dequantized_decoding_weights());
            let tokens: Vec<u32> = (0..10).map(|i| (i * 5 % 37) as u32).collect();
            let mut caches = [KvCache::new(&quant), KvCache::new(&plain)];
            for chunk in [&tokens[..6], &tokens[6..7], &tokens[7..8]] {
                let a = quant.forward_cached(&mut caches[0..1], &[chunk]).unwrap();
                let b = plain.forward_cached(&mut caches[1..2], &[chunk]).unwrap();
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = a
                    .iter()
                    .zip(&b)
                    .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(
                    diff < 0.05 * scale.max(1.0),
                    "{kind:?}: quantized vs fp32 decoding of the same weights: {diff} ({scale})"
                );
            }
        }
    }
}

/// The bandwidth reference reads exactly the weights decoding reads: the wrapping sum of the
/// bits of every fp32 parameter a step reads, and of the bf16 matrices once decoding uses bf16.
#[test]
fn streaming_the_decoding_weights_reads_every_weight_decoding_reads() {
    let mut gpt = model();
    // Every parameter but GPT-2's position embedding (a decoding step reads a row of it).
    let bits = |gpt: &Gpt| {
        let wpe = gpt.layout.wpe.clone().unwrap();
        gpt.decoding_weights()
            .iter()
            .enumerate()
            .filter(|(i, _)| !wpe.contains(i))
            .fold(0u32, |s, (_, x)| s.wrapping_add(x.to_bits()))
    };
    assert_eq!(gpt.stream_decoding_weights(), bits(&gpt));
    // From outside the thread pool and from inside it, with one thread and with several.
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        assert_eq!(pool.install(|| gpt.stream_decoding_weights()), bits(&gpt));
    }
    // bf16 weights: the rounded matrices' upper halves, beside the other parameters' bits
    // (embeddings a decoding step reads a row of are not streamed: GPT-2's positions).
    gpt.transpose_for_decoding();
    let before = gpt.decoding_weights().to_vec();
    let mut matrices = gpt.layer_matrices();
    matrices.push((gpt.layout.head_weights(), gpt.config.n_embd));
    let wpe = gpt.layout.wpe.clone().unwrap();
    let mut want = 0u32;
    for (i, x) in before.iter().enumerate() {
        if matrices.iter().any(|(r, _)| r.contains(&i)) {
            want = want.wrapping_add(u32::from(kiem_engine::bf16_gemm::to_bf16(*x)));
        } else if !wpe.contains(&i) {
            want = want.wrapping_add(x.to_bits());
        }
    }
    gpt.use_compact_weights(DecodingWeights::Bf16);
    assert_eq!(gpt.stream_decoding_weights(), want);
}

/// A decoding model holding `values` (laid out as [`Gpt::decoding_weights`] reads them).
fn model_with_decoding_weights(config: ModelConfig, values: &[f32]) -> Gpt {
    let mut gpt = Gpt::new(config).unwrap();
    let specs = gpt.layout.tensors.clone();
    let p = gpt.params_mut().unwrap();
    p.copy_from_slice(values);
    // Matrices stored `[in, out]` in the files' layout go back there.
    for spec in specs
        .iter()
        .filter(|s| s.matrix == Some(kiem_engine::kernels::WeightLayout::InOut))
    {
        let (rows, cols) = (spec.shape[0], spec.shape[1]);
        let dec = &values[spec.range.clone()];
        let files = &mut p[spec.range.clone()];
        for i in 0..rows {
            for j in 0..cols {
                files[i * cols + j] = dec[j * rows + i];
            }
        }
    }
    gpt.transpose_for_decoding();
    assert_eq!(gpt.decoding_weights(), values);
    gpt
}

/// `in_pool` runs its work on a worker of the pool, so the parallel loops inside fork and join
/// there; on a worker already, it runs in place.
#[test]
fn in_pool_runs_on_a_pool_worker() {
    use kiem_engine::kernels::in_pool;
    assert_eq!(rayon::current_thread_index(), None);
    assert!(in_pool(|| rayon::current_thread_index().is_some()));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        let here = rayon::current_thread_index();
        assert_eq!(in_pool(rayon::current_thread_index), here);
    });
    assert_eq!(in_pool(|| 7), 7);
}

/// The cache starts small and grows as a sequence does; what it held stays put.
#[test]
fn kv_cache_grows_past_its_first_allocation() {
    let mut gpt = model_of(llama_config(16, 600));
    let tokens: Vec<u32> = (0..520).map(|i| (i * 13 % 37) as u32).collect();
    let reference = full_logits(&mut gpt, &tokens);
    let v = gpt.config.vocab_size;
    let mut cache = [KvCache::new(&gpt)];
    let first = cache[0].allocated_bytes();
    let logits = gpt.forward_cached(&mut cache, &[&tokens[..200]]).unwrap();
    assert_close(&logits[..v], &reference[199], "after prefill");
    for t in 200..tokens.len() {
        let logits = gpt
            .forward_cached(&mut cache, &[&tokens[t..t + 1]])
            .unwrap();
        if t % 50 == 0 || t + 1 == tokens.len() {
            assert_close(&logits[..v], &reference[t], &format!("position {t}"));
        }
    }
    assert!(cache[0].allocated_bytes() > first, "the cache grew");
    // Keys and values of 2 key/value heads of 8 channels, not of 4 query heads.
    let per_position = 2 * 2 * 2 * 8 * 4;
    assert!(cache[0].allocated_bytes() <= 600 * per_position);
}

/// Ids beyond the tokenizer (an embedding padded past it) are never generated, even when their
/// logits are the largest.
#[test]
fn generation_stays_inside_the_sampling_vocabulary() {
    let mut gpt = model_of(llama_config(16, 24));
    let c = gpt.config.n_embd;
    let head = gpt.layout.head_weights();
    // Make ids 30..37 dominate every logit.
    for row in 30..37 {
        for x in &mut gpt.params_mut().unwrap()[head.start + row * c..head.start + (row + 1) * c] {
            *x = 50.0;
        }
    }
    let options = GenerateOptions {
        max_tokens: 8,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
    };
    let free = gpt
        .generate(&[vec![1, 2, 3]], &options, &mut |_, _| Control::Continue)
        .unwrap();
    assert!(free[0].tokens.iter().any(|&t| t >= 30));
    assert!(gpt.limit_sampling_to(38).is_err());
    gpt.limit_sampling_to(30).unwrap();
    let limited = gpt
        .generate(&[vec![1, 2, 3]], &options, &mut |_, _| Control::Continue)
        .unwrap();
    assert_eq!(limited[0].tokens.len(), 8);
    assert!(limited[0].tokens.iter().all(|&t| t < 30), "{limited:?}");
}

/// The rotary table starts at 4096 positions and grows when a sequence goes further (a
/// position past the table would fail the rope kernel's bounds check).
#[test]
fn rotary_positions_past_the_first_table() {
    let gpt = model_of(llama_config(16, 5000));
    let mut cache = [KvCache::new(&gpt)];
    let chunk: Vec<u32> = (0..1050).map(|i| (i * 7 % 37) as u32).collect();
    for _ in 0..4 {
        let logits = gpt.forward_cached(&mut cache, &[&chunk]).unwrap();
        assert!(logits.iter().all(|x| x.is_finite()));
    }
    assert_eq!(cache[0].len(), 4200);
}

/// The API says what a buffer holds: logits only after an inference pass (a training pass
/// replaces them with their gradients), parameters by name only in the files' layout.
#[test]
fn misuse_of_logits_and_parameters_is_refused() {
    let mut gpt = model();
    let tokens = [1u32, 2, 3];
    gpt.forward(&tokens, &[Some(2), Some(3), Some(4)], 1, 3, Some(1.0))
        .unwrap();
    assert!(gpt.logits().unwrap_err().to_string().contains("gradients"));
    assert!(gpt.logit_gradients().is_ok());
    gpt.forward(&tokens, &[None, None, None], 1, 3, None)
        .unwrap();
    assert!(gpt.logits().is_ok());
    assert!(gpt.logit_gradients().is_err());
    let files = gpt.params().unwrap().to_vec();
    gpt.transpose_for_decoding();
    assert!(gpt
        .params()
        .unwrap_err()
        .to_string()
        .contains("laid out for decoding"));
    assert!(gpt.params_mut().is_err());
    assert_eq!(gpt.decoding_weights().len(), files.len());
    assert_ne!(
        gpt.decoding_weights(),
        &files[..],
        "GPT-2 matrices are transposed"
    );
}
