"""vLLM start-up and throughput per dtype and compile mode, on this machine's CPU.

For each configuration (dtype x compiled/eager) it starts `loopchat serve --engine vllm` twice
on the same fresh data dir (the first start fills the compile cache under DATA_DIR/cache, the
second reuses it), times spawn -> first answered chat, then measures decode throughput straight
against vLLM (N requests, C concurrent, `ignore_eos`, fixed length). The anchor in the same run
is the first configuration (the default: auto dtype, compiled): every row prints its ratio to it.

    .venv/bin/python bench/startup.py [--dtypes auto,float32,bfloat16] [--modes compiled,eager]
                                      [--requests 32] [--concurrency 16] [--max-tokens 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hardware  # noqa: E402
from bench.serving import _ready, free_port, stop_servers_on_sigterm  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]


def start(model: str, data: Path, dtype: str, eager: bool) -> tuple[subprocess.Popen, str, str, float]:
    """Spawn the gateway + vLLM; return (proc, gateway URL, vLLM URL, seconds to the first answer)."""
    port, engine_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "loopchat.cli", "serve", "--engine", "vllm", "--port", str(port),
           "--engine-port", str(engine_port), "--data-dir", str(data), "--model", model, "--dtype", dtype,
           "--enforce-eager" if eager else "--compile"]
    t0 = time.monotonic()
    log = open(data / "serve.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    gateway = f"http://127.0.0.1:{port}"
    while not _ready(gateway):
        if proc.poll() is not None or time.monotonic() - t0 > 900:
            sys.exit(f"the server did not start; see {data / 'serve.log'}")
        time.sleep(0.5)
    r = httpx.post(gateway + "/v1/chat/completions", timeout=300,
                   json={"model": "loopchat", "messages": PROMPT, "max_tokens": 8, "store": False})
    r.raise_for_status()
    return proc, gateway, f"http://127.0.0.1:{engine_port}", time.monotonic() - t0


async def throughput(url: str, model: str, n: int, concurrency: int, max_tokens: int) -> float:
    sem = asyncio.Semaphore(concurrency)
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 1.0, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=600) as client:
        async def one() -> int:
            async with sem:
                r = await client.post(url + "/v1/chat/completions", json=body)
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one() for _ in range(n))))
        return tokens / (time.perf_counter() - t0)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="auto,float32,bfloat16")
    ap.add_argument("--modes", default="compiled,eager")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model", default=str(ROOT / ".cache/models/SmolLM2-135M-Instruct"))
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    stop_servers_on_sigterm()

    machine = hardware.describe()
    print("machine:", json.dumps(machine), flush=True)
    rows = []
    for dtype in args.dtypes.split(","):
        for mode in args.modes.split(","):
            data = Path(tempfile.mkdtemp(prefix=f"loopchat-start-{dtype}-{mode}-"))
            served = hardware.choose(dtype).dtype
            row = {"dtype": dtype, "served_dtype": served, "mode": mode}
            for which in ("first_start_s", "second_start_s"):
                proc, _, vllm, seconds = start(args.model, data, dtype, mode == "eager")
                row[which] = round(seconds, 1)
                if which == "second_start_s":
                    base = Path(args.model).name
                    asyncio.run(throughput(vllm, base, 4, 4, 8))  # warm-up
                    row["tok_s"] = round(asyncio.run(throughput(vllm, base, args.requests, args.concurrency,
                                                                args.max_tokens)), 1)
                stop(proc)
            rows.append(row)
            print(f"{dtype:>9s} ({served:>8s}) {mode:>8s}: first start {row['first_start_s']:6.1f} s, second "
                  f"{row['second_start_s']:6.1f} s, {row['tok_s']:6.1f} tok/s", flush=True)

    anchor = rows[0]
    print(f"\n{args.requests} requests, {args.concurrency} concurrent, {args.max_tokens} tokens (ignore_eos); "
          f"CPU {machine['cpu_model']} ({machine['cpu_capability']}, native bf16: {machine['native_bf16']}), "
          f"{machine['cores']} cores")
    print(f"{'dtype':>9s} {'served':>9s} {'mode':>9s} {'1st start s':>12s} {'2nd start s':>12s} {'tok/s':>8s} "
          f"{'tok/s vs anchor':>16s}")
    for r in rows:
        print(f"{r['dtype']:>9s} {r['served_dtype']:>9s} {r['mode']:>9s} {r['first_start_s']:12.1f} "
              f"{r['second_start_s']:12.1f} {r['tok_s']:8.1f} {r['tok_s'] / anchor['tok_s']:16.2f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
