"""The operators' API: adapters, promotion and rollback, retrain cycles. Admin key (or open mode)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from feedback import cycles
from serve import hotswap
from serve.auth import User, require_admin
from serve.errors import APIError
from serve.registry import engine_name

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


@router.get("/adapters")
async def list_adapters(request: Request):
    state = request.app.state
    serving, promoted_at = await asyncio.to_thread(cycles.serving_version, state.store)
    rows = await asyncio.to_thread(cycles.list_adapters, state.store)
    data = []
    for row in rows:
        name = engine_name(row["version"])
        manifest = row["manifest"]
        data.append({"version": row["version"], "name": name, "path": row["path"], "parent": row["parent"],
                     "created_at": row["created_at"], "cycle_id": row["cycle_id"],
                     "state": "serving" if row["version"] == serving else
                     "loaded" if name in state.registry.loaded else "published",
                     "metrics": manifest.get("metrics", {}), "gate": manifest.get("gate")})
    return {"object": "list", "serving": serving, "promoted_at": promoted_at, "data": data}


@router.post("/adapters/{version}/promote")
async def promote(version: str, request: Request, user: User = Depends(require_admin)):
    return await hotswap.switch(request.app.state, version, action="promote", by_user=user.name)


@router.post("/rollback")
async def rollback(request: Request, user: User = Depends(require_admin)):
    state = request.app.state
    current, _ = await asyncio.to_thread(cycles.serving_version, state.store)
    if current is None:
        raise APIError(409, "Already serving the base model; there is nothing to roll back.", code="nothing_to_roll_back")
    target = await asyncio.to_thread(cycles.rollback_target, state.store)
    return await hotswap.switch(state, target, action="rollback", by_user=user.name)


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
def queue_cycle(request: Request):
    """Ask the worker for a cycle now; 409 while one is already queued or running."""
    store = request.app.state.store
    cycle_id = cycles.queue_cycle(store, trigger="manual")
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
