"""A client that hangs up stops its generation at once, streamed or not, and what was generated is
stored as `incomplete`; storing never blocks the gateway, even while SQLite is busy.
(tests/test_gateway_engine.py shows the abort reaching a real vLLM server.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3

import httpx
import pytest
from conftest import wait_for

STORY = [{"role": "user", "content": "Tell me a story."}]


def rows(gateway) -> list[tuple[str, str]]:
    with contextlib.closing(gateway.db()) as db:
        return [tuple(r) for r in db.execute("SELECT source, status FROM completions ORDER BY created_at")]


def hang_up(url: str, body: dict, after: float = 1.5) -> None:
    """Send `body` and give up waiting for the answer after `after` s (the client closes the connection)."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=after)


def test_abandoned_chat_is_aborted_and_stored_incomplete(fake_gateway):
    engine = fake_gateway.engine
    engine.token_delay = 1.0  # 8 choices of 8 words: a minute to answer in full
    hang_up(fake_gateway.url + "/v1/chat/completions", {"messages": STORY, "n": 8})
    wait_for(lambda: engine.running == 0 and engine.aborted == 1, 30, "the abandoned generation to be aborted")
    wait_for(lambda: rows(fake_gateway) == [("chat", "incomplete")], 30, "the incomplete row")


def test_abandoned_comparison_aborts_both_candidates(fake_gateway):
    engine = fake_gateway.engine
    engine.token_delay = 2.0  # 16 s an answer
    hang_up(fake_gateway.url + "/v1/comparisons", {"messages": STORY})
    wait_for(lambda: engine.running == 0 and engine.aborted == 2, 30, "both candidates to be aborted")
    wait_for(lambda: rows(fake_gateway) == [("comparison", "incomplete")] * 2, 30, "two incomplete rows")
    with contextlib.closing(fake_gateway.db()) as db:
        assert db.execute("SELECT count(*) FROM comparisons").fetchone()[0] == 0


class Queue:
    """Holds each request `delay` s before the engine starts it, as a busy vLLM queues requests;
    counts the requests waiting and those abandoned while waiting."""

    def __init__(self, engine, delay: float):
        self.stream, self.delay = engine.stream, delay
        self.waiting = self.abandoned = 0
        engine.stream = self

    async def __call__(self, model: str, messages: list[dict], sampling: dict):
        self.waiting += 1
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.abandoned += 1
            raise
        finally:
            self.waiting -= 1
        async for chunk in self.stream(model, messages, sampling):
            yield chunk


def test_stream_abandoned_before_its_first_token_is_aborted(fake_gateway):
    queue = Queue(fake_gateway.engine, delay=60)
    hang_up(fake_gateway.url + "/v1/chat/completions", {"messages": STORY, "stream": True})
    wait_for(lambda: queue.waiting == 0 and queue.abandoned == 1, 30, "the queued request to be given up")
    assert fake_gateway.engine.running == 0 and rows(fake_gateway) == []


def test_a_busy_store_does_not_block_the_gateway(fake_gateway):
    """The incomplete row of a stream whose client hung up waits for SQLite's write lock off the
    event loop: the gateway answers meanwhile, and the row is stored once the lock is free."""
    fake_gateway.engine.token_delay = 1.0
    lock = sqlite3.connect(fake_gateway.db_path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another writer holds the lock (the store waits up to 10 s for it)
    try:
        with httpx.stream("POST", fake_gateway.url + "/v1/chat/completions", timeout=30,
                          json={"messages": STORY, "stream": True}) as r:
            first = next(line for line in r.iter_lines() if line.startswith("data: "))
        completion_id = json.loads(first[6:])["id"]
        wait_for(lambda: fake_gateway.engine.aborted == 1, 30, "the gateway to close the abandoned stream")
        assert httpx.get(fake_gateway.url + "/healthz", timeout=3).status_code == 200
        assert rows(fake_gateway) == []  # the write is still waiting for the lock
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    wait_for(lambda: rows(fake_gateway) == [("chat", "incomplete")], 30, "the incomplete row")
    with contextlib.closing(fake_gateway.db()) as db:
        assert db.execute("SELECT id FROM completions").fetchone()[0] == completion_id
