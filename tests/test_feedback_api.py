"""Feedback through the real HTTP API and the real SQLite file (the real app in front of the fake engine)."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from conftest import assert_error
from fake_engine import answer

TABLES = ("completions", "feedback", "corrections", "comparisons", "votes")
CHAT = {"model": "loopchat", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8}


def counts(gateway) -> dict[str, int]:
    with contextlib.closing(gateway.db()) as db:
        return {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


def feedback_metric(gateway, kind: str) -> float:
    for line in httpx.get(gateway.url + "/metrics").text.splitlines():
        if line.startswith(f'loopchat_feedback_total{{kind="{kind}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def gw(fake_keyed_gateway):
    """Keys required: alice and bob (users), ops (admin)."""
    return fake_keyed_gateway


@pytest.fixture(scope="module")
def alice_completion(gw) -> str:
    """A two-choice completion of alice's."""
    r = httpx.post(gw.url + "/v1/chat/completions", json={**CHAT, "n": 2}, headers=gw.headers("alice"))
    assert r.status_code == 200, r.text
    return r.json()["id"]


def test_thumbs_revotes_and_corrections(gw, alice_completion):
    url, alice = gw.url + "/v1/feedback", gw.headers("alice")
    ups, corrections = feedback_metric(gw, "thumbs_up"), feedback_metric(gw, "correction")
    r = httpx.post(url, json={"completion_id": alice_completion, "rating": 1, "reason": "helpful",
                              "comment": "short and sweet"}, headers=alice)
    assert r.status_code == 200, r.text
    first = r.json()
    assert set(first) >= {"id", "object", "completion_id", "rating", "reason", "comment", "correction", "created_at"}
    assert (first["object"], first["completion_id"], first["rating"], first["reason"], first["correction"]) == \
        ("feedback", alice_completion, 1, "helpful", None)
    before = counts(gw)

    r = httpx.post(url, json={"completion_id": alice_completion, "rating": -1, "choice_index": 1,
                              "correction": "Hi! How can I help you today?"}, headers=alice)
    assert r.status_code == 200, r.text
    again = r.json()
    assert again["id"] == first["id"] and again["rating"] == -1 and again["choice_index"] == 1
    assert again["correction"] == "Hi! How can I help you today?" and again["reason"] is None
    r = httpx.post(url, json={"completion_id": alice_completion, "rating": -1, "correction": "Hello."},
                   headers=alice)
    assert r.json()["correction"] == "Hello."
    after = counts(gw)
    assert after["feedback"] == before["feedback"] and after["corrections"] == before["corrections"] + 1

    listed = httpx.get(url, params={"completion_id": alice_completion}, headers=alice).json()
    assert listed["object"] == "list" and [f["correction"] for f in listed["data"]] == ["Hello."]
    assert httpx.get(url, params={"limit": 1}, headers=alice).json()["data"][0]["id"] == first["id"]
    assert httpx.get(url, params={"completion_id": alice_completion},
                     headers=gw.headers("bob")).json()["data"] == []
    assert feedback_metric(gw, "thumbs_up") == ups + 1
    assert feedback_metric(gw, "correction") == corrections + 2


BAD_FEEDBACK = [
    # (name, body, who, status, param); "ID" stands for alice's completion id
    ("unknown completion", {"completion_id": "chatcmpl-nope", "rating": 1}, "alice", 404, "completion_id"),
    ("someone else's completion", {"completion_id": "ID", "rating": 1}, "bob", 403, "completion_id"),
    ("no key", {"completion_id": "ID", "rating": 1}, None, 401, None),
    ("malformed json", b'{"completion_id": ', "alice", 400, None),
    ("not an object", ["ID", 1], "alice", 400, None),
    ("no rating", {"completion_id": "ID"}, "alice", 400, "rating"),
    ("no completion id", {"rating": 1}, "alice", 400, "completion_id"),
    ("rating zero", {"completion_id": "ID", "rating": 0}, "alice", 400, "rating"),
    ("rating two", {"completion_id": "ID", "rating": 2}, "alice", 400, "rating"),
    ("rating as text", {"completion_id": "ID", "rating": "1"}, "alice", 400, "rating"),
    ("rating as bool", {"completion_id": "ID", "rating": True}, "alice", 400, "rating"),
    ("comment not text", {"completion_id": "ID", "rating": 1, "comment": 5}, "alice", 400, "comment"),
    ("blank correction", {"completion_id": "ID", "rating": -1, "correction": " "}, "alice", 400, "correction"),
    ("negative choice", {"completion_id": "ID", "rating": 1, "choice_index": -1}, "alice", 400, "choice_index"),
    ("choice it lacks", {"completion_id": "ID", "rating": 1, "choice_index": 2}, "alice", 400, "choice_index"),
    ("unknown field", {"completion_id": "ID", "rating": 1, "stars": 5}, "alice", 400, "stars"),
]


@pytest.mark.parametrize("name,body,who,status,param", BAD_FEEDBACK, ids=[c[0] for c in BAD_FEEDBACK])
def test_bad_feedback_is_refused_and_writes_nothing(gw, alice_completion, name, body, who, status,
                                                    param):
    headers = gw.headers(who) if who else {}
    if isinstance(body, bytes):
        kwargs = {"content": body, "headers": {**headers, "content-type": "application/json"}}
    else:
        fill = {"ID": alice_completion}
        body = {k: fill.get(v, v) for k, v in body.items()} if isinstance(body, dict) else \
            [fill.get(v, v) for v in body]
        kwargs = {"json": body, "headers": headers}
    before = counts(gw)
    assert_error(httpx.post(gw.url + "/v1/feedback", **kwargs), status, param)
    assert counts(gw) == before


