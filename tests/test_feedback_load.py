"""Many feedback posts at once against a running gateway (the real app and SQLite file, the fake
engine), and the per-user rate limit."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import httpx
import pytest

from conftest import InProcessGateway
from feedback_fixtures import add_completion
from serve.ratelimit import SlidingWindow

CLIENTS, COMPLETIONS_EACH, POSTS_EACH = 32, 8, 40  # 1,280 posts
LIMIT = 5


def test_sliding_window_counts_per_key_and_forgets_old_events():
    window = SlidingWindow(2, window=60)
    assert [window.hit("a", now=t) for t in (0, 1)] == [0, 0]
    assert window.hit("a", now=30) == 30  # the oldest event leaves the window at t=60
    assert window.hit("b", now=30) == 0
    assert window.hit("a", now=60) == 0
    assert SlidingWindow(0).hit("a") == 0  # 0 = no limit


async def post_all(url: str, jobs: list[tuple[str, list[dict]]]) -> list[list[httpx.Response]]:
    """Each (user, bodies) job is one client posting its bodies in order; all clients at once."""
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=len(jobs))) as client:
        async def run(user: str, bodies: list[dict]) -> list[httpx.Response]:
            return [await client.post("/v1/feedback", json=b, headers={"X-Loopchat-User": user}) for b in bodies]

        return await asyncio.gather(*(run(user, bodies) for user, bodies in jobs))


def test_a_thousand_concurrent_posts_leave_one_row_per_completion_with_the_last_vote(fake_gateway):
    store = fake_gateway.store
    rng = random.Random(7)
    jobs, last = [], {}
    for c in range(CLIENTS):
        user = f"load-{c}"
        ids = [add_completion(store, f"{user}-{i}", user=user, prompt=f"load {c} {i}") for i in range(COMPLETIONS_EACH)]
        bodies = [{"completion_id": rng.choice(ids), "rating": rng.choice((1, -1)), "comment": f"post {n}"}
                  for n in range(POSTS_EACH)]
        jobs.append((user, bodies))
        last.update({(user, b["completion_id"]): (b["rating"], b["comment"]) for b in bodies})

    t0 = time.monotonic()
    responses = asyncio.run(post_all(fake_gateway.url, jobs))
    elapsed = time.monotonic() - t0
    statuses = [r.status_code for client in responses for r in client]
    print(f"{len(statuses)} posts from {CLIENTS} clients in {elapsed:.1f} s ({len(statuses) / elapsed:.0f}/s)")
    assert len(statuses) == CLIENTS * POSTS_EACH and set(statuses) == {200}

    with contextlib.closing(fake_gateway.db()) as db:
        rows = db.execute("SELECT user, completion_id, rating, comment FROM feedback WHERE user LIKE 'load-%'")
        stored = {(r["user"], r["completion_id"]): (r["rating"], r["comment"]) for r in rows}
    assert stored == last


@pytest.fixture
def limited_gateway(tmp_path):
    """A gateway allowing LIMIT feedback posts a minute per user."""
    gw = InProcessGateway(tmp_path / "limited", feedback_rate_limit=LIMIT).start()
    yield gw
    gw.stop()


def test_rate_limit_refuses_posts_past_it_for_that_user_only(limited_gateway):
    store = limited_gateway.store
    eager = add_completion(store, "eager-1", user="eager")
    calm = add_completion(store, "calm-1", user="calm")
    bodies = [{"completion_id": eager, "rating": 1, "comment": str(i)} for i in range(CLIENTS)]
    responses = [r for client in asyncio.run(post_all(limited_gateway.url, [("eager", [b]) for b in bodies]))
                 for r in client]
    accepted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    assert len(accepted) == LIMIT and {r.status_code for r in refused} == {429}
    assert {r.json()["error"]["type"] for r in refused} == {"rate_limit_error"}
    with contextlib.closing(limited_gateway.db()) as db:
        assert db.execute("SELECT count(*) FROM feedback").fetchone()[0] == 1
        comment = db.execute("SELECT comment FROM feedback").fetchone()[0]
    assert comment in {r.json()["comment"] for r in accepted}

    r = httpx.post(limited_gateway.url + "/v1/feedback", json={"completion_id": calm, "rating": -1},
                   headers={"X-Loopchat-User": "calm"})
    assert r.status_code == 200, r.text
