"""The managed vLLM subprocess: a crash gives 503, then the gateway restarts it and serves
again; a client that disconnects mid-stream leaves an `incomplete` row."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

pytestmark = pytest.mark.slow

BODY = {"model": "loopchat", "messages": [{"role": "user", "content": "Tell me a long story about a cat."}],
        "max_tokens": 200, "stream": True}


def test_client_disconnect_is_stored_as_incomplete(vllm_gateway):
    with httpx.stream("POST", vllm_gateway.url + "/v1/chat/completions", json=BODY, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
    cid = httpx.Response(200, content=first[6:]).json()["id"]
    deadline = time.monotonic() + 20
    row = None
    while time.monotonic() < deadline and row is None:
        with vllm_gateway.db() as db:
            row = db.execute("SELECT status, completion_tokens FROM completions WHERE id = ?", [cid]).fetchone()
        time.sleep(0.2)
    assert row is not None and row["status"] == "incomplete"


def vllm_child(gateway) -> psutil.Process:
    children = psutil.Process(gateway.proc.pid).children(recursive=True)
    return next(p for p in children if "vllm.entrypoints" in " ".join(p.cmdline()))


def test_engine_crash_gives_503_then_recovers(vllm_gateway):
    child = vllm_child(vllm_gateway)
    os.killpg(os.getpgid(child.pid), signal.SIGKILL)
    child.wait(10)
    time.sleep(1.5)  # the supervisor polls twice a second
    r = httpx.post(vllm_gateway.url + "/v1/chat/completions", json={**BODY, "stream": False, "max_tokens": 4},
                   timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    assert httpx.get(vllm_gateway.url + "/readyz").status_code == 503
    vllm_gateway.wait_ready(timeout=240)
    r = httpx.post(vllm_gateway.url + "/v1/chat/completions", json={**BODY, "stream": False, "max_tokens": 4},
                   timeout=60)
    assert r.status_code == 200
    assert vllm_child(vllm_gateway).pid != child.pid
