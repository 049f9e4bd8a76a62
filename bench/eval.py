#!/usr/bin/env python3
"""Multiple-choice scoring speed of `kiem eval` against a plain `transformers` loop (and, when
lm_eval is installed, the harness' own HFLM), on the same model and task, in one run.

    python bench/eval.py [--model DIR] [--task FILE] [--limit N] [--threads 2] [--batch 8]
        [--min-ratio R]

Without --model, a GPT-2 124M with random weights is written by transformers to a temporary
directory (with the GPT-2 tokenizer of crates/kiem/tests/fixtures/hf/tiny_a), so nothing is
downloaded. Both sides score every choice of the first --limit questions as lm-evaluation-harness
does (context and " " + choice encoded together, split after the context's tokens); the script
checks that their log-likelihoods agree (max |difference| printed) before it compares times.

kiem: `target/release/kiem eval --task FILE --limit N --batch B --out report.json`, timed as a
whole command minus the same command with `--limit 1` (model loading and start-up), best of
--repeat. transformers: `AutoModelForCausalLM`, float32, torch.set_num_threads, one forward pass
per choice of context + continuation (the plain loop people write), timed after loading, best of
--repeat. HFLM (if importable): `HFLM(pretrained=DIR, batch_size=B).loglikelihood(requests)`.
Exit code 1 when kiem's questions/s over the plain loop's is under --min-ratio.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import machine

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOKENIZER_FILES = os.path.join(ROOT, "crates", "kiem", "tests", "fixtures", "hf", "tiny_a")


def random_gpt2(directory):
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "special_tokens_map.json"):
        path = os.path.join(TOKENIZER_FILES, name)
        if os.path.exists(path):
            shutil.copy(path, directory)


def kiem_scores(kiem, model, task, limit, batch, threads, out):
    cmd = [kiem, "eval", "--model", model, "--task", task, "--limit", str(limit),
           "--batch", str(batch), "--threads", str(threads), "--out", out]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--task", default=os.path.join(ROOT, "data", "eval", "bigbench",
                                                       "physical_intuition.json"))
    parser.add_argument("--kiem", default=os.path.join(ROOT, "target", "release", "kiem"))
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--min-ratio", type=float)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scratch = tempfile.mkdtemp(prefix="kiem-bench-eval-")
    model_dir = args.model
    if model_dir is None:
        model_dir = os.path.join(scratch, "gpt2-124m-random")
        random_gpt2(model_dir)
    out = os.path.join(scratch, "report.json")

    # kiem: the whole command, minus start-up and loading (the same command for one question).
    kiem_best = float("inf")
    for _ in range(args.repeat):
        whole = kiem_scores(args.kiem, model_dir, args.task, args.limit, args.batch, args.threads, out)
        base = kiem_scores(args.kiem, model_dir, args.task, 1, args.batch, args.threads,
                           os.path.join(scratch, "one.json"))
        kiem_best = min(kiem_best, whole - base)
    report = json.load(open(out))
    task = report["tasks"][0]
    questions = task["questions"]
    n = len(questions)

    # The same requests, rebuilt the harness' way from the task file kiem read.
    with open(args.task) as f:
        bb = json.load(f)
    prefix = bb.get("task_prefix", "")
    pairs = []
    for e in bb["examples"][:n]:
        context = prefix + e["input"]
        pairs.append([(context, " " + c) for c in e["target_scores"].keys()])

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    window = model.config.n_positions

    def encode_pair(context, continuation):
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = tok.encode(context + continuation)
        ctx = tok.encode(context)
        return ctx, whole[len(ctx):]

    def plain_loop():
        lls = []
        with torch.inference_mode():
            for choices in pairs:
                row = []
                for context, continuation in choices:
                    ctx, cont = encode_pair(context, continuation)
                    ids = (ctx + cont)[-(window + 1):][:-1]
                    logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
                    tail = logits[-len(cont):]
                    row.append(float(tail.gather(1, torch.tensor(cont)[:, None]).sum()))
                lls.append(row)
        return lls

    loop_best, lls = float("inf"), None
    for _ in range(args.repeat):
        started = time.perf_counter()
        lls = plain_loop()
        loop_best = min(loop_best, time.perf_counter() - started)
    diff = max(abs(a - b["loglikelihood"]) for row, q in zip(lls, questions)
               for a, b in zip(row, q["scores"]))

    harness = None
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model_dir, batch_size=args.batch, device="cpu")
        instances = [Instance(request_type="loglikelihood", doc={}, arguments=(c, k), idx=i,
                              metadata=("bench", qi, 1))
                     for qi, choices in enumerate(pairs) for i, (c, k) in enumerate(choices)]
        harness = float("inf")
        for _ in range(args.repeat):
            started = time.perf_counter()
            lm.loglikelihood(instances, disable_tqdm=True)
            harness = min(harness, time.perf_counter() - started)
    except ImportError:
        pass

    choices = sum(len(c) for c in pairs)
    cpu, simd = machine()
    print(f"machine: {cpu} ({simd}, {os.cpu_count()} logical CPUs)")
    print(f"task: {os.path.relpath(args.task, ROOT)}, {n} questions, {choices} choices; model "
          f"{model.config.n_layer} layers x {model.config.n_embd}, vocab {model.config.vocab_size}; "
          f"torch {torch.__version__}, {args.threads} threads; kiem --batch {args.batch}")
    print(f"log-likelihoods agree: max |kiem - transformers| = {diff:.2e}")
    print(f"kiem eval:              {n / kiem_best:8.2f} questions/s ({kiem_best:.2f} s)")
    print(f"transformers loop:      {n / loop_best:8.2f} questions/s ({loop_best:.2f} s)  "
          f"kiem / loop = {loop_best / kiem_best:.2f}x")
    if harness is not None:
        print(f"lm_eval HFLM batch {args.batch}:   {n / harness:8.2f} questions/s ({harness:.2f} s)  "
              f"kiem / HFLM = {harness / kiem_best:.2f}x")
    if diff > 1e-3:
        print("log-likelihoods disagree", file=sys.stderr)
        return 1
    if args.min_ratio is not None and loop_best / kiem_best < args.min_ratio:
        print(f"kiem / loop {loop_best / kiem_best:.2f} is under --min-ratio {args.min_ratio}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
