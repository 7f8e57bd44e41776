"""Promotion and rollback under load on the real vLLM CPU engine: no request fails, every
stored completion names the version that answered, and a restarted gateway serves the
promoted version."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from conftest import Server, free_port
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


class Load:
    """CLIENTS threads streaming completions without pause; records every outcome."""

    def __init__(self, url: str):
        self.url, self.results, self.stop = url, [], threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(CLIENTS)]

    def client(self, i: int) -> None:
        body = {"model": "loopchat", "stream": True, "max_tokens": 12, "temperature": 0.8,
                "messages": [{"role": "user", "content": f"Name a color, client {i}."}]}
        with httpx.Client(timeout=120) as http:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    with http.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
                        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
                        ok = r.status_code == 200 and lines[-1] == "data: [DONE]"
                        first = httpx.Response(200, content=lines[0][6:]).json() if ok else {}
                        self.results.append({"ok": ok, "status": r.status_code, "id": first.get("id"),
                                             "model": first.get("model"), "started": started})
                except httpx.HTTPError as e:
                    self.results.append({"ok": False, "status": repr(e), "started": started})

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(120)


def ask(url: str) -> str:
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   json={"model": "loopchat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r.json()["model"]


def test_promote_promote_rollback_under_load_then_restart(swap_gateway):
    url, (v1, v2) = swap_gateway.url, swap_gateway.versions
    admin = httpx.Client(base_url=url, timeout=300)
    assert ask(url) == "SmolLM2-135M-Instruct"
    with Load(url) as load:
        time.sleep(3)
        for action, expect in ((f"/admin/adapters/{v1}/promote", v1), (f"/admin/adapters/{v2}/promote", v2),
                               ("/admin/rollback", v1)):
            r = admin.post(action)
            assert r.status_code == 200, r.text
            assert r.json()["serving"] == expect
            switched = time.monotonic()
            assert ask(url) == f"policy-{expect}"  # the very next request gets the new version
            time.sleep(4)
            served_after = {x["model"] for x in load.results if x["ok"] and x["started"] > switched}
            assert served_after == {f"policy-{expect}"}, served_after
    failures = [x for x in load.results if not x["ok"]]
    assert not failures and len(load.results) >= 3 * CLIENTS
    with swap_gateway.db() as db:
        rows = {r["id"]: r["served_by"] for r in db.execute("SELECT id, served_by FROM completions")}
    assert all(rows[x["id"]] == x["model"] for x in load.results)  # each row names who answered
    models = {x["model"] for x in load.results}
    assert {f"policy-{v1}", f"policy-{v2}"} <= models

    listing = admin.get("/admin/adapters").json()
    assert listing["serving"] == v1 and {a["version"] for a in listing["data"]} == {v1, v2}
    time.sleep(2)  # v2's retirement (drain, then unload) has run
    assert f"policy-{v2}" not in {m["id"] for m in admin.get("/v1/models").json()["data"]}

    swap_gateway.stop()
    swap_gateway.start()
    assert ask(url) == f"policy-{v1}"
    metrics = httpx.get(url + "/metrics").text
    assert "loopchat_serving_policy_version 1.0" in metrics
    assert "loopchat_last_promotion_timestamp_seconds" in metrics and "loopchat_cycles" in metrics


def test_bad_promotions_change_nothing(swap_gateway):
    url = swap_gateway.url
    before = ask(url)
    r = httpx.post(url + "/admin/adapters/v99/promote")
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    assert ask(url) == before


def test_admin_api_needs_an_admin_key(keyed_gateway):
    r = httpx.post(keyed_gateway.url + "/admin/rollback",
                   headers={"Authorization": f"Bearer {keyed_gateway.keys['alice']}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    r = httpx.get(keyed_gateway.url + "/admin/cycles", headers={"Authorization": f"Bearer {keyed_gateway.keys['ops']}"})
    assert r.status_code == 200 and r.json()["data"] == []
