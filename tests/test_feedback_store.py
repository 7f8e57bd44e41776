"""The feedback store on a real SQLite file: migrations, upserts, ownership, atomicity, deletion."""

from __future__ import annotations

import shutil
import sqlite3
import threading

import pytest

from feedback import Store, cycles
from feedback.errors import Invalid, NotFound, NotYours
from feedback.migrations import MIGRATIONS
from feedback_fixtures import add_completion

FEEDBACK_TABLES = ("feedback", "corrections", "comparisons", "votes")


def counts(store: Store) -> dict[str, int]:
    return {t: store.count(t) for t in ("users", "api_keys", "completions", *FEEDBACK_TABLES)}


@pytest.fixture
def store(tmp_path) -> Store:
    return Store(tmp_path / "loopchat.db")


def test_v1_database_upgrades_in_place_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    old = Store(path, upto=1)
    assert old.version == 1
    key = old.create_key("alice")
    add_completion(old, "c1", answers=("hello", "hi there"))
    assert not set(FEEDBACK_TABLES) & set(old.db.table_names())
    del old

    new = Store(path)
    assert new.version == len(MIGRATIONS) >= 2
    assert set(FEEDBACK_TABLES) <= set(new.db.table_names())
    assert new.lookup_key(key) == {"user": "alice", "admin": 0}
    assert new.get_completion("c1")["choices"][1]["content"] == "hi there"
    assert new.put_feedback("alice", "c1", 1, choice_index=1)["choice_index"] == 1
    assert new.db.execute("PRAGMA foreign_key_check").fetchall() == []
    assert Store(path).version == new.version  # reopening is a no-op


