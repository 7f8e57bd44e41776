"""The canary's decision rule on simulated evidence: it promotes a better candidate, rolls back a
worse one, and its wrong decisions stay within alpha although it is evaluated at every look.
(A fixed-sample interval evaluated at the same looks does not: the simulation can tell.)"""

from __future__ import annotations

import numpy as np
import pytest

from feedback.canary import Rule, anytime_halfwidth, decide

RULE = Rule(min_answers=100, min_votes=30, margin=0.05, alpha=0.05)
SHARE = 0.1
BASE_RATE = 0.6
LOOKS, RATED_PER_LOOK = 80, 500  # up to 40 000 rated answers, 4 000 of them the candidate's
RUNS = 300


def thumbs_evidence(up_c: int, n_c: int, up_b: int, n_b: int) -> dict:
    """Evidence shaped as feedback.canary.evidence makes it, thumbs only (no votes)."""
    rate_c, rate_b = (up_c / n_c if n_c else None), (up_b / n_b if n_b else None)
    diff = None if rate_c is None or rate_b is None else rate_c - rate_b
    return {"canary": {"rated": n_c, "up": up_c, "rate": rate_c},
            "baseline": {"rated": n_b, "up": up_b, "rate": rate_b},
            "difference": {"estimate": diff},
            "head_to_head": {"n": 0, "wins": 0, "losses": 0, "ties": 0, "win_rate": None}}


def votes_evidence(wins: int, losses: int, ties: int) -> dict:
    n = wins + losses + ties
    ev = thumbs_evidence(0, 0, 0, 0)
    ev["head_to_head"] = {"n": n, "wins": wins, "losses": losses, "ties": ties,
                          "win_rate": (wins + ties / 2) / n if n else None}
    return ev


def run_thumbs(candidate_rate: float, seed: int, rule=RULE, decide_fn=decide) -> list[str]:
    """Each run: looks after every RATED_PER_LOOK rated answers until the rule decides; its outcome."""
    rng = np.random.default_rng(seed)
    n_c = rng.binomial(RATED_PER_LOOK, SHARE, size=(RUNS, LOOKS)).cumsum(axis=1)
    n_b = np.arange(1, LOOKS + 1) * RATED_PER_LOOK - n_c
    up_c = rng.binomial(np.diff(n_c, prepend=0, axis=1), candidate_rate).cumsum(axis=1)
    up_b = rng.binomial(np.diff(n_b, prepend=0, axis=1), BASE_RATE).cumsum(axis=1)
    outcomes = []
    for run in range(RUNS):
        state = "waiting"
        for look in range(LOOKS):
            state = decide_fn(thumbs_evidence(int(up_c[run, look]), int(n_c[run, look]), int(up_b[run, look]),
                                              int(n_b[run, look])), rule)["state"]
            if state != "waiting":
                break
        outcomes.append(state)
    return outcomes


def rate(outcomes: list[str], state: str) -> float:
    return outcomes.count(state) / len(outcomes)


def test_a_better_candidate_is_promoted_and_never_rolled_back():
    outcomes = run_thumbs(0.68, seed=1)
    assert rate(outcomes, "promote") > 0.95 and rate(outcomes, "rollback") == 0


def test_a_much_worse_candidate_is_rolled_back_and_never_promoted():
    outcomes = run_thumbs(0.45, seed=2)
    assert rate(outcomes, "rollback") > 0.95 and rate(outcomes, "promote") == 0


def test_an_equal_candidate_is_rarely_rolled_back_and_mostly_promoted():
    """False rollback: the candidate is as good, the rule says it is worse."""
    outcomes = run_thumbs(BASE_RATE, seed=3)
    assert rate(outcomes, "rollback") <= RULE.alpha
    assert rate(outcomes, "promote") > 0.8


def test_a_candidate_worse_by_the_margin_is_rarely_promoted():
    """False promotion at the hardest point: exactly `margin` worse, where the rule is closest to
    promoting something it should not."""
    outcomes = run_thumbs(BASE_RATE - RULE.margin, seed=4)
    assert rate(outcomes, "promote") <= RULE.alpha / 2


def naive_decide(ev: dict, rule: Rule) -> dict:
    """The same rule with a fixed-sample 95% interval: wrong when evaluated again and again."""
    c, b = ev["canary"], ev["baseline"]
    if min(c["rated"], b["rated"]) < rule.min_answers:
        return {"state": "waiting"}
    diff = ev["difference"]["estimate"]
    se = (c["rate"] * (1 - c["rate"]) / c["rated"] + b["rate"] * (1 - b["rate"]) / b["rated"]) ** 0.5
    if diff - 1.96 * se > -rule.margin:
        return {"state": "promote"}
    return {"state": "rollback" if diff + 1.96 * se < 0 else "waiting"}


def test_the_simulation_catches_a_rule_that_peeks():
    outcomes = run_thumbs(BASE_RATE - RULE.margin, seed=4, decide_fn=naive_decide)
    assert rate(outcomes, "promote") > RULE.alpha / 2  # what the test above would catch


@pytest.mark.parametrize("win_rate,expected", [(0.62, "promote"), (0.38, "rollback")])
def test_head_to_head_votes_decide_alone(win_rate, expected):
    rng = np.random.default_rng(5)
    decided = []
    for _ in range(100):
        wins = losses = ties = 0
        state = "waiting"
        while state == "waiting" and wins + losses + ties < 3000:
            u = rng.random(20)
            ties += int((u < 0.1).sum())
            wins += int(((u >= 0.1) & (u < 0.1 + 0.9 * win_rate)).sum())
            losses += int((u >= 0.1 + 0.9 * win_rate).sum())
            state = decide(votes_evidence(wins, losses, ties), RULE)["state"]
        decided.append(state)
    opposite = {"promote": "rollback", "rollback": "promote"}[expected]
    assert decided.count(expected) >= 95 and opposite not in decided


def test_too_little_evidence_waits_and_says_what_is_missing():
    d = decide(thumbs_evidence(50, 60, 500, 600), RULE)
    assert d["state"] == "waiting" and "60 of 100" in d["reason"]
    assert d["metrics"]["thumbs_up_rate"]["ready"] is False and d["metrics"]["head_to_head"]["n"] == 0


def test_worse_on_votes_rolls_back_even_when_thumbs_say_not_worse():
    ev = thumbs_evidence(7000, 10000, 7000, 10000)
    assert decide(ev, RULE)["state"] == "promote"
    ev["head_to_head"] = votes_evidence(100, 400, 0)["head_to_head"]
    d = decide(ev, RULE)
    assert d["state"] == "rollback" and d["reason"].startswith("head_to_head worse")


def test_the_anytime_interval_is_wider_than_a_fixed_one_and_shrinks():
    fixed = 1.96 * 0.01 ** 0.5
    assert anytime_halfwidth(0.01, 0.05, 0.01) > fixed
    assert anytime_halfwidth(0.001, 0.05, 0.01) < anytime_halfwidth(0.01, 0.05, 0.01)
