"""A client that hangs up before the first byte of its stream goes out: Starlette never starts the
body generator then, and the request must still release its version and keep its row."""

import asyncio
import contextlib
import json

from fake_engine import FakeEngine
from feedback import Store
from serve.gateway import create_app


def test_hangup_before_the_first_byte_releases_the_version_and_keeps_the_row(tmp_path):
    store, engine = Store(tmp_path / "loopchat.db"), FakeEngine()
    app = create_app(store, engine)
    app.state.registry.restoring = False  # no lifespan here: nothing to restore
    body = json.dumps({"model": "loopchat", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json"),
                                                              (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "app": app}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):  # the socket is gone by the time the response starts
        raise OSError("connection reset by peer")

    async def run():
        with contextlib.suppress(Exception):
            await app(scope, receive, send)
        for _ in range(100):  # the incomplete row is written by a task of its own
            if store.db["completions"].count:
                break
            await asyncio.sleep(0.05)

    asyncio.run(run())
    assert dict(app.state.registry.inflight) == {}
    assert engine.running == 0 and engine.aborted == 1
    assert [r["status"] for r in store.db["completions"].rows] == ["incomplete"]
