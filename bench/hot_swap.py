"""Hot swap under load: time from the promote call to the first answer from the new version,
and the failed or slow requests around the switch.

Anchor, measured in the same run: the physical floor on the same vLLM server — a direct
`/v1/load_lora_adapter` of the same adapter plus its first answer, with the same load.

    .venv/bin/python bench/hot_swap.py [--clients 8] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from bench.serving import _ready, free_port, stop_servers_on_sigterm  # noqa: E402
from loop_fixtures import random_adapter  # noqa: E402  (the same random LoRA the hot-swap tests use)

import hardware  # noqa: E402


class Load:
    """Clients sending short streamed requests without pause; each result is (start, end, ok, model)."""

    def __init__(self, url: str, model: str, clients: int):
        self.url, self.model, self.results, self.stop = url, model, [], threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        body = {"model": self.model, "max_tokens": 16, "stream": True,
                "messages": [{"role": "user", "content": "Name three fruits."}]}
        with httpx.Client(timeout=120) as http:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    with http.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
                        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
                    ok = r.status_code == 200 and lines[-1] == "data: [DONE]"
                except httpx.HTTPError:
                    ok = False
                self.results.append((t0, time.monotonic(), ok))

    def __enter__(self):
        [t.start() for t in self.threads]
        return self

    def __exit__(self, *exc):
        self.stop.set()
        [t.join(120) for t in self.threads]


def first_answer_from(url: str, model_field: str, request_model: str, t0: float, timeout: float = 60) -> float:
    """Seconds from t0 until a request to `request_model` is answered by `model_field`."""
    body = {"model": request_model, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
    while time.monotonic() - t0 < timeout:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        if r.status_code == 200 and r.json()["model"] == model_field:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise TimeoutError(model_field)


def summarize(load: Load, t_switch: float, window: float = 10.0) -> dict:
    before = [e - s for s, e, ok in load.results if ok and e < t_switch]
    around = [(s, e, ok) for s, e, ok in load.results if t_switch - window < e and s < t_switch + window]
    median = statistics.median(before) if before else float("nan")
    return {"failed": sum(1 for *_, ok in around if not ok), "requests": len(around),
            "slow": sum(1 for s, e, ok in around if ok and e - s > 3 * median), "median_s": median}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--model", default=str(ROOT / ".cache/models/SmolLM2-135M-Instruct"))
    ap.add_argument("--dtype", default="auto", choices=hardware.DTYPES)
    args = ap.parse_args()
    stop_servers_on_sigterm()
    print("machine:", json.dumps(hardware.describe()), f"serving dtype: {hardware.choose(args.dtype).dtype}",
          flush=True)

    from feedback import Store, cycles
    from train import artifacts

    data = Path(tempfile.mkdtemp(prefix="loopchat-swap-"))
    model_dir = Path(args.model)
    src = random_adapter(model_dir, data / "src", seed=1, rank=args.rank)
    version_dir = artifacts.publish(src, data / "adapters", base_model=str(model_dir))
    version = f"v{artifacts.load_manifest(version_dir)['version']}"
    cycles.record_adapter(Store(data / "loopchat.db"), version, str(version_dir),
                          artifacts.load_manifest(version_dir))

    port, engine_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "loopchat.cli", "serve", "--engine", "vllm", "--port", str(port),
                             "--engine-port", str(engine_port), "--data-dir", str(data), "--model", str(model_dir),
                             "--dtype", args.dtype],
                            stdout=open(data / "serve.log", "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    gateway, vllm = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{engine_port}"
    try:
        while not _ready(gateway):
            if proc.poll() is not None:
                sys.exit(f"gateway died; see {data / 'serve.log'}")
            time.sleep(1)
        base = model_dir.name

        # Anchor: the same adapter loaded straight into vLLM under load, and its first answer.
        with Load(vllm, base, args.clients) as load:
            time.sleep(5)
            t0 = time.monotonic()
            httpx.post(vllm + "/v1/load_lora_adapter", json={"lora_name": "anchor", "lora_path": str(version_dir)},
                       timeout=60).raise_for_status()
            anchor_s = first_answer_from(vllm, "anchor", "anchor", t0)
            time.sleep(5)
        anchor = summarize(load, t0)
        httpx.post(vllm + "/v1/unload_lora_adapter", json={"lora_name": "anchor"}, timeout=60)

        # loopchat: promote through the admin API under the same load on the alias.
        with Load(gateway, "loopchat", args.clients) as load:
            time.sleep(5)
            t0 = time.monotonic()
            r = httpx.post(f"{gateway}/admin/adapters/{version}/promote", timeout=120)
            r.raise_for_status()
            call_s = time.monotonic() - t0
            swap_s = first_answer_from(gateway, f"policy-{version}", "loopchat", t0)
            time.sleep(5)
        ours = summarize(load, t0)

        print(f"rank-{args.rank} adapter on {base}, {args.clients} clients streaming 16-token answers")
        print(f"direct vLLM load + first answer (anchor): {anchor_s * 1000:7.0f} ms   failed {anchor['failed']}/"
              f"{anchor['requests']}, slow (>3x median) {anchor['slow']}")
        print(f"loopchat promote call:                     {call_s * 1000:7.0f} ms")
        print(f"loopchat promote -> first new answer:      {swap_s * 1000:7.0f} ms   failed {ours['failed']}/"
              f"{ours['requests']}, slow (>3x median) {ours['slow']}")
        print(f"ratio loopchat/anchor: {swap_s / anchor_s:.2f} (goal: under 2 s, zero failures)")
    finally:
        proc.terminate()
        proc.wait(60)


if __name__ == "__main__":
    main()
