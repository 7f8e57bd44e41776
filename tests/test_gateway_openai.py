"""Serving and streaming on the real engines: the real `loopchat up` process on the real model, once
per engine, driven by the `openai` SDK; every completion lands in SQLite. (The request contract —
n, stop, max_tokens, store, errors, models, metrics — is tests/test_gateway_chat.py's, on the fake engine.)"""

from __future__ import annotations

import json

import pytest
from conftest import openai_client, stored_completion

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module", params=["vllm_gateway", "hf_gateway"])
def gateway(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def client(gateway):
    return openai_client(gateway)


def test_non_streamed_chat_is_answered_and_stored(gateway, client):
    r = client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert "Paris" in text
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    row = stored_completion(gateway, r.id)
    assert row["output"] == text
    assert json.loads(row["messages"]) == PROMPT
    assert row["served_by"] == "SmolLM2-135M-Instruct" and row["model"] == "loopchat"
    assert row["user"] == "local" and row["status"] == "complete"
    assert row["completion_tokens"] == r.usage.completion_tokens
    assert row["finish_reason"] == r.choices[0].finish_reason
    assert json.loads(row["params"])["temperature"] == 0
    assert row["latency_ms"] > 0 and row["ttft_ms"] > 0


def test_streamed_chat_ends_with_usage_and_is_stored(gateway, client):
    stream = client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    row = stored_completion(gateway, ids.pop())
    assert row["output"] == text and row["status"] == "complete"


def test_stop_and_max_tokens_are_applied_by_the_engine(gateway, client):
    """Each engine applies these itself (the transformers engine cuts stop strings in its own streamer)."""
    full = client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    cut = text.index("Paris")
    stopped = client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=24, temperature=0,
                                             stop=["Paris"])
    assert stopped.choices[0].message.content == text[:cut] and stopped.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=2, temperature=0)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"
