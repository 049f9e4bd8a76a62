#!/usr/bin/env python3
"""Load test of `kiem serve`: aggregate tokens/s with 1 and with N concurrent streaming chat
requests, with p50/p99 latency and time to first token. Loopback only, bounded in requests and
time. Standard library only.

    python3 bench/serve.py --model runs/demo/chat/model [--concurrency 1 8] [--requests 24]
        [--max-tokens 128] [--min-ratio 3]

It starts `target/release/kiem serve` on a free port (or uses --url), sends streaming chat
completions with `ignore_eos` so every request generates exactly --max-tokens tokens, and prints
one table row per concurrency level. With --min-ratio R it exits 1 when the throughput at the
highest concurrency is under R times that of the lowest.

Hostile load: `--stop-bytes N` gives every stream four stop strings of N bytes that never match
(the decoder checks them at every token), and `--hostile K` runs each level a second time while
K more clients keep sending 1 MB prompts to /v1/completions (tokenized, then refused as longer
than the context): the table then shows each level without and with that load, and the ratio
of their latencies (1.0 = the other streams do not notice).
"""
import argparse
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

QUESTIONS = [
    "Do I need a building permit for a carport?",
    "How long does a new roof last?",
    "What does ROT deduction cover?",
    "Can you help with the application?",
]


def never_matching_stops(n):
    """Four stop strings of n bytes that generated text will not contain."""
    return [("\u00a7" + chr(0x2460 + i) * n)[:n // 3 or 1] for i in range(4)] if n else None


def stream_chat(host, port, model, question, max_tokens, seed, key, stops=None):
    """One streaming request: (seconds to first token, total seconds, completion tokens)."""
    request = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if stops:
        request["stop"] = stops
    body = json.dumps(request)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    started = time.perf_counter()
    conn = http.client.HTTPConnection(host, port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first = None
    tokens = None
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices", []):
            if first is None and choice["delta"].get("content"):
                first = time.perf_counter() - started
    conn.close()
    return first or 0.0, time.perf_counter() - started, tokens or 0


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))]


