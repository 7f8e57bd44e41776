"""The managed vLLM subprocess: a crash gives 503, then the gateway restarts it and serves
again; a client that disconnects mid-stream leaves an `incomplete` row."""

from __future__ import annotations

import contextlib
import os
import signal

import httpx
import psutil
import pytest
from conftest import wait_for

pytestmark = pytest.mark.slow

BODY = {"model": "loopchat", "messages": [{"role": "user", "content": "Tell me a long story about a cat."}],
        "max_tokens": 200, "stream": True}


def test_client_disconnect_is_stored_as_incomplete(vllm_gateway):
    with httpx.stream("POST", vllm_gateway.url + "/v1/chat/completions", json=BODY, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
    cid = httpx.Response(200, content=first[6:]).json()["id"]

    def stored_row():
        with contextlib.closing(vllm_gateway.db()) as db:
            return db.execute("SELECT status FROM completions WHERE id = ?", [cid]).fetchone()

    assert wait_for(stored_row, 60, "the cut-off answer to be stored")["status"] == "incomplete"


def test_abandoned_requests_stop_generating_in_vllm(vllm_gateway):
    """Non-streamed requests whose clients hang up are aborted in vLLM at once (the gateway closes
    its stream to vLLM) instead of generating up to max_tokens for nobody."""
    from concurrent.futures import ThreadPoolExecutor

    from prometheus_client.parser import text_string_to_metric_families

    def vllm_metric(name: str) -> float:
        text = httpx.get(vllm_gateway.engine_url + "/metrics", timeout=10).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

    # The gateway passes no ignore_eos; sampled at temperature 2, the model hardly ever ends an answer itself.
    body = {"model": "loopchat", "max_tokens": 1500, "temperature": 2.0,
            "messages": [{"role": "user", "content": "Tell me a very long story about a cat."}]}

    def hangs_up(_) -> bool:
        try:
            httpx.post(vllm_gateway.url + "/v1/chat/completions", json=body, timeout=3)
        except httpx.ReadTimeout:
            return True
        return False

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(hangs_up, range(4)))
    hung_up = vllm_metric("vllm:generation_tokens_total")
    wait_for(lambda: vllm_metric("vllm:num_requests_running") + vllm_metric("vllm:num_requests_waiting") == 0, 300,
             "vLLM to have no request left")
    # Run to their end, the four would generate thousands of tokens more.
    assert vllm_metric("vllm:generation_tokens_total") - hung_up < 200


def vllm_child(gateway) -> psutil.Process:
    children = psutil.Process(gateway.proc.pid).children(recursive=True)
    return next(p for p in children if "vllm.entrypoints" in " ".join(p.cmdline()))


def test_engine_crash_gives_503_then_recovers(vllm_gateway):
    child = vllm_child(vllm_gateway)
    os.killpg(os.getpgid(child.pid), signal.SIGKILL)
    child.wait(10)
    wait_for(lambda: httpx.get(vllm_gateway.url + "/readyz", timeout=10).status_code == 503, 60,
             "/readyz to notice the engine is gone")
    r = httpx.post(vllm_gateway.url + "/v1/chat/completions", json={**BODY, "stream": False, "max_tokens": 4},
                   timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    vllm_gateway.wait_ready(timeout=600)  # a cold vLLM start on a slow, busy CPU: as long as the first start may take
    r = httpx.post(vllm_gateway.url + "/v1/chat/completions", json={**BODY, "stream": False, "max_tokens": 4},
                   timeout=60)
    assert r.status_code == 200
    assert vllm_child(vllm_gateway).pid != child.pid
