"""Base-model requests batched next to adapter requests on vLLM's CPU build are answered by
the base model (serve/engines/vllm_cpu_lora.py): without the plugin, once the last LoRA slot
is taken, base rows get that slot's adapter."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from loop_fixtures import random_adapter

pytestmark = pytest.mark.slow

PROMPTS = ["What is a volcano?", "Why is the sky blue?", "How do bees make honey?", "What is erosion?"]
MAX_LORAS = 4  # as serve/engines/vllm.py starts vLLM


def ask(url: str, model: str, prompt: str) -> list[tuple[str, dict[str, float]]]:
    """The greedy answer's tokens, each with the top-20 log-probabilities at its position."""
    r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0,
        "logprobs": True, "top_logprobs": 20})
    assert r.status_code == 200, r.text
    return [(t["token"], {c["token"]: c["logprob"] for c in t["top_logprobs"]})
            for t in r.json()["choices"][0]["logprobs"]["content"]]


def gap(a, b) -> float:
    """The largest difference in log-probability of a token both answers rank in their top 20, over
    the positions where both had the same context: up to the first differing token, included."""
    worst = 0.0
    for (token_a, top_a), (token_b, top_b) in zip(a, b):
        worst = max([worst] + [abs(top_a[t] - top_b[t]) for t in top_a.keys() & top_b.keys()])
        if token_a != token_b:
            break
    return worst


@pytest.fixture
def every_slot_taken(vllm_gateway, model_dir, tmp_path):
    """MAX_LORAS random adapters loaded and each used once, so every slot (the last included) holds one."""
    url, names = vllm_gateway.engine_url, [f"batching-{i}" for i in range(MAX_LORAS)]
    for i, name in enumerate(names):
        path = random_adapter(model_dir, tmp_path / name, seed=500 + i)
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}, timeout=300)
        assert r.status_code == 200, r.text
        ask(url, name, "Hi")
    yield url, names
    for name in names:
        httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)


def test_base_rows_in_a_mixed_batch_get_no_adapter(every_slot_taken, model_dir):
    """Batch composition moves the numerics a little (bf16: up to 0.3 nats measured, enough to flip a
    greedy near-tie), so an answer is compared by its log-probabilities: a base row in a mixed batch
    must be nearer the base model's answer alone than any adapter's. A leaked row is an adapter's."""
    url, names = every_slot_taken
    base = model_dir.name  # vLLM serves the base model under its directory's name
    alone = {p: ask(url, base, p) for p in PROMPTS}
    adapted = {(n, p): ask(url, n, p) for n in names for p in PROMPTS}
    assert min(gap(adapted[n, p], alone[p]) for n in names for p in PROMPTS) > 1.0  # measured 1.5-4.5
    for _ in range(3):  # whether base rows share a step with adapter rows is up to the scheduler
        with ThreadPoolExecutor(2 * len(PROMPTS)) as pool:
            mixed = {p: pool.submit(ask, url, base, p) for p in PROMPTS}
            for n, p in zip(names, PROMPTS):
                pool.submit(ask, url, n, p)
            mixed = {p: f.result() for p, f in mixed.items()}
        for p in PROMPTS:
            assert gap(mixed[p], alone[p]) < min(gap(mixed[p], adapted[n, p]) for n in names), p
