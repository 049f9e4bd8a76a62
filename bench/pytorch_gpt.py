#!/usr/bin/env python3
"""PyTorch reference trainer for kiem's benchmarks: the same model (GPT-2 or Llama),
initialization, data order and AdamW as `kiem pretrain`, in fp32 eager PyTorch.

Model (--arch gpt2): learned positions, pre-LayerNorm, causal multi-head attention (scaled dot
product), tanh GELU, MLP x4, tied input/output embeddings, biases, no dropout. Model (--arch
llama, kiem's `pretrain --arch llama`): pre-RMSNorm (eps 1e-5, weight only), rotary positions
(theta 10000, Hugging Face rotate-half layout), grouped-query attention with --n-kv-head
key/value heads (default n_head/2 when even, else n_head), SwiGLU MLP of width
ceil(8·n_embd/3/64)·64, no biases, tied input/output embeddings, final RMSNorm. Both: init
N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), norm weights 1. AdamW betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on
matrices only, gradient clipping at 1.0, constant learning rate (the schedule does not change the
cost). Data: kiem/llm.c token shards (`train_*.bin` of a `kiem data prepare` directory), read as
one stream in rows of context + 1 tokens, visited in the same seeded pseudo-random row order as
kiem's loader (`permute` below mirrors crates/kiem-train/src/loader.rs).

Prints one JSON line: {"tokens_per_second", "steps", "timed_steps", "losses", "threads"}.
"""

import argparse
import glob
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c, nh):
        super().__init__()
        self.nh = nh
        self.ln_1 = nn.LayerNorm(c)
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c)
        self.c_fc = nn.Linear(c, 4 * c)
        self.mlp_proj = nn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.nh, c // self.nh).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, ctx, layers, heads, width):
        super().__init__()
        padded = (vocab + 63) // 64 * 64  # kiem pads the vocabulary the same way
        self.vocab = vocab
        self.wte = nn.Embedding(padded, width)
        self.wpe = nn.Embedding(ctx, width)
        self.h = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif "ln" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
        with torch.no_grad():
            self.wte.weight[vocab:].zero_()

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight[: self.vocab].t()
        return F.cross_entropy(logits.reshape(-1, self.vocab), targets.reshape(-1))


class LlamaBlock(nn.Module):
    def __init__(self, c, nh, nkv, hidden):
        super().__init__()
        self.nh, self.nkv, self.hd = nh, nkv, c // nh
        self.norm_1 = nn.RMSNorm(c, eps=1e-5)
        self.q_proj = nn.Linear(c, c, bias=False)
        self.k_proj = nn.Linear(c, nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(c, nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(c, c, bias=False)
        self.norm_2 = nn.RMSNorm(c, eps=1e-5)
        self.gate_proj = nn.Linear(c, hidden, bias=False)
        self.up_proj = nn.Linear(c, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, c, bias=False)

    def forward(self, x, cos, sin):
        b, t, c = x.shape
        h = self.norm_1(x)
        q = self.q_proj(h).view(b, t, self.nh, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.nkv, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.nkv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.nkv != self.nh)
        x = x + self.o_proj(y.transpose(1, 2).reshape(b, t, c))
        h = self.norm_2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def rope(x, cos, sin):
    """Hugging Face rotate-half: x·cos + cat(-x2, x1)·sin over the two halves of each head."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def llama_mlp_hidden(width):
    return (8 * width + 3 * 64 - 1) // (3 * 64) * 64


def default_kv_heads(heads):
    return heads // 2 if heads % 2 == 0 else heads


class Llama(nn.Module):
    def __init__(self, vocab, ctx, layers, heads, width, kv_heads, theta=10000.0):
        super().__init__()
        padded = (vocab + 63) // 64 * 64  # kiem pads the vocabulary the same way
        self.vocab = vocab
        self.wte = nn.Embedding(padded, width)
        hidden = llama_mlp_hidden(width)
        self.h = nn.ModuleList(LlamaBlock(width, heads, kv_heads, hidden) for _ in range(layers))
        self.norm_f = nn.RMSNorm(width, eps=1e-5)
        hd = width // heads
        inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        freqs = torch.outer(torch.arange(ctx, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            else:
                nn.init.ones_(p)  # RMSNorm weights, the only vectors
        with torch.no_grad():
            self.wte.weight[vocab:].zero_()

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx)
        cos, sin = self.cos[:t], self.sin[:t]
        for block in self.h:
            x = block(x, cos, sin)
        logits = self.norm_f(x) @ self.wte.weight[: self.vocab].t()
        return F.cross_entropy(logits.reshape(-1, self.vocab), targets.reshape(-1))


M64 = (1 << 64) - 1


def permute(index, n, key):
    """kiem's row order: a 4-round Feistel bijection on range(n) with cycle walking."""
    if n <= 1:
        return index
    bits = (max((n - 1).bit_length(), 2) + 1) // 2
    mask = (1 << bits) - 1

    def round_fn(x, r):
        z = x ^ ((key + r * 0x9E3779B97F4A7C15) & M64)
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return (z ^ (z >> 31)) & mask

    x = index
    while True:
        left, right = x >> bits, x & mask
        for r in range(4):
            left, right = right, left ^ round_fn(right, r)
        x = (left << bits) | right
        if x < n:
            return x


def shards(data_dir):
    tokens = []
    for path in sorted(glob.glob(os.path.join(data_dir, "train_*.bin"))):
        header = np.fromfile(path, dtype=np.int32, count=256)
        assert header[0] == 20240520, f"{path}: not a token shard"
        dtype = np.uint16 if header[1] == 1 else np.uint32
        tokens.append(np.fromfile(path, dtype=dtype, offset=1024, count=int(header[2])))
    return np.concatenate(tokens).astype(np.int64)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--vocab", type=int, required=True)
    ap.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--n-kv-head", type=int, default=None,
                    help="key/value heads for --arch llama [default: n_head/2 when even, else n_head]")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-head", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=384)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=1337, help="row-order seed (kiem's --seed)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: torch.autocast on the CPU (bf16 matmuls, fp32 weights and optimizer)")
    args = ap.parse_args()

    torch.manual_seed(1337)
    torch.set_num_threads(args.threads)
    data = shards(args.data)
    if args.arch == "llama":
        kv = args.n_kv_head if args.n_kv_head is not None else default_kv_heads(args.n_head)
        model = Llama(args.vocab, args.context, args.n_layer, args.n_head, args.n_embd, kv)
    else:
        model = GPT(args.vocab, args.context, args.n_layer, args.n_head, args.n_embd)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    b, t = args.micro_batch, args.context
    rows_per_epoch = (len(data) - 1) // t
    row = 0
    losses = []
    start = None
    for step in range(args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        rows = []
        for _ in range(b):
            offset = permute(row % rows_per_epoch, rows_per_epoch, args.seed) * t  # epoch 0
            rows.append(data[offset: offset + t + 1])
            row += 1
        batch = torch.from_numpy(np.stack(rows))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - start
    timed = args.steps - args.warmup
    print(json.dumps({"tokens_per_second": timed * b * t / elapsed, "steps": args.steps, "timed_steps": timed,
                      "losses": losses, "threads": args.threads, "torch": torch.__version__,
                      "precision": args.precision, "peak_gflops": measured_peak(args.precision)}))


def measured_peak(precision):
    """GFLOP/s of a large square matmul at the same thread count: the machine's attainable peak."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(2048, 2048, dtype=dtype)
    b = torch.randn(2048, 2048, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 ** 3 / best / 1e9


if __name__ == "__main__":
    main()
