"""Dataset builders on a store filled directly: formats, sources, duplicates, the split, `since`, stats."""

from __future__ import annotations

import time

import pytest

from feedback import Store
from feedback.datasets import build_pairs, build_sft, build_unpaired, count_new_feedback, split_of
from feedback.stats import feedback_stats
from feedback_fixtures import add_completion


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def strip_meta(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "meta"} for r in records]


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "loopchat.db")


@pytest.fixture
def filled(store) -> Store:
    """One conversation of each source: thumbs up and down (q1), a correction (q2), votes (q3)."""
    store.put_feedback("alice", add_completion(store, "up", prompt="q1", answers=("good",)), 1)
    store.put_feedback("alice", add_completion(store, "down", prompt="q1", answers=("bad",)), -1)
    store.put_feedback("alice", add_completion(store, "wrong", prompt="q2", answers=("wrong",)), -1,
                       correction="right")
    a = add_completion(store, "a", prompt="q3", answers=("A",), source="comparison")
    b = add_completion(store, "b", prompt="q3", answers=("B",), source="comparison")
    store.vote("alice", store.create_comparison("alice", a, b), "b")
    store.vote("alice", store.create_comparison("alice", a, b), "tie")
    store.vote("alice", store.create_comparison("alice", a, b), "both_bad")
    store.create_comparison("alice", a, b)  # never voted on
    return store


def test_pairs_come_from_votes_thumbs_and_corrections(filled):
    pairs = build_pairs(filled)
    assert strip_meta(pairs) == [
        {"prompt": user("q3"), "chosen": assistant("B"), "rejected": assistant("A"), "source": "comparison"},
        {"prompt": user("q1"), "chosen": assistant("good"), "rejected": assistant("bad"), "source": "thumbs"},
        {"prompt": user("q2"), "chosen": assistant("right"), "rejected": assistant("wrong"), "source": "correction"},
    ]
    vote, thumbs, correction = (p["meta"] for p in pairs)
    assert vote["ids"][0].startswith("votes:cmp-") and len(vote["ids"]) == 1
    assert thumbs["ids"] == ["feedback:1", "feedback:2"] and correction["ids"] == ["corrections:1"]
    # A vote's pairs are grouped by their comparison; other pairs are groups of one.
    assert (vote["group"], vote["rank_gap"]) == (vote["ids"][0].removeprefix("votes:"), 1)
    assert not {"group", "rank_gap"} & (set(thumbs) | set(correction))
    assert {m["conversation"] for m in (vote, thumbs, correction)} == {
        filled.get_completion(c)["conversation"] for c in ("a", "up", "wrong")}


def test_unpaired_and_sft(filled):
    assert strip_meta(build_unpaired(filled)) == [
        {"prompt": user("q1"), "completion": assistant("good"), "label": True, "source": "thumbs"},
        {"prompt": user("q1"), "completion": assistant("bad"), "label": False, "source": "thumbs"},
        {"prompt": user("q2"), "completion": assistant("wrong"), "label": False, "source": "thumbs"},
    ]
    assert strip_meta(build_sft(filled)) == [
        {"messages": user("q2") + assistant("right"), "source": "correction"},
        {"messages": user("q1") + assistant("good"), "source": "thumbs"},
        {"messages": user("q3") + assistant("B"), "source": "comparison"},  # the winner; ties teach nothing
    ]


def test_the_rated_choice_is_the_answer(store):
    store.put_feedback("alice", add_completion(store, "n2", prompt="q", answers=("first", "second")), 1,
                       choice_index=1, correction="third")
    assert strip_meta(build_sft(store)) == [{"messages": user("q") + assistant("third"), "source": "correction"},
                                            {"messages": user("q") + assistant("second"), "source": "thumbs"}]
    assert build_pairs(store)[0]["rejected"] == assistant("second")


def test_duplicates_collapse_and_keep_every_feedback_id(store):
    for name in ("alice", "bob"):
        store.put_feedback(name, add_completion(store, f"{name}-up", user=name, prompt="q", answers=("yes",)), 1)
        store.put_feedback(name, add_completion(store, f"{name}-down", user=name, prompt="q", answers=("no",)), -1)
    [pair] = build_pairs(store)
    assert sorted(pair["meta"]["ids"]) == ["feedback:1", "feedback:2", "feedback:3", "feedback:4"]
    assert len(build_unpaired(store)) == 2 and len(build_sft(store)) == 1


