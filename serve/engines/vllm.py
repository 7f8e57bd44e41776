"""The vLLM engine: one or more vLLM OpenAI servers (replicas), one managed here as a subprocess
or several given as URLs.

Chunks are forwarded as vLLM wrote them (its `model` field already names the adapter that
answered); the gateway parses each only to keep the text it must store.

Replicas. Each has its own health: checked every second, a replica is taken out after three
failed checks in a row, or at once when a request finds it gone. Requests go round-robin to the
replicas that are up; a request whose replica fails before its first chunk (refused, reset,
closed) is sent to the next one, so a replica that dies costs only the answers it was streaming.
The engine is ready while any replica is.

Adapters fan out: a load goes to every replica that is up, and a replica that comes back (or
answers for the first time) is given every adapter loaded here before it takes a request; a
load while a replica is down is thus done when it returns. (Several gateways in front of the same
replicas load the same names; which may be unloaded is serve/hotswap.py's business.)

Why this fan-out rather than vLLM's filesystem LoRA resolver (`VLLM_LORA_RESOLVER_CACHE_DIR`,
installed with vLLM 0.32): the resolver loads an adapter lazily, on the first request that names
it, on each replica by itself. It finds `<dir>/<model name>` only when its `adapter_config.json`
names vLLM's `--model` string exactly, so loopchat's `adapters/vN` served as `policy-vN` would
need a second tree of names, and a version one replica cannot load shows up as a user's 404 on
that replica, not as a failed promotion; nor does it ever unload. It is not faster either: the
first answer's LoRA set-up dominates both (two replicas sharing 2 busy AVX-512 cores, medians of
10: servable on both 1.1 s after the fan-out was asked, 1.25 s after the resolver's folder
appeared; the two loads themselves took 0.11 s). With the fan-out a promotion succeeds only once
every replica that is up has the version. Replicas behind a router that loopchat cannot address
one by one load adapters from `GET /admin/engine-config` instead (serve/engine_config.py, README
"Scale out").
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
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import aiohttp
import orjson

import hardware
from serve.engines.base import EngineError, EngineUnavailable

log = logging.getLogger("loopchat.vllm")

START_TIMEOUT_S = 600  # a managed server that has not answered for this long is restarted
RESTART_BACKOFF_S = 2.0
HEALTH_INTERVAL_S = 1.0
HEALTH_MISSES = 3  # checks failed in a row that take a replica out (a busy server may answer late; a
# request that finds a replica gone takes it out at once)
ADMIN_TIMEOUT = aiohttp.ClientTimeout(total=120)  # adapter loads and unloads
GONE = (aiohttp.ClientError, asyncio.TimeoutError)  # the replica went away (or never answered)


def lora_args(max_lora_rank: int) -> list[str]:
    """The vLLM flags runtime adapters need: loopchat's own vLLM gets them, and an engine
    started by others needs the same (see serve/engine_config.py)."""
    return ["--enable-lora", "--max-lora-rank", str(max_lora_rank), "--max-loras", "4", "--max-cpu-loras", "8"]


LORA_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


class VLLMProcess:
    """A vLLM OpenAI server as a child process: its log in logs/, stopped with SIGTERM then SIGKILL.
    `env` is added to this process's environment (e.g. VLLM_CPU_KVCACHE_SPACE)."""

    def __init__(self, model_dir: Path, served_name: str, port: int, log_dir: Path | None, max_model_len: int,
                 dtype: str, max_lora_rank: int, cache_dir: Path | None, enforce_eager: bool,
                 env: dict[str, str] | None = None):
        self.model_dir, self.served_name, self.port = Path(model_dir), served_name, port
        self.max_model_len, self.dtype, self.max_lora_rank = max_model_len, dtype, max_lora_rank
        self.cache_dir, self.enforce_eager, self.env = cache_dir, enforce_eager, env or {}
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
            *lora_args(self.max_lora_rank), "--disable-uvicorn-access-log",
        ] + (["--enforce-eager"] if self.enforce_eager else [])

    def spawn(self) -> None:
        env = {**os.environ, **LORA_ENV, **self.env}
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


