"""Every gateway follows the store: which version serves, the running canary and its share.

A background task polls the store (`follow_interval_s`, one cheap query). When what the alias
routes by has changed, it loads every version the store needs (serving, canary, previous) into
the engine, probes those new here, and replaces the registry's route in one assignment. A version
the store needs again after a while without it is loaded again even if this gateway still has it
(loading is idempotent): another gateway may have unloaded it meanwhile. Requests resolve the
alias when they start, so answers in flight finish on the version they began with.

An admin call that moves the alias loads and probes the version on its own gateway first (so an
error reaches the caller and changes nothing), writes the store, then follows at once; the other
gateways follow at their next poll.

Versions are shared: gateways in front of the same engine servers load the same names. One is
unloaded only when nothing needs it: not this gateway's route, not its answers in flight (up to
DRAIN_TIMEOUT_S), and not the store (serving, canary, previous), checked inside a store write
transaction around the unload so that no promotion can slip in between; and only `retire_grace_s`
after it stopped being needed, the time other gateways take to follow.

The same task evaluates a running canary's rule every `decide_interval_s` and, when the canary's
rule is automatic and the evidence decides, ends it (feedback.canary.end: at most once, whichever
gateway is first)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path

from feedback import canary, cycles
from serve.engines import EngineError, EngineUnavailable
from serve.errors import APIError
from serve.registry import Route, engine_name

log = logging.getLogger("loopchat.hotswap")
DRAIN_TIMEOUT_S = 300
RETRY_UNAVAILABLE_S = 1.0  # a version that failed to load because the engine was away: next try
RETRY_FAILED_S = 30.0  # a version that failed to load for another reason
UNLOAD_TIMEOUT_S = 10.0
PROBE = [{"role": "user", "content": "Say OK."}]


class Follower:
    def __init__(self, state, *, follow_interval_s: float = 0.5, retire_grace_s: float = 5.0,
                 decide_interval_s: float = 5.0):
        self.state = state
        self.follow_interval_s, self.retire_grace_s, self.decide_interval_s = \
            follow_interval_s, retire_grace_s, decide_interval_s
        self.wanted: dict | None = None  # the store's alias_state, as last read
        self.applied: tuple | None = None  # the stamp of the last state applied in full
        self.attempted: tuple | None = None
        self.retry_at = 0.0
        self.unneeded_since: dict[str, float] = {}
        self.needed: set[str] = set()  # the versions the store needed at the last sync, loaded here
        self.next_decision = 0.0

    # ---- the background task --------------------------------------------------------------
    async def run(self) -> None:
        await self.restore()
        while True:
            await asyncio.sleep(self.follow_interval_s)
            try:
                async with self.state.swap_lock:
                    await self.sync()
                await self.retire()
                await self.judge_canary()
            except Exception:
                log.exception("following the store failed; trying again")

    async def restore(self) -> None:
        """At start-up: serve what the store says before becoming ready.

        An unavailable engine (still starting, restarting, or dropping out mid-restore) is waited
        out: the version itself is fine, and serving the base model instead would silently undo a
        promotion. Anything else that goes wrong with the serving version is logged and the base
        model serves (the follower tries it again later). Either way `restoring` is cleared at
        the end, so /readyz reports the engine alone."""
        try:
            while True:
                while not await self.state.engine.ready():
                    await asyncio.sleep(0.5)
                async with self.state.swap_lock:
                    failure = await self.sync(restoring=True)
                if failure is None or failure.code != "engine_unavailable":
                    return
                log.warning("restoring %s: %s; retrying", self.wanted["serving"], failure.message)
                await asyncio.sleep(RETRY_UNAVAILABLE_S)
        except Exception:
            log.exception("could not restore the promoted version; serving the base model")
        finally:
            self.state.registry.restoring = False

    # ---- following ----------------------------------------------------------------------
    async def sync(self, *, restoring: bool = False) -> APIError | None:
        """(swap_lock held) Route as the store says. Returns the serving version's load failure, if any:
        then the route keeps serving what it served; a canary or previous version that fails to load
        is left out of the route (canary users get the serving version meanwhile)."""
        st = self.state
        stamp = await asyncio.to_thread(canary.stamp, st.store)
        if stamp == self.applied or (stamp == self.attempted and time.monotonic() < self.retry_at):
            return None
        want = self.wanted = await asyncio.to_thread(canary.alias_state, st.store)
        running = want["canary"]
        roles = {"serving": want["serving"], "canary": running and running["version"], "previous": want["previous"]}
        names, failures = {}, {}
        for role, version in roles.items():
            if version is not None:
                try:
                    names[role] = await self.ensure_loaded(version, reload=version not in self.needed)
                except Exception as e:  # whatever failed: route without it, try again later
                    failures[role] = e if isinstance(e, APIError) else APIError(500, repr(e), code="load_failed")
        serving = failures.get("serving")
        if serving is not None and restoring and serving.code == "engine_unavailable":
            return serving  # waited out by restore()
        for role, e in failures.items():
            if role == "serving" and restoring:
                log.error("could not restore %s (%s); serving the base model", roles[role], e.message)
            else:
                log.error("could not load %s (%s) for %s; trying again later", roles[role], e.message, role)
        registry, old = st.registry, st.registry.route
        base = registry.base_name
        route = Route(serving=names.get("serving", base if want["serving"] is None else old.serving),
                      previous=names.get("previous", base),
                      canary=names.get("canary"), canary_id=running and running["id"],
                      share=running["share"] if running and "canary" in names else 0.0)
        registry.route = route  # the switch: one assignment, seen by the next request
        self._set_gauges(route, old)
        if route.serving != old.serving or route.canary != old.canary or route.share != old.share:
            log.info("loopchat -> %s%s (was %s%s)", route.serving, _canary_text(route), old.serving, _canary_text(old))
        self.needed = {roles[role] for role in names}
        self.attempted = stamp
        self.applied = None if failures else stamp
        unavailable = all(e.code == "engine_unavailable" for e in failures.values())
        self.retry_at = time.monotonic() + (RETRY_UNAVAILABLE_S if unavailable else RETRY_FAILED_S)
        return serving

    async def ensure_loaded(self, version: str, *, reload: bool = False) -> str:
        """(swap_lock held) The engine name of `version`, loaded into the engine (again when `reload`)
        and, if new here, probed. Raises APIError: 404 unknown version, 400 rank too large, the
        engine's refusal, 503 engine away, 502 failed probe. A version the store does not need yet
        is unloaded again when its probe fails."""
        st = self.state
        adapter = await asyncio.to_thread(cycles.get_adapter, st.store, version)
        if adapter is None:
            raise APIError(404, f"No adapter version `{version}`.", param="version", code="adapter_not_found")
        name, path, new = engine_name(version), adapter["path"], engine_name(version) not in st.registry.loaded
        if new:
            await asyncio.to_thread(_check_rank, path, version, st.max_lora_rank)
        if new or reload:
            await _load(st.engine, name, path)
        if new:
            try:
                await _probe(st, name)
            except APIError:
                if self.wanted is None or version not in canary.needed_versions(self.wanted):
                    await _unload_quietly(st.engine, name)
                raise
            st.registry.loaded[name] = path
        return name

    # ---- retiring -------------------------------------------------------------------------
    async def retire(self) -> None:
        """Unload each version nothing needs any more (see the module's docstring)."""
        st, registry = self.state, self.state.registry
        if self.wanted is None:
            return
        route = registry.route
        keep = {engine_name(v) for v in canary.needed_versions(self.wanted)} | \
            {route.serving, route.previous, route.canary}
        now = time.monotonic()
        for name in list(registry.loaded):
            if name in keep:
                self.unneeded_since.pop(name, None)
                continue
            waited = now - self.unneeded_since.setdefault(name, now)
            busy = registry.inflight.get(name, 0)
            if waited < self.retire_grace_s or (busy and waited < DRAIN_TIMEOUT_S):
                continue
            if busy:
                log.warning("%s still had %d requests after %d s; unloading anyway", name, busy, DRAIN_TIMEOUT_S)
            async with st.swap_lock:
                if registry.route != route or name not in registry.loaded:
                    return  # the route moved meanwhile: look again at the next poll
                try:
                    unloaded = await asyncio.to_thread(self._unload_unless_needed, name, asyncio.get_running_loop())
                except (EngineError, EngineUnavailable, TimeoutError) as e:
                    log.warning("could not unload %s: %s; trying again", name, e)
                    continue
                if unloaded:
                    registry.loaded.pop(name, None)
                    log.info("unloaded %s", name)
                self.unneeded_since.pop(name, None)

    def _unload_unless_needed(self, name: str, loop: asyncio.AbstractEventLoop) -> bool:
        """(a worker thread) Unload `name` inside a store write transaction that first checks that no
        version the store names needs it: a promotion of it waits for the transaction, and its
        gateways then load it again."""
        store = self.state.store
        with store.transaction():
            if name in {engine_name(v) for v in canary.needed_versions(canary.alias_state(store))}:
                return False
            unload = asyncio.run_coroutine_threadsafe(self.state.engine.unload_adapter(name), loop)
            try:
                unload.result(UNLOAD_TIMEOUT_S)
            except TimeoutError:
                unload.cancel()  # not later, outside the transaction
                raise
        return True

    # ---- the canary's decision ------------------------------------------------------------
    def assess(self, row: dict) -> tuple[dict, dict]:
        """(a worker thread) The canary's live evidence and what its rule says about it."""
        ev = canary.evidence(self.state.store, row, self.state.registry.base_name)
        return ev, canary.decide(ev, canary.Rule.from_dict(row["rule"]))

    async def judge_canary(self) -> None:
        """Every `decide_interval_s`: the decision gauge, and with an automatic rule, the decision."""
        if time.monotonic() < self.next_decision:
            return
        self.next_decision = time.monotonic() + self.decide_interval_s
        row = (self.wanted or {}).get("canary")
        metrics = self.state.metrics
        if row is None:
            metrics.set_decision(None)
            return
        ev, decision = await asyncio.to_thread(self.assess, row)
        metrics.set_decision(decision["state"])
        if decision["state"] == "waiting" or not row["rule"].get("auto"):
            return
        outcome = "promoted" if decision["state"] == "promote" else "rolled_back"
        async with self.state.swap_lock:
            ended = await self.end_canary(row, outcome, canary.AUTO, ev, decision)
        if ended is not None:
            log.info("canary %s %s by its rule: %s", row["version"], outcome.replace("_", " "), decision["reason"])

    async def end_canary(self, row: dict, outcome: str, by_user: str, ev: dict | None = None,
                         decision: dict | None = None) -> dict | None:
        """(swap_lock held) End the canary `row` (promoted: its version serves) and follow; None when it
        had ended already. The evidence and decision at the end are kept with it."""
        if outcome == "promoted":
            await self.ensure_loaded(row["version"])
        if ev is None:
            ev, decision = await asyncio.to_thread(self.assess, row)
        ended = await asyncio.to_thread(canary.end, self.state.store, row["id"], outcome, by_user,
                                        {**ev, "decision": decision})
        await self.sync()
        return ended

    def _set_gauges(self, route: Route, old: Route) -> None:
        metrics = self.state.metrics
        metrics.serving.set(_number(route.serving))
        if route.serving != old.serving:
            metrics.last_promotion.set(time.time())
        metrics.canary_version.set(_number(route.canary) if route.canary else 0)
        metrics.canary_share.set(route.share)


def _number(name: str) -> int:
    """policy-v3 -> 3; the base model -> 0."""
    prefix = cycles.engine_name("v")  # one place spells the engine names
    rest = name[len(prefix):]
    return int(rest) if name.startswith(prefix) and rest.isdigit() else 0


def _canary_text(route: Route) -> str:
    return f", {route.canary} for {route.share:.0%}" if route.canary else ""


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
    """One short answer from a version before any user sees it."""
    try:
        async for _ in state.engine.stream(name, PROBE, {"max_tokens": 1, "temperature": 0}):
            pass
    except EngineUnavailable as e:
        raise APIError(503, f"the engine went away while probing {name}: {e}", code="engine_unavailable") from e
    except EngineError as e:
        raise APIError(502, f"the probe request to {name} failed: {e}", code="probe_failed") from e


async def _unload_quietly(engine, name: str) -> None:
    try:
        await engine.unload_adapter(name)
    except (EngineError, EngineUnavailable) as e:
        log.warning("could not unload %s after its failed probe: %s", name, e)
