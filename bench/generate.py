#!/usr/bin/env python3
"""Decoding speed of kiem against PyTorch (Hugging Face `transformers`, with its KV cache) on the
same model directory, in one run, and against the memory-bandwidth bound that kiem measures.

    python bench/generate.py --model DIR [--threads 2] [--prompt-tokens 64] [--tokens 128]
        [--weights fp32|bf16] [--min-ratio R] [--min-bandwidth-fraction F]

kiem side: `target/release/kiem bench generate --batch 1 --json` (prefill, batch-1 decode, read
bandwidth, bytes a decoding step reads). kiem streams the weights once between each two decoding
steps (timed apart), so each repetition is compared with the bandwidth of the same moments: this
shared VM's bandwidth swings within seconds. PyTorch side: `AutoModelForCausalLM` loads the same
directory (kiem writes Hugging Face GPT-2 directories), float32, `torch.set_num_threads`; the
prompt is prefilled once, then tokens are decoded one at a time greedily with
`past_key_values`, timed after the prefill, best of --repeat. Needs torch and transformers.
--weights bf16 makes kiem decode from bf16 weights (PyTorch stays fp32; the bound is then that
of the bf16 bytes). Exit code 1 when kiem/PyTorch decode tokens/s is under --min-ratio, or kiem's batch-1 decode is
under --min-bandwidth-fraction of the bandwidth bound (median over its repetitions).
"""
import argparse
import json
import subprocess
import sys
import time


def pytorch_decode(model_dir, threads, prompt_tokens, tokens, repeat):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    prompt = torch.tensor([[(i * 7919) % vocab for i in range(prompt_tokens)]])
    best_prefill, best_decode = float("inf"), float("inf")
    with torch.inference_mode():
        for _ in range(repeat):
            started = time.perf_counter()
            out = model(prompt, use_cache=True)
            best_prefill = min(best_prefill, time.perf_counter() - started)
            past = out.past_key_values
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            started = time.perf_counter()
            for _ in range(tokens - 1):
                out = model(token, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            best_decode = min(best_decode, time.perf_counter() - started)
    return prompt_tokens / best_prefill, (tokens - 1) / best_decode, torch.__version__


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--kiem", default="target/release/kiem")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--weights", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--min-ratio", type=float)
    parser.add_argument("--min-bandwidth-fraction", type=float)
    args = parser.parse_args()

    kiem = json.loads(subprocess.run(
        [args.kiem, "bench", "generate", "--model", args.model, "--batch", "1", "--json",
         "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
         "--tokens", str(args.tokens), "--repeat", str(args.repeat), "--weights", args.weights],
        check=True, capture_output=True, text=True).stdout)
    torch_prefill, torch_decode, torch_version = pytorch_decode(
        args.model, args.threads, args.prompt_tokens, args.tokens, args.repeat)
    kiem_decode = kiem["decode"][0]["tokens_per_second"]
    bound = kiem["bandwidth_bound_tokens_per_second"]
    ratio = kiem_decode / torch_decode
    # Each kiem repetition against the bandwidth measured between its own steps (median).
    fraction = kiem["bandwidth_fraction"]
    print(f"machine: {kiem['machine']}; {args.threads} threads; model {kiem['parameters'] / 1e6:.1f}M parameters; "
          f"torch {torch_version}")
    print(f"{'':>22} {'kiem ' + args.weights:>10} {'PyTorch':>10} {'kiem/PyTorch':>13}")
    print(f"{'prefill tok/s':>22} {kiem['prefill_tokens_per_second']:>10.0f} {torch_prefill:>10.0f} "
          f"{kiem['prefill_tokens_per_second'] / torch_prefill:>12.2f}x")
    print(f"{'decode tok/s (batch 1)':>22} {kiem_decode:>10.1f} {torch_decode:>10.1f} {ratio:>12.2f}x")
    print(f"memory read bandwidth up to {kiem['read_bandwidth'] / 1e9:.1f} GB/s, {kiem['bytes_per_token'] / 1e6:.0f} MB "
          f"per token ({args.weights} weights): bound {bound:.1f} tok/s; kiem reaches {100 * fraction:.0f}% "
          f"(median of its repetitions, each against the bandwidth measured between its steps; fastest "
          f"against the highest: {100 * kiem_decode / bound:.0f}%), PyTorch {100 * torch_decode / bound:.0f}% "
          f"(fastest against the highest)")
    print(json.dumps({"kiem": kiem, "pytorch": {"prefill_tokens_per_second": torch_prefill,
                                                "decode_tokens_per_second": torch_decode},
                      "ratio": ratio, "bandwidth_fraction": fraction}))
    failed = False
    if args.min_ratio is not None and ratio < args.min_ratio:
        print(f"FAIL: kiem/PyTorch decode {ratio:.2f} < --min-ratio {args.min_ratio}", file=sys.stderr)
        failed = True
    if args.min_bandwidth_fraction is not None and fraction < args.min_bandwidth_fraction:
        print(f"FAIL: {fraction:.2f} of the bandwidth bound < --min-bandwidth-fraction "
              f"{args.min_bandwidth_fraction}", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
