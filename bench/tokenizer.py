#!/usr/bin/env python3
"""Tokenizer speed, kiem vs tiktoken, in one run on the same text.

Runs tiktoken's r50k_base (GPT-2) encoder, built offline from the GPT-2 vocabulary files in this
repository, on the inputs split at blank lines ("\n\n"), single-threaded and with N threads;
then runs `kiem bench tokenizer --json` on the same inputs (which splits them the same way) and
prints both with their ratios. Token counts must agree, or the comparison is void.

    python3 bench/tokenizer.py --input data/books.txt [--threads N]   (after `kiem demo --write-data data`)
        [--kiem target/release/kiem] [--min-ratio 1.0]

--min-ratio makes the script exit non-zero when kiem's single-threaded GPT-2 encoding is slower
than that multiple of tiktoken's.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import tiktoken
import tiktoken.load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "crates", "kiem-tokenizer", "assets")
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def r50k_base() -> tiktoken.Encoding:
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        os.path.join(ASSETS, "gpt2_vocab.bpe"), os.path.join(ASSETS, "gpt2_encoder.json")
    )
    return tiktoken.Encoding(
        name="r50k_base",
        explicit_n_vocab=50257,
        pat_str=R50K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 50256},
    )


def fastest(repeat, fn):
    best, out = float("inf"), None
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="UTF-8 text files")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for the batch measurements")
    parser.add_argument("--repeat", type=int, default=3, help="timed repetitions; the fastest counts")
    parser.add_argument("--kiem", default=os.path.join(ROOT, "target", "release", "kiem"), help="kiem binary")
    parser.add_argument("--min-ratio", type=float, default=None,
                        help="fail unless kiem 1-thread MB/s >= this x tiktoken 1-thread MB/s")
    args = parser.parse_args()

    text = "".join(open(p, encoding="utf-8").read() for p in args.input)
    docs = [d for d in text.split("\n\n") if d]
    nbytes = sum(len(d.encode("utf-8")) for d in docs)

    enc = r50k_base()
    t_single, tokens = fastest(args.repeat, lambda: sum(len(enc.encode_ordinary(d)) for d in docs))
    t_multi, _ = fastest(args.repeat, lambda: enc.encode_ordinary_batch(docs, num_threads=args.threads))

    out = subprocess.run(
        [args.kiem, "bench", "tokenizer", "--json", "--threads", str(args.threads),
         "--repeat", str(args.repeat), "--input", *args.input],
        check=True, capture_output=True, text=True,
    ).stdout
    kiem = json.loads(out)
    if kiem["gpt2_tokens"] != tokens:
        print(f"token counts differ: kiem {kiem['gpt2_tokens']} vs tiktoken {tokens}", file=sys.stderr)
        return 2

    tk_single = nbytes / 1e6 / t_single
    tk_multi = nbytes / 1e6 / t_multi
    ks, km = kiem["gpt2_encode_1_thread_mb_s"], kiem["gpt2_encode_all_threads_mb_s"]
    print(f"machine: {kiem['machine']}; python {platform.python_version()}, tiktoken {tiktoken.__version__}")
    print(f"text: {', '.join(args.input)}: {len(docs)} documents, {nbytes / 1e6:.2f} MB, {tokens} GPT-2 tokens")
    print()
    print("| measurement | kiem | tiktoken | kiem / tiktoken |")
    print("|---|---|---|---|")
    print(f"| GPT-2 encode, 1 thread (MB/s) | {ks:.2f} | {tk_single:.2f} | {ks / tk_single:.2f}x |")
    print(f"| GPT-2 encode, {args.threads} threads (MB/s) | {km:.2f} | {tk_multi:.2f} | {km / tk_multi:.2f}x |")
    print(f"| BPE training to {kiem['trained_vocab']} tokens, {args.threads} threads (s) | {kiem['bpe_train_seconds']:.2f} | - | - |")
    print(f"| trained-tokenizer encode, 1 thread (MB/s) | {kiem['trained_encode_1_thread_mb_s']:.2f} | - | - |")
    scale = kiem["prepare_all_threads_mb_s"] / kiem["prepare_1_thread_mb_s"]
    print(f"| data prepare (gpt2), 1 thread (MB/s) | {kiem['prepare_1_thread_mb_s']:.2f} | - | - |")
    print(f"| data prepare (gpt2), {args.threads} threads (MB/s) | {kiem['prepare_all_threads_mb_s']:.2f} | - | {scale:.2f}x vs 1 thread |")
    if args.min_ratio is not None and ks / tk_single < args.min_ratio:
        print(f"FAIL: kiem/tiktoken single-threaded ratio {ks / tk_single:.2f} < {args.min_ratio}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
