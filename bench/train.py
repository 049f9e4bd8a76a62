#!/usr/bin/env python3
"""Training speed, kiem vs PyTorch eager, in one run on the same data, model and thread count.

Runs `kiem pretrain` and bench/pytorch_gpt.py one after the other with identical settings and
prints tokens/s of each (first --warmup steps excluded), their ratio, and each process's peak RSS,
with the CPU model, its SIMD level and the matmul path kiem used (from the run's checkpoint).

    python bench/train.py --data runs/bench-data [--threads 2] [--steps 20]
        [--arch gpt2|llama] [--n-kv-head N]
        [--precision fp32|bf16] [--torch-precision fp32|bf16]
        [--kiem target/release/kiem] [--min-ratio 1.0] [--dry-run]

The data directory must come from `kiem data prepare` (its tokenizer sets the vocabulary).
Default model: the issue's benchmark config (context 256, 6 layers, 6 heads, width 384, micro-batch 8).
--arch llama trains kiem's `pretrain --arch llama` model (RMS norm, rotary positions, SwiGLU MLP of
width ceil(8·width/3/64)·64, --n-kv-head key/value heads [default: heads/2 when even, else heads],
no biases, tied head) against the same model in PyTorch (bench/pytorch_gpt.py --arch llama).
--precision sets kiem's matmul operands (bf16: fp32 sums and master weights); --torch-precision
bf16 runs the reference under torch.autocast. Achieved FLOP/s use the PaLM count per token
(6 × matrix parameters, head included, + 12 × layers × width × context; for llama the matrices are
q, k, v, o, gate, up, down and the head) and are set against the measured peak: the GFLOP/s of
a 2048² torch.mm at the same thread count and precision (fp32 and bf16 both reported).
--min-ratio makes the script exit non-zero when kiem / PyTorch tokens/s falls below it.
--dry-run prints both command lines and exits.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_wrapper(cmd):
    """Runs cmd under a tiny wrapper that reports the child's own ru_maxrss (KiB)."""
    code = ("import os,sys,subprocess;p=subprocess.Popen(sys.argv[1:]);"
            "_,s,r=os.wait4(p.pid,0);print('RSS_KIB',r.ru_maxrss,file=sys.stderr);"
            "sys.exit(os.waitstatus_to_exitcode(s))")
    proc = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    rss = [line for line in proc.stderr.splitlines() if line.startswith("RSS_KIB")][-1]
    return proc.stdout, int(rss.split()[1]) / 1024


