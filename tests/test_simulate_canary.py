"""`loopchat simulate canary`: many simulated users drive a canary on the real gateway app (real routes,
store and decision rule; the in-process fake engine) until its rule, or an operator, decides it."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from click.testing import CliRunner
from conftest import InProcessGateway, wait_for
from fake_engine import answer

from feedback.canary import Rule
from loopchat import preferences
from loopchat.cli import cli
from loopchat.simulate_canary import CanarySettings, drive

PROMPTS = ["What is the capital of France?", "Why is the sky blue?", "How do I boil an egg?",
           "Name a fruit that is yellow.", "What is 2 plus 2?", "Give me a tip for sleeping better.",
           "What do bees make?", "How many legs does a cat have?"]
CANARY = "policy-v1"  # the first version a fresh gateway publishes
CANARY_ANSWERS = {answer(CANARY, [{"role": "user", "content": p}]) for p in PROMPTS}

# Simulated users' tastes (loaded by name, as `--preference test_simulate_canary:likes_canary`).
likes_canary = preferences.preference(lambda prompt, text: float(text in CANARY_ANSWERS))
hates_canary = preferences.preference(lambda prompt, text: float(text not in CANARY_ANSWERS))


def indifferent(prompt: str, a: str, b: str) -> str:
    """Pairwise only (no score): thumbs come from comparing with the base model's answer."""
    return "tie"


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def gateway(tmp_path, rule: Rule) -> InProcessGateway:
    gw = InProcessGateway(tmp_path / "gw", canary_rule=rule, decide_interval_s=0.05, follow_interval_s=0.05).start()
    assert gw.publish_adapter() == "v1"
    return gw


def served_by_user(gw: InProcessGateway) -> dict[str, set[str]]:
    with gw.db() as db:
        rows = db.execute("SELECT user, served_by FROM completions WHERE source = 'chat'").fetchall()
    out = {}
    for user, served_by in rows:
        out.setdefault(user, set()).add(served_by)
    return out


def test_the_command_drives_a_better_canary_to_promotion(tmp_path, prompts):
    gw = gateway(tmp_path, Rule(min_answers=15, min_votes=8))
    try:
        out = tmp_path / "out"
        result = CliRunner().invoke(cli, ["simulate", "canary", "--gateway", gw.url, "--version", "v1", "--share",
                                          "0.5", "--prompts", str(prompts), "--preference",
                                          "test_simulate_canary:likes_canary", "--users", "24", "--concurrency", "4",
                                          "--timeout", "120", "--out", str(out)])
        assert result.exit_code == 0, result.output
        report = json.loads((out / "canary.json").read_text())
        assert report["decision"] == "promoted" and report["ended_by"] == "auto" and "promoted" in result.stdout
        assert report["canary"]["outcome"] == "promoted" and report["canary"]["ended_at"] is not None
        counted = report["counted"]  # what the gateway's rule had when it decided: at least one metric's minimum
        assert counted["votes"] >= 8 or min(counted["canary_rated"], counted["baseline_rated"]) >= 15, counted
        assert "not worse" in counted["reason"] and "rule:" in result.stdout
        assert httpx.get(gw.url + "/admin/adapters").json()["serving"] == "v1"
        arms = report["arms"]
        assert arms["canary"]["answers"] > 0 and arms["baseline"]["answers"] > 0
        # The taste is the canary's: its answers get thumbs up, the base model's down (noise aside).
        assert arms["canary"]["up"] > arms["canary"]["down"] and arms["baseline"]["down"] > arms["baseline"]["up"]
        # Many distinct users, each kept on one arm for the canary's life (the gateway's sticky assignment).
        by_user = served_by_user(gw)
        assert len(by_user) > 10
        with gw.db() as db:
            ended_at = db.execute("SELECT ended_at FROM canaries").fetchone()[0]
            during = db.execute("SELECT user, count(DISTINCT served_by) FROM completions WHERE source = 'chat' "
                                "AND created_at < ? GROUP BY user", [ended_at]).fetchall()
        assert during and all(n == 1 for _, n in during)
        assert {s for sources in by_user.values() for s in sources} >= {CANARY, "base-model"}
    finally:
        gw.stop()


def test_a_worse_canary_is_rolled_back(tmp_path, prompts):
    gw = gateway(tmp_path, Rule(min_answers=15, min_votes=8))
    try:
        report = drive(CanarySettings(gateway=gw.url, version="v1", share=0.5, prompts=prompts,
                                      preference="test_simulate_canary:hates_canary", users=24, concurrency=4,
                                      rank_k=3, poll_s=0.05, timeout=120), log=lambda line: None)
        assert report["decision"] == "rolled_back" and report["ended_by"] == "auto"
        assert report["votes"] > 0 and report["arms"]["canary"]["answers"] > 0
        assert httpx.get(gw.url + "/admin/adapters").json()["serving"] is None
        with gw.db() as db:  # the votes ranked three answers, the canary's and the serving one's among them
            sizes = {r[0] for r in db.execute("SELECT count(*) FROM candidates GROUP BY comparison_id")}
        assert sizes == {3}
    finally:
        gw.stop()


def test_the_driver_stops_when_an_operator_ends_the_canary(tmp_path, prompts):
    gw = gateway(tmp_path, Rule(min_answers=100_000, min_votes=100_000))  # the rule never decides
    reports = []
    try:
        settings = CanarySettings(gateway=gw.url, version="v1", share=0.5, prompts=prompts, preference=
                                  "test_simulate_canary:indifferent", users=12, concurrency=3, poll_s=0.05,
                                  timeout=120)
        driver = threading.Thread(target=lambda: reports.append(drive(settings, log=lambda line: None)))
        driver.start()

        def rated() -> int:
            with gw.db() as db:
                return db.execute("SELECT count(*) FROM feedback").fetchone()[0]
        wait_for(lambda: rated() >= 10, 60, "simulated users to rate ten answers")
        assert driver.is_alive()  # still going: nothing decided yet
        r = httpx.post(gw.url + "/admin/canary/rollback", timeout=30)
        assert r.status_code == 200, r.text
        driver.join(60)
        assert not driver.is_alive()
        report = reports[0]
        assert report["decision"] == "rolled_back" and report["ended_by"] == "local"
        assert report["canary"]["evidence"] is not None
        # Thumbs came from comparing with the base model's answer, asked without storing it: every stored
        # chat answer is one the users were served through the alias.
        with gw.db() as db:
            models = {r[0] for r in db.execute("SELECT model FROM completions WHERE source = 'chat'")}
        assert models == {"loopchat"}
    finally:
        gw.stop()  # a driver left running fails on its next request and ends
