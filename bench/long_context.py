#!/usr/bin/env python3
"""Training at long context: peak RSS and tokens/s of `kiem pretrain` at context 256 and 2048,
with and without --recompute, optionally beside another kiem binary (an older build) in the
same run.

    python bench/long_context.py --data /tmp/bench-data [--threads 2] [--steps 4]
        [--micro-batch 4] [--baseline /path/to/older/kiem] [--precision fp32|bf16]

Model: the issue-3 benchmark config (6 layers, 6 heads, width 384; the data's vocabulary).
tokens/s is measured over the steps after the first two (bench/common.py step_timing). The
"expected" column is what the attention FLOPs alone predict for context 2048 from the same
binary's context-256 speed: the PaLM count per token, 6 x matrix parameters + 12 x layers x
width x context, at context 256 over the same at 2048. The data directory must come from
`kiem data prepare`.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import KIEM, machine, step_timing  # noqa: E402

LAYERS, HEADS, WIDTH = 6, 6, 384


def train(kiem, data, context, micro_batch, steps, threads, extra):
    """(peak RSS MiB, tokens/s) of one pretrain run in a fresh directory."""
    out = tempfile.mkdtemp(prefix="kiem-long-")
    try:
        cmd = [kiem, "--quiet", "pretrain", "--data", data, "--out", os.path.join(out, "run"),
               "--context", str(context), "--n-layer", str(LAYERS), "--n-head", str(HEADS),
               "--n-embd", str(WIDTH), "--micro-batch", str(micro_batch), "--steps", str(steps),
               "--lr", "1e-3", "--warmup-steps", "1", "--eval-every", "0", "--eval-tokens", "1",
               "--sample-every", "0", "--checkpoint-every", "0", "--threads", str(threads),
               *extra]
        with open(os.path.join(out, "stderr"), "w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
            # The child's own peak RSS (wait4 reports that process's usage alone).
            _, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                err.seek(0)
                sys.exit(f"{' '.join(cmd)} failed:\n{err.read()}")
        rss = usage.ru_maxrss / 1024
        seconds, tokens = step_timing(os.path.join(out, "run"))
        return rss, tokens / seconds
    finally:
        shutil.rmtree(out, ignore_errors=True)


def vocab_of(data):
    return json.load(open(os.path.join(data, "manifest.json")))["tokenizer"]["vocab_size"]


def flops_per_token(vocab, context):
    hidden = 4 * WIDTH
    matrices = LAYERS * (WIDTH * 3 * WIDTH + WIDTH * WIDTH + 2 * WIDTH * hidden) + vocab * WIDTH
    return 6 * matrices + 12 * LAYERS * WIDTH * context


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--kiem", default=KIEM)
    ap.add_argument("--baseline", help="another kiem binary (e.g. an older build) to compare")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="kiem's matmul precision (bf16 needs AVX512-BF16)")
    args = ap.parse_args()
    cpu, simd = machine()
    vocab = vocab_of(args.data)
    print(f"machine: {cpu} ({simd}); {args.threads} threads; model {LAYERS} layers, width "
          f"{WIDTH}, vocab {vocab}, micro-batch {args.micro_batch}, {args.steps} steps, "
          f"{args.precision} matmuls")
    precision = ["--precision", args.precision]
    runs = [(args.kiem, "kiem", precision)]
    if args.baseline:
        runs.insert(0, (args.baseline, "baseline", precision))
    rows = []
    for context in (256, 2048):
        for binary, name, extra in runs:
            rows.append((name, context, "", *train(binary, args.data, context, args.micro_batch,
                                                   args.steps, args.threads, extra)))
    rows.append(("kiem", 2048, "--recompute",
                 *train(args.kiem, args.data, 2048, args.micro_batch, args.steps, args.threads,
                        ["--recompute", *precision])))
    ratio = flops_per_token(vocab, 256) / flops_per_token(vocab, 2048)
    print("| binary | context | flags | peak RSS (MiB) | tokens/s | expected from ctx 256 |")
    print("|---|---|---|---|---|---|")
    speed256 = {name: tps for name, ctx, _, _, tps in rows if ctx == 256}
    for name, context, flags, rss, tps in rows:
        expected = f"{speed256[name] * ratio:.0f}" if context == 2048 else ""
        print(f"| {name} | {context} | {flags} | {rss:.0f} | {tps:.0f} | {expected} |")


if __name__ == "__main__":
    main()
