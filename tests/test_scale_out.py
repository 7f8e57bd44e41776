"""Several gateways in front of several vLLM replicas, all real processes: two vLLM CPU servers
and two `loopchat serve --engine-url A --engine-url B` gateways on one data dir (one SQLite file).

- A version promoted through gateway 1 is served by both gateways (gateway 2 follows the store),
  while clients stream on both and no request fails.
- A replica killed under load (SIGKILL) costs only the answers it was streaming; both gateways keep
  answering from the other, and the replica, restarted, gets the adapters back before it takes
  requests again.
"""

from __future__ import annotations

import os
import re
import signal
import time

import httpx
import pytest
from conftest import Server, StreamingLoad, ask, free_port, wait_for
from loop_fixtures import publish_random

import hardware
from serve.engines.vllm import VLLMProcess

pytestmark = pytest.mark.slow
CLIENTS = 4  # per gateway


def healthy(url: str) -> bool:
    return httpx.get(url + "/health", timeout=5).status_code == 200


def loaded_adapters(url: str) -> set[str]:
    """The adapters a vLLM server holds now."""
    return {m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"] if m.get("parent")}


def gateways_adapters(gateways) -> set[str]:
    """The adapters the gateways have loaded, by their /v1/models."""
    return {m["id"] for gw in gateways for m in httpx.get(gw.url + "/v1/models", timeout=30).json()["data"]
            if m["parent"]}


def vllm_requests_done(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "vllm:request_success_total")


@pytest.fixture(scope="module")
def replicas(model_dir, tmp_path_factory):
    """Two vLLM servers started the way loopchat starts its own (1 GiB of KV cache each), but not pinned:
    vLLM's CPU backend pins each server's worker to the same core by default, and on a 2-core machine a
    restarted replica's worker then starved behind the other's busy one (0.8 s of CPU in 12 minutes)."""
    logs = tmp_path_factory.mktemp("replicas")
    dtype = hardware.choose().dtype
    procs = [VLLMProcess(model_dir, model_dir.name, free_port(), logs / f"r{i}", 2048, dtype, 16, None, False,
                         env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}) for i in range(2)]
    try:
        for p in procs:
            p.spawn()
        for p in procs:
            wait_for(lambda: (p.alive() or pytest.fail(f"vLLM exited; see {p.log_path}")) and healthy(p.url),
                     900, f"vLLM at {p.url} to answer", interval=1)
        yield procs
    finally:
        for p in procs:
            p.terminate()


@pytest.fixture(scope="module")
def gateways(replicas, model_dir, tmp_path_factory):
    """Two gateways, one data dir, both in front of both replicas."""
    data = tmp_path_factory.mktemp("scale-out")
    engine_args = [arg for p in replicas for arg in ("--engine-url", p.url)]
    servers = []
    for i in (1, 2):
        port = free_port()
        server = Server(["serve", *engine_args, "--port", str(port), "--data-dir", str(data),
                         "--model", str(model_dir)], data, port)
        server.log_path = data / f"gateway{i}.log"
        servers.append(server)
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def test_a_promotion_through_one_gateway_is_served_by_both(gateways, replicas, model_dir, tmp_path):
    gw1, gw2 = gateways
    versions = [publish_random(gw1.db_path, model_dir, tmp_path, seed) for seed in (11, 12)]
    admin = httpx.Client(base_url=gw1.url, timeout=300)
    with StreamingLoad(gw1.url, clients=CLIENTS) as load1, StreamingLoad(gw2.url, clients=CLIENTS) as load2:
        wait_for(lambda: load1.results and load2.results, 300, "both gateways to answer")
        for version in versions:  # the second promotion retires the first version while gateway 2 may still use it
            name = f"policy-{version}"
            asked = time.monotonic()
            r = admin.post(f"/admin/adapters/{version}/promote")
            assert r.status_code == 200 and r.json()["serving"] == version, r.text
            answered = time.monotonic()
            assert ask(gw1.url) == name
            wait_for(lambda: ask(gw2.url) == name, 60, f"gateway 2 to serve {version}", interval=0.1)
            print(f"{version}: gateway 1 promoted it in {answered - asked:.2f} s; gateway 2 served it "
                  f"{time.monotonic() - answered:.2f} s after that")
            for load in (load1, load2):
                wait_for(lambda: any(x["model"] == name for x in load.ok_since(asked)), 120,
                         f"a streamed answer from {version}")
    assert load1.failures() == [] and load2.failures() == []
    # Both replicas hold what the store needs: the serving version and the rollback target.
    assert all(loaded_adapters(p.url) >= {f"policy-{v}" for v in versions} for p in replicas)
    for gw in gateways:
        assert httpx.get(gw.url + "/admin/adapters", timeout=30).json()["serving"] == versions[-1]


