"""The gateway as an OpenAI server: the real `loopchat up` process on the real model, once per
engine, driven by the `openai` SDK; every completion lands in SQLite."""

from __future__ import annotations

import json

import openai
import pytest

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module", params=["vllm_gateway", "hf_gateway"])
def gateway(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def client(gateway):
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused-in-open-mode", max_retries=0)


def stored(gateway, completion_id):
    with gateway.db() as db:
        return db.execute("SELECT * FROM completions WHERE id = ?", [completion_id]).fetchone()


def test_non_streamed_chat_is_answered_and_stored(gateway, client):
    r = client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert "Paris" in text
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    row = stored(gateway, r.id)
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
    row = stored(gateway, ids.pop())
    assert row["output"] == text and row["status"] == "complete"


def test_store_false_answers_without_recording(gateway, client):
    """Evaluation traffic opts out: answered (streamed or not), never stored, so never trained on."""
    r = client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=8, temperature=0, store=False)
    assert r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=8, temperature=0,
                                                 store=False, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert stored(gateway, r.id) is None and stored(gateway, chunks[0].id) is None
    with pytest.raises(openai.NotFoundError):  # nothing to rate
        client.post("/feedback", body={"completion_id": r.id, "rating": 1}, cast_to=object)


def test_n_two_gives_two_choices(gateway, client):
    r = client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=12, n=2, temperature=1.0,
                                       seed=7)
    assert [c.index for c in r.choices] == [0, 1]
    assert all(c.message.content for c in r.choices)
    assert len(json.loads(stored(gateway, r.id)["choices"])) == 2


def test_stop_sequence_cuts_the_answer(gateway, client):
    free = client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=24, temperature=0)
    full = free.choices[0].message.content
    assert "Paris" in full
    r = client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=24, temperature=0,
                                       stop=["Paris"])
    assert r.choices[0].message.content == full[: full.index("Paris")]
    assert r.choices[0].finish_reason == "stop"


def test_max_tokens_limits_length(gateway, client):
    r = client.chat.completions.create(model="loopchat", messages=[{"role": "user", "content": "Write a long story."}],
                                       max_completion_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_models_list_has_alias_and_base(gateway, client):
    ids = {m.id: m for m in client.models.list().data}
    assert {"loopchat", "SmolLM2-135M-Instruct"} <= set(ids)


def test_health_ready_and_metrics(gateway, client):
    import httpx

    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(gateway.url + "/readyz").status_code == 200
    client.chat.completions.create(model="loopchat", messages=PROMPT, max_tokens=4)
    text = httpx.get(gateway.url + "/metrics").text
    assert 'loopchat_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "loopchat_time_to_first_token_seconds_count" in text
    assert "loopchat_generated_tokens_total" in text
    assert "loopchat_serving_policy_version" in text
