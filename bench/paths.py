#!/usr/bin/env python3
"""Every matmul path this CPU has, in one run: the products alone (`kiem bench gemm`) and
training against PyTorch fp32 (bench/train.py) for fp32, bf16 on AVX512-BF16 and bf16 on AMX
tiles (`KIEM_BF16=amx`), each where the CPU and OS run it. One command for a machine seen for
the first time (issue 19's goals are per CPU); paste its output into bench/RESULTS.md.

    python bench/paths.py --data /tmp/bench-data [--gpt2-data /tmp/bench-gpt2] [--threads 2]
        [--rounds 2] [--python /path/to/python-with-torch] [--dry-run]

--data: a `kiem data prepare` directory for the issue-3 config (context 256, 6 layers, width
384, micro-batch 8, 12 steps, 2 untimed); --gpt2-data adds the 124M config (GPT-2 tokenizer,
context 1024, 12 layers, width 768, micro-batch 1, 5 steps, 1 untimed). Each training line is
one bench/train.py invocation (kiem and PyTorch in the same run); --rounds repeats them, since
virtual machines drift. The path each run really used is read back from its checkpoint: a
request for AMX on a CPU or OS that cannot run it falls back and says so.
"""

import argparse
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import KIEM, ROOT, cpu_flags, machine  # noqa: E402


def paths():
    """(label, --precision, extra environment) for each path this CPU's flags offer."""
    flags = cpu_flags()
    found = [("fp32, own GEMM", "fp32", {})]
    if "avx512_bf16" in flags:
        found.append(("bf16, AVX512-BF16", "bf16", {}))
    if {"amx_bf16", "amx_tile"} <= flags:
        found.append(("bf16, AMX tiles", "bf16", {"KIEM_BF16": "amx"}))
    return found


def run(cmd, env, dry_run):
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    print(f"$ {shown + ' ' if shown else ''}{' '.join(cmd)}", file=sys.stderr)
    if dry_run:
        return ""
    # Only the path asked for: a KIEM_BF16 exported by the caller would change what runs.
    inherited = {k: v for k, v in os.environ.items() if k != "KIEM_BF16"}
    out = subprocess.run(cmd, env={**inherited, **env}, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"failed:\n{out.stdout}\n{out.stderr}", file=sys.stderr)
        return None
    return out.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--gpt2-data")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kiem", default=KIEM)
    ap.add_argument("--python", default=sys.executable, help="Python with torch")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args()
    if args.rounds < 1 or args.threads < 1:
        ap.error("--rounds and --threads must be at least 1")

    cpu, simd = machine()
    found = paths()
    print(f"machine: {cpu}; SIMD level {simd}; {args.threads} threads")
    print(f"paths offered by the CPU flags: {', '.join(p[0] for p in found)}\n")

    # One `bench gemm` shows every fp32 level and the AVX512-BF16 kernel; AMX's column only
    # when asked for.
    gemm_envs = [{}] + [env for _, _, env in found if env]
    for env in gemm_envs:
        shown = " ".join(f"{k}={v}" for k, v in env.items())
        out = run([args.kiem, "bench", "gemm", "--threads", str(args.threads)], env, args.dry_run)
        print(f"`{shown + ' ' if shown else ''}kiem bench gemm --threads {args.threads}`:")
        print(out if out is not None else "failed (its output is above, on stderr)\n")

    configs = [("issue-3", args.data, ["--steps", "12", "--warmup", "2"])]
    if args.gpt2_data:
        configs.append(("124M", args.gpt2_data,
                        ["--steps", "5", "--warmup", "1", "--context", "1024", "--n-layer", "12",
                         "--n-head", "12", "--n-embd", "768", "--micro-batch", "1"]))
    print("| config | path asked | path kiem used | kiem tok/s | PyTorch fp32 tok/s | kiem / PyTorch |")
    print("|---|---|---|---:|---:|---:|")
    for _ in range(args.rounds):
        for name, data, flags in configs:
            for label, precision, env in found:
                out = run([sys.executable, os.path.join(ROOT, "bench", "train.py"), "--data", data,
                           "--threads", str(args.threads), "--kiem", args.kiem, "--python",
                           args.python, "--precision", precision, *flags], env, args.dry_run)
                if args.dry_run:
                    continue
                if out is None:
                    print(f"| {name} | {label} | failed (see stderr) | | | |", flush=True)
                    continue
                used = re.search(r"kiem's matmul path: (.*)", out)
                tps = re.search(r"\| tokens/s \| ([\d.]+) \| ([\d.]+) \| ([\d.]+x) \|", out)
                if not tps:
                    sys.exit(f"no tokens/s line in bench/train.py's output:\n{out}")
                print(f"| {name} | {label} | {used.group(1) if used else '?'} | {tps.group(1)} "
                      f"| {tps.group(2)} | {tps.group(3)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
