"""The engine interface. Engines speak OpenAI chat-completion dicts; the gateway adds ids,
auth, storage and metrics around them."""

from __future__ import annotations

from typing import AsyncIterator, Protocol


class EngineError(Exception):
    """The engine refused the request (bad input it detected, e.g. too long for the context)."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


class EngineUnavailable(Exception):
    """The engine is down or still loading: the gateway answers 503."""


class Engine(Protocol):
    kind: str
    served_name: str  # the base model's name in /v1/models
    info: dict[str, str]  # how it computes: dtype, device, and the reason for them (shown in /metrics, /readyz)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ready(self) -> bool: ...

    def stream(self, model: str, messages: list[dict], sampling: dict) -> AsyncIterator[dict]:
        """Yield OpenAI `chat.completion.chunk` dicts for `model` (the base name or a loaded
        adapter name), ending with a chunk that carries `usage`. Raises EngineError or
        EngineUnavailable before the first chunk when the request cannot run."""
        ...

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...

    async def adapters(self) -> list[str]: ...