def test_a_correction_equal_to_the_answer_makes_no_pair(store):
    store.put_feedback("alice", add_completion(store, "c", answers=("same",)), -1, correction="same ")
    assert build_pairs(store) == [] and len(build_sft(store)) == 1


def test_the_split_is_by_conversation_and_stable_as_data_grows(store):
    def rate(prompt: str, n: int) -> None:
        store.put_feedback("alice", add_completion(store, f"{prompt}-{n}", prompt=prompt, answers=(f"a{n}",)),
                           1 if n % 2 else -1)

    for i in range(100):
        rate(f"question {i}", 0)
        rate(f"question {i}", 1)
    first = {split: build_pairs(store, split=split) for split in ("train", "heldout", "all")}
    train = {p["meta"]["conversation"] for p in first["train"]}
    heldout = {p["meta"]["conversation"] for p in first["heldout"]}
    assert not train & heldout and len(first["train"]) + len(first["heldout"]) == len(first["all"]) == 100
    assert 3 <= len(heldout) <= 20  # about HELDOUT_PERCENT

    for i in range(50, 150):  # new feedback on old and new conversations
        rate(f"question {i}", 3)
    later = {split: build_pairs(store, split=split) for split in ("train", "heldout")}
    assert {p["meta"]["conversation"] for p in later["train"]} >= train
    assert {p["meta"]["conversation"] for p in later["heldout"]} >= heldout
    for split, records in later.items():
        assert all(split_of(r["meta"]["conversation"]) == split for r in records)
    with pytest.raises(ValueError):
        build_pairs(store, split="test")


def test_since_selects_records_with_newer_feedback(filled):
    assert count_new_feedback(filled, 0) == {"thumbs": 3, "comparisons": 3, "corrections": 1}
    since = time.time()
    assert count_new_feedback(filled, since) == {"thumbs": 0, "comparisons": 0, "corrections": 0}
    assert build_pairs(filled, since=since) == []
    time.sleep(0.01)
    # A new thumbs-down in q1 pairs with the old thumbs-up; the re-vote on "down" turns it into a like.
    filled.put_feedback("alice", add_completion(filled, "down2", prompt="q1", answers=("worse",)), -1)
    filled.put_feedback("alice", "down", 1)
    assert count_new_feedback(filled, since) == {"thumbs": 2, "comparisons": 0, "corrections": 0}
    new = strip_meta(build_pairs(filled, since=since))
    assert new == [
        {"prompt": user("q1"), "chosen": assistant("good"), "rejected": assistant("worse"), "source": "thumbs"},
        {"prompt": user("q1"), "chosen": assistant("bad"), "rejected": assistant("worse"), "source": "thumbs"},
    ]


def test_stats_count_by_day_and_kind_and_what_each_source_yields(filled):
    stats = feedback_stats(filled)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert stats["data"] == [{"day": today, "kind": k, "count": n} for k, n in
                             [("thumbs_up", 1), ("thumbs_down", 2), ("correction", 1), ("comparison", 4), ("vote", 3)]]
    assert stats["totals"] == {"thumbs_up": 1, "thumbs_down": 2, "correction": 1, "comparison": 4, "vote": 3}
    assert stats["yields"] == {"pairs": {"comparison": 1, "thumbs": 1, "correction": 1},
                               "unpaired": {"thumbs": 3}, "sft": {"correction": 1, "thumbs": 1, "comparison": 1}}


def test_conversations_with_tool_turns_are_left_out(store):
    store.record_completion({
        "id": "tool", "user": "alice", "source": "chat", "model": "loopchat", "served_by": "base",
        "messages": user("weather?") + [{"role": "tool", "content": "sunny"}], "output": "It is sunny.",
        "choices": [{"index": 0, "content": "It is sunny.", "finish_reason": "stop"}], "status": "complete"})
    store.put_feedback("alice", "tool", -1, correction="Sunny today.")
    assert build_pairs(store) == build_unpaired(store) == build_sft(store) == []
