#!/usr/bin/env python3
"""LoRA and QLoRA fine-tuning against full fine-tuning in kiem, and against `peft` + PyTorch, on
the same Llama-family model, batch and adapter config, in one run: peak resident memory and step
time.

    python bench/lora.py [--layers 12] [--width 768] [--seq 256] [--micro-batch 4]
        [--steps 6] [--rank 16] [--threads 2] [--skip-peft] [--recompute]

The base: `kiem tokenizer train` on a generated corpus (kiem's chat tokens included) and `kiem
pretrain --arch llama` for one step: a random Llama (width --width, --layers blocks, heads of
64, SwiGLU) written as a Hugging Face directory, loaded by kiem and by transformers alike.
Conversations are generated so that every one is --seq tokens long or more (cut to the
context), so each micro-batch is --micro-batch x --seq tokens on both sides.

kiem: `kiem finetune` (full) and `kiem finetune --lora-rank R --lora-alpha 2R --lora-targets
all` (and the same with `--base-weights q4_0`: QLoRA, the frozen layer matrices kept as Q4_0
blocks) under /usr/bin/time -v (peak RSS of the whole process); step time is the mean over steps
after the first two, from metrics.jsonl's elapsed_seconds. peft + PyTorch: the same model via
AutoModelForCausalLM (float32, eager attention), get_peft_model(LoraConfig(r=R, lora_alpha=2R,
target_modules="all-linear")), torch.optim.AdamW over the adapters, random token batches of the
same shape, the same number of steps and the same timing rule; peak RSS by getrusage in its own
process. --recompute passes `--recompute` to every kiem run (activations of one layer kept,
recomputed in the backward pass). Prints a table and ratios; nothing is downloaded.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from common import KIEM, machine, run, step_timing


def peak_rss_mib(stderr):
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    return int(m.group(1)) / 1024 if m else float("nan")


def make_base(work, args):
    words = "order parcel invoice refund delivery address warehouse courier customer".split()
    corpus = "\n\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) + f" {i}"
                         for i in range(4000))
    with open(os.path.join(work, "corpus.txt"), "w") as f:
        f.write(corpus)
    run([KIEM, "tokenizer", "train", "--input", "corpus.txt", "--vocab-size", "4096", "--out",
         "tok.json"], work)
    run([KIEM, "data", "prepare", "--input", "corpus.txt", "--split-on-blank-lines",
         "--tokenizer", "tok.json", "--out", "data"], work)
    heads = args.width // 64
    run([KIEM, "pretrain", "--data", "data", "--out", "base", "--arch", "llama", "--n-layer",
         str(args.layers), "--n-head", str(heads), "--n-embd", str(args.width), "--context",
         str(args.seq), "--micro-batch", "1", "--batch-tokens", str(args.seq), "--steps", "1",
         "--eval-every", "0", "--sample-every", "0", "--threads", str(args.threads)], work)
    long_answer = " ".join(words[j % len(words)] for j in range(args.seq))
    with open(os.path.join(work, "chat.jsonl"), "w") as f:
        for i in range(64):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"Where is order {i}?"},
                {"role": "assistant", "content": f"Order {i}: {long_answer}"}]}) + "\n")


def kiem_finetune(work, args, name, extra):
    steps = str(args.steps)
    cmd = ["/usr/bin/time", "-v", KIEM, "finetune", "--model", "base/model", "--data",
           "chat.jsonl", "--out", name, "--steps", steps, "--micro-batch", str(args.micro_batch),
           "--val-fraction", "0", "--eval-every", "0", "--checkpoint-every", "1000",
           "--threads", str(args.threads)] + extra
    out = run(cmd, work)
    return peak_rss_mib(out.stderr), step_timing(os.path.join(work, name))[0]


PEFT_CHILD = r"""
import resource, sys, time, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
model_dir, rank, batch, seq, steps, threads = sys.argv[1], *map(int, sys.argv[2:7])
torch.set_num_threads(threads)
model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").float()
model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                         target_modules="all-linear", task_type="CAUSAL_LM"))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
g = torch.Generator().manual_seed(0)
vocab = model.config.vocab_size
times = []
for step in range(steps):
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad()
    times.append(time.perf_counter() - t)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(rss, sum(times[2:]) / len(times[2:]))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-peft", action="store_true")
    p.add_argument("--recompute", action="store_true",
                   help="kiem runs keep one layer's activations (kiem finetune --recompute)")
    args = p.parse_args()
    if not os.path.exists(KIEM):
        sys.exit("build kiem first: cargo build --release")
    cpu, simd = machine()
    with tempfile.TemporaryDirectory() as work:
        make_base(work, args)
        config = json.load(open(os.path.join(work, "base/model/config.json")))
        lora = ["--lora-rank", str(args.rank), "--lora-alpha", str(2 * args.rank),
                "--lora-targets", "all"]
        every = ["--recompute"] if args.recompute else []
        lora += every
        rows = [("kiem full fine-tune",) + kiem_finetune(work, args, "full", every),
                ("kiem LoRA",) + kiem_finetune(work, args, "lora", lora),
                ("kiem QLoRA (q4_0 base)",) + kiem_finetune(
                    work, args, "qlora", lora + ["--base-weights", "q4_0"])]
        if not args.skip_peft:
            out = subprocess.run([sys.executable, "-c", PEFT_CHILD, os.path.join(work,
                                  "base/model"), str(args.rank), str(args.micro_batch),
                                  str(args.seq), str(args.steps), str(args.threads)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"peft run failed:\n{out.stderr}")
            rss, secs = map(float, out.stdout.split()[-2:])
            rows.append(("peft + PyTorch LoRA", rss, secs))
    print(f"CPU: {cpu} ({simd}); {args.threads} threads; Llama {config['num_hidden_layers']} layers, "
          f"width {config['hidden_size']}, MLP {config['intermediate_size']}, vocab "
          f"{config['vocab_size']}; micro-batch {args.micro_batch} x {args.seq} tokens; "
          f"LoRA r={args.rank} alpha={2 * args.rank} on every linear layer; {args.steps} steps"
          + ("; kiem with --recompute" if args.recompute else ""))
    print(f"{'':24} {'peak RSS MiB':>12} {'s/step':>8}")
    for name, rss, secs in rows:
        print(f"{name:24} {rss:12.0f} {secs:8.3f}")
    full, lora_row, qlora = rows[0], rows[1], rows[2]
    print(f"LoRA / full RSS: {lora_row[1] / full[1]:.2f} (goal <= 0.5); "
          f"LoRA step time vs full: {full[2] / lora_row[2]:.2f}x faster")
    print(f"QLoRA / full RSS: {qlora[1] / full[1]:.2f} (goal <= 0.3); "
          f"QLoRA step time vs LoRA: {lora_row[2] / qlora[2]:.2f}x")
    if len(rows) > 3:
        peft = rows[3]
        print(f"kiem LoRA vs peft + PyTorch: {peft[2] / lora_row[2]:.2f}x faster (goal >= 1.5), "
              f"RSS {lora_row[1] / peft[1]:.2f}x")


if __name__ == "__main__":
    main()
