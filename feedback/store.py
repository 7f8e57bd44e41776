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

from feedback import rankings
from feedback.errors import Invalid, NotFound, NotYours
from feedback.migrations import migrate

BUSY_TIMEOUT_MS = 10_000
KEY_PREFIX = "lc-"

_FEEDBACK_SELECT = """
    SELECT f.id, f.completion_id, f.choice_index, f.rating, f.reason, f.comment, k.content AS correction,
           f.created_at
    FROM feedback f LEFT JOIN corrections k ON k.feedback_id = f.id"""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def conversation_hash(messages: list[dict]) -> str:
    """Stable id of a conversation (its request messages), used for the held-out split."""
    canon = json.dumps([[m.get("role"), m.get("content")] for m in messages], separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode()).hexdigest()[:32]


def _switch_to_wal(conn: sqlite3.Connection) -> None:
    """PRAGMA journal_mode=WAL, retried for up to the busy timeout: when several connections switch a new
    file at once, SQLite answers the losers "database is locked" at once, not through the busy handler."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class Store:
    def __init__(self, path: str | Path, *, upto: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.home = self.path.parent.resolve()  # the data directory: stored file paths are relative to it
        self._local = threading.local()
        self.version = migrate(self.db, upto)

    @property
    def db(self) -> sqlite_utils.Database:
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            _switch_to_wal(conn)
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

    # ---- thumbs and corrections -----------------------------------------------------
    def put_feedback(self, user: str, completion_id: str, rating: int, *, reason: str | None = None,
                     comment: str | None = None, correction: str | None = None, choice_index: int = 0) -> dict:
        """Record `user`'s verdict on one of their completions, replacing any earlier one.

        The post is the user's whole feedback on that completion: a post without a correction
        removes an earlier correction. Raises NotFound, NotYours or Invalid; writes nothing then."""
        if rating not in (1, -1):
            raise Invalid("rating must be 1 or -1", "rating")
        now = time.time()
        with self.transaction() as db:
            found = db.execute("SELECT user, choices FROM completions WHERE id = ?", [completion_id]).fetchone()
            if found is None:
                raise NotFound(f"No completion with id '{completion_id}'.", "completion_id")
            owner, choices = found
            if owner != user:
                raise NotYours(f"Completion '{completion_id}' belongs to another user.", "completion_id")
            n_choices = len(json.loads(choices)) if choices else 1
            if not 0 <= choice_index < n_choices:
                raise Invalid(f"choice_index {choice_index} is out of range: the completion has {n_choices} "
                              "choice(s).", "choice_index")
            db["feedback"].upsert(
                {"user": user, "completion_id": completion_id, "choice_index": choice_index, "rating": rating,
                 "reason": reason, "comment": comment, "created_at": now},
                pk=("user", "completion_id"))
            feedback_id = db.execute("SELECT id FROM feedback WHERE user = ? AND completion_id = ?",
                                     [user, completion_id]).fetchone()[0]
            if correction is None:
                db.execute("DELETE FROM corrections WHERE feedback_id = ?", [feedback_id])
            else:
                db["corrections"].upsert(
                    {"feedback_id": feedback_id, "completion_id": completion_id, "content": correction,
                     "created_at": now},
                    pk="feedback_id")
            return self.rows(_FEEDBACK_SELECT + " WHERE f.id = ?", [feedback_id])[0]

    def get_feedback(self, user: str, completion_id: str | None = None, limit: int = 20) -> list[dict]:
        """`user`'s feedback on one completion, or their most recent feedback first."""
        if completion_id is not None:
            return self.rows(_FEEDBACK_SELECT + " WHERE f.user = ? AND f.completion_id = ?", [user, completion_id])
        return self.rows(_FEEDBACK_SELECT + " WHERE f.user = ? ORDER BY f.created_at DESC, f.id DESC LIMIT ?",
                         [user, limit])

    # ---- comparisons and votes ------------------------------------------------------
    def create_comparison(self, user: str, *completion_ids: str, origins: list[str | None] | None = None) -> str:
        """Store a comparison of 2 to 4 stored completions, labelled a, b, ... in the order they are
        shown, with where each came from (`origins`: serving, previous, base, canary or a model the
        client named; None: not known); returns its id."""
        labels = rankings.labels_for(len(completion_ids))
        origins = origins or [None] * len(completion_ids)
        if len(origins) != len(completion_ids):
            raise ValueError("one origin per candidate")
        comparison_id = "cmp-" + secrets.token_hex(12)
        with self.transaction() as db:
            db["comparisons"].insert({"id": comparison_id, "user": user, "a_id": completion_ids[0],
                                      "b_id": completion_ids[1], "created_at": time.time()})
            db["candidates"].insert_all([
                {"comparison_id": comparison_id, "position": i, "label": label, "completion_id": cid, "origin": origin}
                for i, (label, cid, origin) in enumerate(zip(labels, completion_ids, origins))])
        return comparison_id

    def get_comparison(self, comparison_id: str, user: str) -> dict:
        """The comparison with its candidates in the order shown (label, id, content, the model that
        wrote it, origin) and the vote (`choice` and `ranking`, None before one). Raises NotFound, or
        NotYours unless `user` created it."""
        found = self.rows("""SELECT p.id, p.user, p.created_at, v.choice, v.ranking FROM comparisons p
                             LEFT JOIN votes v ON v.comparison_id = p.id WHERE p.id = ?""", [comparison_id])
        if not found:
            raise NotFound(f"No comparison with id '{comparison_id}'.")
        row = found[0]
        if row["user"] != user:
            raise NotYours(f"Comparison '{comparison_id}' was created by another user.")
        candidates = self.rows("""SELECT k.label, c.id, c.output AS content, c.served_by AS model, k.origin
                                  FROM candidates k JOIN completions c ON c.id = k.completion_id
                                  WHERE k.comparison_id = ? ORDER BY k.position""", [comparison_id])
        ranking = None if row["choice"] is None else \
            rankings.stored([c["label"] for c in candidates], row["choice"], row["ranking"])
        return {"id": row["id"], "created_at": row["created_at"], "choice": row["choice"], "ranking": ranking,
                "candidates": candidates}

    def vote(self, user: str, comparison_id: str, choice: str | None = None, *, ranking: object = None) -> dict:
        """Record (or replace) the creator's vote: a `choice` (a label, tie, both_bad or all_bad) or a
        full `ranking` (see feedback.rankings); returns the comparison as get_comparison does.
        Raises Invalid, NotFound or NotYours; writes nothing then."""
        rankings.check_form(choice, ranking)
        with self.transaction() as db:
            labels = [c["label"] for c in self.get_comparison(comparison_id, user)["candidates"]]
            word, groups = rankings.normalise(labels, choice, ranking)
            db["votes"].upsert({"comparison_id": comparison_id, "choice": word, "ranking": json.dumps(groups),
                                "created_at": time.time()}, pk="comparison_id")
            return self.get_comparison(comparison_id, user)

    # ---- privacy ----------------------------------------------------------------------
    def delete_user(self, name: str) -> dict[str, int]:
        """Remove a user with their keys, completions and every piece of feedback on or by them,
        in one transaction; returns how many rows went from each table."""
        mine = "SELECT id FROM completions WHERE user = :u"
        comparisons = "SELECT value FROM json_each(:comparisons)"  # read before their candidates go
        feedback = f"SELECT id FROM feedback WHERE user = :u OR completion_id IN ({mine})"
        steps = [
            ("votes", f"DELETE FROM votes WHERE comparison_id IN ({comparisons})"),
            ("candidates", f"DELETE FROM candidates WHERE comparison_id IN ({comparisons})"),
            ("comparisons", f"DELETE FROM comparisons WHERE id IN ({comparisons})"),
            ("corrections",
             f"DELETE FROM corrections WHERE feedback_id IN ({feedback}) OR completion_id IN ({mine})"),
            ("feedback", f"DELETE FROM feedback WHERE id IN ({feedback})"),
            ("completions", "DELETE FROM completions WHERE user = :u"),
            ("api_keys", "DELETE FROM api_keys WHERE user = :u"),
            ("users", "DELETE FROM users WHERE name = :u"),
        ]
        with self.transaction() as db:
            ids = [r[0] for r in db.execute(
                f"SELECT id FROM comparisons WHERE user = :u OR id IN "
                f"(SELECT comparison_id FROM candidates WHERE completion_id IN ({mine}))", {"u": name})]
            params = {"u": name, "comparisons": json.dumps(ids)}
            return {table: db.execute(sql, params).rowcount for table, sql in steps}

    def has_user(self, name: str) -> bool:
        return bool(self.rows("SELECT 1 FROM users WHERE name = ?", [name]))

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
