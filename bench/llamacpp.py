#!/usr/bin/env python3
"""kiem against llama.cpp's `llama-bench` on the same GGUF files, same threads, in one run:
prefill tokens/s (a 512-token prompt) and batch-1 decode tokens/s (128 tokens), Q8_0 and Q4_0.

    python bench/llamacpp.py --llama-bench PATH/TO/llama-bench [--layers 12] [--width 768]
        [--threads 2] [--types q8_0 q4_0] [--repeat 3] [--llama-quantize PATH/TO/llama-quantize]
        [--work DIR]

Types kiem writes (f32, f16, bf16, q8_0, q4_0, q4_1) are exported by kiem; the others (q4_k_m,
q5_k_m, q6_k, q5_0, q5_1, ..., any name llama-quantize takes) are made by llama.cpp's own
`llama-quantize` from kiem's f32 export (build it as llama-bench, `--target llama-quantize`).

llama.cpp is not a dependency of kiem: build `llama-bench` from the source that ships in the
PyPI sdist of `llama-cpp-python` (vendor/llama.cpp), outside the repository, e.g.

    pip download --no-deps --no-binary llama-cpp-python llama-cpp-python -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-*.tar.gz -C /tmp/lcp && cd /tmp/lcp/*/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF
    cmake --build build --target llama-bench -j2      # cmake itself: pip install cmake

(In a VM that advertises AMX but faults on it, GGML_NATIVE=ON builds a llama-bench that dies
with SIGILL: configure -DGGML_NATIVE=OFF with the CPU's levels named instead, e.g. -DGGML_AVX2=ON
-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON.)

The model: `kiem data prepare --tokenizer gpt2` on a generated corpus and `kiem pretrain --arch
llama` for one step (a random Llama of --layers blocks, width --width, heads of 64, SwiGLU, the
GPT-2 vocabulary, context 1024), exported by `kiem export --format gguf --type T` (llama.cpp's
layout: q/k permuted, tokenizer metadata with pre-tokenizer `gpt-2`). Both programs read the same
file. kiem: `kiem bench generate --model FILE --batch 1 --tokens 128` with `--prompt-tokens
512` for prefill and `--prompt-tokens 1` for decoding (llama-bench decodes from an empty
context), the fastest of --repeat runs; it also reports the measured read bandwidth and the
bound it sets on decoding ("of bound": the median over repetitions of each one's decode speed
against the bandwidth measured between its steps; the last column gives every repetition's
fraction and bandwidth, lowest to highest). llama.cpp: `llama-bench -m FILE -p 512 -n 128 -t
THREADS -r REPEAT`, its fastest repetition. The VMs this runs on are noisy: compare figures of
one run only.
Nothing is downloaded.
"""
import argparse
import json
import os
import sys
import tempfile

from common import KIEM, machine, run


