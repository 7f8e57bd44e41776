"""Which engine model answers a request: the `loopchat` alias, the base model, or an adapter
version loaded under its own name (`policy-vN`). Counts requests in flight per name so an
old version is unloaded only once its last answer has finished."""

from __future__ import annotations

import asyncio
from collections import Counter
from contextlib import contextmanager

from serve.errors import APIError

ALIAS = "loopchat"


def engine_name(version: str) -> str:
    return f"policy-{version}"


class Registry:
    def __init__(self, base_name: str):
        self.base_name = base_name
        self.alias_target: str | None = None  # an engine adapter name; None = the base model
        self.loaded: dict[str, str] = {}  # engine adapter name -> adapter directory
        self.inflight: Counter[str] = Counter()
        self.restoring = True  # until the promoted version is back after a start
        self._drained = asyncio.Event()

    @property
    def serving(self) -> str:
        return self.alias_target or self.base_name

    def resolve(self, model: str) -> str:
        if model == ALIAS:
            if self.restoring:
                raise APIError(503, "The serving policy is being restored; try again shortly.",
                               code="engine_unavailable")
            return self.serving
        if model == self.base_name or model in self.loaded:
            return model
        if engine_name(model) in self.loaded:  # "v3" is accepted for "policy-v3"
            return engine_name(model)
        raise APIError(404, f"The model `{model}` does not exist or is not loaded.", param="model",
                       code="model_not_found")

    def comparison_models(self, user: str, n: int) -> list[tuple[str, str]]:
        """(engine model name, origin) for each of the `n` candidates of a comparison asked for
        with the `loopchat` alias; origin says where it came from (serving, previous, base, canary)."""
        return [(self.resolve(ALIAS), "serving")] * n

    def acquire(self, name: str) -> None:
        self.inflight[name] += 1

    def release(self, name: str) -> None:
        self.inflight[name] -= 1
        if self.inflight[name] <= 0:
            del self.inflight[name]
            self._drained.set()

    @contextmanager
    def track(self, name: str):
        self.acquire(name)
        try:
            yield
        finally:
            self.release(name)

    async def wait_idle(self, name: str, timeout: float) -> bool:
        """Wait until no request is answering with `name`; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.inflight.get(name, 0) > 0:
            self._drained.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._drained.wait(), remaining)
            except asyncio.TimeoutError:
                return False
        return True

    def models(self) -> list[dict]:
        rows = [{"id": ALIAS, "object": "model", "owned_by": "loopchat", "root": self.serving, "parent": None},
                {"id": self.base_name, "object": "model", "owned_by": "loopchat", "root": self.base_name,
                 "parent": None}]
        rows += [{"id": name, "object": "model", "owned_by": "loopchat", "root": path, "parent": self.base_name}
                 for name, path in self.loaded.items()]
        return rows
