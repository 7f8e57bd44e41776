"""Promotion and rollback under load on the real vLLM CPU engine: no request fails, every
stored completion names the version that answered, and a restarted gateway serves the
promoted version. (The admin API's contract is tests/test_gateway_admin.py's and
tests/test_gateway_hotswap.py's, on the fake engine.)"""

from __future__ import annotations

import contextlib

import httpx
import pytest
from conftest import Server, StreamingLoad, ask, free_port, wait_for
from loop_fixtures import publish_random

pytestmark = pytest.mark.slow
CLIENTS = 8


@pytest.fixture(scope="module")
def swap_gateway(vllm_gateway, model_dir, tmp_path_factory):
    """A gateway of its own (open mode) in front of the shared vLLM server, with two published versions."""
    data = tmp_path_factory.mktemp("swap-gw")
    port = free_port()
    server = Server(["serve", "--engine-url", vllm_gateway.engine_url, "--port", str(port), "--data-dir", str(data),
                     "--model", str(model_dir)], data, port)
    server.start()
    work = tmp_path_factory.mktemp("adapters-src")
    server.versions = [publish_random(server.db_path, model_dir, work, seed) for seed in (1, 2)]
    yield server
    server.stop()


def test_promote_promote_rollback_under_load_then_restart(swap_gateway):
    url, (v1, v2) = swap_gateway.url, swap_gateway.versions
    admin = httpx.Client(base_url=url, timeout=300)
    assert ask(url) == "SmolLM2-135M-Instruct"
    with StreamingLoad(url, clients=CLIENTS) as load:
        wait_for(lambda: load.results, 300, "the load to get its first answers")
        load.switch(admin, f"/admin/adapters/{v1}/promote", v1)  # each waits for an answer sent after it
        load.switch(admin, f"/admin/adapters/{v2}/promote", v2)
        load.switch(admin, "/admin/rollback", v1)
    assert load.failures() == []
    assert load.served_by_phase() == [{f"policy-{v1}"}, {f"policy-{v2}"}, {f"policy-{v1}"}]
    assert all(load.in_flight_across_switches()), load.in_flight_across_switches()
    with contextlib.closing(swap_gateway.db()) as db:
        rows = {r["id"]: r["served_by"] for r in db.execute("SELECT id, served_by FROM completions")}
    assert all(rows[x["id"]] == x["model"] for x in load.results)  # each row names who answered

    listing = admin.get("/admin/adapters").json()
    assert listing["serving"] == v1 and {a["version"] for a in listing["data"]} == {v1, v2}
    wait_for(lambda: f"policy-{v2}" not in {m["id"] for m in admin.get("/v1/models").json()["data"]}, 120,
             f"{v2} to be unloaded once its last answer finished")

    swap_gateway.stop()
    swap_gateway.start()
    assert ask(url) == f"policy-{v1}"
    metrics = httpx.get(url + "/metrics").text
    assert "loopchat_serving_policy_version 1.0" in metrics
    assert "loopchat_last_promotion_timestamp_seconds" in metrics and "loopchat_cycles" in metrics
