"""The gateway app: OpenAI-compatible routes, health, metrics; the engine starts with it."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response

from feedback import Store
from feedback.canary import Rule
from serve import admin_routes, chat, engine_config, errors, feedback_routes, hotswap
from serve.auth import current_user
from serve.engines import Engine
from serve.metrics import Metrics, MetricsAndLimits
from serve.ratelimit import SlidingWindow
from serve.registry import DEFAULT_COMPARISON_MIX, Registry

log = logging.getLogger("loopchat.gateway")


@dataclass
class GatewayConfig:
    keys_required: bool = False
    max_body_bytes: int = 1_000_000
    feedback_rate_limit: int = 0  # feedback posts per user per minute; 0 = no limit
    max_lora_rank: int = 16  # the engine's limit: promotion refuses larger adapters with a 400
    canary_rule: Rule = field(default_factory=Rule)  # the decision rule new canaries get
    comparison_mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_COMPARISON_MIX))
    follow_interval_s: float = 0.5  # how often the gateway looks at the store's alias and canary
    retire_grace_s: float = 5.0  # how long a version no longer needed stays loaded for other gateways
    decide_interval_s: float = 5.0  # how often a running canary's rule is evaluated


router = APIRouter()


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    state = request.app.state
    if await state.engine.ready() and not state.registry.restoring:
        return {"status": "ready", "engine": state.engine.kind, "serving": state.registry.serving,
                **state.engine.info}
    raise errors.APIError(503, f"The {state.engine.kind} engine is not ready yet.", code="engine_unavailable")


@router.get("/metrics")
async def metrics(request: Request):
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/models", dependencies=[Depends(current_user)])
async def list_models(request: Request):
    return {"object": "list", "data": request.app.state.registry.models()}


def create_app(store: Store, engine: Engine, config: GatewayConfig | None = None) -> FastAPI:
    config = config or GatewayConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        following = asyncio.create_task(app.state.follower.run())
        try:
            yield
        finally:
            following.cancel()
            await engine.stop()

    app = FastAPI(title="loopchat", version="0.1.0", lifespan=lifespan)
    app.state.store = store
    app.state.engine = engine
    app.state.registry = Registry(engine.served_name, config.comparison_mix)
    app.state.metrics = Metrics(store)
    app.state.metrics.engine.info({"kind": engine.kind, **engine.info})
    app.state.keys_required = config.keys_required
    app.state.max_lora_rank = config.max_lora_rank
    app.state.swap_lock = asyncio.Lock()
    app.state.canary_rule = config.canary_rule
    app.state.follower = hotswap.Follower(app.state, follow_interval_s=config.follow_interval_s,
                                          retire_grace_s=config.retire_grace_s,
                                          decide_interval_s=config.decide_interval_s)
    app.state.feedback_limiter = SlidingWindow(config.feedback_rate_limit)
    errors.install(app)
    app.include_router(router)
    app.include_router(chat.router)
    app.include_router(feedback_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(engine_config.router)
    app.add_middleware(MetricsAndLimits, metrics=app.state.metrics, max_body_bytes=config.max_body_bytes)
    return app
