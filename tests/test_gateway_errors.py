"""Bad requests get OpenAI-shaped errors with the right status, and write no row."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.slow

GOOD = {"model": "loopchat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

CASES = [
    ("malformed json", b"{not json", 400, None),
    ("no messages", {"model": "loopchat", "messages": []}, 400, "messages"),
    ("missing messages", {"model": "loopchat"}, 400, "messages"),
    ("bad role", {**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("empty content", {**GOOD, "messages": [{"role": "user", "content": "  "}]}, 400, None),
    ("temperature too high", {**GOOD, "temperature": 3}, 400, "temperature"),
    ("top_p zero", {**GOOD, "top_p": 0}, 400, "top_p"),
    ("negative max_tokens", {**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ("n too large", {**GOOD, "n": 100}, 400, "n"),
    ("too many stops", {**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("unknown model", {**GOOD, "model": "gpt-17"}, 404, "model"),
    ("completion over the context", {**GOOD, "max_tokens": 5000}, 413, None),
    ("prompt over the context", {**GOOD, "messages": [{"role": "user", "content": "word " * 3000}]}, 413, None),
    ("body over the size limit", {**GOOD, "messages": [{"role": "user", "content": "x" * 1_100_000}]}, 413, None),
]


def count(gateway) -> int:
    with gateway.db() as db:
        return db.execute("SELECT count(*) FROM completions").fetchone()[0]


@pytest.mark.parametrize("name,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request(vllm_gateway, name, body, status, param):
    before = count(vllm_gateway)
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(vllm_gateway.url + "/v1/chat/completions", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] == param
    assert count(vllm_gateway) == before
    assert httpx.get(vllm_gateway.url + "/readyz").status_code == 200  # still serving


def test_streamed_bad_request_is_an_error_not_a_stream(vllm_gateway):
    r = httpx.post(vllm_gateway.url + "/v1/chat/completions", json={**GOOD, "stream": True, "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_keys_are_required_and_checked(keyed_gateway):
    url = keyed_gateway.url + "/v1/chat/completions"
    r = httpx.post(url, json=GOOD)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = httpx.post(url, json=GOOD, headers={"Authorization": "Bearer lc-wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(url, json=GOOD, headers={"Authorization": f"Bearer {keyed_gateway.keys['alice']}"}, timeout=60)
    assert r.status_code == 200
    with keyed_gateway.db() as db:
        row = db.execute("SELECT user FROM completions WHERE id = ?", [r.json()["id"]]).fetchone()
        assert row["user"] == "alice"
        hashes = [h for (h,) in db.execute("SELECT key_hash FROM api_keys")]
    assert keyed_gateway.keys["alice"] not in hashes  # only the hash is stored


def test_refuses_public_address_without_keys(tmp_path, model_dir):
    from conftest import Server

    out = Server([], tmp_path, 0).cli("serve", "--host", "0.0.0.0", "--engine-url", "http://127.0.0.1:9",
                                      "--model", str(model_dir))
    assert out.returncode != 0
    assert "refusing to listen on 0.0.0.0 without an API key" in out.stderr
