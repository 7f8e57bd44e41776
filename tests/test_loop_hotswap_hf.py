"""The transformers engine swaps adapters the same way (peft named adapters), so the loop
works where vLLM is not installed."""

from __future__ import annotations

import httpx
import pytest
from loop_fixtures import publish_random

pytestmark = pytest.mark.slow


def answer(url: str, model: str = "loopchat") -> dict:
    r = httpx.post(url + "/v1/chat/completions", timeout=120,
                   json={"model": model, "messages": [{"role": "user", "content": "Name a color."}],
                         "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_promote_and_rollback_on_transformers(hf_gateway, model_dir, tmp_path):
    url = hf_gateway.url
    base = answer(url)
    assert base["model"] == "SmolLM2-135M-Instruct"
    version = publish_random(hf_gateway.db_path, model_dir, tmp_path, seed=3)
    r = httpx.post(f"{url}/admin/adapters/{version}/promote", timeout=120)
    assert r.status_code == 200, r.text
    tuned = answer(url)
    assert tuned["model"] == f"policy-{version}"
    assert tuned["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    assert answer(url, "SmolLM2-135M-Instruct")["choices"][0]["message"]["content"] == \
        base["choices"][0]["message"]["content"]  # the base stays reachable by name, adapter disabled
    assert httpx.post(f"{url}/admin/rollback", timeout=120).json()["serving"] is None
    back = answer(url)
    assert back["model"] == "SmolLM2-135M-Instruct"
    assert back["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]
