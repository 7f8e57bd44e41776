"""The operators' API: adapters, promotion and rollback, canaries, retrain cycles. Admin key (or open mode).

Whatever moves the alias is written to the store, which every gateway follows (serve/hotswap.py);
the gateway that took the call loads and probes the version first, so that an error reaches the
caller and changes nothing, and follows at once."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from feedback import canary, cycles
from feedback.errors import FeedbackError, NotFound
from serve.auth import User, require_admin
from serve.errors import APIError
from serve.registry import engine_name

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


class ShareRequest(BaseModel):
    """The share of users a canary answers, strictly between 0 and 1."""

    model_config = ConfigDict(extra="forbid", strict=True)
    share: float


async def _store_call(fn, *args):
    """A store operation in a worker thread, its refusals as API errors."""
    try:
        return await asyncio.to_thread(fn, *args)
    except canary.Conflict as e:
        raise APIError(409, e.message, code=e.code) from e
    except NotFound as e:
        raise APIError(404, e.message, param=e.param, code="adapter_not_found") from e
    except FeedbackError as e:
        raise APIError(400, e.message, param=e.param, code="invalid_value") from e


@router.get("/adapters")
async def list_adapters(request: Request):
    state = request.app.state
    serving, promoted_at = await asyncio.to_thread(cycles.serving_version, state.store)
    running = await asyncio.to_thread(canary.running, state.store)
    rows = await asyncio.to_thread(cycles.list_adapters, state.store)
    data = []
    for row in rows:
        name = engine_name(row["version"])
        manifest = row["manifest"]
        data.append({"version": row["version"], "name": name, "path": row["path"], "parent": row["parent"],
                     "created_at": row["created_at"], "cycle_id": row["cycle_id"],
                     "state": "serving" if row["version"] == serving else
                     "canary" if running and row["version"] == running["version"] else
                     "loaded" if name in state.registry.loaded else "published",
                     "metrics": manifest.get("metrics", {}), "gate": manifest.get("gate")})
    return {"object": "list", "serving": serving, "promoted_at": promoted_at, "data": data}


def _switched(state, serving: str | None, previous: str, t0: float) -> dict:
    return {"serving": serving, "name": state.registry.serving, "previous": previous,
            "switch_ms": (time.perf_counter() - t0) * 1000}


@router.post("/adapters/{version}/promote")
async def promote(version: str, request: Request, user: User = Depends(require_admin)):
    """Make `version` the serving one. While a canary runs, only its own version may be promoted
    (which ends it, as POST /admin/canary/promote does)."""
    state = request.app.state
    async with state.swap_lock:
        t0, previous = time.perf_counter(), state.registry.serving
        running = await asyncio.to_thread(canary.running, state.store)
        if running is not None and running["version"] == version:
            await _end(state, running, "promoted", user.name)
        else:
            if running is not None:
                raise APIError(409, f"A canary of {running['version']} is running; promote or roll it back first.",
                               code="canary_running")
            await state.follower.ensure_loaded(version)
            await _store_call(canary.move_alias, state.store, version, "promote", user.name)
            await state.follower.sync()
    return _switched(state, version, previous, t0)


@router.post("/rollback")
async def rollback(request: Request, user: User = Depends(require_admin)):
    """Serve the version served before the current one again (refused while a canary runs)."""
    state = request.app.state
    async with state.swap_lock:
        t0, previous = time.perf_counter(), state.registry.serving
        current, _ = await asyncio.to_thread(cycles.serving_version, state.store)
        if current is None:
            raise APIError(409, "Already serving the base model; there is nothing to roll back.",
                           code="nothing_to_roll_back")
        target = await asyncio.to_thread(cycles.rollback_target, state.store)
        if target is not None:
            await state.follower.ensure_loaded(target)
        await _store_call(canary.move_alias, state.store, target, "rollback", user.name)
        await state.follower.sync()
    return _switched(state, target, previous, t0)


# ---- canaries -------------------------------------------------------------------------------
@router.post("/adapters/{version}/canary", status_code=201)
async def start_canary(version: str, body: ShareRequest, request: Request, user: User = Depends(require_admin)):
    """Put a published version on canary for `share` of users (sticky per user), beside the serving one."""
    state = request.app.state
    async with state.swap_lock:
        await _store_call(canary.check_start, state.store, version, body.share)
        await state.follower.ensure_loaded(version)
        row = await _store_call(canary.start, state.store, version, body.share, user.name, state.canary_rule)
        await state.follower.sync()
    return {"object": "canary", **row}


@router.patch("/canary")
async def set_canary_share(body: ShareRequest, request: Request):
    """Change the running canary's share; users already on it stay on it when the share grows."""
    state = request.app.state
    async with state.swap_lock:
        row = await _store_call(canary.set_share, state.store, body.share)
        await state.follower.sync()
    return {"object": "canary", **row}


