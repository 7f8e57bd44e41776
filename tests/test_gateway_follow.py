"""Several gateways, one truth: two in-process gateways on one store file stand in for two gateway
processes. A change made through either is served by both (each looks every 0.5 s) with no failed request, they
route each user alike, an automatic canary decision is applied once, and a version the store still
names is never unloaded from an engine the gateways share. (The real two-gateway, two-vLLM test is
tests/test_scale_out.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import httpx
import pytest

from conftest import InProcessGateway, StreamingLoad, ask, wait_for
from fake_engine import FakeEngine, answer
from feedback import Store, canary, cycles
from feedback.canary import Rule
from loop_fixtures import fake_adapter, publish
from serve.gateway import GatewayConfig, create_app

# A gateway looks at the store every 0.5 s, so it follows a change within ~1 s. A test waits far longer: two
# in-process gateways, their clients and the test share one interpreter, and a loaded 2-core machine can stall
# them all for seconds with no bug; a gateway that never follows still fails.
FOLLOW_WAIT_S = 30.0
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def pair(tmp_path):
    """Gateways A and B on one store, each with its own engine (so each must load what it serves)."""
    gateways = [InProcessGateway(tmp_path / "data", token_delay=0.02, decide_interval_s=0.2,
                                 canary_rule=Rule(min_answers=30)) for _ in range(2)]
    for gw in gateways:
        gw.start()
    yield gateways
    for gw in gateways:
        gw.stop()


def as_user(url: str, user: str, http: httpx.Client) -> str:
    r = http.post(url + "/v1/chat/completions", headers={"X-Loopchat-User": user},
                  json={"model": "loopchat", "messages": HI, "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r.json()["model"]


def test_changes_through_one_gateway_are_served_by_the_other_under_load(pair):
    a, b = pair
    v1, v2 = a.publish_adapter(), a.publish_adapter()
    users = [f"user-{i}" for i in range(40)]
    with httpx.Client(base_url=a.url, timeout=60) as admin, httpx.Client(timeout=60) as http, \
            StreamingLoad(b.url, clients=4) as load:
        wait_for(lambda: len(load.results) >= 4, 60, "the load on B to get answers")
        assert admin.post(f"/admin/adapters/{v1}/promote").json()["serving"] == v1
        wait_for(lambda: ask(b.url) == f"policy-{v1}", FOLLOW_WAIT_S, f"B to serve {v1}")

        started = admin.post(f"/admin/adapters/{v2}/canary", json={"share": 0.5}).json()
        on_canary = {u for u in users if canary.bucket(started["id"], u) < 0.5}
        assert 0 < len(on_canary) < len(users)
        wait_for(lambda: b.app.state.registry.route.canary == f"policy-{v2}", FOLLOW_WAIT_S,
                 f"B to route {v2} as canary")
        assert {u: as_user(b.url, u, http) for u in users} == {u: as_user(a.url, u, http) for u in users} == \
            {u: f"policy-{v2}" if u in on_canary else f"policy-{v1}" for u in users}  # alike on both

        assert admin.post("/admin/canary/promote").json()["serving"] == v2
        wait_for(lambda: ask(b.url) == f"policy-{v2}", FOLLOW_WAIT_S, f"B to serve {v2} after the canary's promotion")
        switched = load.results[-1]["started"]
        wait_for(lambda: load.ok_since(switched), 60, "a streamed answer on B after the promotion")
    assert load.failures() == []
    assert {x["model"] for x in load.results} >= {"base-model", f"policy-{v1}", f"policy-{v2}"}
    with contextlib.closing(b.db()) as db:
        rows = {r["id"]: (r["served_by"], r["output"])
                for r in db.execute("SELECT id, served_by, output FROM completions")}
    for x in load.results:  # each answer is one version's whole answer, stored under that version
        assert rows[x["id"]] == (x["model"], x["text"])
        assert x["text"] == answer(x["model"], [{"role": "user", "content": x["prompt"]}])
    wait_for(lambda: set(b.engine.loaded) == {f"policy-{v1}", f"policy-{v2}"}, 30, "B to keep serving and previous")


def test_an_automatic_decision_is_applied_once_across_gateways(pair):
    a, b = pair
    v1, v2 = a.publish_adapter(), a.publish_adapter()
    assert httpx.post(f"{a.url}/admin/adapters/{v1}/promote").status_code == 200
    started = httpx.post(f"{b.url}/admin/adapters/{v2}/canary", json={"share": 0.5}).json()
    for version, up in ((v2, 28), (v1, 10)):
        for i in range(30):
            user, cid = f"rater-{uuid.uuid4().hex[:8]}", f"chatcmpl-{uuid.uuid4().hex}"
            a.store.record_completion({"id": cid, "user": user, "source": "chat", "model": "loopchat",
                                       "served_by": f"policy-{version}", "messages": HI, "status": "complete"})
            a.store.put_feedback(user, cid, 1 if i < up else -1)
    wait_for(lambda: all(ask(gw.url) == f"policy-{v2}" for gw in pair), 30, "both gateways to serve the canary")
    ended = canary.get(a.store, started["id"])
    assert (ended["outcome"], ended["ended_by"]) == ("promoted", "auto")
    assert [(p["version"], p["action"], p["by_user"]) for p in cycles.promotions(a.store)] == \
        [(v1, "promote", "local"), (v2, "promote", "auto")]  # once, whichever gateway was first


def publish_fake(store_path, work, base_model: str) -> str:
    return publish(store_path, fake_adapter(work / uuid.uuid4().hex), base_model=base_model)


def test_a_version_the_store_names_is_never_unloaded_by_a_gateway_that_has_not_followed_yet(tmp_path):
    """A gateway decides to retire v1 from what it saw last; meanwhile another gateway put v1 on canary.
    The unload checks the store in the same transaction, so v1 stays; once the store lets go of it,
    it goes (with the stale view still in place)."""
    store, engine = Store(tmp_path / "loopchat.db"), FakeEngine()
    v1, v2, v3 = (publish_fake(store.path, tmp_path, engine.served_name) for _ in range(3))
    app = create_app(store, engine, GatewayConfig(retire_grace_s=0))
    follower, registry = app.state.follower, app.state.registry
    registry.restoring = False

    async def scenario():
        for version in (v1, v2, v3):  # v1: neither serving nor previous at the end
            cycles.record_promotion(store, version, "promote", "ops")
            async with app.state.swap_lock:
                await follower.sync()
        assert f"policy-{v1}" in engine.loaded
        canary.start(store, v1, 0.1, "ops", Rule())  # another gateway's doing: this one has not looked
        await follower.retire()
        assert f"policy-{v1}" in engine.loaded and f"policy-{v1}" in registry.loaded
        canary.end(store, canary.running(store)["id"], "rolled_back", "ops")
        await follower.retire()
        assert f"policy-{v1}" not in engine.loaded and f"policy-{v1}" not in registry.loaded

    asyncio.run(scenario())


def test_a_version_another_gateway_unloaded_is_loaded_again_before_it_serves(tmp_path):
    """This gateway still has v1 (it has not retired it yet) when another one, in front of the same
    engine, unloads it; then the store needs v1 again: it is loaded again before the route names it."""
    store, engine = Store(tmp_path / "loopchat.db"), FakeEngine()
    v1, v2, v3 = (publish_fake(store.path, tmp_path, engine.served_name) for _ in range(3))
    app = create_app(store, engine, GatewayConfig())
    follower, registry = app.state.follower, app.state.registry
    registry.restoring = False

    async def scenario():
        for version in (v1, v2, v3):
            cycles.record_promotion(store, version, "promote", "ops")
            async with app.state.swap_lock:
                await follower.sync()
        assert f"policy-{v1}" in registry.loaded  # not needed any more, not retired yet
        await engine.unload_adapter(f"policy-{v1}")  # another gateway's retirement of it
        canary.start(store, v1, 0.5, "ops", Rule())
        async with app.state.swap_lock:
            await follower.sync()
        assert f"policy-{v1}" in engine.loaded and registry.route.canary == f"policy-{v1}"

    asyncio.run(scenario())
