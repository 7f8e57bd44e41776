"""SQLite store on sqlite-utils: WAL mode, a busy timeout, short transactional writes.

One connection per thread (FastAPI runs sync handlers in a thread pool); the gateway,
the worker and the CLI each open their own Store on the same file.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import sqlite_utils

from feedback.migrations import migrate

BUSY_TIMEOUT_MS = 10_000
KEY_PREFIX = "lc-"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def conversation_hash(messages: list[dict]) -> str:
    """Stable id of a conversation (its request messages), used for the held-out split."""
    canon = json.dumps([[m.get("role"), m.get("content")] for m in messages], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


class Store:
    def __init__(self, path: str | Path, *, upto: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.version = migrate(self.db, upto)

    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA synchronous=NORMAL")
            db = self._local.db = sqlite_utils.Database(conn)
        return db

    def transaction(self):
        """`with store.transaction() as db:` — BEGIN IMMEDIATE ... COMMIT, rolled back on error."""
        return _Transaction(self.db)

    # ---- users and keys -------------------------------------------------------------
    def ensure_user(self, name: str) -> None:
        self.db["users"].insert({"name": name, "created_at": time.time()}, pk="name", ignore=True)

    def create_key(self, user: str, admin: bool = False) -> str:
        key = KEY_PREFIX + secrets.token_urlsafe(24)
        with self.transaction() as db:
            db["users"].insert({"name": user, "created_at": time.time()}, pk="name", ignore=True)
            db["api_keys"].insert({"user": user, "key_hash": hash_key(key), "admin": int(admin), "created_at": time.time()})
        return key

    def key_count(self) -> int:
        return self.db.execute("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL").fetchone()[0]

    def lookup_key(self, key: str) -> dict | None:
        rows = list(self.db.query(
            "SELECT user, admin FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL", [hash_key(key)]))
        return rows[0] if rows else None

    # ---- completions ----------------------------------------------------------------
    def record_completion(self, row: dict[str, Any]) -> None:
        """Insert one finished (or abandoned) completion. JSON fields may be given as objects."""
        row = dict(row)
        for k in ("messages", "choices", "params"):
            if not isinstance(row.get(k), (str, type(None))):
                row[k] = json.dumps(row[k], ensure_ascii=False)
        row.setdefault("created_at", time.time())
        if "conversation" not in row:
            row["conversation"] = conversation_hash(json.loads(row["messages"]))
        with self.transaction() as db:
            db["users"].insert({"name": row["user"], "created_at": time.time()}, pk="name", ignore=True)
            db["completions"].insert(row, pk="id")

    def get_completion(self, completion_id: str) -> dict | None:
        try:
            row = self.db["completions"].get(completion_id)
        except sqlite_utils.db.NotFoundError:
            return None
        for k in ("messages", "choices", "params"):
            if row.get(k):
                row[k] = json.loads(row[k])
        return row

    def count(self, table: str) -> int:
        return self.db[table].count

    def rows(self, sql: str, params: Iterable = ()) -> list[dict]:
        return list(self.db.query(sql, list(params)))


class _Transaction:
    def __init__(self, db: sqlite_utils.Database):
        self.db = db

    def __enter__(self) -> sqlite_utils.Database:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