def test_listing_feedback_validates_its_limit(gw):
    r = httpx.get(gw.url + "/v1/feedback", params={"limit": 0}, headers=gw.headers("alice"))
    assert assert_error(r, 400)["param"].endswith("limit")


def test_comparison_is_blind_until_its_creator_votes(gw):
    alice, bob = gw.headers("alice"), gw.headers("bob")
    version = gw.publish_adapter()
    assert httpx.post(f"{gw.url}/admin/adapters/{version}/promote", headers=gw.headers("ops")).status_code == 200
    before = counts(gw)
    comparisons, votes = feedback_metric(gw, "comparison"), feedback_metric(gw, "vote")
    r = httpx.post(gw.url + "/v1/comparisons", json={**CHAT, "models": ["loopchat", "base-model"]}, headers=alice)
    assert r.status_code == 200, r.text
    cmp = r.json()
    assert cmp["id"].startswith("cmp-") and cmp["object"] == "comparison"
    assert [set(c) for c in cmp["candidates"]] == [{"label", "id", "content"}] * 2
    assert [c["label"] for c in cmp["candidates"]] == ["a", "b"]
    assert cmp["candidates"][0]["id"] != cmp["candidates"][1]["id"]
    after = counts(gw)
    assert (after["completions"], after["comparisons"]) == (before["completions"] + 2, before["comparisons"] + 1)
    with contextlib.closing(gw.db()) as db:
        sources = {r[0] for r in db.execute("SELECT source FROM completions WHERE id IN (?, ?)",
                                            [c["id"] for c in cmp["candidates"]])}
    assert sources == {"comparison"}

    url = f"{gw.url}/v1/comparisons/{cmp['id']}"
    shown = httpx.get(url, headers=alice).json()
    assert shown["choice"] is None and shown["ranking"] is None and shown["candidates"] == cmp["candidates"]
    assert_error(httpx.get(url, headers=bob), 403)
    assert_error(httpx.post(url + "/vote", json={"choice": "a"}, headers=bob), 403)
    assert counts(gw)["votes"] == before["votes"]

    r = httpx.post(url + "/vote", json={"choice": "a"}, headers=alice)
    assert r.status_code == 200, r.text
    assert r.json()["choice"] == "a" and r.json()["id"] == cmp["id"] and r.json()["ranking"] == [["a"], ["b"]]
    revealed = r.json()["candidates"]
    assert [c["id"] for c in revealed] == [c["id"] for c in cmp["candidates"]]
    assert [c["content"] for c in revealed] == [c["content"] for c in cmp["candidates"]]
    assert {c["model"] for c in revealed} == {f"policy-{version}", "base-model"}
    assert {c["origin"] for c in revealed} == {"loopchat", "base-model"}  # the models the client named
    for c in revealed:  # the reveal names the model that really wrote each candidate
        assert c["content"] == answer(c["model"], CHAT["messages"])
    r = httpx.post(url + "/vote", json={"choice": "both_bad"}, headers=alice)
    assert r.json()["choice"] == "both_bad"
    assert counts(gw)["votes"] == before["votes"] + 1
    assert httpx.get(url, headers=alice).json()["candidates"] == revealed
    assert feedback_metric(gw, "comparison") == comparisons + 1
    assert feedback_metric(gw, "vote") == votes + 2


BAD_COMPARISONS = [
    ("unknown model", {**CHAT, "models": ["loopchat", "gpt-17"]}, 404, "model"),
    ("one model", {**CHAT, "models": ["loopchat"]}, 400, "models"),
    ("five models", {**CHAT, "models": ["loopchat"] * 5}, 400, "models"),
    ("models other than n", {**CHAT, "n": 3, "models": ["loopchat"] * 2}, 400, "models"),
    ("one candidate", {**CHAT, "n": 1}, 400, "n"),
    ("five candidates", {**CHAT, "n": 5}, 400, "n"),
    ("streamed", {**CHAT, "stream": True}, 400, None),
    ("not stored", {**CHAT, "store": False}, 400, None),
    ("no messages", {"model": "loopchat", "messages": []}, 400, "messages"),
]


@pytest.mark.parametrize("name,body,status,param", BAD_COMPARISONS, ids=[c[0] for c in BAD_COMPARISONS])
def test_bad_comparison_is_refused_and_writes_nothing(gw, name, body, status, param):
    before = counts(gw)
    r = httpx.post(gw.url + "/v1/comparisons", json=body, headers=gw.headers("alice"))
    assert_error(r, status, param)
    assert counts(gw) == before


@pytest.mark.parametrize("path,body,status", [
    ("/v1/comparisons/cmp-nope/vote", {"choice": "a"}, 404),
    ("/v1/comparisons/cmp-nope/vote", {"choice": "e"}, 400),
    ("/v1/comparisons/cmp-nope/vote", {}, 400),
    ("/v1/comparisons/cmp-nope", None, 404),
])
def test_bad_vote_is_refused(gw, path, body, status):
    before = counts(gw)
    headers = gw.headers("alice")
    r = httpx.get(gw.url + path, headers=headers) if body is None else \
        httpx.post(gw.url + path, json=body, headers=headers)
    assert_error(r, status)
    assert counts(gw) == before


def test_stats_are_for_admins(gw):
    url = gw.url + "/admin/feedback/stats"
    assert_error(httpx.get(url, headers=gw.headers("alice")), 403)
    r = httpx.get(url, headers=gw.headers("ops"))
    assert r.status_code == 200, r.text
    stats = r.json()
    assert set(stats["kinds"]) == {"thumbs_up", "thumbs_down", "correction", "comparison", "vote"}
    assert all(set(row) == {"day", "kind", "count"} for row in stats["data"])
    assert set(stats["yields"]) == {"pairs", "unpaired", "sft"}
