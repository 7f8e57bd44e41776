"""Live head-to-head win rates from votes: the statistic on a real store, and GET /admin/winrates on
the real app (fake engine)."""

from __future__ import annotations

import contextlib
import time
from math import sqrt

import httpx
import pytest

from conftest import assert_error
from feedback import Store, cycles
from feedback.winrates import head_to_head, live_win_rates, mean_interval
from feedback_fixtures import add_completion


@pytest.fixture
def store(tmp_path) -> Store:
    store = Store(tmp_path / "loopchat.db")
    for version, parent in (("v1", None), ("v2", 1)):
        cycles.record_adapter(store, version, f"/adapters/{version}", {"name": f"policy-{version}",
                                                                      "parent_version": parent})
    return store


def voted(store: Store, served_by: tuple[str, ...], choice: str | None = None, ranking=None) -> str:
    """A comparison of answers by `served_by` (labelled a, b, ... in that order), voted; its id."""
    n = store.count("completions")
    ids = [add_completion(store, f"c{n + i}", prompt=f"q{n}", answers=(f"answer {n + i}",), served_by=who,
                          source="comparison") for i, who in enumerate(served_by)]
    cid = store.create_comparison("alice", *ids)
    store.vote("alice", cid, choice, ranking=ranking)
    return cid


def test_the_interval_is_the_mean_with_1_96_standard_errors():
    scores = [1, 0, 0.5, 1, 1]
    mean, half = mean_interval(scores)
    sd = sqrt(sum((x - 0.7) ** 2 for x in scores) / 4)
    assert mean == pytest.approx(0.7) and half == pytest.approx(1.96 * sd / sqrt(5))
    assert mean_interval([1.0]) == (1.0, None) and mean_interval([]) == (None, None)


def test_head_to_head_counts_wins_losses_and_ties_from_either_side(store):
    voted(store, ("policy-v2", "policy-v1"), "a")
    voted(store, ("policy-v1", "policy-v2"), "b")
    voted(store, ("policy-v1", "policy-v2"), "a")
    voted(store, ("policy-v2", "policy-v1"), "tie")
    voted(store, ("policy-v2", "policy-v1"), "both_bad")  # all bad: neither is better
    voted(store, ("policy-v2", "base-model"), "a")  # another opponent: not counted
    result = head_to_head(store, "policy-v2", "policy-v1")
    rate, half = mean_interval([1, 1, 0, 0.5, 0.5])
    assert result == {"version": "policy-v2", "opponent": "policy-v1", "wins": 2, "losses": 1, "ties": 2, "n": 5,
                      "win_rate": pytest.approx(0.6), "ci95": [pytest.approx(rate - half), pytest.approx(rate + half)]}
    mirrored = head_to_head(store, "policy-v1", "policy-v2")
    assert (mirrored["wins"], mirrored["losses"], mirrored["win_rate"]) == (1, 2, pytest.approx(0.4))


def test_a_ranking_of_k_answers_is_one_vote_scored_over_its_cross_pairs(store):
    # a and b by v2, c by v1, d by the base: v2's a beats c, b ties with it -> 0.75 for v2, one vote
    voted(store, ("policy-v2", "policy-v2", "policy-v1", "base-model"), ranking=[["a"], ["b", "c"], ["d"]])
    result = head_to_head(store, "policy-v2", "policy-v1")
    assert (result["n"], result["wins"], result["win_rate"], result["ci95"]) == (1, 1, 0.75, None)
    assert head_to_head(store, "policy-v1", "base-model")["win_rate"] == 1.0
    assert head_to_head(store, "policy-v2", "policy-v3")["n"] == 0


def test_since_and_until_select_votes_by_when_they_were_cast(store):
    voted(store, ("policy-v2", "policy-v1"), "b")
    start = time.time()
    late = voted(store, ("policy-v2", "policy-v1"), "a")
    assert head_to_head(store, "policy-v2", "policy-v1")["n"] == 2
    since = head_to_head(store, "policy-v2", "policy-v1", since=start)
    assert (since["n"], since["wins"], since["win_rate"]) == (1, 1, 1.0)
    assert head_to_head(store, "policy-v2", "policy-v1", until=start)["losses"] == 1
    store.vote("alice", late, "b")  # a re-vote counts once, when it was cast
    assert head_to_head(store, "policy-v2", "policy-v1", since=start)["losses"] == 1


def test_live_win_rates_put_each_version_against_its_parent_or_the_base(store):
    voted(store, ("policy-v1", "base-model"), "a")
    voted(store, ("policy-v2", "policy-v1"), "b")
    rows = live_win_rates(store, "base-model")
    assert [(r["adapter"], r["version"], r["opponent"], r["wins"], r["losses"]) for r in rows] == [
        ("v1", "policy-v1", "base-model", 1, 0), ("v2", "policy-v2", "policy-v1", 0, 1)]


def test_winrates_route_is_for_admins(fake_keyed_gateway):
    gw = fake_keyed_gateway
    url = gw.url + "/admin/winrates"
    assert_error(httpx.get(url, headers=gw.headers("alice")), 403)
    r = httpx.get(url, headers=gw.headers("ops"))
    assert r.status_code == 200 and r.json()["object"] == "list", r.text
    assert_error(httpx.get(url, params={"version": "policy-v1"}, headers=gw.headers("ops")), 400, "opponent")
    assert_error(httpx.get(url, params={"since": 5}, headers=gw.headers("ops")), 400, "since")


def test_winrates_route_counts_votes_cast_through_the_api(fake_gateway):
    gw = fake_gateway
    version = gw.publish_adapter()
    assert httpx.post(f"{gw.url}/admin/adapters/{version}/promote").status_code == 200
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "models": ["loopchat", "base-model"]}
    for _ in range(3):
        cmp = httpx.post(gw.url + "/v1/comparisons", json=chat).json()
        revealed = httpx.post(f"{gw.url}/v1/comparisons/{cmp['id']}/vote", json={"choice": "a"}).json()
        assert revealed["choice"] == "a"
    with contextlib.closing(gw.db()) as db:  # which side won each vote was shuffled
        wins = db.execute("SELECT count(*) FROM candidates k JOIN completions c ON c.id = k.completion_id "
                          "WHERE k.label = 'a' AND c.served_by = ?", [f"policy-{version}"]).fetchone()[0]
    [row] = httpx.get(gw.url + "/admin/winrates").json()["data"]
    assert (row["adapter"], row["version"], row["opponent"]) == (version, f"policy-{version}", "base-model")
    assert (row["n"], row["wins"], row["losses"]) == (3, wins, 3 - wins)
    [pair] = httpx.get(gw.url + "/admin/winrates", params={"version": "base-model",
                                                           "opponent": f"policy-{version}"}).json()["data"]
    assert (pair["n"], pair["wins"]) == (3, 3 - wins)
