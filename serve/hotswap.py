"""Zero-downtime adapter swaps: load the new version under its own name, probe it, move the
`loopchat` alias in one step, and unload the old version once its last answer is done.

Requests resolve the alias when they start, so in-flight answers finish on the version
they began with, and every new request after the switch gets the new one."""

from __future__ import annotations

import asyncio
import logging
import time

from feedback import cycles
from serve.engines import EngineError, EngineUnavailable
from serve.errors import APIError
from serve.registry import engine_name

log = logging.getLogger("loopchat.hotswap")
DRAIN_TIMEOUT_S = 300
PROBE = [{"role": "user", "content": "Say OK."}]


async def switch(state, version: str | None, *, action: str, by_user: str, record: bool = True) -> dict:
    """Point the alias at `version` (None = the base model) on every engine replica."""
    async with state.swap_lock:
        t0 = time.perf_counter()
        registry, engine = state.registry, state.engine
        name = None
        if version is not None:
            adapter = await asyncio.to_thread(cycles.get_adapter, state.store, version)
            if adapter is None:
                raise APIError(404, f"No adapter version `{version}`.", param="version", code="adapter_not_found")
            name = engine_name(version)
            if name not in registry.loaded:
                await _load(engine, name, adapter["path"])
                registry.loaded[name] = adapter["path"]
            await _probe(state, name)
        old = registry.alias_target
        registry.alias_target = name  # the switch: one assignment, seen by the next request
        state.metrics.serving.set(int(version[1:]) if version else 0)
        state.metrics.last_promotion.set(time.time())
        if record:
            await asyncio.to_thread(cycles.record_promotion, state.store, version, action, by_user)
        if old and old != name:
            asyncio.create_task(_retire(state, old))
        switch_ms = (time.perf_counter() - t0) * 1000
        log.info("%s: loopchat -> %s (was %s) in %.0f ms", action, name or registry.base_name, old or "base",
                 switch_ms)
        return {"serving": version, "name": name or registry.base_name, "previous": old, "switch_ms": switch_ms}


async def restore(state) -> None:
    """At start-up: serve the version the store says was promoted last."""
    while not await state.engine.ready():
        await asyncio.sleep(0.5)
    version, _ = await asyncio.to_thread(cycles.serving_version, state.store)
    try:
        if version:
            await switch(state, version, action="restore", by_user="startup", record=False)
    except APIError as e:
        log.error("could not restore %s (%s); serving the base model", version, e.message)
    state.registry.restoring = False


async def _load(engine, name: str, path: str) -> None:
    try:
        await engine.load_adapter(name, path)
    except EngineError as e:
        raise APIError(e.status if 400 <= e.status < 500 else 502, f"loading {name}: {e.message}",
                       code="adapter_load_failed") from e
    except EngineUnavailable as e:
        raise APIError(503, str(e), code="engine_unavailable") from e


async def _probe(state, name: str) -> None:
    """One short answer from the new version before any user sees it."""
    try:
        async for _ in state.engine.stream(name, PROBE, {"max_tokens": 1, "temperature": 0}):
            pass
    except (EngineError, EngineUnavailable) as e:
        await state.engine.unload_adapter(name)
        state.registry.loaded.pop(name, None)
        raise APIError(502, f"the probe request to {name} failed: {e}", code="probe_failed") from e


async def _retire(state, name: str) -> None:
    drained = await state.registry.wait_idle(name, DRAIN_TIMEOUT_S)
    async with state.swap_lock:
        if state.registry.alias_target == name or name not in state.registry.loaded:
            return  # promoted again meanwhile, or already gone
        if not drained:
            log.warning("%s still had requests after %d s; unloading anyway", name, DRAIN_TIMEOUT_S)
        await state.engine.unload_adapter(name)
        state.registry.loaded.pop(name, None)
        log.info("unloaded %s", name)