@router.get("/canary")
async def canary_status(request: Request):
    """The running canary (null when none) with its live evidence and what its rule says, the rule,
    and the canaries that ended last (newest first, each with its evidence at the end)."""
    state = request.app.state
    running = await asyncio.to_thread(canary.running, state.store)
    evidence, decision = await asyncio.to_thread(state.follower.assess, running) if running else (None, None)
    recent = await asyncio.to_thread(canary.recent, state.store)
    return {"object": "canary.status", "canary": running, "evidence": evidence, "decision": decision,
            "rule": running["rule"] if running else asdict(state.canary_rule), "recent": recent}


@router.get("/canary/{canary_id}")
async def get_canary(canary_id: int, request: Request):
    """One canary, running or ended; its `evidence` (with the rule's `decision` in it) is live while
    it runs and as it was at the end afterwards."""
    state = request.app.state
    row = await asyncio.to_thread(canary.get, state.store, canary_id)
    if row is None:
        raise APIError(404, f"No canary {canary_id}.", param="canary_id", code="canary_not_found")
    if row["ended_at"] is None:
        evidence, decision = await asyncio.to_thread(state.follower.assess, row)
        row["evidence"] = {**evidence, "decision": decision}
    return {"object": "canary", **row}


@router.post("/canary/promote")
async def promote_canary(request: Request, user: User = Depends(require_admin)):
    """The operator's decision: the canary's version serves everyone."""
    return await _end_running(request.app.state, "promoted", user.name)


@router.post("/canary/rollback")
async def rollback_canary(request: Request, user: User = Depends(require_admin)):
    """The operator's decision: the canary ends and its users go back to the serving version."""
    return await _end_running(request.app.state, "rolled_back", user.name)


async def _end_running(state, outcome: str, by_user: str) -> dict:
    async with state.swap_lock:
        t0, previous = time.perf_counter(), state.registry.serving
        running = await asyncio.to_thread(canary.running, state.store)
        ended = await _end(state, running, outcome, by_user)
    return {"object": "canary.ended", "canary": ended,
            **_switched(state, ended["version"] if outcome == "promoted" else ended["baseline"], previous, t0)}


async def _end(state, running: dict | None, outcome: str, by_user: str) -> dict:
    ended = None if running is None else await state.follower.end_canary(running, outcome, by_user)
    if ended is None:  # none ran, or it ended meanwhile (its rule, or another gateway)
        raise APIError(409, "No canary is running.", code="no_canary")
    return ended


@router.get("/cycles")
def list_cycles(request: Request, limit: int = 50):
    return {"object": "list", "data": cycles.list_cycles(request.app.state.store, limit)}


@router.get("/cycles/{cycle_id}")
def get_cycle(cycle_id: int, request: Request):
    row = cycles.get_cycle(request.app.state.store, cycle_id)
    if row is None:
        raise APIError(404, f"No cycle {cycle_id}.", param="cycle_id", code="cycle_not_found")
    return row


@router.post("/cycles", status_code=202)
def queue_cycle(request: Request, body: dict | None = None):
    """Ask the worker for a cycle now; 409 while one is already queued or running. An optional JSON
    body `{"recipe": "sft"}` names the recipe it runs (one of feedback.cycles.RECIPES; else the worker's)."""
    store = request.app.state.store
    body = body or {}
    for key in body:
        if key != "recipe":
            raise APIError(400, f"Unknown field {key!r}; a cycle request takes only 'recipe'.", param=key,
                           code="invalid_value")
    recipe = body.get("recipe")
    if recipe is not None and recipe not in cycles.RECIPES:
        raise APIError(400, f"Unknown recipe {recipe!r}; one of {', '.join(cycles.RECIPES)}.", param="recipe",
                       code="invalid_value")
    cycle_id = cycles.queue_cycle(store, trigger="manual", recipe=recipe)
    if cycle_id is None:
        what = cycles.describe(cycles.active_cycle(store))
        raise APIError(409, f"{what[0].upper()}{what[1:]}; ask again once it has ended "
                            "(`loopchat cycle run --wait` waits for it).", code="cycle_active")
    return cycles.get_cycle(store, cycle_id)


@router.post("/cycles/{cycle_id}/cancel")
def cancel_cycle(cycle_id: int, request: Request):
    store = request.app.state.store
    if cycles.get_cycle(store, cycle_id) is None:
        raise APIError(404, f"No cycle {cycle_id}.", param="cycle_id", code="cycle_not_found")
    return cycles.request_cancel(store, cycle_id)
