"""Retrain cycles, published adapters and the promotion history, in the store.

A cycle is a row whose `state` walks through STEPS; the database guarantees that only one
is active at a time (a partial unique index), so two workers or an operator's click can
never start a second one."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from pathlib import Path

from feedback.store import Store

STEPS = ("queued", "building_data", "sft", "reward_model", "best_of_n", "ppo", "evaluating", "published")
OUTCOMES = ("promoted", "rejected", "failed", "cancelled")
# `published` ends a cycle that has no gateway to promote through; with one, it is momentary.
TERMINAL = OUTCOMES + ("published",)
FIGURES = ("n_sft", "n_pairs", "n_prompts", "budget_s", "rm_accuracy", "mean_reward", "kl", "gate", "version", "error")
# The recipes train/recipes implements (the first is the default): what a cycle's `recipe` may name,
# here so that the admin API validates a request without importing the trainer.
RECIPES = ("rlhf", "sft", "bon")


def this_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def queue_cycle(store: Store, trigger: str = "manual", *, claim: bool = False, recipe: str | None = None) -> int | None:
    """A new queued cycle's id, or None when one is already active. `claim`: it starts at once,
    claimed by this process (as `claim()` does), so no worker's poll can take it first. `recipe`:
    one of RECIPES for it to run (None: the worker's)."""
    assert recipe is None or recipe in RECIPES, recipe
    now = time.time()
    row = {"state": "queued", "trigger": trigger, "created_at": now, "steps": "{}", "recipe": recipe}
    if claim:
        row.update(state="building_data", started_at=now, worker=this_worker(), heartbeat_at=now)
    try:
        with store.transaction() as db:
            return db["cycles"].insert(row).last_pk
    except sqlite3.IntegrityError:
        return None


def active_cycle(store: Store) -> dict | None:
    rows = store.rows(f"SELECT * FROM cycles WHERE state NOT IN {TERMINAL} ORDER BY id LIMIT 1")
    return _decode(rows[0]) if rows else None


def describe(row: dict) -> str:
    """One line for an operator: which cycle, who started it and when, where it is now."""
    if row["state"] == "queued":
        return f"cycle {row['id']} ({row['trigger']}, queued {_ago(row['created_at'])}) is waiting for a worker"
    return (f"cycle {row['id']} ({row['trigger']}, started {_ago(row['started_at'] or row['created_at'])} "
            f"by worker {row['worker'] or 'unknown'}) is in step {row['state']}")


def _ago(ts: float) -> str:
    seconds = max(0.0, time.time() - ts)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def claim(store: Store, cycle_id: int) -> bool:
    """Mark a queued cycle as ours; False when another worker took it first."""
    with store.transaction() as db:
        cur = db.execute("UPDATE cycles SET state = 'building_data', started_at = ?, worker = ?, heartbeat_at = ? "
                         "WHERE id = ? AND state = 'queued'", [time.time(), this_worker(), time.time(), cycle_id])
        return cur.rowcount == 1


def advance(store: Store, cycle_id: int, state: str, step_figures: dict | None = None, **figures) -> None:
    """Move to `state`, recording the figures of the step just finished."""
    assert state in STEPS + OUTCOMES, state
    unknown = set(figures) - set(FIGURES)
    assert not unknown, unknown
    with store.transaction() as db:
        row = db["cycles"].get(cycle_id)
        steps = json.loads(row["steps"] or "{}")
        if step_figures:
            steps[row["state"]] = step_figures
        update = {"state": state, "steps": json.dumps(steps), "heartbeat_at": time.time(), **figures}
        if state in TERMINAL:
            update["finished_at"] = time.time()
            update["duration_s"] = time.time() - (row["started_at"] or row["created_at"])
        db["cycles"].update(cycle_id, update)


def record_recipe(store: Store, cycle_id: int, recipe: str) -> None:
    """The recipe a cycle runs, once it starts: the one it was queued with, else its worker's."""
    assert recipe in RECIPES, recipe
    store.db.execute("UPDATE cycles SET recipe = ? WHERE id = ?", [recipe, cycle_id])


def heartbeat(store: Store, cycle_id: int) -> bool:
    """Refresh the heartbeat; False when an operator asked to cancel."""
    store.db.execute("UPDATE cycles SET heartbeat_at = ? WHERE id = ?", [time.time(), cycle_id])
    return not store.db["cycles"].get(cycle_id)["cancel_requested"]


def request_cancel(store: Store, cycle_id: int) -> dict:
    with store.transaction() as db:
        row = db["cycles"].get(cycle_id)
        if row["state"] == "queued":
            db["cycles"].update(cycle_id, {"state": "cancelled", "finished_at": time.time(), "duration_s": 0})
        elif row["state"] not in TERMINAL:
            db["cycles"].update(cycle_id, {"cancel_requested": 1})
    return get_cycle(store, cycle_id)


def fail_orphans(store: Store, stale_after_s: float = 120) -> list[int]:
    """Cycles left active by a worker that died: failed, so the next one can start.

    Dead means: same host and its pid is gone, or no heartbeat for `stale_after_s`."""
    host = socket.gethostname()
    failed = []
    for row in store.rows(f"SELECT * FROM cycles WHERE state NOT IN {TERMINAL} AND state != 'queued'"):
        worker_host, _, pid = (row["worker"] or ":").partition(":")
        dead = (worker_host == host and pid.isdigit() and not _pid_alive(int(pid))) or \
            time.time() - (row["heartbeat_at"] or 0) > stale_after_s
        if dead:
            advance(store, row["id"], "failed", error=f"worker {row['worker']} died during {row['state']}")
            failed.append(row["id"])
    return failed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def last_cycle_time(store: Store) -> float:
    """When the last cycle that used its data started; failed and cancelled cycles did not,
    so the feedback they saw still counts as new."""
    rows = store.rows("SELECT max(created_at) AS t FROM cycles WHERE state NOT IN ('failed', 'cancelled')")
    return rows[0]["t"] or 0.0


def get_cycle(store: Store, cycle_id: int) -> dict | None:
    rows = store.rows("SELECT * FROM cycles WHERE id = ?", [cycle_id])
    return _decode(rows[0]) if rows else None


def list_cycles(store: Store, limit: int = 50) -> list[dict]:
    return [_decode(r) for r in store.rows("SELECT * FROM cycles ORDER BY id DESC LIMIT ?", [limit])]


def _decode(row: dict) -> dict:
    row = dict(row)
    row["steps"] = json.loads(row["steps"] or "{}")
    return row


# ---- adapters and promotions -------------------------------------------------------------
def engine_name(version: str) -> str:
    """The name an adapter version serves under in the engine, and so in `completions.served_by`."""
    return f"policy-{version}"


def record_adapter(store: Store, version: str, path: str | Path, manifest: dict, cycle_id: int | None = None) -> None:
    """An adapter inside the data directory is recorded relative to it, so that the directory can be
    moved, restored from a backup or mounted elsewhere (a container's volume) and still serve."""
    path = Path(path).resolve()
    stored = path.relative_to(store.home) if path.is_relative_to(store.home) else path
    store.db["adapters"].upsert({"version": version, "path": str(stored), "parent": manifest.get("parent_version"),
                                 "created_at": time.time(), "cycle_id": cycle_id,
                                 "manifest": json.dumps(manifest)}, pk="version")


def get_adapter(store: Store, version: str) -> dict | None:
    """The adapter's row, its `path` absolute wherever the data directory is now."""
    rows = store.rows("SELECT * FROM adapters WHERE version = ?", [version])
    if not rows:
        return None
    row = dict(rows[0])
    row["path"] = str(store.home / row["path"])
    row["manifest"] = json.loads(row["manifest"] or "{}")
    return row


def list_adapters(store: Store) -> list[dict]:
    return [get_adapter(store, r["version"]) for r in store.rows("SELECT version FROM adapters ORDER BY created_at")]


def record_promotion(store: Store, version: str | None, action: str, by_user: str) -> None:
    store.db["promotions"].insert({"version": version, "action": action, "by_user": by_user, "at": time.time()})


def promotions(store: Store) -> list[dict]:
    return store.rows("SELECT * FROM promotions ORDER BY id")


def serving_version(store: Store) -> tuple[str | None, float | None]:
    """The version the alias points at (None = the base model) and when it moved there."""
    rows = store.rows("SELECT version, at FROM promotions ORDER BY id DESC LIMIT 1")
    return (rows[0]["version"], rows[0]["at"]) if rows else (None, None)


def rollback_target(store: Store) -> str | None:
    """The version served before the current one (None = the base model).

    Walks the history backwards skipping the current version, so rollback after rollback
    keeps going back rather than bouncing between two versions."""
    history = [r["version"] for r in promotions(store) if r["action"] == "promote"]
    current, _ = serving_version(store)
    if current in history:
        history = history[:len(history) - 1 - history[::-1].index(current)]
    while history and history[-1] == current:  # promoted twice in a row: go back past both
        history.pop()
    return history[-1] if history else None
