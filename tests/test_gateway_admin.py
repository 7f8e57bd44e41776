"""The admin API's contract (the real app in front of the fake engine): who may call it, what it
lists, and that a promotion or rollback that cannot happen answers an error and changes nothing."""

from __future__ import annotations

import httpx
import pytest

from conftest import ask, assert_error, wait_for
from feedback import cycles

ADMIN_ROUTES = [("GET", "/admin/adapters"), ("POST", "/admin/adapters/v1/promote"), ("POST", "/admin/rollback"),
                ("GET", "/admin/cycles"), ("POST", "/admin/cycles"), ("GET", "/admin/cycles/1"),
                ("POST", "/admin/cycles/1/cancel"), ("GET", "/admin/feedback/stats"),
                ("POST", "/admin/adapters/v1/canary"), ("GET", "/admin/canary"), ("PATCH", "/admin/canary"),
                ("GET", "/admin/canary/1"), ("POST", "/admin/canary/promote"), ("POST", "/admin/canary/rollback")]


@pytest.mark.parametrize("method,path", ADMIN_ROUTES, ids=[f"{m} {p}" for m, p in ADMIN_ROUTES])
def test_admin_api_needs_an_admin_key(fake_keyed_gateway, method, path):
    gw = fake_keyed_gateway
    assert_error(httpx.request(method, gw.url + path), 401, code="missing_api_key")
    assert_error(httpx.request(method, gw.url + path, headers=gw.headers("alice")), 403, code="admin_required")
    assert cycles.list_cycles(gw.store) == [] and cycles.promotions(gw.store) == []  # nothing happened
    assert gw.store.count("canaries") == 0


def test_an_admin_key_may_call_it(fake_keyed_gateway):
    gw = fake_keyed_gateway
    r = httpx.get(gw.url + "/admin/cycles", headers=gw.headers("ops"))
    assert r.status_code == 200 and r.json() == {"object": "list", "data": []}
    r = httpx.get(gw.url + "/admin/adapters", headers=gw.headers("ops"))
    assert r.status_code == 200 and r.json() == {"object": "list", "serving": None, "promoted_at": None, "data": []}


def serving_state(gw) -> tuple:
    """What a failed promotion must leave alone: who answers, the store's history, the models listed."""
    models = sorted(m["id"] for m in httpx.get(gw.url + "/v1/models").json()["data"])
    return ask(gw.url), len(cycles.promotions(gw.store)), models, sorted(gw.engine.loaded)


def test_bad_promotions_change_nothing(fake_gateway):
    gw = fake_gateway
    v1, v2 = gw.publish_adapter(), gw.publish_adapter()
    assert httpx.post(f"{gw.url}/admin/adapters/{v1}/promote").status_code == 200
    before = serving_state(gw)
    assert before[0] == f"policy-{v1}"

    assert_error(httpx.post(gw.url + "/admin/adapters/v99/promote"), 404, "version", code="adapter_not_found")
    gw.engine.fail_load.add(f"policy-{v2}")  # the engine cannot load it (vLLM: a missing path)
    assert_error(httpx.post(f"{gw.url}/admin/adapters/{v2}/promote"), 404, code="adapter_load_failed")
    gw.engine.fail_load.clear()
    gw.engine.up = False
    assert_error(httpx.post(f"{gw.url}/admin/adapters/{v2}/promote"), 503, code="engine_unavailable")
    gw.engine.up = True
    assert serving_state(gw) == before


def test_rollback_walks_back_to_the_base_model_then_refuses(fake_gateway):
    gw = fake_gateway
    v1, v2 = gw.publish_adapter(), gw.publish_adapter()
    for version in (v1, v2):
        assert httpx.post(f"{gw.url}/admin/adapters/{version}/promote").json()["serving"] == version
    assert httpx.post(gw.url + "/admin/rollback").json()["serving"] == v1
    assert ask(gw.url) == f"policy-{v1}"
    assert httpx.post(gw.url + "/admin/rollback").json()["serving"] is None
    assert ask(gw.url) == "base-model"
    assert_error(httpx.post(gw.url + "/admin/rollback"), 409, code="nothing_to_roll_back")
    assert ask(gw.url) == "base-model"
    assert [(p["version"], p["action"]) for p in cycles.promotions(gw.store)] == \
        [(v1, "promote"), (v2, "promote"), (v1, "rollback"), (None, "rollback")]


def test_adapters_list_each_versions_state(fake_gateway):
    gw = fake_gateway
    v1, v2, v3, v4, v5 = (gw.publish_adapter() for _ in range(5))
    for version in (v1, v2, v3):
        assert httpx.post(f"{gw.url}/admin/adapters/{version}/promote").status_code == 200
    assert httpx.post(f"{gw.url}/admin/adapters/{v4}/canary", json={"share": 0.2}).status_code == 201

    def states() -> dict:
        return {a["version"]: a["state"] for a in httpx.get(gw.url + "/admin/adapters").json()["data"]}

    wait_for(lambda: states()[v1] == "published", 30, f"{v1} to be unloaded once neither serving nor previous")
    listing = httpx.get(gw.url + "/admin/adapters").json()
    assert listing["serving"] == v3 and listing["promoted_at"] > 0
    assert states() == {v1: "published", v2: "loaded", v3: "serving", v4: "canary", v5: "published"}  # v2: previous
    assert all(a["name"] == f"policy-{a['version']}" and a["path"].endswith(a["version"]) for a in listing["data"])


def test_cycles_are_queued_one_at_a_time_and_cancelled(fake_gateway):
    url = fake_gateway.url
    r = httpx.post(url + "/admin/cycles")
    assert r.status_code == 202, r.text
    queued = r.json()
    assert queued["state"] == "queued" and queued["trigger"] == "manual"
    assert_error(httpx.post(url + "/admin/cycles"), 409, code="cycle_active")
    assert httpx.get(f"{url}/admin/cycles/{queued['id']}").json()["id"] == queued["id"]
    assert_error(httpx.get(f"{url}/admin/cycles/{queued['id'] + 1}"), 404, "cycle_id", code="cycle_not_found")
    assert_error(httpx.post(f"{url}/admin/cycles/{queued['id'] + 1}/cancel"), 404, code="cycle_not_found")
    assert httpx.post(f"{url}/admin/cycles/{queued['id']}/cancel").json()["state"] == "cancelled"
    assert httpx.post(url + "/admin/cycles").status_code == 202  # the cancelled one no longer blocks
    assert [c["state"] for c in httpx.get(url + "/admin/cycles").json()["data"]] == ["queued", "cancelled"]
