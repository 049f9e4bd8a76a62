#!/usr/bin/env python3
"""Data-parallel training on one machine: one process of T threads vs T processes of one thread
(`mpirun -n T`), with and without --zero 1, in one run on the same data and global batch, and an
estimate of scaling across machines from the measured communication volume.

    python bench/mpi.py --data /tmp/bench-data [--threads 2] [--steps 12]
        [--n-layer 6 --n-head 6 --n-embd 384 --context 256 --micro-batch 8]
        [--kiem target/release/kiem]

kiem must be built with `cargo build --release --features mpi` (Open MPI's mpirun on PATH).
Every run trains T micro-batches per step (one per process under MPI). tokens/s come from
metrics.jsonl over the steps after the first two (bench/common.py step_timing); "comm" is the
mean `comm_seconds` per step rank 0 spent in collectives (gradient all-reduce, or
reduce-scatter + parameter all-gather with --zero 1, plus the loss reduction); peak RSS is
the largest of the job's processes (wait4 on mpirun reports its descendants' maximum).

The estimate: a ring all-reduce (and ZeRO-1's reduce-scatter + all-gather) moves
2 (N-1)/N x 4 bytes x parameters in and out of every process per step. With the per-process
batch fixed (weak scaling) the compute time per step stays what one process of this run takes,
so the efficiency on N machines at link bandwidth B is compute / (compute + volume / B),
without overlap of communication and backward (kiem does not overlap them; see docs).
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import KIEM, machine, step_timing  # noqa: E402


def parameters(model_dir):
    """Parameter count of a saved model (its safetensors header)."""
    with open(os.path.join(model_dir, "model.safetensors"), "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    total = 0
    for name, info in header.items():
        if name != "__metadata__":
            count = 1
            for d in info["shape"]:
                count *= d
            total += count
    return total


def train(args, processes, threads, extra, work):
    """(tokens/s, seconds/step, comm seconds/step or None, peak RSS MiB, run dir)."""
    out = os.path.join(work, f"run-{processes}x{threads}{''.join(extra)}")
    cmd = [args.kiem, "--quiet", "pretrain", "--data", args.data, "--out", out,
           "--context", str(args.context), "--n-layer", str(args.n_layer),
           "--n-head", str(args.n_head), "--n-embd", str(args.n_embd),
           "--micro-batch", str(args.micro_batch),
           "--batch-tokens", str(args.micro_batch * args.context * args.threads),
           "--steps", str(args.steps), "--lr", "1e-3", "--warmup-steps", "1",
           "--eval-every", "0", "--eval-tokens", "1", "--sample-every", "0",
           "--checkpoint-every", "0", "--threads", str(threads), "--seed", "1", *extra]
    if processes > 1:
        cmd = ["mpirun", "--oversubscribe", "--bind-to", "none", "-n", str(processes)] + cmd
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    with open(os.path.join(work, "stderr"), "w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.exit(f"{' '.join(cmd)} failed:\n{err.read()}")
    seconds, tokens = step_timing(out)
    steps = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    comm = [m["comm_seconds"] for m in steps if "comm_seconds" in m][2:]
    return tokens / seconds, seconds, (sum(comm) / len(comm) if comm else None), \
        usage.ru_maxrss / 1024, out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=2, help="cores used by every configuration")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--kiem", default=KIEM)
    args = ap.parse_args()
    if shutil.which("mpirun") is None:
        sys.exit("mpirun is not on PATH (install openmpi-bin)")
    cpu, simd = machine()
    t = args.threads
    print(f"machine: {cpu} ({simd}); {os.cpu_count()} logical CPUs")
    print(f"model: {args.n_layer} layers, width {args.n_embd}, context {args.context}; "
          f"global batch {t} x {args.micro_batch} rows; {args.steps} steps")
    work = tempfile.mkdtemp(prefix="kiem-mpi-")
    try:
        rows = [(f"1 process x {t} threads", *train(args, 1, t, [], work))]
        rows.append((f"{t} processes x 1 thread", *train(args, t, 1, [], work)))
        rows.append((f"{t} processes x 1 thread, --zero 1", *train(args, t, 1, ["--zero", "1"],
                                                                   work)))
        params = parameters(os.path.join(rows[0][5], "model"))
        base = rows[0][1]
        print(f"{'configuration':<36} {'tokens/s':>9} {'ratio':>6} {'s/step':>7} "
              f"{'comm s/step':>11} {'comm %':>6} {'peak RSS MiB':>12}")
        for name, tps, sec, comm, rss, _ in rows:
            comm_s = f"{comm:.4f}" if comm is not None else "-"
            share = f"{100 * comm / sec:.1f}" if comm is not None else "-"
            print(f"{name:<36} {tps:>9.0f} {tps / base:>6.2f} {sec:>7.3f} {comm_s:>11} "
                  f"{share:>6} {rss:>12.0f}")
        # Weak scaling across machines: each keeps this run's per-process batch and compute.
        _, tps, sec, comm, _, _ = rows[1]
        compute = sec - comm
        print(f"\n{params / 1e6:.1f}M parameters: a ring all-reduce moves 2(N-1)/N x "
              f"{4 * params / 1e6:.0f} MB per process per step; compute {compute:.3f} s/step "
              f"per process (measured above, one thread)")
        print(f"{'machines':>8} " + " ".join(f"{g:>4} Gb/s" for g in (10, 25, 100)))
        for n in (2, 4, 8, 16):
            volume = 2 * (n - 1) / n * 4 * params
            eff = [compute / (compute + volume / (g * 1e9 / 8)) for g in (10, 25, 100)]
            print(f"{n:>8} " + " ".join(f"{100 * e:>8.0f}%" for e in eff))
        print("(efficiency = compute / (compute + volume / bandwidth) per step, no overlap; "
              "a machine of C cores runs C/threads-per-rank ranks, each with this compute)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