def test_a_replica_killed_under_load_costs_only_its_streams_and_comes_back_with_the_adapters(gateways, replicas,
                                                                                           model_dir, tmp_path):
    gw1, gw2 = gateways
    version = publish_random(gw1.db_path, model_dir, tmp_path, 13)
    name = f"policy-{version}"
    r = httpx.post(f"{gw1.url}/admin/adapters/{version}/promote", timeout=300)
    assert r.status_code == 200, r.text
    wait_for(lambda: ask(gw2.url) == name, 60, f"gateway 2 to serve {version}", interval=0.1)
    victim = replicas[1]
    logged_before = {gw: gw.log_path.stat().st_size for gw in gateways}
    with StreamingLoad(gw1.url, clients=CLIENTS) as load1, StreamingLoad(gw2.url, clients=CLIENTS) as load2:
        loads = (load1, load2)
        wait_for(lambda: all(len(load.results) >= 4 for load in loads), 300, "both gateways to answer")
        killed = time.monotonic()
        os.killpg(os.getpgid(victim.proc.pid), signal.SIGKILL)
        victim.proc.wait(30)
        wait_for(lambda: all(len(load.ok_since(killed + 1)) >= 8 for load in loads), 300,
                 "both gateways to keep answering with one replica")
        for gw in gateways:
            assert httpx.get(gw.url + "/readyz", timeout=30).status_code == 200

        restarted = time.monotonic()
        victim.spawn()
        wait_for(lambda: healthy(victim.url), 900, "the killed replica to answer again", interval=1)
        # Given back by the gateways (vLLM starts with none) before any request reaches it: one that came
        # first would be answered 404, and no request may fail after the kill (checked below).
        wait_for(lambda: loaded_adapters(victim.url) >= gateways_adapters(gateways) >= {name}, 60,
                 "the restarted replica to get every adapter the gateways have back")
        print(f"the restarted replica had {sorted(loaded_adapters(victim.url))} "
              f"{time.monotonic() - restarted:.0f} s after its restart")
        wait_for(lambda: vllm_requests_done(victim.url) >= 4, 120, "the restarted replica to take requests again")
        wait_for(lambda: all(len(load.ok_since(restarted)) >= 4 for load in loads), 120, "answers after the restart")

    for load in loads:
        assert all(x["model"] == name for x in load.results if x["ok"])
        # Only streams the killed replica was sending may fail: they had begun (a 200 and their first
        # chunk) before the kill and end with an error event. A request that had not got its first
        # chunk is sent to the other replica, and every request sent after the kill is answered.
        for failed in load.failures():
            assert failed["status"] == 200 and failed["started"] < killed < failed["finished"], failed
        assert len(load.failures()) <= CLIENTS
        print(f"{len(load.failures())} of {len(load.results)} streams failed (each was streaming from the killed "
              "replica)")
    for gw in gateways:
        log = gw.log_path.read_bytes()[logged_before[gw]:].decode(errors="replace")
        assert f"vLLM at {victim.url} failed" in log or f"vLLM at {victim.url} did not answer" in log
        assert re.search(rf"vLLM at {re.escape(victim.url)} is up after [\d.]+ s, with [1-9]\d* adapter", log)
