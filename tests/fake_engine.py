"""An in-process engine for the gateway's contract tests: the real FastAPI app (routes, auth,
validation, storage, admin API, hot swap) runs in front of it without vLLM.

It implements `serve.engines.base.Engine`: deterministic text (a function of the model name,
the last user message and the choice index), real streaming chunks one word at a time,
usage on the last chunk, adapters as names. Knobs a test can turn:

- `up`: False makes it unavailable (`ready()` False, `stream` raises EngineUnavailable);
- `token_delay`: seconds between words (for disconnects and hot swaps under load);
- `hold`: model names whose streams stop before their next word until the name is removed;
- `fail_load`: names whose load raises EngineError(404) like vLLM's missing path;
- `running` / `aborted`: how many streams are being generated now / were closed before their end.

It is never how a capability is shown to work: that is what the real-vLLM tests do.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from typing import AsyncIterator

from serve.engines.base import EngineError, EngineUnavailable

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def answer(model: str, messages: list[dict], index: int = 0, length: int = 8) -> str:
    """The text the fake engine gives (before max_tokens and stop cut it)."""
    last = next((m.get("content") or "" for m in reversed(messages) if m.get("role") == "user"), "")
    digest = hashlib.sha256(f"{model}|{last}|{index}".encode()).digest()
    return " ".join(WORDS[b % len(WORDS)] for b in digest[:length])


class FakeEngine:
    kind = "fake"
    info = {"dtype": "float32", "device": "cpu", "reason": "a fake engine computes nothing"}

    def __init__(self, served_name: str = "base-model", max_model_len: int = 2048, token_delay: float = 0.0):
        self.served_name, self.max_model_len, self.token_delay = served_name, max_model_len, token_delay
        self.up = True
        self.hold: set[str] = set()
        self.fail_load: set[str] = set()
        self.loaded: dict[str, str] = {}
        self.running = 0
        self.aborted = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def ready(self) -> bool:
        return self.up

    async def stream(self, model: str, messages: list[dict], sampling: dict) -> AsyncIterator[dict]:
        if not self.up:
            raise EngineUnavailable("the fake engine is down")
        if model != self.served_name and model not in self.loaded:
            raise EngineError(404, f"The model `{model}` does not exist.", code="model_not_found", param="model")
        prompt_tokens = sum(len((m.get("content") or "").split()) + 4 for m in messages)
        max_tokens = sampling.get("max_tokens") or self.max_model_len - prompt_tokens
        if prompt_tokens >= self.max_model_len or prompt_tokens + max_tokens > self.max_model_len:
            raise EngineError(413, f"This model's maximum context length is {self.max_model_len} tokens.",
                              code="context_length_exceeded", param="messages")
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stops = sampling.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops

        def chunk(choices: list[dict], **extra) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, **extra}

        self.running += 1
        finished = False
        try:
            completion_tokens = 0
            for index in range(sampling.get("n") or 1):
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                words = answer(model, messages, index).split()
                finish, text = "stop", ""
                for i, word in enumerate(words):
                    if i >= max_tokens:
                        finish = "length"
                        break
                    piece = word if i == 0 else " " + word
                    cut = next((s for s in stops if s in text + piece), None)
                    if cut is not None:
                        piece = (text + piece)[: (text + piece).index(cut)][len(text):]
                        if piece:
                            yield chunk([{"index": index, "delta": {"content": piece}, "finish_reason": None}])
                        completion_tokens += 1
                        break
                    if self.token_delay:
                        await asyncio.sleep(self.token_delay)
                    while model in self.hold:
                        await asyncio.sleep(0.01)
                    text += piece
                    completion_tokens += 1
                    yield chunk([{"index": index, "delta": {"content": piece}, "finish_reason": None}])
                yield chunk([{"index": index, "delta": {}, "finish_reason": finish}])
            yield chunk([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                   "total_tokens": prompt_tokens + completion_tokens})
            finished = True
        finally:
            self.running -= 1
            if not finished:
                self.aborted += 1

    async def load_adapter(self, name: str, path: str) -> None:
        if not self.up:
            raise EngineUnavailable("the fake engine is down")
        if name in self.fail_load:
            raise EngineError(404, f"no adapter at {path}")
        self.loaded[name] = path

    async def unload_adapter(self, name: str) -> None:
        if not self.up:
            raise EngineUnavailable("the fake engine is down")
        self.loaded.pop(name, None)

    async def adapters(self) -> list[str]:
        return list(self.loaded)
