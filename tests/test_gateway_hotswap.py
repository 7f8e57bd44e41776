"""Hot swap's contract on the real app with the fake engine, whose streams overlap every switch:
no request fails, each answer and its stored row name the version that wrote all of it, requests
sent after a switch get the new version, and an old version is unloaded only after its last answer.
(tests/test_loop_hotswap.py shows the same on the real vLLM engine.)"""

from __future__ import annotations

import contextlib
import threading
import time

import httpx

from conftest import StreamingLoad, ask, read_stream, wait_for
from fake_engine import answer

MORE = [{"role": "user", "content": "Tell me more."}]


def prompt_of(result: dict) -> list[dict]:
    return [{"role": "user", "content": result["prompt"]}]


def test_promote_promote_rollback_under_load(fake_gateway):
    gw = fake_gateway
    gw.engine.token_delay = 0.02  # a streamed answer takes ~0.2 s: several are in flight at every switch
    v1, v2 = gw.publish_adapter(), gw.publish_adapter()
    with httpx.Client(base_url=gw.url, timeout=60) as admin, StreamingLoad(gw.url, clients=6) as load:
        wait_for(lambda: len(load.results) >= 6, 60, "the load to get answers")
        load.switch(admin, f"/admin/adapters/{v1}/promote", v1)
        load.switch(admin, f"/admin/adapters/{v2}/promote", v2)
        load.switch(admin, "/admin/rollback", v1)

    assert load.failures() == []
    assert all(load.in_flight_across_switches()), load.in_flight_across_switches()
    assert load.served_by_phase() == [{f"policy-{v1}"}, {f"policy-{v2}"}, {f"policy-{v1}"}]
    assert {x["model"] for x in load.results} == {"base-model", f"policy-{v1}", f"policy-{v2}"}
    with contextlib.closing(gw.db()) as db:
        rows = {r["id"]: (r["served_by"], r["output"], r["status"])
                for r in db.execute("SELECT id, served_by, output, status FROM completions")}
    for x in load.results:  # every answer is one version's whole answer, stored under that version
        assert x["text"] == answer(x["model"], prompt_of(x))
        assert rows[x["id"]] == (x["model"], x["text"], "complete")
    assert gw.engine.aborted == 0
    wait_for(lambda: set(gw.engine.loaded) == {f"policy-{v1}"}, 30, f"{v2} to be unloaded once drained")


def test_old_version_is_unloaded_only_after_its_last_answer(fake_gateway):
    """v1 stays loaded while it is the previous version (comparisons, instant rollback); once it is
    not even that, it is unloaded, but only after the answer it is still giving has finished."""
    gw = fake_gateway
    v1, v2, v3 = gw.publish_adapter(), gw.publish_adapter(), gw.publish_adapter()
    for version in (v1, v2):
        assert httpx.post(f"{gw.url}/admin/adapters/{version}/promote").status_code == 200
    name = f"policy-{v1}"
    gw.engine.hold.add(name)  # v1's answers stop after their first chunk until released
    done: dict = {}

    def stream() -> None:
        body = {"model": name, "stream": True, "messages": MORE}
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=60) as r:
            done.update(read_stream(r) or {"failed": r.status_code})

    client = threading.Thread(target=stream)
    client.start()
    wait_for(lambda: gw.engine.running == 1, 30, f"an answer on {v1} to be under way")
    assert httpx.post(f"{gw.url}/admin/adapters/{v3}/promote").json()["serving"] == v3  # v2 is previous now
    assert ask(gw.url) == f"policy-{v3}"
    follower = gw.app.state.follower
    wait_for(lambda: time.monotonic() - follower.unneeded_since.get(name, time.monotonic()) >
             follower.retire_grace_s + 1, 60, f"{v1} to be unneeded for longer than the grace")
    models = {m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]}
    assert {name, f"policy-{v2}", f"policy-{v3}"} <= models and name in gw.engine.loaded  # still answering

    gw.engine.hold.clear()
    client.join(30)
    assert done.get("model") == name, done  # finished, all of it
    assert done["text"] == answer(name, MORE)
    wait_for(lambda: name not in gw.engine.loaded, 30, f"{v1} to be unloaded after its last answer")
    assert name not in {m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"]}
    assert set(gw.engine.loaded) == {f"policy-{v2}", f"policy-{v3}"}
    assert gw.engine.aborted == 0