@dataclass(eq=False)
class Replica:
    """One vLLM server. `up`: it answers /health and holds every adapter loaded here, so it may
    take requests. `process` is set when loopchat started it."""
    url: str
    process: VLLMProcess | None = None
    up: bool = False
    misses: int = 0  # /health checks failed in a row
    down_since: float = 0.0  # time.monotonic() when it stopped being up (or was started)


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
        self.replicas = [Replica(u) for u in urls] or [Replica(self.process.url, self.process)]
        self._turn = itertools.count()
        self._adapters: dict[str, str] = {}  # name -> path: what every replica that is up has loaded
        self._adapters_lock = asyncio.Lock()  # loads, unloads and a replica's return, one at a time
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task] = []

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60))
        for replica in self.replicas:
            replica.down_since = time.monotonic()
            if replica.process:
                replica.process.spawn()
            self._tasks.append(asyncio.create_task(self._watch(replica)))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for replica in self.replicas:
            if replica.process:
                await asyncio.to_thread(replica.process.terminate)
        if self._session:
            await self._session.close()

    async def ready(self) -> bool:
        return any(r.up for r in self.replicas)

    async def _healthy(self, url: str) -> bool:
        try:
            async with self._session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=3)) as r:
                return r.status == 200
        except GONE:
            return False

    async def _watch(self, replica: Replica) -> None:
        """Keep `replica.up` true to the replica: out when /health fails, back (with every adapter)
        when it answers again. A managed server is restarted when it dies or never answers."""
        while True:
            try:
                await self._check(replica)
            except Exception:  # a bug here must not stop the watch: the replica would never come back
                log.exception("checking vLLM at %s", replica.url)
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def _check(self, replica: Replica) -> None:
        process = replica.process
        if process and not process.alive():
            replica.up = False
            log.error("vLLM exited with code %s; restarting it (log: %s)", process.proc.returncode, process.log_path)
            await asyncio.sleep(RESTART_BACKOFF_S)
            process.restarts += 1
            process.spawn()
            replica.down_since = time.monotonic()
        elif await self._healthy(replica.url):
            replica.misses = 0
            if not replica.up:
                await self._rejoin(replica)
        else:
            replica.misses += 1
            if replica.misses >= HEALTH_MISSES:
                self._take_out(replica, f"did not answer /health {replica.misses} times in a row")
            if not replica.up:
                await self._wait_more(replica)

    async def _wait_more(self, replica: Replica) -> None:
        """A replica that is out and does not answer yet: say so now and then; a managed one that
        has not answered for START_TIMEOUT_S is stopped (and so restarted at the next check)."""
        waited, process = time.monotonic() - replica.down_since, replica.process
        if process and waited > START_TIMEOUT_S:
            log.error("vLLM did not answer within %d s; restarting it (log: %s)", START_TIMEOUT_S, process.log_path)
            await asyncio.to_thread(process.terminate)
        elif process and int(waited) % 5 == 0:
            log.info("vLLM loading %s ... %.0f s (log: %s)", self.served_name, waited, process.log_path)
        elif not process and int(waited) % 30 == 0:
            log.info("vLLM at %s does not answer /health (for %.0f s)", replica.url, waited)

    async def _rejoin(self, replica: Replica) -> None:
        """A replica answers (again): load every adapter into it, then let it take requests."""
        async with self._adapters_lock:
            try:
                for name, path in self._adapters.items():
                    await self._load_into(replica, name, path)
            except (EngineError, EngineUnavailable) as e:
                log.warning("vLLM at %s answers but cannot take its adapters back (%s); it stays out",
                            replica.url, e)
                return
            replica.up = True
        log.info("vLLM at %s is up after %.1f s, with %d adapter(s)", replica.url,
                 time.monotonic() - replica.down_since, len(self._adapters))

    def _take_out(self, replica: Replica, why: str) -> None:
        if replica.up:
            replica.up, replica.down_since = False, time.monotonic()
            log.warning("vLLM at %s %s: taking it out (%d of %d replicas up)", replica.url, why,
                        sum(r.up for r in self.replicas), len(self.replicas))

    # ---- generation --------------------------------------------------------------------
    async def stream(self, model: str, messages: list[dict], sampling: dict) -> AsyncIterator[dict]:
        body = {"model": model, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}, **sampling}
        replica, resp, chunks, first = await self._open(body)
        async with resp:
            try:
                yield first
                async for chunk in chunks:
                    yield chunk
            except GONE as e:
                self._take_out(replica, f"failed mid-answer ({e!r})")
                raise EngineUnavailable(f"vLLM at {replica.url} went away mid-answer") from e
            finally:
                await chunks.aclose()

    async def _open(self, body: dict):
        """Send the request to the next replica that is up, and to the others in turn while each
        fails before its first chunk. The replica, the response, its chunks and the first chunk."""
        up = [r for r in self.replicas if r.up]
        if not up:
            raise EngineUnavailable("no vLLM replica is up")
        turn = next(self._turn) % len(up)
        errors = []
        for replica in up[turn:] + up[:turn]:
            resp = None
            try:
                resp = await self._post_chat(replica, body)
                chunks = _chunks(resp)
                first = await anext(chunks, None)
            except GONE as e:
                if resp is not None:
                    resp.release()
                self._take_out(replica, f"failed before answering ({e!r})")
                errors.append(f"{replica.url}: {e!r}")
                continue
            except BaseException:
                if resp is not None:
                    resp.release()
                raise
            if first is None:
                resp.release()
                raise EngineError(502, "vLLM returned no output")
            return replica, resp, chunks, first
        raise EngineUnavailable(f"every vLLM replica failed: {'; '.join(errors)}")

    async def _post_chat(self, replica: Replica, body: dict) -> aiohttp.ClientResponse:
        """The 200 response of `replica` to the request (an EngineError otherwise)."""
        resp = await self._session.post(f"{replica.url}/v1/chat/completions", json=body)
        if resp.status != 200:
            text = await resp.text()
            resp.release()
            raise _upstream_error(resp.status, text)
        return resp

    # ---- adapters ----------------------------------------------------------------------
    async def load_adapter(self, name: str, path: str) -> None:
        """Load into every replica that is up; one that went away gets it when it returns. Refused
        by any replica (a bad adapter, a path it cannot see), it is unloaded from the others."""
        async with self._adapters_lock:
            up = [r for r in self.replicas if r.up]
            results = await asyncio.gather(*(self._load_into(r, name, path) for r in up), return_exceptions=True)
            refused = [e for e in results if isinstance(e, BaseException) and not isinstance(e, EngineUnavailable)]
            loaded = [r for r, e in zip(up, results) if e is None]
            if refused or not loaded:
                await asyncio.gather(*(self._unload_from(r, name) for r in loaded), return_exceptions=True)
                if refused:
                    raise refused[0]
                raise EngineUnavailable("no vLLM replica is up" if not up else
                                        f"no vLLM replica took {name}: {results[0]}")
            for replica, e in zip(up, results):
                if e is not None:
                    self._take_out(replica, f"failed to load {name} ({e})")
            self._adapters[name] = path

    async def unload_adapter(self, name: str) -> None:
        async with self._adapters_lock:
            self._adapters.pop(name, None)
            up = [r for r in self.replicas if r.up]
            results = await asyncio.gather(*(self._unload_from(r, name) for r in up), return_exceptions=True)
            for replica, e in zip(up, results):
                if isinstance(e, EngineUnavailable):
                    self._take_out(replica, f"failed to unload {name} ({e})")  # restarted, it will not have it
                elif e is not None:
                    raise e

    async def adapters(self) -> list[str]:
        return list(self._adapters)

    async def _load_into(self, replica: Replica, name: str, path: str) -> None:
        status, text = await self._admin(replica, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if status == 400 and "already been loaded" in text:
            # Another gateway in front of the same server loaded it: fine if it is the same adapter.
            theirs = await self._loaded_path(replica, name)
            if theirs != path:
                raise EngineError(409, f"vLLM at {replica.url} serves `{name}` from {theirs}, not {path}: "
                                       "two loopchat data dirs share this server")
        elif status != 200:
            raise _upstream_error(status, text)

    async def _unload_from(self, replica: Replica, name: str) -> None:
        status, text = await self._admin(replica, "/v1/unload_lora_adapter", {"lora_name": name})
        if status not in (200, 404):  # 404: not loaded there (another gateway unloaded it first)
            raise _upstream_error(status, text)

    async def _loaded_path(self, replica: Replica, name: str) -> str | None:
        try:
            async with self._session.get(f"{replica.url}/v1/models", timeout=ADMIN_TIMEOUT) as r:
                models = (await r.json())["data"]
        except GONE as e:
            raise EngineUnavailable(f"vLLM at {replica.url} did not answer: {e!r}") from e
        return next((m["root"] for m in models if m["id"] == name), None)

    async def _admin(self, replica: Replica, path: str, body: dict) -> tuple[int, str]:
        try:
            async with self._session.post(replica.url + path, json=body, timeout=ADMIN_TIMEOUT) as r:
                return r.status, await r.text()
        except GONE as e:
            raise EngineUnavailable(f"vLLM at {replica.url} did not answer: {e!r}") from e


async def _chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[dict]:
    """The chunks of vLLM's SSE answer; a stream cut before `[DONE]` raises ServerDisconnectedError."""
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
    raise aiohttp.ServerDisconnectedError("the answer ended before [DONE]")


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