def make_model(work, args):
    if os.path.exists(os.path.join(work, "base", "model")):
        return  # --work kept it from an earlier run
    words = ("order parcel invoice refund delivery address warehouse courier customer "
             "shipment tracking return exchange payment").split()
    corpus = "\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(60)) + f" {i}"
                         for i in range(3000))
    with open(os.path.join(work, "corpus.txt"), "w") as f:
        f.write(corpus)
    run([KIEM, "data", "prepare", "--input", "corpus.txt", "--split-on-blank-lines",
         "--tokenizer", "gpt2", "--out", "data"], work)
    run([KIEM, "pretrain", "--data", "data", "--out", "base", "--arch", "llama", "--n-layer",
         str(args.layers), "--n-head", str(args.width // 64), "--n-embd", str(args.width),
         "--context", "1024", "--micro-batch", "1", "--batch-tokens", "1024", "--steps", "1",
         "--eval-every", "0", "--sample-every", "0", "--threads", str(args.threads)], work)


def kiem_speed(path, kind, args, work):
    # No --weights: kiem decodes the file's own blocks, as llama.cpp does. Prefill from a
    # 512-token prompt; decoding from a 1-token one, as llama-bench's tg128 decodes from an
    # empty context.
    def bench(prompt_tokens):
        out = run([KIEM, "bench", "generate", "--model", path, "--batch", "1",
                   "--prompt-tokens", str(prompt_tokens), "--tokens", "128",
                   "--repeat", str(args.repeat), "--threads", str(args.threads), "--json"], work)
        return json.loads(out.stdout)
    prefill = bench(512)
    r = bench(1)
    decode = r["decode"][0]
    # Each repetition's fraction of the bound and the bandwidth measured between its steps:
    # their spread shows how far this machine's bandwidth moved during the run.
    reps = decode.get("repetitions") or []
    spread = ([rep["tokens_per_second"] * r["bytes_per_token"] / rep["read_bandwidth"]
               for rep in reps], [rep["read_bandwidth"] for rep in reps])
    return (prefill["prefill_tokens_per_second"], decode["tokens_per_second"],
            r.get("bandwidth_fraction"), r.get("bytes_per_token"), r.get("parameters"), spread)


KIEM_TYPES = {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"}


def make_file(kind, args, work):
    path = os.path.join(work, f"model-{kind}.gguf")
    if os.path.exists(path):
        return path  # --work kept it
    if kind in KIEM_TYPES:
        run([KIEM, "export", "--format", "gguf", "--type", kind, "--model", "base/model",
             "--out", path], work)
        return path
    if not args.llama_quantize:
        sys.exit(f"type {kind}: kiem does not write it; pass --llama-quantize to make it")
    f32 = make_file("f32", args, work) if not os.path.exists(
        os.path.join(work, "model-f32.gguf")) else os.path.join(work, "model-f32.gguf")
    run([args.llama_quantize, f32, path, kind.upper()], work)
    return path


def llamacpp_speed(path, args, work):
    out = run([args.llama_bench, "-m", path, "-p", "512", "-n", "128", "-t", str(args.threads),
               "-r", str(args.repeat), "-o", "json"], work)
    rows = json.loads(out.stdout)
    # The fastest repetition, as kiem's figures are.
    fastest = lambda r: max(r.get("samples_ts") or [r["avg_ts"]])
    prefill = next(fastest(r) for r in rows if r.get("n_prompt") == 512 and r.get("n_gen") == 0)
    decode = next(fastest(r) for r in rows if r.get("n_gen") == 128 and r.get("n_prompt") == 0)
    build = rows[0].get("build_commit", "?")
    return prefill, decode, build


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-bench", required=True)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--types", nargs="+", default=["q8_0", "q4_0"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--llama-quantize", help="llama.cpp's llama-quantize, for types kiem does "
                   "not write (K quants, Q5_0, Q5_1)")
    p.add_argument("--work", help="keep the model and its GGUF files in this folder (reused "
                   "by later runs with the same folder, --layers and --width; default: a temporary folder)")
    args = p.parse_args()
    if not os.path.exists(KIEM):
        sys.exit("build kiem first: cargo build --release")
    args.llama_bench = os.path.abspath(args.llama_bench)
    if args.llama_quantize:
        args.llama_quantize = os.path.abspath(args.llama_quantize)
    cpu, simd = machine()
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        work = os.path.abspath(args.work) if args.work else temporary
        os.makedirs(work, exist_ok=True)
        make_model(work, args)
        for kind in args.types:
            path = make_file(kind, args, work)
            # Written files are flushed before timing: their write-back (the pretraining's
            # checkpoints, the exports) slowed whichever type came first (Q8_0 prefill 1470-1520
            # tok/s first in a run, 2650 second).
            os.sync()
            size = os.path.getsize(path)
            k_pre, k_dec, frac, _, params, spread = kiem_speed(path, kind, args, work)
            l_pre, l_dec, build = llamacpp_speed(path, args, work)
            rows.append((kind, size, k_pre, l_pre, k_dec, l_dec, frac, params, build, spread))
    print(f"CPU: {cpu} ({simd}); {args.threads} threads; random Llama, {args.layers} layers, "
          f"width {args.width}, GPT-2 vocabulary ({rows[0][7] / 1e6:.0f}M parameters); "
          f"llama.cpp build {rows[0][8]}")
    print(f"{'type':7} {'file MiB':>8} | {'prefill tok/s':>13} {'llama.cpp':>9} {'ratio':>6} | "
          f"{'decode tok/s':>12} {'llama.cpp':>9} {'ratio':>6} {'of bound':>8} | "
          f"{'repetitions: of bound, GB/s':>27}")
    for kind, size, k_pre, l_pre, k_dec, l_dec, frac, _, _, (fracs, bws) in rows:
        spread = (f"{min(fracs) * 100:.0f}-{max(fracs) * 100:.0f}%, "
                  f"{min(bws) / 1e9:.1f}-{max(bws) / 1e9:.1f}" if fracs else "")
        print(f"{kind:7} {size / 2**20:8.0f} | {k_pre:13.1f} {l_pre:9.1f} {k_pre / l_pre:6.2f} | "
              f"{k_dec:12.1f} {l_dec:9.1f} {k_dec / l_dec:6.2f} "
              f"{(frac or float('nan')) * 100:7.0f}% | {spread:>27}")
    print("goals: decode >= 1.0x llama.cpp and >= 80% of the bandwidth bound; prefill >= 1.0x")


if __name__ == "__main__":
    main()
