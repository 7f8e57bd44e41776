"""Gateway overhead: the same load sent straight to vLLM and through the loopchat gateway.

Starts `loopchat serve` (which starts its vLLM server), then alternates rounds against the
vLLM URL (the anchor) and the gateway URL, and prints tokens/s and p50/p95 time to first
token for both, with their ratios.

    .venv/bin/python bench/serving.py [--requests 64] [--concurrency 16] [--max-tokens 64] [--rounds 2]
                                      [--dtype auto|float32|bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hardware  # noqa: E402
PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how rain forms.",
           "Describe your ideal weekend in detail.", "List some tips for learning to cook.",
           "Tell me about the history of bicycles.", "What makes a good friend? Explain."]


def stop_servers_on_sigterm() -> None:
    """A time limit's SIGTERM (timeout(1), bench/gpu_check.sh) then runs the `finally` that stops the gateway.
    Killed outright, the gateway's vLLM lives on in its own process session, and on a GPU it keeps the memory
    the next vLLM server needs."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 1.0, "stream": True, "stream_options": {"include_usage": True}}
    t0, ttft, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any((c.get("delta") or {}).get("content") for c in chunk["choices"]):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return ttft, tokens


async def load(url: str, model: str, n: int, concurrency: int, max_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def task(i):
            async with sem:
                return await one(client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(task(i) for i in range(n)))
        wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    return {"tok_s": sum(r[1] for r in results) / wall, "p50_ttft_ms": 1000 * statistics.median(ttfts),
            "p95_ttft_ms": 1000 * ttfts[int(0.95 * (len(ttfts) - 1))], "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per target")
    ap.add_argument("--model", default=str(ROOT / ".cache/models/SmolLM2-135M-Instruct"))
    ap.add_argument("--dtype", default="auto", choices=hardware.DTYPES)
    args = ap.parse_args()
    stop_servers_on_sigterm()
    print("machine:", json.dumps(hardware.describe()), f"serving dtype: {hardware.choose(args.dtype).dtype}",
          flush=True)

    port, engine_port = free_port(), free_port()
    data = tempfile.mkdtemp(prefix="loopchat-bench-")
    log = open(Path(data) / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "loopchat.cli", "serve", "--engine", "vllm", "--port", str(port),
                             "--engine-port", str(engine_port), "--data-dir", data, "--model", args.model,
                             "--dtype", args.dtype],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    gateway, vllm = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{engine_port}"
    try:
        deadline = time.monotonic() + 600
        while not _ready(gateway):
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit(f"gateway did not start; see {log.name}")
            time.sleep(1)
        base = Path(args.model).name
        asyncio.run(load(vllm, base, 16, args.concurrency, 16))  # warm-up
        runs = {"vllm": [], "gateway": []}
        for rnd in range(args.rounds):
            for name, url, model in (("vllm", vllm, base), ("gateway", gateway, "loopchat")):
                res = asyncio.run(load(url, model, args.requests, args.concurrency, args.max_tokens))
                runs[name].append(res)
                print(f"round {rnd + 1} {name:8s} {res['tok_s']:7.1f} tok/s  p50 TTFT {res['p50_ttft_ms']:7.1f} ms  "
                      f"p95 TTFT {res['p95_ttft_ms']:7.1f} ms  ({res['wall_s']:.1f} s)", flush=True)
        avg = {k: {m: statistics.mean(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
        v, g = avg["vllm"], avg["gateway"]
        print(f"\n{args.requests} requests x {args.rounds} rounds, {args.concurrency} concurrent, "
              f"{args.max_tokens} new tokens, temperature 1.0, {os.cpu_count()} CPUs")
        print(f"{'':10s}{'tok/s':>10s}{'p50 TTFT ms':>14s}{'p95 TTFT ms':>14s}")
        for k in ("vllm", "gateway"):
            print(f"{k:10s}{avg[k]['tok_s']:10.1f}{avg[k]['p50_ttft_ms']:14.1f}{avg[k]['p95_ttft_ms']:14.1f}")
        print(f"throughput ratio gateway/vllm: {g['tok_s'] / v['tok_s']:.3f} (goal >= 0.97)")
        print(f"p50 TTFT added by the gateway: {g['p50_ttft_ms'] - v['p50_ttft_ms']:+.1f} ms (goal <= 10 ms); "
              f"ratio {g['p50_ttft_ms'] / v['p50_ttft_ms']:.3f}")
    finally:
        proc.terminate()
        proc.wait(60)


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