def measure_peaks(args):
    """Both precisions' 2048² matmul GFLOP/s, from the reference Python at the run's threads."""
    code = ("import sys,json,torch;sys.path.insert(0,sys.argv[1]);import pytorch_gpt as g;"
            "torch.set_num_threads(int(sys.argv[2]));"
            "print(json.dumps({p: g.measured_peak(p) for p in ('fp32','bf16')}))")
    out = subprocess.run([args.python, "-c", code, os.path.join(ROOT, "bench"), str(args.threads)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--n-kv-head", type=int, default=None,
                    help="key/value heads for --arch llama [default: n_head/2 when even, else n_head]")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--kiem", default=os.path.join(ROOT, "target", "release", "kiem"))
    ap.add_argument("--python", default=sys.executable, help="Python with torch for the reference")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--torch-precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--min-ratio", type=float, default=None)
    ap.add_argument("--dry-run", action="store_true", help="print the two command lines and exit")
    args = ap.parse_args()
    arch_flags = []
    if args.arch == "llama":
        kv = args.n_kv_head if args.n_kv_head is not None else (
            args.n_head // 2 if args.n_head % 2 == 0 else args.n_head)
        if kv < 1 or args.n_head % kv or args.n_embd % args.n_head or (args.n_embd // args.n_head) % 2:
            ap.error(f"--arch llama needs --n-kv-head ({kv}) dividing --n-head and an even head size")
        arch_flags = ["--arch", "llama", "--n-kv-head", str(kv)]
    elif args.n_kv_head is not None:
        ap.error("--n-kv-head needs --arch llama")

    manifest = json.load(open(os.path.join(args.data, "manifest.json")))
    vocab = manifest["tokenizer"]["vocab_size"]
    shape = ["--context", str(args.context), "--n-layer", str(args.n_layer), "--n-head", str(args.n_head),
             "--n-embd", str(args.n_embd), "--micro-batch", str(args.micro_batch)]

    def kiem_cmd(run_dir):
        return [args.kiem, "--quiet", "pretrain", "--data", args.data, "--out", run_dir, *arch_flags, *shape,
                "--steps", str(args.steps), "--lr", "1e-3", "--warmup-steps", "1", "--eval-every", "0",
                "--eval-tokens", "1", "--sample-every", "0", "--checkpoint-every", "0",
                "--threads", str(args.threads), "--precision", args.precision]

    ref_cmd = [args.python, os.path.join(ROOT, "bench", "pytorch_gpt.py"), "--data", args.data, "--vocab", str(vocab),
               *arch_flags, *shape, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--precision", args.torch_precision]
    if args.dry_run:
        print(" ".join(kiem_cmd("RUN_DIR")))
        print(" ".join(ref_cmd))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        _, kiem_rss = peak_rss_wrapper(kiem_cmd(run_dir))
        steps = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if '"loss"' in l]
        first, last = steps[args.warmup - 1], steps[-1]
        kiem_tps = (last["tokens"] - first["tokens"]) / (last["elapsed_seconds"] - first["elapsed_seconds"])
        kiem_losses = [s["loss"] for s in steps]
        # The matmul path the run used, as its last checkpoint records it.
        states = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "*", "trainer_state",
                                               "state.json")))
        matmul_path = (json.load(open(states[-1]))["trainer"].get("matmul_path", "not recorded")
                       if states else "not recorded")

    out, torch_rss = peak_rss_wrapper(ref_cmd)
    ref = json.loads(out.strip().splitlines()[-1])
    ratio = kiem_tps / ref["tokens_per_second"]
    c, layers = args.n_embd, args.n_layer
    if args.arch == "llama":  # q and o c×c, k and v c×kv·hd, gate/up/down c×hidden, plus the head
        hidden = (8 * c + 3 * 64 - 1) // (3 * 64) * 64
        params = layers * (2 * c * c + 2 * c * kv * (c // args.n_head) + 3 * c * hidden) + vocab * c
    else:
        params = layers * 12 * c * c + vocab * c  # the weights of matrix products (the head included)
    flops_per_token = 6 * params + 12 * layers * c * args.context
    peak = {"fp32": ref["peak_gflops"]} if args.torch_precision == "fp32" else {}
    if args.precision != args.torch_precision or "fp32" not in peak:
        peak.update(measure_peaks(args))
    kiem_gflops = kiem_tps * flops_per_token / 1e9
    torch_gflops = ref["tokens_per_second"] * flops_per_token / 1e9
    print(f"config: vocab {vocab}, context {args.context}, {args.n_layer} layers, {args.n_head} heads, "
          f"width {args.n_embd}, micro-batch {args.micro_batch}, {args.threads} threads, "
          f"{args.steps} steps ({args.warmup} untimed); torch {ref['torch']}"
          + (f"; llama, {kv} kv heads, MLP {hidden}" if args.arch == "llama" else ""))
    cpu, simd = machine()
    print(f"machine: {cpu} ({simd}); kiem's matmul path: {matmul_path}")
    print(f"measured peak (2048² torch.mm, {args.threads} threads): "
          + ", ".join(f"{p} {g:.0f} GFLOP/s" for p, g in sorted(peak.items())))
    print(f"| | kiem ({args.precision}) | PyTorch eager ({args.torch_precision}) | kiem / PyTorch |")
    print("|---|---|---|---|")
    print(f"| tokens/s | {kiem_tps:.0f} | {ref['tokens_per_second']:.0f} | {ratio:.2f}x |")
    print(f"| GFLOP/s (% of {args.precision} / {args.torch_precision} peak) | {kiem_gflops:.0f} "
          f"({100 * kiem_gflops / peak[args.precision]:.0f}%) | {torch_gflops:.0f} "
          f"({100 * torch_gflops / peak[args.torch_precision]:.0f}%) | |")
    print(f"| peak RSS (MiB) | {kiem_rss:.0f} | {torch_rss:.0f} | {kiem_rss / torch_rss:.2f}x |")
    print(f"| loss at step 1 / {args.steps} | {kiem_losses[0]:.3f} / {kiem_losses[-1]:.3f} | "
          f"{ref['losses'][0]:.3f} / {ref['losses'][-1]:.3f} | |")
    if args.min_ratio is not None and ratio < args.min_ratio:
        print(f"FAIL: kiem/PyTorch tokens/s ratio {ratio:.2f} < {args.min_ratio}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
