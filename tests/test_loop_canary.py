"""A canary on real parts: the real gateway (`loopchat up`) in front of the real vLLM CPU server, with
a real SQLite file. A real adapter answers a sticky share of the users beside the serving version;
every stored row names the version that answered; thumbs count as evidence for the arm they rated;
an operator's rollback under a streaming load sends every user back to the serving version with no
failed request. (The API's contract on the fake engine: tests/test_canary_api.py; several gateways
on one store: tests/test_gateway_follow.py.)"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import StreamingLoad, ask, openai_client, wait_for
from feedback.canary import bucket
from loop_fixtures import publish_random

pytestmark = pytest.mark.slow
SHARE = 0.5
USERS = [f"canary-user-{i}" for i in range(48)]
HI = [{"role": "user", "content": "Say hi."}]


@pytest.fixture
def admin(vllm_gateway):
    """An admin client of the session's gateway, which this test leaves as it found it however the test
    ends: no canary running, the alias where it was."""
    with httpx.Client(base_url=vllm_gateway.url, timeout=300) as http:
        assert http.get("/admin/canary").json()["canary"] is None, "a canary was left running by another test"
        serving = http.get("/admin/adapters").json()["serving"]
        yield http
        if http.get("/admin/canary").json()["canary"] is not None:
            assert http.post("/admin/canary/rollback").status_code == 200
        if http.get("/admin/adapters").json()["serving"] != serving:  # only a canary promoted by mistake
            r = http.post(f"/admin/adapters/{serving}/promote") if serving else http.post("/admin/rollback")
            assert r.status_code == 200, r.text


def chat(client, user: str, stream: bool) -> tuple[str, str]:
    """(completion id, the `model` the response names) of one short answer to `user` through the openai SDK."""
    kwargs = {"model": "loopchat", "messages": HI, "max_tokens": 4, "extra_headers": {"X-Loopchat-User": user}}
    if not stream:
        r = client.chat.completions.create(**kwargs)
        return r.id, r.model
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert chunks and {(c.id, c.model) for c in chunks} == {(chunks[0].id, chunks[0].model)}
    return chunks[0].id, chunks[0].model


def model_for(http: httpx.Client, user: str) -> str:
    r = http.post("/v1/chat/completions", headers={"X-Loopchat-User": user},
                  json={"model": "loopchat", "messages": HI, "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r.json()["model"]


def test_a_canary_answers_a_sticky_share_until_an_operator_rolls_it_back(vllm_gateway, admin, model_dir, tmp_path):
    gw = vllm_gateway
    version = publish_random(gw.db_path, model_dir, tmp_path, seed=13)
    on_canary_name, serving_name = f"policy-{version}", ask(gw.url)  # no canary yet: everyone gets the serving one

    r = admin.post(f"/admin/adapters/{version}/canary", json={"share": SHARE})
    assert r.status_code == 201, r.text
    started = r.json()
    expected = {u: on_canary_name if bucket(started["id"], u) < SHARE else serving_name for u in USERS}
    client = openai_client(gw)
    with ThreadPoolExecutor(8) as pool:  # streamed and not, each user once each way
        first = dict(zip(USERS, pool.map(lambda i: chat(client, USERS[i], i % 2 == 0), range(len(USERS)))))
        second = dict(zip(USERS, pool.map(lambda i: chat(client, USERS[i], i % 2 == 1), range(len(USERS)))))
    assert {u: model for u, (_, model) in first.items()} == expected  # the bucket decides
    assert {u: model for u, (_, model) in second.items()} == expected  # sticky
    canary_users = [u for u in USERS if expected[u] == on_canary_name]
    assert 0.25 < len(canary_users) / len(USERS) < 0.75  # the share, within sampling error (sd 0.072)
    with contextlib.closing(gw.db()) as db:
        rows = {r["id"]: (r["user"], r["model"], r["served_by"], r["status"])
                for r in db.execute("SELECT * FROM completions WHERE created_at >= ?", [started["started_at"]])}
    assert rows == {cid: (u, "loopchat", model, "complete") for answers in (first, second)
                    for u, (cid, model) in answers.items()}  # each row names the version that answered

    rated = {on_canary_name: [0, 0], serving_name: [0, 0]}  # [rated, up] per engine name
    for i, (user, (cid, model)) in enumerate(first.items()):
        up = (i % 3 != 0) == (model == on_canary_name)  # the canary mostly liked, the serving one mostly not
        r = httpx.post(gw.url + "/v1/feedback", headers={"X-Loopchat-User": user},
                       json={"completion_id": cid, "rating": 1 if up else -1})
        assert r.status_code == 200, r.text
        rated[model][0] += 1
        rated[model][1] += up
    status = admin.get("/admin/canary").json()
    assert status["canary"]["id"] == started["id"] and status["decision"]["state"] == "waiting"
    ev = status["evidence"]
    for arm, name in (("canary", on_canary_name), ("baseline", serving_name)):
        answers = sum(model == name for answers in (first, second) for _, model in answers.values())
        assert (ev[arm]["served_by"], ev[arm]["answers"], [ev[arm]["rated"], ev[arm]["up"]]) == \
            (name, answers, rated[name]), (arm, ev[arm])
    assert ev["canary"]["rate"] > ev["baseline"]["rate"]

    load_users = canary_users[:3] + [u for u in USERS if expected[u] == serving_name][:1]
    with httpx.Client(base_url=gw.url, timeout=120) as http, ThreadPoolExecutor(8) as pool, \
            StreamingLoad(gw.url, users=load_users) as load:
        wait_for(lambda: {x["model"] for x in load.results if x["ok"]} == {on_canary_name, serving_name}, 120,
                 "the load to be answered by both versions")
        asked = time.monotonic()
        r = admin.post("/admin/canary/rollback")
        switched = time.monotonic()
        assert r.status_code == 200, r.text
        ended = r.json()
        assert (ended["canary"]["id"], ended["canary"]["outcome"], ended["canary"]["ended_by"]) == \
            (started["id"], "rolled_back", "local")
        assert (ended["serving"], ended["name"]) == (started["baseline"], serving_name)
        wait_for(lambda: set(pool.map(lambda u: model_for(http, u), USERS)) == {serving_name}, 120,
                 "every user to be served by the serving version")
        wait_for(lambda: {x["user"] for x in load.ok_since(switched)} == set(load_users), 120,
                 "each load client to get an answer sent after the rollback")
    assert load.failures() == []
    assert {x["model"] for x in load.ok_since(switched)} == {serving_name}
    # canary answers in flight while the rollback ran finished (none failed)
    assert any(x["model"] == on_canary_name for x in load.in_flight(asked, switched))
    with contextlib.closing(gw.db()) as db:
        stored = {r["id"]: r["served_by"] for r in db.execute("SELECT id, served_by FROM completions")}
    assert all(stored[x["id"]] == x["model"] for x in load.results)

    status = admin.get("/admin/canary").json()
    assert status["canary"] is None and status["recent"][0]["id"] == started["id"]
    assert [status["recent"][0]["evidence"]["canary"][k] for k in ("rated", "up")] == rated[on_canary_name]
    wait_for(lambda: on_canary_name not in {m["id"] for m in admin.get("/v1/models").json()["data"]}, 120,
             f"{version} to be unloaded once its last answer finished")
