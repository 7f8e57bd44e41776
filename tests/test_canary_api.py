"""Canaries through the admin API on one gateway (the real app in front of the fake engine): bad
requests answer a clear 4xx and change nothing; the alias gives a sticky share of users the canary
and every row names who answered; the rule's decision is applied by itself or confirmed by an
operator; comparisons during a canary pit it against the serving version; /metrics and the CLI
show it. (Several gateways on one store: tests/test_gateway_follow.py.)"""

from __future__ import annotations

import contextlib
import random
import uuid

import httpx
import pytest
from click.testing import CliRunner

from conftest import InProcessGateway, assert_error, read_stream, wait_for
from feedback import canary, cycles
from feedback.canary import Rule, bucket
from loopchat.commands.canary import canary as canary_cli

HI = [{"role": "user", "content": "Hi"}]


def ask_as(url: str, user: str, http: httpx.Client | None = None) -> dict:
    r = (http or httpx).post(url + "/v1/chat/completions", headers={"X-Loopchat-User": user}, timeout=60,
                             json={"model": "loopchat", "messages": HI, "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r.json()


def everything(gw) -> tuple:
    """What a refused request must leave alone: the store's canaries and promotions, the route, the engine."""
    with contextlib.closing(gw.db()) as db:
        canaries = [tuple(r) for r in db.execute("SELECT * FROM canaries ORDER BY id")]
        promotions = [tuple(r) for r in db.execute("SELECT * FROM promotions ORDER BY id")]
    return canaries, promotions, gw.app.state.registry.route, sorted(gw.engine.loaded)


def rated_answers(store, version: str, n: int, up: int) -> None:
    """`n` answers of `version` to the alias, each rated by its user, `up` of them thumbs up."""
    for i in range(n):
        user, cid = f"rater-{uuid.uuid4().hex[:8]}", f"chatcmpl-{uuid.uuid4().hex}"
        store.record_completion({"id": cid, "user": user, "source": "chat", "model": "loopchat",
                                 "served_by": cycles.engine_name(version), "messages": HI, "output": "ok",
                                 "status": "complete"})
        store.put_feedback(user, cid, 1 if i < up else -1)


def test_bad_canary_requests_change_nothing(fake_gateway):
    gw = fake_gateway
    v1, v2, v3 = gw.publish_adapter(), gw.publish_adapter(), gw.publish_adapter()
    assert httpx.post(f"{gw.url}/admin/adapters/{v1}/promote").status_code == 200
    before = everything(gw)

    def start(version: str, body) -> httpx.Response:
        return httpx.post(f"{gw.url}/admin/adapters/{version}/canary", json=body)

    assert_error(start("v99", {"share": 0.1}), 404, "version", code="adapter_not_found")
    for share in (0, 1, -0.1, 1.5):
        assert_error(start(v2, {"share": share}), 400, "share", code="invalid_value")
    for body in ({"share": "0.1"}, {}, {"share": 0.1, "rule": "mine"}):
        assert_error(start(v2, body), 400, code="invalid_value")
    assert_error(start(v1, {"share": 0.1}), 409, code="canary_of_serving")
    gw.engine.fail_load.add(f"policy-{v2}")  # the engine cannot load it (vLLM: a missing path)
    assert_error(start(v2, {"share": 0.1}), 404, code="adapter_load_failed")
    gw.engine.fail_load.clear()
    gw.engine.up = False
    assert_error(start(v2, {"share": 0.1}), 503, code="engine_unavailable")
    gw.engine.up = True
    for path in ("/admin/canary/promote", "/admin/canary/rollback"):
        assert_error(httpx.post(gw.url + path), 409, code="no_canary")
    assert_error(httpx.patch(gw.url + "/admin/canary", json={"share": 0.2}), 409, code="no_canary")
    assert_error(httpx.get(gw.url + "/admin/canary/1"), 404, "canary_id", code="canary_not_found")
    assert everything(gw) == before

    r = start(v2, {"share": 0.1})
    assert r.status_code == 201, r.text
    running = everything(gw)
    assert running[2].canary == f"policy-{v2}"
    assert_error(start(v3, {"share": 0.1}), 409, code="canary_running")  # two canaries at once
    assert_error(start(v2, {"share": 0.2}), 409, code="canary_running")
    for share in (0, 1, 2):
        assert_error(httpx.patch(gw.url + "/admin/canary", json={"share": share}), 400, "share", code="invalid_value")
    assert_error(httpx.post(f"{gw.url}/admin/adapters/{v3}/promote"), 409, code="canary_running")
    assert_error(httpx.post(gw.url + "/admin/rollback"), 409, code="canary_running")
    assert everything(gw) == running


def test_the_alias_gives_a_sticky_share_of_users_the_canary(fake_gateway):
    gw = fake_gateway
    v1, v2 = gw.publish_adapter(), gw.publish_adapter()
    assert httpx.post(f"{gw.url}/admin/adapters/{v1}/promote").status_code == 200
    started = httpx.post(f"{gw.url}/admin/adapters/{v2}/canary", json={"share": 0.3}).json()
    assert (started["object"], started["version"], started["baseline"], started["share"]) == ("canary", v2, v1, 0.3)
    assert started["rule"] == {"min_answers": 100, "min_votes": 30, "margin": 0.05, "alpha": 0.05, "auto": True}
    users = [f"user-{i}" for i in range(150)]
    http = httpx.Client(timeout=60)

    def expected(user: str, share: float) -> str:
        return f"policy-{v2}" if bucket(started["id"], user) < share else f"policy-{v1}"

    answers = {u: ask_as(gw.url, u, http) for u in users}
    assert all(answers[u]["model"] == expected(u, 0.3) for u in users)
    on_canary = {u for u in users if answers[u]["model"] == f"policy-{v2}"}
    assert 0.18 < len(on_canary) / len(users) < 0.42  # the share, within sampling error (sd 0.037)
    assert all(ask_as(gw.url, u, http)["model"] == answers[u]["model"] for u in users[:30])  # sticky

    streamed = next(iter(on_canary))
    body = {"model": "loopchat", "stream": True, "messages": HI, "max_tokens": 2}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers={"X-Loopchat-User": streamed},
                      timeout=60) as r:
        assert read_stream(r)["model"] == f"policy-{v2}"

    assert httpx.patch(gw.url + "/admin/canary", json={"share": 0.6}).json()["share"] == 0.6
    wider = {u for u in users if ask_as(gw.url, u, http)["model"] == f"policy-{v2}"}
    assert on_canary < wider and wider == {u for u in users if expected(u, 0.6) == f"policy-{v2}"}

    with contextlib.closing(gw.db()) as db:  # every row names who answered
        rows = {r["id"]: (r["user"], r["model"], r["served_by"]) for r in db.execute("SELECT * FROM completions")}
    assert all(rows[a["id"]] == (u, "loopchat", a["model"]) for u, a in answers.items())


@pytest.fixture
def confirm_gateway(tmp_path):
    """Operator-confirmed decisions, a small minimum sample, the rule evaluated often."""
    gw = InProcessGateway(tmp_path / "gw", canary_rule=Rule(min_answers=30, auto=False), decide_interval_s=0.2)
    yield gw.start()
    gw.stop()


@pytest.fixture
def auto_gateway(tmp_path):
    gw = InProcessGateway(tmp_path / "gw", canary_rule=Rule(min_answers=30), decide_interval_s=0.2)
    yield gw.start()
    gw.stop()


def test_an_operator_confirms_what_the_rule_says(confirm_gateway):
    gw = confirm_gateway
    v1, v2 = gw.publish_adapter(), gw.publish_adapter()
    assert httpx.post(f"{gw.url}/admin/adapters/{v1}/promote").status_code == 200
    assert httpx.post(f"{gw.url}/admin/adapters/{v2}/canary", json={"share": 0.5}).status_code == 201
    status = httpx.get(gw.url + "/admin/canary").json()
    assert status["decision"]["state"] == "waiting" and "0 of 30" in status["decision"]["reason"]
    rated_answers(gw.store, v2, 30, up=27)
    rated_answers(gw.store, v1, 30, up=12)
    wait_for(lambda: 'loopchat_canary_decision{state="promote"} 1.0' in httpx.get(gw.url + "/metrics").text, 30,
             "the gateway to evaluate the rule")
    status = httpx.get(gw.url + "/admin/canary").json()
    assert status["canary"]["ended_at"] is None  # the rule says promote, but an operator decides
    assert status["decision"]["state"] == "promote"
    ev = status["evidence"]
    assert [(ev[arm]["rated"], ev[arm]["up"]) for arm in ("canary", "baseline")] == [(30, 27), (30, 12)]
    assert ev["canary"]["rate"] == 0.9 and ev["canary"]["ci95"][0] < 0.9 < ev["canary"]["ci95"][1]
    assert ev["difference"]["estimate"] == pytest.approx(0.5)

    r = httpx.post(gw.url + "/admin/canary/promote")
    assert r.status_code == 200, r.text
    ended = r.json()
    assert ended["serving"] == v2 and ended["name"] == f"policy-{v2}"
    assert (ended["canary"]["outcome"], ended["canary"]["ended_by"]) == ("promoted", "local")
    assert ended["canary"]["evidence"]["decision"]["state"] == "promote"
    assert all(ask_as(gw.url, f"user-{i}")["model"] == f"policy-{v2}" for i in range(20))
    last = cycles.promotions(gw.store)[-1]
    assert (last["version"], last["action"], last["by_user"]) == (v2, "promote", "local")
    status = httpx.get(gw.url + "/admin/canary").json()
    assert status["canary"] is None and [c["id"] for c in status["recent"]] == [ended["canary"]["id"]]
    assert_error(httpx.post(gw.url + "/admin/canary/promote"), 409, code="no_canary")


def test_an_automatic_rule_rolls_back_a_worse_canary(auto_gateway):
    gw = auto_gateway
    v1, v2 = gw.publish_adapter(), gw.publish_adapter()
    assert httpx.post(f"{gw.url}/admin/adapters/{v1}/promote").status_code == 200
    started = httpx.post(f"{gw.url}/admin/adapters/{v2}/canary", json={"share": 0.5}).json()
    promotions = cycles.promotions(gw.store)
    rated_answers(gw.store, v2, 30, up=4)
    rated_answers(gw.store, v1, 30, up=24)
    ended = wait_for(lambda: canary.get(gw.store, started["id"])["ended_at"] and canary.get(gw.store, started["id"]),
                     30, "the rule to roll the canary back")
    assert (ended["outcome"], ended["ended_by"]) == ("rolled_back", "auto")
    assert ended["evidence"]["decision"]["state"] == "rollback"
    wait_for(lambda: gw.app.state.registry.route.canary is None, 10, "the route to drop the canary")
    assert all(ask_as(gw.url, f"user-{i}")["model"] == f"policy-{v1}" for i in range(20))
    assert cycles.promotions(gw.store) == promotions  # the alias did not move
    one = httpx.get(f"{gw.url}/admin/canary/{started['id']}").json()
    assert one["outcome"] == "rolled_back" and one["evidence"]["canary"]["rated"] == 30


def test_comparisons_during_a_canary_are_head_to_heads_and_count_as_evidence(fake_gateway):
    gw = fake_gateway
    v1, v2 = gw.publish_adapter(), gw.publish_adapter()
    assert httpx.post(f"{gw.url}/admin/adapters/{v1}/promote").status_code == 200
    assert httpx.post(f"{gw.url}/admin/adapters/{v2}/canary", json={"share": 0.1}).status_code == 201
    r = httpx.post(gw.url + "/v1/comparisons", json={"messages": HI, "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    cmp = r.json()
    canary_label = None
    voted = httpx.post(f"{gw.url}/v1/comparisons/{cmp['id']}/vote", json={"choice": "a"}).json()
    for c in voted["candidates"]:
        if c["model"] == f"policy-{v2}":
            canary_label = c["label"]
    assert {(c["model"], c["origin"]) for c in voted["candidates"]} == {(f"policy-{v2}", "canary"),
                                                                        (f"policy-{v1}", "serving")}
    h2h = httpx.get(gw.url + "/admin/canary").json()["evidence"]["head_to_head"]
    assert h2h["n"] == 1 and (h2h["wins"], h2h["losses"]) == ((1, 0) if canary_label == "a" else (0, 1))


def test_comparison_candidates_follow_the_mix(tmp_path):
    gw = InProcessGateway(tmp_path / "gw", comparison_mix={"previous": 1.0}).start()
    try:
        registry = gw.app.state.registry
        v1, v2 = gw.publish_adapter(), gw.publish_adapter()
        assert httpx.post(f"{gw.url}/admin/adapters/{v1}/promote").status_code == 200
        # no version before v1: the base model, and it says so
        assert registry.comparison_models("u", 2) == [(f"policy-{v1}", "serving"), ("base-model", "base")]
        assert httpx.post(f"{gw.url}/admin/adapters/{v2}/promote").status_code == 200
        assert registry.comparison_models("u", 3) == [(f"policy-{v2}", "serving")] + [(f"policy-{v1}", "previous")] * 2
        assert f"policy-{v1}" in gw.engine.loaded  # the previous version stays loaded for them
        registry.comparison_mix, registry.rng = {"serving": 0.5, "previous": 0.3, "base": 0.2}, random.Random(0)
        drawn = [registry.comparison_models("u", 2)[1][1] for _ in range(2000)]
        shares = {o: round(drawn.count(o) / 2000, 1) for o in set(drawn)}
        assert shares == {"serving": 0.5, "previous": 0.3, "base": 0.2}
    finally:
        gw.stop()


def test_metrics_show_the_canary(fake_gateway):
    gw = fake_gateway
    v1 = gw.publish_adapter()
    assert httpx.post(f"{gw.url}/admin/adapters/{v1}/canary", json={"share": 0.25}).status_code == 201  # vs base
    metrics = httpx.get(gw.url + "/metrics").text
    assert "loopchat_canary_share 0.25" in metrics and "loopchat_canary_version 1.0" in metrics
    assert httpx.post(gw.url + "/admin/canary/rollback").json()["serving"] is None
    metrics = httpx.get(gw.url + "/metrics").text
    assert "loopchat_canary_share 0.0" in metrics and "loopchat_canary_version 0.0" in metrics


def test_cli(fake_gateway):
    gw = fake_gateway
    v1, v2 = gw.publish_adapter(), gw.publish_adapter()

    def cli(*args: str):
        return CliRunner().invoke(canary_cli, [*args, "--gateway", gw.url])

    out = cli("start", v1, "--share", "0.1")
    assert out.exit_code == 0 and out.output.startswith(f"canary 1: {v1} answers 10% of users beside the base model")
    out = cli("start", v2, "--share", "0.1")
    assert out.exit_code == 1 and out.output.strip().splitlines() == [
        f"Error: 409: A canary of {v1} is running; promote or roll it back first."]
    out = cli("share", "1.5")
    assert out.exit_code == 1 and len(out.output.strip().splitlines()) == 1 and "400" in out.output
    assert cli("share", "0.2").output.startswith(f"canary 1: {v1} answers 20% of users")
    out = cli("status")
    assert out.exit_code == 0 and "rule (automatic" in out.output and "waiting" in out.output
    out = cli("promote")
    assert out.exit_code == 0 and out.output.strip() == f"canary 1 promoted: {v1} serves"
    assert "ended: canary 1" in cli("status").output
    out = cli("rollback")
    assert out.exit_code == 1 and out.output.strip() == "Error: 409: No canary is running."
