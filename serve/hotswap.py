"""Zero-downtime adapter swaps: load the new version under its own name, probe it, move the
`loopchat` alias in one step, and unload the old version once its last answer is done.

Requests resolve the alias when they start, so in-flight answers finish on the version
they began with, and every new request after the switch gets the new one."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from feedback import cycles
from serve.engines import EngineError, EngineUnavailable
from serve.errors import APIError
from serve.registry import engine_name

log = logging.getLogger("loopchat.hotswap")
DRAIN_TIMEOUT_S = 300
RESTORE_RETRY_S = 1.0
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
                await asyncio.to_thread(_check_rank, adapter["path"], version, state.max_lora_rank)
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
    """At start-up: serve the version the store says was promoted last.

    An unavailable engine (still starting, restarting, or dropping out mid-restore) is waited
    out: the version itself is fine, and serving the base model instead would silently undo a
    promotion. Anything else that goes wrong (the adapter is missing or broken, its probe
    fails, an error nobody expected) is logged and the base model serves. Either way
    `restoring` is cleared at the end, so /readyz reports the engine alone. Each try reads the
    store again, so a promotion made meanwhile wins."""
    version = None
    try:
        while True:
            while not await state.engine.ready():
                await asyncio.sleep(0.5)
            version, _ = await asyncio.to_thread(cycles.serving_version, state.store)
            if not version:
                return
            try:
                await switch(state, version, action="restore", by_user="startup", record=False)
                return
            except APIError as e:
                if e.code != "engine_unavailable":
                    log.error("could not restore %s (%s); serving the base model", version, e.message)
                    return
                log.warning("restoring %s: %s; retrying", version, e.message)
                await asyncio.sleep(RESTORE_RETRY_S)
    except Exception:
        log.exception("could not restore %s; serving the base model", version or "the promoted version")
    finally:
        state.registry.restoring = False


def _check_rank(path: str, version: str, max_rank: int) -> None:
    """Refuse an adapter the engine would refuse (vLLM answers a rank above its --max-lora-rank
    with an error that would reach the operator as a 502)."""
    try:
        rank = json.loads((Path(path) / "adapter_config.json").read_text()).get("r") or 0
    except (OSError, ValueError) as e:
        raise APIError(400, f"{version}: cannot read its adapter_config.json ({e}).", param="version",
                       code="adapter_invalid") from e
    if rank > max_rank:
        raise APIError(400, f"{version} has LoRA rank {rank}; the engine accepts at most {max_rank} "
                       "(--max-lora-rank / LOOPCHAT_MAX_LORA_RANK).", param="version", code="adapter_rank_too_large")


async def _load(engine, name: str, path: str) -> None:
    try:
        await engine.load_adapter(name, path)
    except EngineError as e:
        raise APIError(e.status if 400 <= e.status < 500 else 502, f"loading {name}: {e.message}",
                       code="adapter_load_failed") from e
    except EngineUnavailable as e:
        raise APIError(503, str(e), code="engine_unavailable") from e


async def _probe(state, name: str) -> None:
    """One short answer from the new version before any user sees it; it is unloaded if that fails."""
    try:
        async for _ in state.engine.stream(name, PROBE, {"max_tokens": 1, "temperature": 0}):
            pass
    except (EngineError, EngineUnavailable) as e:
        state.registry.loaded.pop(name, None)
        try:
            await state.engine.unload_adapter(name)
        except (EngineError, EngineUnavailable) as unload_error:
            log.warning("could not unload %s after its failed probe: %s", name, unload_error)
        if isinstance(e, EngineUnavailable):
            raise APIError(503, f"the engine went away while probing {name}: {e}", code="engine_unavailable") from e
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
