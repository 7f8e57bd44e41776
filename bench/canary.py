"""Canary decisions on live evidence: how much traffic from simulated users the gateway's sequential
test needs to roll back a worse adapter and to promote a better one.

Starts `loopchat serve --engine vllm` on a fresh data dir, then makes two adapters for the `concise`
user by a quick SFT (`loopchat train sft`) on demonstrations built from the base model's own answers:
- worse: a rambling preamble before the answer (long, so it mostly runs into max_tokens unfinished);
- better: the answer's first sentence.
Both are published as versions. Each is measured against the base model on held-out prompts (mean
preference score, judged without noise: the true effect the canary has to find), then put on canary
in turn (worse first, so both start against the base model) while simulated users
(`loopchat.simulate_canary`) chat, rate and vote until the gateway decides it.

Prints per canary: decision, answers and thumbs up per arm, votes, seconds; writes a JSON report.

    .venv/bin/python bench/canary.py [--out bench/canary-concise.json] [--port 18700] [--share 0.5]
        [--users 60] [--vote-share 0.5] [--max-tokens 96] [--demos 64] [--epochs 2] [--work /tmp/loopchat-canary]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hardware  # noqa: E402
from bench.serving import stop_servers_on_sigterm  # noqa: E402
from loopchat import preferences  # noqa: E402
from loopchat.simulate import DEFAULT_PROMPTS, Gateway, load_prompts, prompt_text, split_prompts  # noqa: E402
from loopchat.simulate_canary import CanarySettings, drive, summary  # noqa: E402

RAMBLE = ("Well, that is a really interesting question, and there are many different things that we could say "
          "about it, so before I answer let me think it through carefully, step by step, and consider every "
          "side of it in turn, because it deserves a thorough and complete answer rather than a quick one, and")
LOOPCHAT = [sys.executable, "-m", "loopchat.cli"]


def start_gateway(data: Path, port: int, model: Path, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(LOOPCHAT + ["serve", "--engine", "vllm", "--port", str(port), "--engine-port",
                                        str(port + 1), "--data-dir", str(data), "--model", str(model)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"the gateway did not get ready; see {log}")
        time.sleep(1)


def answers(gw: Gateway, prompts: list, model: str, max_tokens: int, seed: int = 0) -> list[str]:
    """One sampled answer of `model` per prompt, not stored (nothing here is feedback)."""
    def one(messages):
        return gw.chat(messages, model, store=False, max_tokens=max_tokens, temperature=0.7, seed=seed).text

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, prompts))


def demonstrations(prompts: list, base_answers: list[str], style: str) -> list[dict]:
    out = []
    for messages, answer in zip(prompts, base_answers):
        if style == "concise":
            text = preferences.first_sentence(answer)
        else:
            text = f"{RAMBLE} {answer.strip()}"
        if text:
            out.append({"messages": messages + [{"role": "assistant", "content": text}]})
    return out


def train_and_publish(data: Path, model: Path, demos: list[dict], name: str, work: Path, args) -> tuple[str, float]:
    """SFT on `demos` with `loopchat train sft`, publish as the next version and record it; (version, seconds)."""
    from feedback import Store, cycles
    from train import artifacts

    demo_file = work / f"{name}.jsonl"
    demo_file.write_text("".join(json.dumps(d) + "\n" for d in demos))
    out = work / f"sft-{name}"
    t0 = time.monotonic()
    run = subprocess.run(LOOPCHAT + ["train", "sft", "--data", str(demo_file), "--epochs", str(args.epochs),
                                     "--batch-size", "8", "--lr", str(args.lr), "--out", str(out), "--data-dir",
                                     str(data), "--model", str(model), "-q"],
                         capture_output=True, text=True, cwd=ROOT)
    if run.returncode != 0:
        sys.exit(f"training {name} failed:\n{run.stderr[-2000:]}")
    seconds = time.monotonic() - t0
    version_dir = artifacts.publish(out, data / "adapters", base_model=str(model), metrics={"bench": name})
    manifest = artifacts.load_manifest(version_dir)
    version = f"v{manifest['version']}"
    cycles.record_adapter(Store(data / "loopchat.db"), version, str(version_dir), manifest)
    return version, seconds


def measure(engine: str, prompts: list, name: str, path: Path | None, max_tokens: int) -> dict:
    """Mean `concise` score, thumbs-up share and length of answers to `prompts`, asked straight from
    vLLM (the adapter at `path` loaded under `name` for the while; None: the base model `name`)."""
    http = httpx.Client(base_url=engine, timeout=300)
    if path is not None:
        http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}).raise_for_status()

    def one(messages):
        r = http.post("/v1/chat/completions", json={"model": name, "messages": messages, "max_tokens": max_tokens,
                                                    "temperature": 0.7, "seed": 1})
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"] or ""

    try:
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(one, prompts))
    finally:
        if path is not None:
            http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        http.close()
    scores = [preferences.concise_score(prompt_text(m), t) for m, t in zip(prompts, texts)]
    return {"score": round(sum(scores) / len(scores), 3), "up": round(sum(s >= 0.5 for s in scores) / len(scores), 3),
            "words": round(sum(len(t.split()) for t in texts) / len(texts), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "canary-concise.json")
    ap.add_argument("--work", type=Path, default=Path("/tmp/loopchat-canary"))
    ap.add_argument("--port", type=int, default=18700, help="the gateway's; vLLM gets the next one")
    ap.add_argument("--model", type=Path, default=ROOT / ".cache/models/SmolLM2-135M-Instruct")
    ap.add_argument("--demos", type=int, default=64, help="demonstrations per adapter")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--share", type=float, default=0.5, help="of users on the canary")
    ap.add_argument("--users", type=int, default=60)
    ap.add_argument("--vote-share", type=float, default=0.5,
                    help="of the users' turns: a comparison to vote on (head-to-head votes decide with less traffic)")
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96,
                    help="per answer: room for the base model to finish most answers (and the rambling one not)")
    ap.add_argument("--eval-prompts", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds to wait for each decision")
    args = ap.parse_args()
    stop_servers_on_sigterm()
    machine = hardware.describe()
    print("machine:", json.dumps(machine), flush=True)

    shutil.rmtree(args.work, ignore_errors=True)
    data = args.work / "data"
    data.mkdir(parents=True)
    t_start = time.monotonic()
    proc = start_gateway(data, args.port, args.model, args.work / "serve.log")
    url = f"http://127.0.0.1:{args.port}"
    gw = Gateway(url, user="bench-canary")
    result = {"machine": machine, "model": args.model.name,
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "gateway_start_s": round(time.monotonic() - t_start, 1), "adapters": {}, "canaries": []}
    adapters, canaries = result["adapters"], result["canaries"]

    def save() -> None:  # after each step: a run cut short keeps what it measured
        result["total_s"] = round(time.monotonic() - t_start, 1)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    try:
        base = gw.base_model()
        demo_prompts, heldout = split_prompts(load_prompts(DEFAULT_PROMPTS), args.eval_prompts, seed=0)
        demo_prompts = random.Random(0).sample(demo_prompts, min(args.demos, len(demo_prompts)))
        base_answers = answers(gw, demo_prompts, base, max_tokens=96)
        for style in ("rambling", "concise"):
            version, seconds = train_and_publish(data, args.model, demonstrations(demo_prompts, base_answers, style),
                                                 style, args.work, args)
            adapters[style] = {"version": version, "train_s": round(seconds, 1)}
            print(f"{style}: {version}, trained in {seconds:.0f} s", flush=True)

        # The true effect each canary has to find: its answers and the base model's on held-out prompts.
        engine = f"http://127.0.0.1:{args.port + 1}"
        effect = result["effect"] = {"base": measure(engine, heldout, base, None, args.max_tokens)}
        for style, row in adapters.items():
            effect[style] = measure(engine, heldout, f"bench-{style}", data / "adapters" / row["version"],
                                    args.max_tokens)
        print("effect (concise score, thumbs-up share, words):", json.dumps(effect), flush=True)
        save()

        for style in ("rambling", "concise"):
            s = CanarySettings(gateway=url, version=adapters[style]["version"], share=args.share, users=args.users,
                               vote_share=args.vote_share, noise=args.noise, concurrency=args.concurrency,
                               max_tokens=args.max_tokens, timeout=args.timeout, seed=len(canaries))
            report = drive(s, log=lambda line: print(line, flush=True))
            canaries.append({"adapter": style, **{k: report[k] for k in ("version", "decision", "ended_by", "arms",
                                                                         "votes", "seconds", "counted")},
                             "evidence": report["canary"]["evidence"]})
            print(summary(report), flush=True)
            save()
    finally:
        gw.close()
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()

    print(f"{'adapter':<10}{'version':<9}{'decision':<14}{'canary n/up':>13}{'baseline n/up':>15}{'votes':>7}"
          f"{'seconds':>9}   rule counted (rated c/b, votes)")
    for c in canaries:
        arms, rule = c["arms"], c["counted"]
        print(f"{c['adapter']:<10}{c['version']:<9}{str(c['decision']):<14}"
              f"{arms['canary']['answers']:>8}/{arms['canary']['up']:<4}{arms['baseline']['answers']:>10}/"
              f"{arms['baseline']['up']:<4}{c['votes']:>7}{c['seconds']:>9.0f}   "
              f"{rule['canary_rated']}/{rule['baseline_rated']}, {rule['votes']}")
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
