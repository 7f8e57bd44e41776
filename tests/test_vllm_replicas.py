"""The vLLM engine's replicas (serve/engines/vllm.py) against stand-ins for vLLM's HTTP API: requests
go only to replicas that are up, one sent to a replica that died goes to another, a replica that
comes back gets every adapter before its first request, and an adapter any replica refuses is
loaded nowhere. The same on real vLLM servers and gateways: tests/test_scale_out.py (slow)."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiohttp import web
from conftest import free_port

import hardware
from serve.engines import EngineError, EngineUnavailable
from serve.engines.vllm import VLLMEngine

BASE = "base"


class StubVLLM:
    """vLLM's OpenAI server as far as the engine sees it: /health, /v1/models, runtime LoRA loads
    and unloads (with `sees_adapters` False, as on a machine without the shared volume, every
    path is refused with 404, as vLLM refuses a missing one), and streamed chat answers (404 for a
    model it does not hold). `stop()` makes its port refuse connections, as a
    killed server's does; `start()` brings it back with no adapter, as a restarted vLLM.
    `events` records ("load", name) and ("chat", model) in order since the last start."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.adapters: dict[str, str] = {}
        self.events: list[tuple[str, str]] = []
        self.sees_adapters = True
        self.runner: web.AppRunner | None = None

    async def start(self) -> "StubVLLM":
        self.adapters, self.events = {}, []
        app = web.Application()
        app.add_routes([web.get("/health", self.health), web.get("/v1/models", self.models),
                        web.post("/v1/load_lora_adapter", self.load), web.post("/v1/unload_lora_adapter", self.unload),
                        web.post("/v1/chat/completions", self.chat)])
        self.runner = web.AppRunner(app, shutdown_timeout=0)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def health(self, _):
        return web.Response()

    async def models(self, _):
        return web.json_response({"data": [{"id": BASE, "root": "/models/base", "parent": None}] + [
            {"id": name, "root": path, "parent": BASE} for name, path in self.adapters.items()]})

    async def load(self, request):
        body = await request.json()
        name, path = body["lora_name"], body["lora_path"]
        if name in self.adapters:
            return _error(400, f"The lora adapter '{name}' has already been loaded.")
        if not self.sees_adapters:
            return _error(404, f"Loading lora {name} failed: No adapter found for {path}")
        self.adapters[name] = path
        self.events.append(("load", name))
        return web.Response(text="Success")

    async def unload(self, request):
        name = (await request.json())["lora_name"]
        if self.adapters.pop(name, None) is None:
            return _error(404, f"The lora adapter '{name}' cannot be found.")
        return web.Response(text="Success")

    async def chat(self, request):
        model = (await request.json())["model"]
        if model != BASE and model not in self.adapters:
            return _error(404, f"The model `{model}` does not exist.")
        self.events.append(("chat", model))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in ("Hello", " there"):
            chunk = {"id": "chatcmpl-1", "model": model, "choices": [{"index": 0, "delta": {"content": piece}}]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    def chats(self) -> int:
        return sum(kind == "chat" for kind, _ in self.events)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "Error", "code": status}}, status=status)


async def until(condition, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def answer(engine: VLLMEngine, model: str = BASE) -> str:
    chunks = [c async for c in engine.stream(model, [{"role": "user", "content": "Hi"}], {"max_tokens": 2})]
    return "".join(c["choices"][0]["delta"]["content"] for c in chunks)


def run_with_replicas(tmp_path, scenario, n: int = 2) -> None:
    """Run `scenario(engine, stubs)` with an engine in front of `n` started stand-ins, all up."""

    async def main():
        stubs = [await StubVLLM().start() for _ in range(n)]
        engine = VLLMEngine(model_dir=tmp_path, served_name=BASE, urls=[s.url for s in stubs],
                            dtype=hardware.choose("float32", device="cpu"))
        await engine.start()
        try:
            await until(lambda: all(r.up for r in engine.replicas), "every replica to be up")
            await scenario(engine, stubs)
        finally:
            await engine.stop()
            for stub in stubs:
                await stub.stop()

    asyncio.run(main())


def test_a_request_sent_to_a_replica_that_died_is_answered_by_another(tmp_path):
    async def scenario(engine, stubs):
        alive, dead = stubs
        await dead.stop()  # before the engine's next health check: it still counts the replica as up
        assert [await answer(engine) for _ in range(4)] == ["Hello there"] * 4
        assert alive.chats() == 4 and await engine.ready()
        assert [r.up for r in engine.replicas] == [True, False]

    run_with_replicas(tmp_path, scenario)


def test_a_replica_that_comes_back_gets_every_adapter_before_its_first_request(tmp_path):
    async def scenario(engine, stubs):
        stays, restarts = stubs
        await engine.load_adapter("policy-v1", "/adapters/v1")
        await restarts.stop()
        await until(lambda: not engine.replicas[1].up, "the stopped replica to be taken out")
        await engine.load_adapter("policy-v2", "/adapters/v2")  # done on the replica that is up
        assert stays.adapters == {"policy-v1": "/adapters/v1", "policy-v2": "/adapters/v2"}

        await restarts.start()  # with no adapter, as a restarted vLLM
        await until(lambda: engine.replicas[1].up, "the restarted replica to be taken back")
        assert restarts.adapters == stays.adapters
        for _ in range(4):
            assert await answer(engine, "policy-v2") == "Hello there"
        assert restarts.events[:2] == [("load", "policy-v1"), ("load", "policy-v2")] and restarts.chats() == 2

    run_with_replicas(tmp_path, scenario)


def test_with_no_replica_up_the_engine_is_not_ready_and_refuses_work(tmp_path):
    async def scenario(engine, stubs):
        for stub in stubs:
            await stub.stop()
        await until(lambda: not any(r.up for r in engine.replicas), "every replica to be taken out")
        assert not await engine.ready()
        with pytest.raises(EngineUnavailable):
            await answer(engine)
        with pytest.raises(EngineUnavailable):
            await engine.load_adapter("policy-v1", "/adapters/v1")
        assert await engine.adapters() == []

    run_with_replicas(tmp_path, scenario)


def test_an_adapter_one_replica_refuses_is_loaded_nowhere(tmp_path):
    async def scenario(engine, stubs):
        takes, refuses = stubs
        refuses.sees_adapters = False
        with pytest.raises(EngineError) as refused:
            await engine.load_adapter("policy-v1", "/adapters/v1")
        assert refused.value.status == 404
        assert takes.adapters == {} and await engine.adapters() == []

    run_with_replicas(tmp_path, scenario)


def test_a_name_another_data_dir_loaded_from_another_path_is_refused(tmp_path):
    async def scenario(engine, stubs):
        stubs[0].adapters["policy-v1"] = "/elsewhere/adapters/v1"  # another loopchat's v1 on a shared server
        with pytest.raises(EngineError) as refused:
            await engine.load_adapter("policy-v1", "/adapters/v1")
        assert refused.value.status == 409 and "/elsewhere/adapters/v1" in refused.value.message
        assert "policy-v1" not in stubs[1].adapters  # unloaded again from the replica that took it

    run_with_replicas(tmp_path, scenario)
