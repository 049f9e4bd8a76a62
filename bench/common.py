"""What the benchmark scripts share: the kiem binary, running it, the machine's description and
a run's step timing from its metrics.jsonl."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KIEM = os.path.join(ROOT, "target", "release", "kiem")


def run(cmd, cwd):
    """Runs `cmd` in `cwd`; exits with its output if it fails."""
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout}\n{out.stderr}")
    return out


def cpu_flags():
    """The first CPU's flags in /proc/cpuinfo."""
    lines = open("/proc/cpuinfo").read().splitlines()
    return set(next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), []))


def machine():
    """(CPU model name, SIMD level: avx512f, avx2 or baseline) from /proc/cpuinfo."""
    lines = open("/proc/cpuinfo").read().splitlines()
    cpu = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")),
               "unknown CPU")
    flags = cpu_flags()
    simd = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "baseline"
    return cpu, simd


def step_timing(run_dir):
    """(seconds, real tokens) per optimizer step of a kiem run, averaged over the steps after
    the first two (metrics.jsonl: `elapsed_seconds` and cumulative `tokens` per step)."""
    steps = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    steps = [m for m in steps if "elapsed_seconds" in m]
    a, b = steps[1], steps[-1]
    n = b["step"] - a["step"]
    return (b["elapsed_seconds"] - a["elapsed_seconds"]) / n, (b["tokens"] - a["tokens"]) / n
