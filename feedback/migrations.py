"""Versioned schema migrations, applied in order and recorded in SQLite's `user_version`.

Each migration is a function of a sqlite_utils.Database; append new ones, never edit old ones:
a database made by any earlier version upgrades in place and keeps its rows.
"""

from __future__ import annotations

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


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    v1_completions_and_keys,
]


def migrate(db: sqlite_utils.Database, upto: int | None = None) -> int:
    """Bring `db` to the newest version (or `upto`); returns the version it is at."""
    target = len(MIGRATIONS) if upto is None else upto
    current = db.execute("PRAGMA user_version").fetchone()[0]
    for version in range(current + 1, target + 1):
        with db.conn:
            MIGRATIONS[version - 1](db)
            db.execute(f"PRAGMA user_version = {version}")
    return max(current, target)
