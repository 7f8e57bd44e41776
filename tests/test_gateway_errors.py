"""Bad requests get OpenAI-shaped errors with the right status, and write no row (the real app, the fake engine)."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from conftest import assert_error, run_cli

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
    with contextlib.closing(gateway.db()) as db:
        return db.execute("SELECT count(*) FROM completions").fetchone()[0]


@pytest.mark.parametrize("name,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request(fake_keyed_gateway, name, body, status, param):
    gw, alice = fake_keyed_gateway, fake_keyed_gateway.headers("alice")
    before = count(gw)
    kwargs = {"content": body, "headers": {**alice, "content-type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body, "headers": alice}
    assert_error(httpx.post(gw.url + "/v1/chat/completions", **kwargs), status, param)
    assert count(gw) == before
    assert httpx.post(gw.url + "/v1/chat/completions", json=GOOD, headers=alice).status_code == 200  # still serving


def test_streamed_bad_request_is_an_error_not_a_stream(fake_gateway):
    r = httpx.post(fake_gateway.url + "/v1/chat/completions", json={**GOOD, "stream": True, "model": "nope"})
    assert_error(r, 404, "model", code="model_not_found")
    r = httpx.post(fake_gateway.url + "/v1/chat/completions", json={**GOOD, "stream": True, "max_tokens": 5000})
    assert_error(r, 413)
    assert count(fake_gateway) == 0


def test_engine_down_is_503_until_it_is_back(fake_gateway):
    url = fake_gateway.url
    fake_gateway.engine.up = False
    for stream in (False, True):
        assert_error(httpx.post(url + "/v1/chat/completions", json={**GOOD, "stream": stream}), 503,
                     code="engine_unavailable")
    assert_error(httpx.get(url + "/readyz"), 503, code="engine_unavailable")
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}  # alive, only not ready
    assert count(fake_gateway) == 0
    fake_gateway.engine.up = True
    assert httpx.get(url + "/readyz").status_code == 200
    assert httpx.post(url + "/v1/chat/completions", json=GOOD).status_code == 200


def test_keys_are_required_and_checked(fake_keyed_gateway):
    gw = fake_keyed_gateway
    url = gw.url + "/v1/chat/completions"
    assert_error(httpx.post(url, json=GOOD), 401, code="missing_api_key")
    assert_error(httpx.post(url, json=GOOD, headers={"Authorization": "Bearer lc-wrong"}), 401,
                 code="invalid_api_key")
    assert_error(httpx.get(gw.url + "/v1/models"), 401, code="missing_api_key")
    r = httpx.post(url, json=GOOD, headers={**gw.headers("alice"), "X-Loopchat-User": "mallory"})
    assert r.status_code == 200, r.text
    with contextlib.closing(gw.db()) as db:
        row = db.execute("SELECT user FROM completions WHERE id = ?", [r.json()["id"]]).fetchone()
        hashes = [h for (h,) in db.execute("SELECT key_hash FROM api_keys")]
    assert row["user"] == "alice"  # the key names the user; the open-mode header does not
    assert gw.keys["alice"] not in hashes  # only the hash is stored


def test_open_mode_callers_name_themselves(fake_gateway):
    r = httpx.post(fake_gateway.url + "/v1/chat/completions", json=GOOD, headers={"X-Loopchat-User": "session-7"})
    anonymous = httpx.post(fake_gateway.url + "/v1/chat/completions", json=GOOD,
                           headers={"Authorization": "Bearer ignored-in-open-mode"})
    with contextlib.closing(fake_gateway.db()) as db:
        users = [db.execute("SELECT user FROM completions WHERE id = ?", [x.json()["id"]]).fetchone()[0]
                 for x in (r, anonymous)]
    assert users == ["session-7", "local"]


def test_refuses_public_address_without_keys(tmp_path):
    out = run_cli(tmp_path / "data", "serve", "--host", "0.0.0.0", "--engine-url", "http://127.0.0.1:9",
                  "--model", str(tmp_path))
    assert out.returncode != 0
    assert "refusing to listen on 0.0.0.0 without an API key" in out.stderr
