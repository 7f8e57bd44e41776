"""Versioned schema migrations, applied in order and recorded in SQLite's `user_version`.

Each migration is a function of a sqlite_utils.Database; append new ones, never edit old ones:
a database made by any earlier version upgrades in place and keeps its rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import sqlite_utils


def v1_completions_and_keys(db: sqlite_utils.Database) -> None:
    db["users"].create({"name": str, "created_at": float}, pk="name")
    db["api_keys"].create(
        {"id": int, "user": str, "key_hash": str, "admin": int, "created_at": float, "revoked_at": float},
        pk="id",
        foreign_keys=[("user", "users", "name")],
        not_null={"user", "key_hash", "admin", "created_at"},
        defaults={"admin": 0},
    )
    db["api_keys"].create_index(["key_hash"], unique=True)
    db["completions"].create(
        {
            "id": str,  # the OpenAI `id` returned to the client
            "user": str,
            "created_at": float,
            "source": str,  # chat | comparison
            "model": str,  # what the client asked for
            "served_by": str,  # the base model or adapter version that answered
            "messages": str,  # JSON: the request messages
            "conversation": str,  # hash of the messages: the unit of the held-out split
            "output": str,  # choice 0's text
            "choices": str,  # JSON: [{index, content, finish_reason}]
            "params": str,  # JSON: sampling parameters
            "prompt_tokens": int,
            "completion_tokens": int,
            "latency_ms": float,
            "ttft_ms": float,
            "finish_reason": str,
            "status": str,  # complete | incomplete
        },
        pk="id",
        foreign_keys=[("user", "users", "name")],
        not_null={"user", "created_at", "source", "model", "messages", "conversation", "status"},
    )
    db["completions"].create_index(["user", "created_at"])
    db["completions"].create_index(["conversation"])
    db["completions"].create_index(["created_at"])


def v2_feedback(db: sqlite_utils.Database) -> None:
    """Thumbs, corrections, pairwise comparisons and their votes.

    Feedback rows are replaced in place (one per user and completion, one vote per
    comparison), so `created_at` is the time of the current vote: "new since T" means
    created_at > T. Every column the trainer or the dashboard filters or joins on has an index.
    """
    db["feedback"].create(
        {
            "id": int,
            "user": str,
            "completion_id": str,
            "choice_index": int,  # which choice of the completion was rated
            "rating": int,  # 1 | -1
            "reason": str,
            "comment": str,
            "created_at": float,
        },
        pk="id",
        foreign_keys=[("user", "users", "name"), ("completion_id", "completions", "id")],
        not_null={"user", "completion_id", "choice_index", "rating", "created_at"},
        defaults={"choice_index": 0},
    )
    db["feedback"].create_index(["user", "completion_id"], unique=True)
    db["feedback"].create_index(["completion_id"])
    db["feedback"].create_index(["created_at"])
    db["corrections"].create(
        {
            "id": int,
            "feedback_id": int,  # the thumb it came with; one correction per feedback row
            "completion_id": str,  # the completion (and choice_index of the feedback) it corrects
            "content": str,  # what the assistant should have said
            "created_at": float,
        },
        pk="id",
        foreign_keys=[("feedback_id", "feedback", "id"), ("completion_id", "completions", "id")],
        not_null={"feedback_id", "completion_id", "content", "created_at"},
    )
    db["corrections"].create_index(["feedback_id"], unique=True)
    db["corrections"].create_index(["completion_id"])
    db["corrections"].create_index(["created_at"])
    db["comparisons"].create(
        {
            "id": str,  # cmp-...
            "user": str,  # the creator, the only one who may vote
            "a_id": str,  # candidate completions, in the order they were shown
            "b_id": str,
            "created_at": float,
        },
        pk="id",
        foreign_keys=[("user", "users", "name"), ("a_id", "completions", "id"), ("b_id", "completions", "id")],
        not_null={"user", "a_id", "b_id", "created_at"},
    )
    db["comparisons"].create_index(["user", "created_at"])
    db["comparisons"].create_index(["a_id"])
    db["comparisons"].create_index(["b_id"])
    db["comparisons"].create_index(["created_at"])
    db["votes"].create(
        {"comparison_id": str, "choice": str, "created_at": float},  # choice: a | b | tie | both_bad
        pk="comparison_id",
        foreign_keys=[("comparison_id", "comparisons", "id")],
        not_null={"choice", "created_at"},
    )
    db["votes"].create_index(["created_at"])


def v3_cycles_and_adapters(db: sqlite_utils.Database) -> None:
    db["cycles"].create(
        {
            "id": int,
            "state": str,  # queued building_data sft reward_model best_of_n ppo evaluating published [promoted|rejected|failed|cancelled]
            "trigger": str,  # manual | scheduled
            "created_at": float,
            "started_at": float,
            "finished_at": float,
            "duration_s": float,
            "steps": str,  # JSON: {step: {"duration_s", ...figures}}
            "n_sft": int,
            "n_pairs": int,
            "n_prompts": int,
            "rm_accuracy": float,
            "mean_reward": float,
            "kl": float,
            "gate": str,  # pass | fail
            "version": str,
            "error": str,
            "worker": str,  # host:pid of the worker running it
            "heartbeat_at": float,
            "cancel_requested": int,
        },
        pk="id",
        not_null={"state", "trigger", "created_at"},
        defaults={"cancel_requested": 0},
    )
    db["cycles"].create_index(["created_at"])
    # At most one cycle is active at a time, whichever worker or client asks for one.
    db.execute("CREATE UNIQUE INDEX one_active_cycle ON cycles ((1)) WHERE state NOT IN "
               "('published', 'promoted', 'rejected', 'failed', 'cancelled')")
    db["adapters"].create(
        {"version": str, "path": str, "parent": str, "created_at": float, "cycle_id": int, "manifest": str},
        pk="version",
        foreign_keys=[("cycle_id", "cycles", "id")],
        not_null={"path", "created_at"},
    )
    db["promotions"].create(  # the alias history: the newest row names what `loopchat` serves
        {"id": int, "version": str, "action": str, "by_user": str, "at": float},
        pk="id",
        foreign_keys=[("version", "adapters", "version")],
        not_null={"action", "at"},
    )


def v4_cycle_budget(db: sqlite_utils.Database) -> None:
    """A cycle's time budget in seconds; NULL: its steps ran the fixed sizes of its config. What
    each step chose within it is in `steps` beside its other figures."""
    db["cycles"].add_column("budget_s", float)


def v5_rankings(db: sqlite_utils.Database) -> None:
    """Comparisons of K answers (2 to 4) and rankings of them.

    `candidates` lists every answer of a comparison in the order shown (`label` a, b, c, d) and
    where it came from (`origin`: serving, previous, base, canary, or a model the client named);
    `comparisons.a_id`/`b_id` stay the first two, for readers of version 2. A vote's `ranking` is
    the full order as JSON groups of labels, best first, ties sharing a group; `choice` stays the
    one-word verdict. Existing comparisons get their two candidates copied in. A cycle records the
    recipe it ran (NULL: the default)."""
    db["candidates"].create(
        {"comparison_id": str, "position": int, "label": str, "completion_id": str, "origin": str},
        pk=("comparison_id", "position"),
        foreign_keys=[("comparison_id", "comparisons", "id"), ("completion_id", "completions", "id")],
        not_null={"label", "completion_id"},
    )
    db["candidates"].create_index(["completion_id"])
    db.execute("INSERT INTO candidates (comparison_id, position, label, completion_id) "
               "SELECT id, 0, 'a', a_id FROM comparisons UNION ALL SELECT id, 1, 'b', b_id FROM comparisons")
    db["votes"].add_column("ranking", str)
    db["cycles"].add_column("recipe", str)


def v6_canaries(db: sqlite_utils.Database) -> None:
    """Canary rollouts: a published version serving `share` of users (sticky per user) beside the
    serving one (`baseline`, NULL = the base model) until live evidence or an operator ends it.
    At most one runs at a time (`ended_at` NULL). Every gateway follows this table and the
    promotions history, so all of them route alike."""
    db["canaries"].create(
        {"id": int, "version": str, "baseline": str, "share": float, "started_at": float, "updated_at": float,
         "by_user": str, "ended_at": float, "outcome": str, "ended_by": str, "rule": str, "evidence": str},
        pk="id",
        foreign_keys=[("version", "adapters", "version")],
        not_null={"version", "share", "started_at", "updated_at"},
    )
    db.execute("CREATE UNIQUE INDEX one_running_canary ON canaries ((1)) WHERE ended_at IS NULL")


def v7_adapter_paths_relative_to_the_data_dir(db: sqlite_utils.Database) -> None:
    """Adapters recorded with an absolute path inside the data directory get one relative to it,
    so that the directory can be moved (feedback.cycles.record_adapter records new ones so)."""
    file = db.execute("PRAGMA database_list").fetchone()[2]
    if not file:  # an in-memory database has no directory
        return
    home = Path(file).resolve().parent
    for version, path in db.execute("SELECT version, path FROM adapters").fetchall():
        if Path(path).is_absolute() and Path(path).is_relative_to(home):
            db["adapters"].update(version, {"path": str(Path(path).relative_to(home))})


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    v1_completions_and_keys,
    v2_feedback,
    v3_cycles_and_adapters,
    v4_cycle_budget,
    v5_rankings,
    v6_canaries,
    v7_adapter_paths_relative_to_the_data_dir,
]


def migrate(db: sqlite_utils.Database, upto: int | None = None) -> int:
    """Bring `db` to the newest version (or `upto`); returns the version it is at.

    Each step runs in one IMMEDIATE transaction that re-reads the version first, so a crash
    leaves no half-made schema and two processes opening a new file at once (gateway, CLI)
    do not both apply the same step."""
    target = len(MIGRATIONS) if upto is None else upto
    current = db.execute("PRAGMA user_version").fetchone()[0]
    while current < target:
        db.execute("BEGIN IMMEDIATE")
        try:
            current = db.execute("PRAGMA user_version").fetchone()[0]
            if current < target:
                MIGRATIONS[current](db)
                current += 1
                db.execute(f"PRAGMA user_version = {current}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    return current
