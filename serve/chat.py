"""POST /v1/chat/completions: resolve the model, stream from the engine, store the completion.

The `loopchat` alias resolves per user (a running canary answers its share of users, sticky), and
the stored row names the version that answered (`served_by`).

Every answer is generated as a stream internally, so there is one path for timing,
token counts and storage; a non-streamed request is assembled from the same chunks."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import suppress
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serve.auth import User, current_user
from serve.engines import EngineError, EngineUnavailable
from serve.errors import APIError
from serve.protocol import ChatCompletionRequest

log = logging.getLogger("loopchat.chat")
router = APIRouter()
T = TypeVar("T")
_writes: set[asyncio.Task] = set()  # completion rows being stored, referenced until done


class Recorder:
    """Collects one completion as its chunks pass, and turns it into a store row."""

    def __init__(self, *, user: str, model: str, served_by: str, messages: list[dict], sampling: dict,
                 source: str = "chat", store: bool = True):
        self.user, self.model, self.served_by, self.source = user, model, served_by, source
        self.store = store
        self.messages, self.sampling = messages, sampling
        self.t0 = time.perf_counter()
        self.id: str | None = None
        self.created = int(time.time())
        self.ttft: float | None = None
        self.texts: dict[int, list[str]] = {}
        self.finish: dict[int, str | None] = {}
        self.usage: dict | None = None

    def add(self, chunk: dict) -> None:
        self.id = self.id or chunk.get("id")
        for choice in chunk.get("choices", ()):
            i = choice["index"]
            piece = (choice.get("delta") or {}).get("content")
            if piece:
                if self.ttft is None:
                    self.ttft = time.perf_counter() - self.t0
                self.texts.setdefault(i, []).append(piece)
            else:
                self.texts.setdefault(i, [])
            if choice.get("finish_reason"):
                self.finish[i] = choice["finish_reason"]
        if chunk.get("usage"):
            self.usage = chunk["usage"]

    def choices(self) -> list[dict]:
        return [{"index": i, "content": "".join(self.texts[i]), "finish_reason": self.finish.get(i)}
                for i in sorted(self.texts)]

    def row(self, status: str) -> dict:
        """The store row. `created_at` is taken with `latency_ms`, not when the write thread gets
        to it, so that `created_at - latency_ms` is when the request came in."""
        choices = self.choices()
        usage = self.usage or {}
        return {
            "id": self.id, "user": self.user, "source": self.source, "model": self.model,
            "served_by": self.served_by, "messages": self.messages,
            "output": choices[0]["content"] if choices else "", "choices": choices, "params": self.sampling,
            "prompt_tokens": usage.get("prompt_tokens"), "completion_tokens": usage.get("completion_tokens"),
            "created_at": time.time(), "latency_ms": (time.perf_counter() - self.t0) * 1000,
            "ttft_ms": None if self.ttft is None else self.ttft * 1000,
            "finish_reason": choices[0]["finish_reason"] if choices else None, "status": status,
        }

    def response(self) -> dict:
        usage = self.usage or {}
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.served_by,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["content"]},
                         "finish_reason": c["finish_reason"], "logprobs": None} for c in self.choices()],
            "usage": {"prompt_tokens": usage.get("prompt_tokens", 0),
                      "completion_tokens": usage.get("completion_tokens", 0),
                      "total_tokens": usage.get("total_tokens", 0)},
        }


async def open_stream(state, model: str, messages: list[dict], sampling: dict) -> tuple[dict, AsyncIterator[dict]]:
    """Start generation and wait for its first chunk, so that an engine error still becomes
    a proper HTTP status instead of a broken stream."""
    gen = state.engine.stream(model, messages, sampling)
    try:
        first = await gen.__anext__()
    except EngineUnavailable as e:
        raise APIError(503, f"The model is not available right now: {e}", code="engine_unavailable") from e
    except EngineError as e:
        raise APIError(e.status, e.message, code=e.code, param=e.param) from e
    except StopAsyncIteration:
        raise APIError(502, "The engine returned no output.")
    return first, gen


async def generate(state, req: ChatCompletionRequest, user: User, source: str = "chat") -> Recorder:
    """Run one request to the end (non-streamed) and store it; used by chat and comparisons.

    Cancelled midway (its client hung up) or failed, it closes the engine stream, which aborts
    the request upstream, and stores what came until then as incomplete."""
    name = state.registry.resolve(req.model, user.name)
    rec = Recorder(user=user.name, model=req.model, served_by=name, messages=req.plain_messages(),
                   sampling=req.sampling(), source=source, store=req.store)
    with state.registry.track(name):
        first, gen = await open_stream(state, name, rec.messages, rec.sampling)
        try:
            rec.add(first)
            async for chunk in gen:
                rec.add(chunk)
        except BaseException:
            if rec.store:
                store_later(state, rec.row("incomplete"))
            await gen.aclose()
            raise
    await finish(state, rec, "complete")
    return rec


async def finish(state, rec: Recorder, status: str) -> None:
    """Count the completion and store it. The write starts before the first await, so once this
    is called the row is stored even if the caller is cancelled meanwhile."""
    if rec.ttft is not None:
        state.metrics.ttft.observe(rec.ttft)
    state.metrics.tokens.labels(rec.served_by).inc((rec.usage or {}).get("completion_tokens", 0))
    if rec.id and rec.store:
        await asyncio.shield(store_later(state, rec.row(status)))


def store_later(state, row: dict) -> asyncio.Task:
    """Store a completion row in a worker thread, so that SQLite waiting for its write lock (up to
    its busy timeout) never blocks the event loop. The write runs as a task of its own, kept
    referenced until done: it happens even when the request that started it is cancelled, as in
    the `finally` of a stream whose client hung up, where an await would never resume."""
    task = asyncio.create_task(asyncio.to_thread(state.store.record_completion, row))
    _writes.add(task)
    task.add_done_callback(_written)
    return task


def _written(task: asyncio.Task) -> None:
    _writes.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("could not store a completion", exc_info=task.exception())


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`await work`, but cancel it as soon as the client hangs up, and then answer 499 (which
    nobody reads): cancelling a generation closes its engine stream, which aborts the request
    upstream, so an abandoned request does not keep the engine busy for others.

    Starlette notices a disconnect only while it sends a StreamingResponse, and a plain response
    is computed before anything is sent; so this listens for `http.disconnect` itself. Once the
    body has been read, as FastAPI has done before the endpoint runs, `receive()` returns
    nothing else."""
    task = asyncio.ensure_future(work)
    hangup = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait((task, hangup), return_when=asyncio.FIRST_COMPLETED)
    finally:
        hangup.cancel()
        task.cancel()  # nothing when it is done; when this request is cancelled itself, the work goes too
    if task in done:
        return task.result()
    with suppress(asyncio.CancelledError):
        await task  # its clean-up: the engine stream closed, the incomplete row on its way to the store
    raise APIError(499, "The client closed the request.", code="client_closed_request")


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, user: User = Depends(current_user)):
    state = request.app.state
    if not req.stream:
        return JSONResponse((await cancel_on_disconnect(request, generate(state, req, user))).response())

    name = state.registry.resolve(req.model, user.name)
    rec = Recorder(user=user.name, model=req.model, served_by=name, messages=req.plain_messages(),
                   sampling=req.sampling(), store=req.store)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    state.registry.acquire(name)
    try:
        first, gen = await cancel_on_disconnect(request, open_stream(state, name, rec.messages, rec.sampling))
    except BaseException:
        state.registry.release(name)
        raise
    rec.add(first)  # the id is known from here on, even if no byte of the stream ever goes out

    stored = False

    async def close() -> None:
        """Release the version, keep an unfinished answer as incomplete, close the engine stream
        (which aborts it upstream). Called once, by the response, however it ended."""
        state.registry.release(name)
        if not stored and rec.id and rec.store:  # the client went away (or the engine failed): keep it, as incomplete
            store_later(state, rec.row("incomplete"))
        await gen.aclose()

    async def sse():
        nonlocal stored
        try:
            chunk = first
            while True:
                if chunk.get("choices") or include_usage:
                    yield b"data: " + orjson.dumps(chunk) + b"\n\n"
                try:
                    chunk = await gen.__anext__()
                except StopAsyncIteration:
                    break
                rec.add(chunk)
            # Stored before [DONE], so a client may send feedback on the id as soon as the stream ends.
            stored = True  # by finish() even if the client hangs up while it waits for the write
            await finish(state, rec, "complete")
            yield b"data: [DONE]\n\n"
        except (EngineError, EngineUnavailable) as e:
            err = {"error": {"message": str(e), "type": "server_error", "param": None, "code": "engine_error"}}
            yield b"data: " + orjson.dumps(err) + b"\n\n"

    return ClosingStream(sse(), on_close=close, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class ClosingStream(StreamingResponse):
    """A StreamingResponse that runs `on_close` however it ends: finished, the client gone mid-stream,
    or gone before the first byte (then Starlette never starts the body generator, so a `finally`
    inside the generator would never run)."""

    def __init__(self, content, *, on_close: Callable[[], Awaitable[None]], **kwargs):
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()
