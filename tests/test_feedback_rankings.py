"""Rankings of K answers on a real SQLite store: how a vote reads, what the store refuses, and the
pairs (with their group and rank gap) and demonstrations a ranking gives the datasets."""

from __future__ import annotations

import json
from math import comb

import pytest

from feedback import Store, rankings
from feedback.datasets import build_pairs, build_sft
from feedback.errors import Invalid, NotFound, NotYours
from feedback_fixtures import add_completion

ANSWERS = {"a": "Paris.", "b": "It is Paris, the capital.", "c": "Lyon.", "d": "I do not know."}


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "loopchat.db")


def comparison(store: Store, k: int = 4, user: str = "alice", prompt: str = "Capital of France?",
               served_by: tuple[str, ...] = ("policy-v2", "policy-v1", "base", "policy-v2")) -> str:
    ids = [add_completion(store, f"{user}-{prompt}-{x}", user=user, prompt=prompt, answers=(ANSWERS[x],),
                          served_by=served_by[i], source="comparison") for i, x in enumerate("abcd"[:k])]
    return store.create_comparison(user, *ids, origins=["serving", "previous", "base", "serving"][:k])


@pytest.mark.parametrize("vote,expected", [
    ({"choice": "c"}, ("c", [["c"], ["a", "b", "d"]])),
    ({"choice": "tie"}, ("tie", [["a", "b", "c", "d"]])),
    ({"choice": "both_bad"}, ("all_bad", [["a", "b", "c", "d"]])),
    ({"choice": "all_bad"}, ("all_bad", [["a", "b", "c", "d"]])),
    ({"ranking": [["c"], ["b", "a"], ["d"]]}, ("c", [["c"], ["a", "b"], ["d"]])),
    ({"ranking": [["b", "d"], ["a", "c"]]}, ("ranked", [["b", "d"], ["a", "c"]])),
    ({"ranking": [["d", "c", "b", "a"]]}, ("tie", [["a", "b", "c", "d"]])),
])
def test_every_vote_is_stored_as_its_word_and_ranking(store, vote, expected):
    cid = comparison(store)
    shown = store.vote("alice", cid, vote.get("choice"), ranking=vote.get("ranking"))
    assert (shown["choice"], shown["ranking"]) == expected
    row = store.rows("SELECT choice, ranking FROM votes WHERE comparison_id = ?", [cid])[0]
    assert (row["choice"], json.loads(row["ranking"])) == expected


def test_two_answers_keep_both_bad_and_any_k_takes_all_bad(store):
    cid = comparison(store, k=2)
    assert store.vote("alice", cid, "all_bad")["choice"] == "both_bad"
    assert store.vote("alice", cid, ranking=[["b"], ["a"]])["choice"] == "b"


BAD_VOTES = [
    # (name, choice, ranking, param) on a comparison of three answers a, b, c
    ("nothing", None, None, "choice"),
    ("both keys", "a", [["a"], ["b"], ["c"]], "ranking"),
    ("a label it lacks", "d", None, "choice"),
    ("an unknown word", "best", None, "choice"),
    ("not a list", None, "abc", "ranking"),
    ("no groups", None, [], "ranking"),
    ("an empty group", None, [["a"], [], ["b", "c"]], "ranking"),
    ("a group not a list", None, ["a", ["b", "c"]], "ranking"),
    ("a label it lacks, ranked", None, [["a"], ["b"], ["c", "d"]], "ranking"),
    ("a label twice", None, [["a"], ["b", "a"], ["c"]], "ranking"),
    ("a label left out", None, [["a"], ["c"]], "ranking"),
]


@pytest.mark.parametrize("name,choice,ranking,param", BAD_VOTES, ids=[v[0] for v in BAD_VOTES])
def test_a_bad_vote_is_refused_and_the_earlier_one_stays(store, name, choice, ranking, param):
    cid = comparison(store, k=3)
    store.vote("alice", cid, ranking=[["b"], ["a", "c"]])
    before = store.rows("SELECT * FROM votes")
    with pytest.raises(Invalid) as caught:
        store.vote("alice", cid, choice, ranking=ranking)
    assert caught.value.param == param and caught.value.message
    assert store.rows("SELECT * FROM votes") == before


def test_only_the_creator_votes_on_an_existing_comparison(store):
    cid = comparison(store, k=3)
    store.ensure_user("bob")
    with pytest.raises(NotYours):
        store.vote("bob", cid, ranking=[["a"], ["b"], ["c"]])
    with pytest.raises(NotFound):
        store.vote("alice", "cmp-nope", ranking=[["a"], ["b"], ["c"]])
    with pytest.raises(Invalid):  # the form is checked before the comparison is looked up
        store.vote("alice", "cmp-nope")
    assert store.count("votes") == 0