def hostile_client(host, port, model, key, stop_event, counts):
    """Sends 1 MB prompts until told to stop; each is tokenized by the server and refused."""
    prompt = ("The customer wrote a very long complaint about the roof. " * 17_000)[:1_000_000]
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 4})
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    while not stop_event.is_set():
        conn = http.client.HTTPConnection(host, port, timeout=600)
        conn.request("POST", "/v1/completions", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        conn.close()
        counts[response.status] = counts.get(response.status, 0) + 1


def run_level(host, port, model, concurrency, requests, max_tokens, time_limit, key,
              stops=None, hostile=0):
    results, errors = [], []
    stop_event = threading.Event()
    hostile_counts = {}
    hostile_threads = [
        threading.Thread(target=hostile_client, args=(host, port, model, key, stop_event, hostile_counts))
        for _ in range(hostile)
    ]
    for t in hostile_threads:
        t.start()
    lock = threading.Lock()
    next_index = [0]
    deadline = time.perf_counter() + time_limit

    def worker():
        while time.perf_counter() < deadline:
            with lock:
                i = next_index[0]
                if i >= requests:
                    return
                next_index[0] += 1
            try:
                r = stream_chat(host, port, model, QUESTIONS[i % len(QUESTIONS)], max_tokens, i, key, stops)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(e))

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    stop_event.set()
    for t in hostile_threads:
        t.join()
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, e.g. {errors[0]}")
    tokens = sum(r[2] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_second": tokens / wall,
        "ttft_p50_ms": 1000 * percentile([r[0] for r in results], 50),
        "ttft_p99_ms": 1000 * percentile([r[0] for r in results], 99),
        "latency_p50_s": percentile([r[1] for r in results], 50),
        "latency_p99_s": percentile([r[1] for r in results], 99),
        "per_stream_tokens_per_second": statistics.mean(r[2] / r[1] for r in results),
        "hostile_clients": hostile,
        "hostile_responses": {str(k): v for k, v in hostile_counts.items()},
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory to serve (ignored with --url)")
    parser.add_argument("--url", help="an already running server, e.g. http://127.0.0.1:8080")
    parser.add_argument("--api-key", default=os.environ.get("KIEM_API_KEY"))
    parser.add_argument("--kiem", default="target/release/kiem")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--time-limit", type=float, default=120, help="seconds per level at most")
    parser.add_argument("--threads", type=int, help="kiem serve --threads")
    parser.add_argument("--min-ratio", type=float, help="fail when highest/lowest concurrency throughput is below this")
    parser.add_argument("--stop-bytes", type=int, default=0, help="four never-matching stop strings of this many bytes per stream")
    parser.add_argument("--hostile", type=int, default=0, help="run each level again beside this many clients sending 1 MB prompts")
    args = parser.parse_args()

    server = None
    if args.url:
        parsed = urllib.parse.urlparse(args.url)
        host, port = parsed.hostname, parsed.port
    else:
        if not args.model:
            parser.error("give --model DIR (or --url of a running server)")
        command = [args.kiem, "serve", "--model", args.model, "--port", "0",
                   "--max-batch", str(max(args.concurrency)), "--queue", "256"]
        if args.threads:
            command += ["--threads", str(args.threads)]
        server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        host, port = "127.0.0.1", None
        for line in server.stderr:
            if line.startswith("listening on http://127.0.0.1:"):
                port = int(line.split(":")[2].split("/")[0])
                break
        if port is None:
            raise SystemExit("kiem serve did not start")
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
    try:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        headers = {"Authorization": "Bearer " + args.api_key} if args.api_key else {}
        conn.request("GET", "/v1/models", headers=headers)
        model = json.loads(conn.getresponse().read())["data"][0]["id"]
        # Warm up (first-touch allocations, caches).
        stream_chat(host, port, model, QUESTIONS[0], 8, 0, args.api_key)
        print(f"kiem serve load test: model {model}, {args.max_tokens} tokens per request, "
              f"{platform.machine()} with {os.cpu_count()} CPUs")
        print(f"{'streams':>7} {'requests':>8} {'tok/s':>9} {'per stream':>10} {'TTFT p50':>9} "
              f"{'TTFT p99':>9} {'lat p50':>8} {'lat p99':>8}")
        rows, loaded_rows = [], []
        stops = never_matching_stops(args.stop_bytes)

        def show(label, row):
            print(f"{label:>7} {row['requests']:>8} {row['tokens_per_second']:>9.0f} "
                  f"{row['per_stream_tokens_per_second']:>10.0f} {row['ttft_p50_ms']:>7.0f}ms "
                  f"{row['ttft_p99_ms']:>7.0f}ms {row['latency_p50_s']:>7.2f}s {row['latency_p99_s']:>7.2f}s",
                  flush=True)

        for c in args.concurrency:
            row = run_level(host, port, model, c, args.requests, args.max_tokens, args.time_limit,
                            args.api_key, stops)
            rows.append(row)
            show(str(c), row)
            if args.hostile:
                loaded = run_level(host, port, model, c, args.requests, args.max_tokens, args.time_limit,
                                   args.api_key, stops, args.hostile)
                loaded_rows.append(loaded)
                show(f"{c}+{args.hostile}h", loaded)
                print(f"  with {args.hostile} clients sending 1 MB prompts "
                      f"(answers {loaded['hostile_responses']}): latency p50 "
                      f"{loaded['latency_p50_s'] / row['latency_p50_s']:.2f}x, p99 "
                      f"{loaded['latency_p99_s'] / row['latency_p99_s']:.2f}x, TTFT p50 "
                      f"{loaded['ttft_p50_ms'] / max(row['ttft_p50_ms'], 1e-9):.2f}x", flush=True)
        ratio = rows[-1]["tokens_per_second"] / rows[0]["tokens_per_second"]
        print(f"throughput ratio {rows[-1]['concurrency']} vs {rows[0]['concurrency']} streams: {ratio:.2f}x")
        print(json.dumps({"rows": rows, "hostile_rows": loaded_rows, "ratio": ratio,
                          "stop_bytes": args.stop_bytes}))
        if args.min_ratio is not None and ratio < args.min_ratio:
            print(f"FAIL: ratio {ratio:.2f} is under --min-ratio {args.min_ratio}", file=sys.stderr)
            return 1
        return 0
    finally:
        if server:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    sys.exit(main())