def test_processes_opening_a_new_file_at_once_migrate_it_once(tmp_path):
    path, errors, stores = tmp_path / "race.db", [], []

    def open_store():
        try:
            stores.append(Store(path))
        except Exception as e:  # pragma: no cover - the failure this test exists to catch
            errors.append(e)

    threads = [threading.Thread(target=open_store) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and {s.version for s in stores} == {len(MIGRATIONS)}


def test_a_moved_data_dir_still_finds_the_adapters_inside_it(tmp_path):
    """Adapters in the data dir are found where the dir is now (moved, restored, mounted elsewhere);
    one recorded from outside it keeps its absolute path."""
    home = tmp_path / "data"
    store = Store(home / "loopchat.db")
    cycles.record_adapter(store, "v1", home / "adapters" / "v1", {"version": 1})
    cycles.record_adapter(store, "v2", tmp_path / "elsewhere" / "v2", {"version": 2})
    assert cycles.get_adapter(store, "v1")["path"] == str(home / "adapters" / "v1")
    del store
    shutil.move(home, tmp_path / "moved")

    moved = Store(tmp_path / "moved" / "loopchat.db")
    assert [a["path"] for a in cycles.list_adapters(moved)] == [str(tmp_path / "moved" / "adapters" / "v1"),
                                                                  str(tmp_path / "elsewhere" / "v2")]


def test_adapters_recorded_with_absolute_paths_become_movable_on_upgrade(tmp_path):
    home = tmp_path / "data"
    old = Store(home / "loopchat.db", upto=6)
    for version, path in (("v1", home / "adapters" / "v1"), ("v2", tmp_path / "elsewhere" / "v2")):
        old.db["adapters"].insert({"version": version, "path": str(path), "created_at": 0.0, "manifest": "{}"})
    del old

    new = Store(home / "loopchat.db")
    assert new.rows("SELECT path FROM adapters ORDER BY version") == [
        {"path": "adapters/v1"}, {"path": str(tmp_path / "elsewhere" / "v2")}]
    assert cycles.get_adapter(new, "v1")["path"] == str(home / "adapters" / "v1")


def test_feedback_is_one_row_per_user_and_completion_with_the_latest_vote(store):
    add_completion(store, "c1")
    first = store.put_feedback("alice", "c1", 1, reason="helpful", comment="nice", correction="Hello!")
    assert first["rating"] == 1 and first["correction"] == "Hello!" and first["reason"] == "helpful"
    again = store.put_feedback("alice", "c1", -1, correction="Hi, how can I help?")
    assert again["id"] == first["id"] and again["rating"] == -1 and again["correction"] == "Hi, how can I help?"
    assert again["reason"] is None and again["created_at"] >= first["created_at"]
    assert (store.count("feedback"), store.count("corrections")) == (1, 1)
    assert store.get_feedback("alice", "c1") == [again]
    # A post without a correction replaces the whole verdict, correction included.
    store.put_feedback("alice", "c1", -1)
    assert (store.count("feedback"), store.count("corrections")) == (1, 0)


def test_recent_feedback_is_newest_first_and_limited(store):
    for i in range(3):
        store.put_feedback("alice", add_completion(store, f"c{i}"), 1)
    assert [r["completion_id"] for r in store.get_feedback("alice", limit=2)] == ["c2", "c1"]
    assert store.get_feedback("bob") == [] and store.get_feedback("alice", "missing") == []


@pytest.mark.parametrize("user,completion,rating,choice_index,error,param", [
    ("alice", "nope", -1, 0, NotFound, "completion_id"),
    ("bob", "c1", -1, 0, NotYours, "completion_id"),
    ("alice", "c1", -1, 2, Invalid, "choice_index"),
    ("alice", "c1", 0, 0, Invalid, "rating"),
])
def test_refused_feedback_writes_nothing(store, user, completion, rating, choice_index, error, param):
    add_completion(store, "c1", answers=("a", "b"))
    store.ensure_user("bob")
    store.put_feedback("alice", "c1", 1, correction="better")
    before = counts(store)
    with pytest.raises(error) as caught:
        store.put_feedback(user, completion, rating, correction="other", choice_index=choice_index)
    assert caught.value.param == param
    assert counts(store) == before
    assert store.get_feedback("alice", "c1")[0]["correction"] == "better"


def test_comparisons_belong_to_their_creator_and_keep_one_vote(store):
    add_completion(store, "a1", prompt="q", answers=("one",), served_by="base")
    add_completion(store, "b1", prompt="q", answers=("two",), served_by="policy-v1")
    store.ensure_user("bob")
    cid = store.create_comparison("alice", "a1", "b1")
    assert cid.startswith("cmp-")
    shown = store.get_comparison(cid, "alice")
    assert shown["choice"] is None and shown["ranking"] is None
    assert shown["candidates"] == [{"label": "a", "id": "a1", "content": "one", "model": "base", "origin": None},
                                   {"label": "b", "id": "b1", "content": "two", "model": "policy-v1", "origin": None}]
    voted = store.vote("alice", cid, "a")
    assert (voted["choice"], voted["ranking"]) == ("a", [["a"], ["b"]])
    voted = store.vote("alice", cid, "both_bad")
    assert (voted["choice"], voted["ranking"]) == ("both_bad", [["a", "b"]])
    assert store.count("votes") == 1
    for call, error in [(lambda: store.vote("bob", cid, "b"), NotYours),
                        (lambda: store.vote("alice", "cmp-nope", "b"), NotFound),
                        (lambda: store.vote("alice", cid, "c"), Invalid),
                        (lambda: store.get_comparison(cid, "bob"), NotYours)]:
        with pytest.raises(error):
            call()
    assert store.get_comparison(cid, "alice")["choice"] == "both_bad"
    with pytest.raises(sqlite3.IntegrityError):  # candidates must be stored completions
        store.create_comparison("alice", "a1", "missing")
    assert store.count("comparisons") == 1


def test_delete_user_removes_everything_of_theirs_and_nothing_else(store):
    store.create_key("alice")
    store.create_key("bob")
    for user in ("alice", "bob"):
        a = add_completion(store, f"{user}-a", user=user, prompt="q")
        b = add_completion(store, f"{user}-b", user=user, prompt="q", answers=("other",))
        store.put_feedback(user, a, 1, correction="fixed")
        store.put_feedback(user, b, -1)
        store.vote(user, store.create_comparison(user, a, b), "a")
    bob_before = {t: n // 2 for t, n in counts(store).items()}

    gone = store.delete_user("alice")
    assert gone == {"votes": 1, "candidates": 2, "comparisons": 1, "corrections": 1, "feedback": 2, "completions": 2,
                    "api_keys": 1, "users": 1}
    assert counts(store) == bob_before
    assert not store.has_user("alice") and store.has_user("bob")
    assert store.delete_user("alice") == dict.fromkeys(gone, 0)
    assert store.db.execute("PRAGMA foreign_key_check").fetchall() == []
