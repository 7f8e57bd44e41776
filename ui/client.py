"""A small async client of the gateway's HTTP API: everything the browser UI does goes through it.

Who is calling: with an API key, `Authorization: Bearer KEY`; in open mode, the
`X-Loopchat-User` header names the browser session."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import AsyncIterator

import httpx

TIMEOUT = httpx.Timeout(10.0, read=300.0)


class GatewayError(Exception):
    """An error answer from the gateway, in OpenAI's shape, or the gateway being unreachable."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    @classmethod
    def from_response(cls, resp: httpx.Response) -> "GatewayError":
        try:
            err = resp.json()["error"]
            return cls(resp.status_code, err.get("message") or resp.reason_phrase, err.get("code"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls(resp.status_code, resp.text[:200] or resp.reason_phrase)

    @property
    def needs_key(self) -> bool:
        return self.status == 401

    @property
    def not_available(self) -> bool:
        """The route itself is missing (an older gateway), not a missing thing it was asked about."""
        return self.status in (404, 405) and self.code is None


@dataclass(frozen=True)
class Gateway:
    url: str
    user: str | None = None
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        if self.api_key:
            return {"Authorization": f"Bearer {self.api_key}"}
        return {"X-Loopchat-User": self.user} if self.user else {}

    async def request(self, method: str, path: str, **kwargs) -> dict:
        try:
            async with httpx.AsyncClient(base_url=self.url, headers=self.headers(), timeout=TIMEOUT) as http:
                resp = await http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise GatewayError(503, f"The gateway at {self.url} cannot be reached ({e}).") from e
        if resp.status_code >= 400:
            raise GatewayError.from_response(resp)
        return resp.json()

    async def stream_chat(self, model: str, messages: list[dict], max_tokens: int,
                          temperature: float) -> AsyncIterator[tuple[str, str]]:
        """Yields (completion_id, text piece) as the answer streams in."""
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                "stream": True}
        try:
            async with httpx.AsyncClient(base_url=self.url, headers=self.headers(), timeout=TIMEOUT) as http:
                async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
                    if resp.status_code >= 400:
                        await resp.aread()
                        raise GatewayError.from_response(resp)
                    async for line in resp.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise GatewayError(502, chunk["error"].get("message", "stream failed"),
                                               chunk["error"].get("code"))
                        for choice in chunk.get("choices", ()):
                            yield chunk["id"], (choice.get("delta") or {}).get("content") or ""
        except httpx.HTTPError as e:
            raise GatewayError(503, f"The gateway at {self.url} cannot be reached ({e}).") from e

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self.request("GET", "/v1/models"))["data"]]

    async def send_feedback(self, completion_id: str, rating: int, reason: str | None = None,
                            comment: str | None = None, correction: str | None = None) -> dict:
        body = {"completion_id": completion_id, "rating": rating, "reason": reason, "comment": comment,
                "correction": correction}
        return await self.request("POST", "/v1/feedback", json={k: v for k, v in body.items() if v is not None})

    async def feedback_for(self, completion_id: str) -> dict | None:
        rows = (await self.request("GET", "/v1/feedback", params={"completion_id": completion_id}))["data"]
        return rows[0] if rows else None

    async def compare(self, messages: list[dict], max_tokens: int, n: int = 2) -> dict:
        """`n` anonymous answers (2 to 4), labelled a, b, ... in the order to show them."""
        return await self.request("POST", "/v1/comparisons",
                                  json={"messages": messages, "max_tokens": max_tokens, "n": n})

    async def vote(self, comparison_id: str, choice: str | None = None,
                   ranking: list[list[str]] | None = None) -> dict:
        """A `choice` (a label, tie, all_bad) or a `ranking` (groups of labels, best first); the reveal."""
        body = {"choice": choice} if ranking is None else {"ranking": ranking}
        return await self.request("POST", f"/v1/comparisons/{comparison_id}/vote", json=body)

    async def adapters(self) -> dict:
        return await self.request("GET", "/admin/adapters")

    async def cycles(self) -> list[dict]:
        return (await self.request("GET", "/admin/cycles"))["data"]

    async def feedback_stats(self) -> dict:
        return await self.request("GET", "/admin/feedback/stats")

    async def run_cycle(self) -> dict:
        return await self.request("POST", "/admin/cycles")

    async def promote(self, version: str) -> dict:
        return await self.request("POST", f"/admin/adapters/{version}/promote")

    async def rollback(self) -> dict:
        return await self.request("POST", "/admin/rollback")

    # ---- canaries and live win rates (the operator dashboard) ----
    async def canary(self) -> dict:
        """The running canary (or null), its live evidence per arm, the rule's state, recent ended ones."""
        return await self.request("GET", "/admin/canary")

    async def start_canary(self, version: str, share: float) -> dict:
        return await self.request("POST", f"/admin/adapters/{version}/canary", json={"share": share})

    async def promote_canary(self) -> dict:
        return await self.request("POST", "/admin/canary/promote")

    async def rollback_canary(self) -> dict:
        return await self.request("POST", "/admin/canary/rollback")

    async def winrates(self) -> list[dict]:
        """Per version, its live win rate against its predecessor with a 95% interval."""
        return (await self.request("GET", "/admin/winrates"))["data"]
