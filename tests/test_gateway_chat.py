"""The gateway's OpenAI contract, driven by the `openai` SDK through the real app in front of the
fake engine: what a request may ask for, what comes back, and what is stored.
(tests/test_gateway_openai.py shows the same requests answered by the real engines.)"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from conftest import openai_client, stored_completion, wait_for
from fake_engine import answer

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture
def client(fake_gateway):
    return openai_client(fake_gateway)


def test_non_streamed_chat_is_answered_and_stored(fake_gateway, client):
    r = client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert text == answer("base-model", PROMPT)
    assert r.model == "base-model" and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(text.split()) and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    row = stored_completion(fake_gateway, r.id)
    assert row["output"] == text and json.loads(row["messages"]) == PROMPT
    assert (row["model"], row["served_by"], row["user"], row["status"]) == \
        ("loopchat", "base-model", "local", "complete")
    assert (row["prompt_tokens"], row["completion_tokens"]) == (r.usage.prompt_tokens, r.usage.completion_tokens)
    assert row["finish_reason"] == "stop"
    assert json.loads(row["params"]) == {"n": 1, "temperature": 0, "max_tokens": 24}
    assert row["latency_ms"] > 0 and row["ttft_ms"] > 0


def test_streamed_chat_ends_with_usage_and_is_stored(fake_gateway, client):
    chunks = list(client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=24, stream=True,
                                                 stream_options={"include_usage": True}))
    words = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    text = "".join(words)
    assert text == answer("base-model", PROMPT) and len(words) == len(text.split())  # one chunk a word, as sent
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(words)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    row = stored_completion(fake_gateway, ids.pop())
    assert row["output"] == text and row["status"] == "complete" and row["completion_tokens"] == len(words)


def test_streamed_chat_without_include_usage_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model="loopchat", messages=PROMPT, stream=True))
    assert chunks and all(c.choices and c.usage is None for c in chunks)


def test_store_false_answers_without_recording(fake_gateway, client):
    """Evaluation traffic opts out: answered (streamed or not), never stored, so never trained on."""
    r = client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=8, store=False)
    assert r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=8, store=False,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert stored_completion(fake_gateway, r.id) is None
    assert stored_completion(fake_gateway, chunks[0].id) is None
    with pytest.raises(openai.NotFoundError):  # nothing to rate
        client.post("/feedback", body={"completion_id": r.id, "rating": 1}, cast_to=object)


@pytest.mark.parametrize("stream", [False, True])
def test_n_two_gives_two_choices_and_stores_both(fake_gateway, client, stream):
    r = client.chat.completions.create(model="loopchat", messages=PROMPT, n=2, seed=7, stream=stream)
    if stream:
        chunks = list(r)
        texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
                 for i in (0, 1)]
        completion_id = chunks[0].id
    else:
        assert [c.index for c in r.choices] == [0, 1]
        texts, completion_id = [c.message.content for c in r.choices], r.id
    assert texts == [answer("base-model", PROMPT, 0), answer("base-model", PROMPT, 1)]
    choices = json.loads(stored_completion(fake_gateway, completion_id)["choices"])
    assert [(c["index"], c["content"]) for c in choices] == list(enumerate(texts))


def test_stop_sequence_cuts_the_answer(client):
    full = answer("base-model", PROMPT)
    stop = " " + full.split()[3]
    r = client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=24, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_max_tokens_limits_length(fake_gateway, client, field):
    r = client.chat.completions.create(model="loopchat", messages=PROMPT, **{field: 5})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == " ".join(answer("base-model", PROMPT).split()[:5])
    assert stored_completion(fake_gateway, r.id)["finish_reason"] == "length"


def test_models_list_has_alias_and_base(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"loopchat", "base-model"}
    assert models["loopchat"].root == "base-model"  # the alias serves the base model until a promotion
    assert client.chat.completions.create(model="base-model", messages=PROMPT).model == "base-model"


def test_health_ready_and_metrics(fake_gateway, client):
    url = fake_gateway.url
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(url + "/readyz").json()
    assert (ready["status"], ready["engine"], ready["serving"]) == ("ready", "fake", "base-model")
    r = client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=4)
    assert httpx.get(url + "/metrics").headers["content-type"].startswith("text/plain")
    counted = 'loopchat_requests_total{route="/v1/chat/completions",status="200"} 1.0'

    def metrics_counting_it():  # a request is counted after its last byte, maybe just after the client read it
        text = httpx.get(url + "/metrics").text
        return text if counted in text else None

    text = wait_for(metrics_counting_it, 30, "the chat request to be counted in /metrics")
    assert "loopchat_time_to_first_token_seconds_count 1.0" in text
    assert f'loopchat_generated_tokens_total{{served_by="base-model"}} {float(r.usage.completion_tokens)}' in text
    assert "loopchat_serving_policy_version 0.0" in text
