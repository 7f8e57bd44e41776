"""What engines that loopchat does not start need from it, in one place: `GET /admin/engine-config`.

Past one machine, vLLM replicas are run by others (a fleet behind a router). They need the base
model's served name, the flags that let them take LoRA adapters, and the adapters that must be
servable now, each under the engine name the gateway sends (`policy-vN`). The answer comes from the
store, which every gateway follows, so any gateway gives the same one:

    {"base_model": "SmolLM2-135M-Instruct",
     "alias": {"name": "loopchat", "serving": "policy-v3", "canary": "policy-v4" | null, "canary_share": 0.1},
     "adapters": [{"name": "policy-v3", "version": "v3", "path": "/data/adapters/v3", "role": "serving"},
                  ... the canary's, then the rollback target's ("previous")],
     "vllm": {"env": {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
              "args": ["--served-model-name", ..., "--enable-lora", ...,
                       "--lora-modules", "policy-v3=/data/adapters/v3", ...]}}

Paths are the store's: replicas must see the adapters folder at the same path (a shared volume,
mounted alike). A replica started with `vllm.args` serves every listed adapter from its first
request. The alias and the canary's split stay the gateway's: engines only see engine names.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request

from feedback import canary, cycles
from serve.auth import require_admin
from serve.engines.vllm import LORA_ENV, lora_args
from serve.registry import ALIAS

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


def engine_config(store, base_name: str, max_lora_rank: int) -> dict:
    state = canary.alias_state(store)
    running = state["canary"]
    roles = [("serving", state["serving"]), ("canary", running and running["version"]), ("previous", state["previous"])]
    adapters = []
    for role, version in roles:
        if version is not None and version not in {a["version"] for a in adapters}:
            row = cycles.get_adapter(store, version)
            adapters.append({"name": cycles.engine_name(version), "version": version, "path": row["path"],
                             "role": role})
    modules = [f"{a['name']}={a['path']}" for a in adapters]
    return {
        "base_model": base_name,
        "alias": {"name": ALIAS, "serving": canary.served_name(state["serving"], base_name),
                  "canary": running and cycles.engine_name(running["version"]),
                  "canary_share": running["share"] if running else 0.0},
        "adapters": adapters,
        "vllm": {"env": dict(LORA_ENV),
                 "args": ["--served-model-name", base_name, *lora_args(max_lora_rank),
                          *(["--lora-modules", *modules] if modules else [])]},
    }


@router.get("/engine-config")
async def get_engine_config(request: Request):
    state = request.app.state
    return await asyncio.to_thread(engine_config, state.store, state.registry.base_name, state.max_lora_rank)
