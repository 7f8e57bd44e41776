"""Which engine model answers a request: the `loopchat` alias, the base model, or an adapter
version loaded under its own name (`policy-vN`).

The alias routes by `route`, one immutable value replaced in a single assignment when this
gateway follows the store (serve/hotswap.py): a user in the running canary's share gets the
canary version, everyone else the serving one. Requests in flight are counted per name, so a
version is unloaded only once its last answer here has finished."""

from __future__ import annotations

import random
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass

from feedback.canary import bucket
from feedback.cycles import engine_name
from serve.errors import APIError

ALIAS = "loopchat"
ORIGINS = ("serving", "previous", "base")  # where a comparison candidate may come from, besides a canary
DEFAULT_COMPARISON_MIX = {"serving": 0.5, "previous": 0.3, "base": 0.2}


@dataclass(frozen=True)
class Route:
    """What the alias serves now, as engine names. `previous`: the version before the serving one
    (the base model's name when there is none)."""

    serving: str
    previous: str
    canary: str | None = None
    canary_id: int | None = None
    share: float = 0.0


class Registry:
    def __init__(self, base_name: str, comparison_mix: dict[str, float] | None = None):
        self.base_name = base_name
        self.route = Route(base_name, base_name)
        self.comparison_mix = dict(comparison_mix or DEFAULT_COMPARISON_MIX)
        self.rng = random.Random()
        self.loaded: dict[str, str] = {}  # engine adapter name -> adapter directory
        self.inflight: Counter[str] = Counter()
        self.restoring = True  # until this gateway has followed the store once after its start

    @property
    def serving(self) -> str:
        return self.route.serving

    def for_user(self, user: str | None) -> str:
        """The engine name the alias gives `user` now (sticky for a canary's life)."""
        route = self.route
        if route.canary is not None and user is not None and bucket(route.canary_id, user) < route.share:
            return route.canary
        return route.serving

    def resolve(self, model: str, user: str | None = None) -> str:
        if model == ALIAS:
            if self.restoring:
                raise APIError(503, "The serving policy is being restored; try again shortly.",
                               code="engine_unavailable")
            return self.for_user(user)
        if model == self.base_name or model in self.loaded:
            return model
        if engine_name(model) in self.loaded:  # "v3" is accepted for "policy-v3"
            return engine_name(model)
        raise APIError(404, f"The model `{model}` does not exist or is not loaded.", param="model",
                       code="model_not_found")

    def comparison_models(self, user: str, n: int) -> list[tuple[str, str]]:
        """(engine model name, origin) for each of the `n` candidates of a comparison asked for with
        the `loopchat` alias. During a canary the first two are the canary and the serving version,
        so every vote on them is a head-to-head between the two; otherwise the first is the serving
        version. The rest are drawn by `comparison_mix` from serving, previous and base. A previous
        version that does not exist is the base model, and says so."""
        if self.restoring:
            self.resolve(ALIAS)  # the same 503
        route = self.route
        picks = [(route.canary, "canary"), (route.serving, "serving")] if route.canary else [(route.serving, "serving")]
        origins, weights = zip(*self.comparison_mix.items())
        while len(picks) < n:
            origin = self.rng.choices(origins, weights)[0]
            name = {"serving": route.serving, "previous": route.previous, "base": self.base_name}[origin]
            picks.append((name, "base" if origin == "previous" and name == self.base_name else origin))
        return picks[:n]

    def acquire(self, name: str) -> None:
        self.inflight[name] += 1

    def release(self, name: str) -> None:
        self.inflight[name] -= 1
        if self.inflight[name] <= 0:
            del self.inflight[name]

    @contextmanager
    def track(self, name: str):
        self.acquire(name)
        try:
            yield
        finally:
            self.release(name)

    def models(self) -> list[dict]:
        rows = [{"id": ALIAS, "object": "model", "owned_by": "loopchat", "root": self.serving, "parent": None},
                {"id": self.base_name, "object": "model", "owned_by": "loopchat", "root": self.base_name,
                 "parent": None}]
        rows += [{"id": name, "object": "model", "owned_by": "loopchat", "root": path, "parent": self.base_name}
                 for name, path in self.loaded.items()]
        return rows
