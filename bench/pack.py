#!/usr/bin/env python3
"""Fine-tuning with and without --pack on real conversations of varied length: trained tokens
per second (real tokens, padding not counted), rows and padding, in one run.

    python bench/pack.py [--chats ../shared/data/chat/construction_company_faq_en.sharegpt.jsonl]
        [--layers 6] [--width 512] [--micro-batch 8] [--steps 12] [--threads 2] [--lora-rank 0]

The base: `kiem tokenizer train` on the conversations' own text (kiem's chat tokens included)
and `kiem pretrain --arch llama` for one step (a random Llama: width --width, --layers blocks,
heads of 64, context 512) written as a Hugging Face directory. Then `kiem finetune` on the
conversations twice, the same flags but --pack. Throughput is the mean over the steps after the
first two, from metrics.jsonl (`tokens` counts the real tokens trained, `elapsed_seconds` the
wall clock). Without --pack each micro-batch pads its conversations to the longest among them;
with it, rows hold consecutive conversations up to the longest conversation's length.
"""
import argparse
import json
import os
import sys
import tempfile

from common import KIEM, ROOT, machine, run, step_timing

DEFAULT_CHATS = os.path.join(ROOT, "..", "shared", "data", "chat",
                             "construction_company_faq_en.sharegpt.jsonl")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chats", default=DEFAULT_CHATS)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA runs instead of full ones")
    args = p.parse_args()
    if not os.path.exists(KIEM):
        sys.exit("build kiem first: cargo build --release")
    chats = os.path.abspath(args.chats)
    cpu, simd = machine()
    with tempfile.TemporaryDirectory() as work:
        text = []
        for line in open(chats):
            record = json.loads(line)
            turns = record.get("conversations") or record.get("messages") or []
            text += [t.get("value") or t.get("content") or "" for t in turns]
        with open(os.path.join(work, "corpus.txt"), "w") as f:
            f.write("\n\n".join(text))
        run([KIEM, "tokenizer", "train", "--input", "corpus.txt", "--vocab-size", "4096", "--out",
             "tok.json"], work)
        run([KIEM, "data", "prepare", "--input", "corpus.txt", "--split-on-blank-lines",
             "--tokenizer", "tok.json", "--out", "data"], work)
        run([KIEM, "pretrain", "--data", "data", "--out", "base", "--arch", "llama",
             "--n-layer", str(args.layers), "--n-head", str(args.width // 64), "--n-embd",
             str(args.width), "--context", "512", "--micro-batch", "1", "--batch-tokens", "512",
             "--steps", "1", "--eval-every", "0", "--sample-every", "0", "--threads",
             str(args.threads)], work)
        rows = []
        for name, extra in [("padded rows", []), ("--pack", ["--pack"])]:
            out = "packed" if extra else "padded"
            lora = ["--lora-rank", str(args.lora_rank)] if args.lora_rank else []
            run([KIEM, "finetune", "--model", "base/model", "--data", chats, "--out", out,
                 "--steps", str(args.steps), "--micro-batch", str(args.micro_batch),
                 "--val-fraction", "0", "--eval-every", "0", "--checkpoint-every", "1000",
                 "--threads", str(args.threads)] + lora + extra, work)
            seconds, tokens = step_timing(os.path.join(work, out))
            rows.append((name, tokens / seconds, seconds, tokens))
    print(f"CPU: {cpu} ({simd}); {args.threads} threads; Llama {args.layers} layers, width {args.width}; "
          f"{os.path.basename(chats)}; micro-batch {args.micro_batch}; "
          f"{'LoRA r=%d' % args.lora_rank if args.lora_rank else 'full fine-tune'}; "
          f"{args.steps} steps")
    print(f"{'':14} {'trained tok/s':>13} {'s/step':>8} {'tokens/step':>11}")
    for name, tps, secs, tokens in rows:
        print(f"{name:14} {tps:13.0f} {secs:8.3f} {tokens:11.0f}")
    print(f"--pack: {rows[1][1] / rows[0][1]:.2f}x the trained tokens per second")


if __name__ == "__main__":
    main()
