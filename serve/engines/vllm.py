"""The vLLM engine: one or more vLLM OpenAI servers, managed here as a subprocess or given as URLs.

Chunks are forwarded as vLLM wrote them (its `model` field already names the adapter that
answered); the gateway parses each only to keep the text it must store.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import orjson

import hardware
from serve.engines.base import EngineError, EngineUnavailable

log = logging.getLogger("loopchat.vllm")

START_TIMEOUT_S = 600
RESTART_BACKOFF_S = 2.0


class VLLMProcess:
    """A vLLM OpenAI server as a child process: progress while it loads, its log in logs/,
    restarted when it dies, stopped with SIGTERM then SIGKILL."""

    def __init__(self, model_dir: Path, served_name: str, port: int, log_dir: Path | None, max_model_len: int,
                 dtype: str, max_lora_rank: int, cache_dir: Path | None, enforce_eager: bool):
        self.model_dir, self.served_name, self.port = Path(model_dir), served_name, port
        self.max_model_len, self.dtype, self.max_lora_rank = max_model_len, dtype, max_lora_rank
        self.cache_dir, self.enforce_eager = cache_dir, enforce_eager
        self.log_path = Path(log_dir or ".") / "vllm.log"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", self.served_name,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", str(self.max_model_len), "--dtype", self.dtype,
            "--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", "4", "--max-cpu-loras", "8",
            "--disable-uvicorn-access-log",
        ] + (["--enforce-eager"] if self.enforce_eager else [])

    def spawn(self) -> None:
        env = dict(os.environ)
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        if self.cache_dir is not None:
            # vLLM's and torch inductor's compile caches under the data dir: a second start on the
            # same data dir reuses the compiled graphs instead of compiling again.
            env.setdefault("VLLM_CACHE_ROOT", str(self.cache_dir / "vllm"))
            env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(self.cache_dir / "inductor"))
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log_path, "ab")
        logf.write(f"\n==== {time.strftime('%F %T')} starting: {' '.join(self.command())}\n".encode())
        logf.flush()
        self.proc = subprocess.Popen(self.command(), stdout=logf, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        logf.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 20) -> None:
        if not self.alive():
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait()


class VLLMEngine:
    kind = "vllm"

    def __init__(self, *, model_dir: Path, served_name: str, urls=(), port: int = 8100, log_dir=None,
                 max_model_len: int = 2048, dtype: hardware.Choice | None = None, max_lora_rank: int = 16,
                 cache_dir: Path | None = None, enforce_eager: bool = False):
        self.served_name = served_name
        choice = dtype or hardware.choose()
        self.process = None if urls else VLLMProcess(model_dir, served_name, port, log_dir, max_model_len,
                                                     choice.dtype, max_lora_rank, cache_dir, enforce_eager)
        self.info = ({"dtype": choice.dtype, "device": choice.device, "reason": choice.reason,
                      "enforce_eager": str(enforce_eager).lower()} if self.process else
                     {"dtype": "external", "device": "external", "reason": "vLLM servers given by --engine-url"})
        self.urls = list(urls) or [self.process.url]
        self._next = itertools.cycle(self.urls)
        self._adapters: dict[str, str] = {}  # name -> path, re-loaded into a restarted server
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        self._up = False

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60))
        if self.process:
            self.process.spawn()
            self._tasks.append(asyncio.create_task(self._supervise()))
        else:
            self._tasks.append(asyncio.create_task(self._watch_external()))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self.process:
            await asyncio.to_thread(self.process.terminate)
        if self._session:
            await self._session.close()

    async def _healthy(self, url: str) -> bool:
        try:
            async with self._session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=3)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def _wait_healthy(self) -> None:
        t0, last = time.monotonic(), 0.0
        while not await self._healthy(self.process.url):
            if not self.process.alive():
                raise RuntimeError(f"vLLM exited with code {self.process.proc.returncode}; see {self.process.log_path}")
            waited = time.monotonic() - t0
            if waited > START_TIMEOUT_S:
                raise RuntimeError(f"vLLM did not answer within {START_TIMEOUT_S} s; see {self.process.log_path}")
            if waited - last >= 5:
                last = waited
                log.info("vLLM loading %s ... %.0f s (log: %s)", self.served_name, waited, self.process.log_path)
            await asyncio.sleep(0.5)
        log.info("vLLM ready after %.1f s at %s", time.monotonic() - t0, self.process.url)

    async def _supervise(self) -> None:
        """Start, wait for health, and restart the server whenever it dies."""
        while True:
            try:
                await self._wait_healthy()
                await self._reload_adapters()
                self._up = True
                while self.process.alive():
                    await asyncio.sleep(0.5)
                self._up = False
                log.error("vLLM exited (code %s); restarting", self.process.proc.returncode)
            except RuntimeError as e:
                self._up = False
                log.error("%s; retrying in %.0f s", e, RESTART_BACKOFF_S)
                await asyncio.to_thread(self.process.terminate)
            await asyncio.sleep(RESTART_BACKOFF_S)
            self.process.restarts += 1
            self.process.spawn()

    async def _watch_external(self) -> None:
        while True:
            self._up = all([await self._healthy(u) for u in self.urls])
            await asyncio.sleep(1.0)

    async def ready(self) -> bool:
        return self._up

    # ---- generation --------------------------------------------------------------------
    async def stream(self, model: str, messages: list[dict], sampling: dict) -> AsyncIterator[dict]:
        if not self._up:
            raise EngineUnavailable("the vLLM engine is not ready")
        body = {"model": model, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}, **sampling}
        url = next(self._next)
        try:
            resp = await self._session.post(f"{url}/v1/chat/completions", json=body)
        except aiohttp.ClientError as e:
            raise EngineUnavailable(f"vLLM did not answer: {e}") from e
        async with resp:
            if resp.status != 200:
                raise _upstream_error(resp.status, await resp.text())
            async for raw in resp.content:
                if not raw.startswith(b"data: "):
                    continue
                data = raw[6:].strip()
                if data == b"[DONE]":
                    return
                chunk = orjson.loads(data)  # per token: orjson is several times faster than json
                if "error" in chunk:
                    raise EngineError(500, chunk["error"].get("message", "engine error"))
                yield chunk

    # ---- adapters ----------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str) -> None:
        await asyncio.gather(*(self._post(u, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
                               for u in self.urls))
        self._adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        self._adapters.pop(name, None)
        await asyncio.gather(*(self._post(u, "/v1/unload_lora_adapter", {"lora_name": name}, missing_ok=True)
                               for u in self.urls))

    async def adapters(self) -> list[str]:
        return list(self._adapters)

    async def _reload_adapters(self) -> None:
        for name, path in list(self._adapters.items()):
            await self._post(self.process.url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def _post(self, url: str, path: str, body: dict, missing_ok: bool = False) -> None:
        try:
            async with self._session.post(url + path, json=body) as r:
                text = await r.text()
                if r.status == 200 or (r.status == 404 and missing_ok):
                    return
                if r.status == 400 and "already been loaded" in text:
                    return  # another gateway in front of the same server loaded it
                raise _upstream_error(r.status, text)
        except aiohttp.ClientError as e:
            raise EngineUnavailable(f"vLLM at {url} did not answer: {e}") from e


def _upstream_error(status: int, text: str) -> EngineError:
    try:
        err = json.loads(text)
        err = err.get("error", err)
        message = err.get("message") or text
    except (ValueError, AttributeError):
        message = text
    if status == 400 and ("context length" in message.lower() or "max_model_len" in message):
        return EngineError(413, message, code="context_length_exceeded", param="messages")
    return EngineError(status if 400 <= status < 500 else 502, message)