def test_a_comparison_has_two_to_four_candidates_with_their_origin(store):
    cid = comparison(store)
    shown = store.get_comparison(cid, "alice")
    assert [(c["label"], c["model"], c["origin"]) for c in shown["candidates"]] == [
        ("a", "policy-v2", "serving"), ("b", "policy-v1", "previous"), ("c", "base", "base"),
        ("d", "policy-v2", "serving")]
    row = store.rows("SELECT a_id, b_id FROM comparisons WHERE id = ?", [cid])[0]
    assert [row["a_id"], row["b_id"]] == [c["id"] for c in shown["candidates"][:2]]  # readers of version 2
    one = add_completion(store, "lonely")
    for ids in ([one], [one] * 5):
        with pytest.raises(ValueError):
            store.create_comparison("alice", *ids)
    assert store.count("comparisons") == 1


def test_pairs_of_a_ranking_are_every_two_answers_in_different_groups():
    assert rankings.pairs([["c"], ["a", "b"], ["d"]]) == [
        ("c", "a", 1), ("c", "b", 1), ("c", "d", 2), ("a", "d", 1), ("b", "d", 1)]  # C(4,2) - 1 tie
    assert len(rankings.pairs([["a"], ["b"], ["c"], ["d"]])) == comb(4, 2)
    assert rankings.pairs([["a", "b", "c"]]) == []
    assert rankings.best([["c"], ["a", "b"]]) == "c"
    assert rankings.best([["a", "b"], ["c"]]) is rankings.best([["a", "b"]]) is None


def test_a_ranking_becomes_its_pairs_with_group_and_gap_and_its_best_answer_a_demonstration(store):
    cid = comparison(store)
    store.vote("alice", cid, ranking=[["b"], ["a", "c"], ["d"]])
    pairs = build_pairs(store)
    got = {(p["chosen"][0]["content"], p["rejected"][0]["content"]): p["meta"] for p in pairs}
    A, B, C, D = (ANSWERS[x] for x in "abcd")
    assert set(got) == {(B, A), (B, C), (B, D), (A, D), (C, D)}  # C(4,2) minus the tie a = c
    assert {m["group"] for m in got.values()} == {cid}
    assert {pair: m["rank_gap"] for pair, m in got.items()} == {(B, A): 1, (B, C): 1, (B, D): 2, (A, D): 1, (C, D): 1}
    assert all(p["source"] == "comparison" and p["meta"]["ids"] == [f"votes:{cid}"] for p in pairs)
    assert [r["messages"][-1]["content"] for r in build_sft(store)] == [B]

    store.vote("alice", cid, ranking=[["a", "b"], ["c", "d"]])  # no single best answer: no demonstration
    assert len(build_pairs(store)) == 4 and build_sft(store) == []
    store.vote("alice", cid, "all_bad")
    assert build_pairs(store) == build_sft(store) == []


def test_votes_from_before_rankings_are_read_from_their_choice(tmp_path):
    """A version 4 database: two-answer votes with no ranking column, upgraded in place."""
    path = tmp_path / "old.db"
    old = Store(path, upto=4)
    for i, choice in enumerate(("b", "tie")):
        a = add_completion(old, f"a{i}", prompt=f"q{i}", answers=("A",), source="comparison")
        b = add_completion(old, f"b{i}", prompt=f"q{i}", answers=("B",), source="comparison")
        old.db["comparisons"].insert({"id": f"cmp-old{i}", "user": "alice", "a_id": a, "b_id": b, "created_at": 1.0})
        old.db["votes"].insert({"comparison_id": f"cmp-old{i}", "choice": choice, "created_at": 2.0})
    del old
    store = Store(path)
    assert store.get_comparison("cmp-old0", "alice")["ranking"] == [["b"], ["a"]]
    [pair] = build_pairs(store)
    assert (pair["chosen"][0]["content"], pair["rejected"][0]["content"]) == ("B", "A")
    assert (pair["meta"]["group"], pair["meta"]["rank_gap"]) == ("cmp-old0", 1)


def test_delete_user_removes_every_candidate_of_their_comparisons(store):
    comparison(store, user="alice")
    kept = comparison(store, user="bob")
    store.vote("bob", kept, "a")
    gone = store.delete_user("alice")
    assert (gone["comparisons"], gone["candidates"], gone["completions"]) == (1, 4, 4)
    assert store.rows("SELECT DISTINCT comparison_id FROM candidates") == [{"comparison_id": kept}]
    assert store.db.execute("PRAGMA foreign_key_check").fetchall() == []
