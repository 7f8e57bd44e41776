"""Comparisons of 2 to 4 answers and their rankings through the real HTTP API, the real SQLite file
and `loopchat export` (the real app in front of the fake engine)."""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest

from conftest import assert_error
from fake_engine import answer
from feedback_fixtures import add_completion

CHAT = {"model": "loopchat", "messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 8}


def post(gw, path: str, body, user: str = "ranker") -> httpx.Response:
    return httpx.post(gw.url + path, json=body, headers={"X-Loopchat-User": user}, timeout=30)


def votes(gw) -> list[tuple]:
    with contextlib.closing(gw.db()) as db:
        return db.execute("SELECT comparison_id, choice, ranking, created_at FROM votes ORDER BY 1").fetchall()


def test_the_alias_asks_the_registry_for_each_candidate_and_reveals_them_after_the_ranking(fake_gateway,
                                                                                         monkeypatch):
    gw = fake_gateway
    version = gw.publish_adapter()
    assert httpx.post(f"{gw.url}/admin/adapters/{version}/promote").status_code == 200
    asked = []
    sources = [(f"policy-{version}", "serving"), ("base-model", "base"), (f"policy-{version}", "canary"),
               ("base-model", "previous")]

    def comparison_models(user: str, n: int) -> list[tuple[str, str]]:
        asked.append((user, n))
        return sources[:n]

    monkeypatch.setattr(gw.app.state.registry, "comparison_models", comparison_models)
    r = post(gw, "/v1/comparisons", {**CHAT, "n": 4})
    assert r.status_code == 200, r.text
    cmp = r.json()
    assert asked == [("ranker", 4)]
    assert [c["label"] for c in cmp["candidates"]] == ["a", "b", "c", "d"]
    assert [set(c) for c in cmp["candidates"]] == [{"label", "id", "content"}] * 4
    assert len({c["id"] for c in cmp["candidates"]}) == 4
    with contextlib.closing(gw.db()) as db:
        stored = db.execute("SELECT k.label, k.origin, c.served_by, c.params FROM candidates k JOIN completions c "
                            "ON c.id = k.completion_id WHERE k.comparison_id = ? ORDER BY k.position",
                            [cmp["id"]]).fetchall()
    assert sorted((row["served_by"], row["origin"]) for row in stored) == sorted(sources)
    assert all(json.loads(row["params"])["n"] == 1 for row in stored)  # one answer per candidate

    url = f"{gw.url}/v1/comparisons/{cmp['id']}"
    shown = httpx.get(url, headers={"X-Loopchat-User": "ranker"}).json()
    assert shown["candidates"] == cmp["candidates"] and shown["choice"] is shown["ranking"] is None

    r = post(gw, f"/v1/comparisons/{cmp['id']}/vote", {"ranking": [["c"], ["d", "a"], ["b"]]})
    assert r.status_code == 200, r.text
    voted = r.json()
    assert (voted["object"], voted["id"], voted["choice"], voted["ranking"]) == \
        ("comparison.vote", cmp["id"], "c", [["c"], ["a", "d"], ["b"]])
    assert [(c["label"], c["origin"]) for c in voted["candidates"]] == [(row["label"], row["origin"]) for row in stored]
    for c in voted["candidates"]:  # the reveal names the model that really wrote each candidate
        assert c["content"] == answer(c["model"], CHAT["messages"])
    assert httpx.get(url, headers={"X-Loopchat-User": "ranker"}).json() == {**voted, "object": "comparison"}


@pytest.mark.parametrize("body,k,origins", [
    ({"n": 3, "model": "base-model"}, 3, {"base-model"}),
    ({"models": ["base-model", "loopchat", "base-model"]}, 3, {"base-model", "loopchat"}),
    ({}, 2, None),  # the alias: the registry's origins
])
def test_n_counts_candidates_and_origins_name_what_was_asked(fake_gateway, body, k, origins):
    r = post(fake_gateway, "/v1/comparisons", {**CHAT, **body})
    assert r.status_code == 200, r.text
    cmp = r.json()
    assert [c["label"] for c in cmp["candidates"]] == list("abcd"[:k])
    with contextlib.closing(fake_gateway.db()) as db:
        found = {row[0] for row in db.execute("SELECT origin FROM candidates WHERE comparison_id = ?", [cmp["id"]])}
    assert found == origins if origins else found and found <= {"serving", "previous", "base", "canary"}


BAD_VOTES = [
    # (name, body, status, param) on a comparison of three answers
    ("nothing", {}, 400, "choice"),
    ("both keys", {"choice": "a", "ranking": [["a"], ["b"], ["c"]]}, 400, "ranking"),
    ("a label it lacks", {"choice": "d"}, 400, "choice"),
    ("not a label", {"choice": "e"}, 400, "choice"),
    ("choice not text", {"choice": 1}, 400, "choice"),
    ("ranking not a list", {"ranking": "abc"}, 400, "ranking"),
    ("no groups", {"ranking": []}, 400, "ranking"),
    ("a group not a list", {"ranking": ["a", ["b", "c"]]}, 400, "ranking.0"),
    ("an empty group", {"ranking": [["a"], [], ["b", "c"]]}, 400, "ranking"),
    ("a label it lacks, ranked", {"ranking": [["a"], ["b"], ["c", "d"]]}, 400, "ranking"),
    ("not a label, ranked", {"ranking": [["a"], ["b"], ["c", "x"]]}, 400, "ranking.2.1"),
    ("a label twice", {"ranking": [["a"], ["b", "a"], ["c"]]}, 400, "ranking"),
    ("a label left out", {"ranking": [["a"], ["c"]]}, 400, "ranking"),
    ("an unknown field", {"choice": "a", "weight": 2}, 400, "weight"),
]


@pytest.fixture(scope="module")
def three(fake_keyed_gateway) -> tuple:
    """(gateway, alice's comparison of three answers, already ranked once)."""
    gw = fake_keyed_gateway
    r = httpx.post(gw.url + "/v1/comparisons", json={**CHAT, "n": 3}, headers=gw.headers("alice"))
    assert r.status_code == 200, r.text
    cid = r.json()["id"]
    r = httpx.post(f"{gw.url}/v1/comparisons/{cid}/vote", json={"ranking": [["b"], ["a", "c"]]},
                   headers=gw.headers("alice"))
    assert r.status_code == 200, r.text
    return gw, cid


@pytest.mark.parametrize("name,body,status,param", BAD_VOTES, ids=[v[0] for v in BAD_VOTES])
def test_a_bad_vote_is_refused_with_its_param_and_nothing_changes(three, name, body, status, param):
    gw, cid = three
    before = votes(gw)
    r = httpx.post(f"{gw.url}/v1/comparisons/{cid}/vote", json=body, headers=gw.headers("alice"))
    assert_error(r, status, param, "invalid_value")
    assert votes(gw) == before


def test_only_the_creator_ranks_and_sees_the_ranking(three):
    gw, cid = three
    before = votes(gw)
    url = f"{gw.url}/v1/comparisons/{cid}"
    assert_error(httpx.post(url + "/vote", json={"ranking": [["a"], ["b"], ["c"]]}, headers=gw.headers("bob")),
                 403, code="not_owner")
    assert_error(httpx.get(url, headers=gw.headers("bob")), 403)
    assert votes(gw) == before
    assert httpx.get(url, headers=gw.headers("alice")).json()["ranking"] == [["b"], ["a", "c"]]


def test_export_writes_every_pair_of_a_ranking_with_its_group(fake_gateway, tmp_path):
    """Four different answers stored as a comparison, ranked through the API: C(4,2) = 6 pairs in the
    export, one demonstration (the best answer)."""
    gw = fake_gateway
    texts = {"a": "An apple.", "b": "A banana, yellow and sweet.", "c": "Cherry.", "d": "Fruit is food."}
    ids = [add_completion(gw.store, f"cand-{x}", user="ranker", prompt="Name a fruit.", answers=(t,),
                          source="comparison") for x, t in texts.items()]
    cid = gw.store.create_comparison("ranker", *ids, origins=["serving"] * 4)
    r = post(gw, f"/v1/comparisons/{cid}/vote", {"ranking": [["c"], ["a"], ["d"], ["b"]]})
    assert r.status_code == 200, r.text

    out = tmp_path / "pairs.jsonl"
    result = gw.cli("export", "--kind", "pairs", "-o", str(out))
    assert result.returncode == 0, result.stderr
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    order = "cadb"
    expected = {(texts[order[i]], texts[order[j]], j - i) for i in range(4) for j in range(i + 1, 4)}
    assert {(p["chosen"][0]["content"], p["rejected"][0]["content"], p["meta"]["rank_gap"]) for p in pairs} == expected
    assert len(pairs) == 6 and {p["meta"]["group"] for p in pairs} == {cid}
    assert all(p["source"] == "comparison" and p["prompt"] == CHAT["messages"] for p in pairs)

    result = gw.cli("export", "--kind", "sft", "-o", str(out))
    assert result.returncode == 0, result.stderr
    [demo] = [json.loads(line) for line in out.read_text().splitlines()]
    assert demo["messages"] == CHAT["messages"] + [{"role": "assistant", "content": texts["c"]}]
