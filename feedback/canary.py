"""Canary rollouts: a published version answers a share of users beside the serving one (the
baseline) until live evidence, or an operator, ends it. This module is the store's side (start,
share, end, what every gateway follows) and the decision rule, plain statistics on stored evidence.

Assignment is sticky: a user's bucket is a hash of (canary id, user) in [0, 1), and the user gets
the canary while bucket < share. Raising the share keeps every user already on the canary there.

At most one canary runs at a time (a partial unique index); ending one is a single UPDATE that
matches only while it still runs, so of several gateways deciding at once exactly one ends it,
and its promotion is written in the same transaction.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, fields
from math import log, sqrt

from feedback import cycles
from feedback.errors import FeedbackError, Invalid, NotFound
from feedback.store import Store
from feedback.winrates import head_to_head, mean_interval

OUTCOMES = ("promoted", "rolled_back")
STATES = ("waiting", "promote", "rollback")
AUTO = "auto"  # `ended_by` of a canary the decision rule ended


class Conflict(FeedbackError):
    """The request contradicts what runs now; `code` says how (canary_running, canary_of_serving,
    no_canary)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Rule:
    """When the evidence decides. `margin` is how much worse the candidate may be and still be
    promoted (non-inferiority), in points of thumbs-up rate and of head-to-head win rate below one
    half; `alpha` bounds the chance of a wrong decision (see `decide`); `auto` ends the canary as
    soon as the rule decides, else an operator confirms. Stored with each canary, so every gateway
    judges it by the same rule."""

    min_answers: int = 100  # rated answers per version before thumbs count
    min_votes: int = 30  # head-to-head votes before they count
    margin: float = 0.05
    alpha: float = 0.05
    auto: bool = True

    def __post_init__(self):
        if self.min_answers < 1 or self.min_votes < 1:
            raise ValueError("min_answers and min_votes must be at least 1")
        if not 0 <= self.margin < 0.5:
            raise ValueError("margin must be in [0, 0.5)")
        if not 0 < self.alpha < 1:
            raise ValueError("alpha must be in (0, 1)")

    @classmethod
    def from_dict(cls, d: dict) -> "Rule":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


# ---- the store ----------------------------------------------------------------------------
def bucket(canary_id: int, user: str) -> float:
    """The user's place in [0, 1) for this canary; on the canary while it is below the share."""
    digest = hashlib.sha256(f"{canary_id}:{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def running(store: Store) -> dict | None:
    rows = store.rows("SELECT * FROM canaries WHERE ended_at IS NULL")
    return _decode(rows[0]) if rows else None


def get(store: Store, canary_id: int) -> dict | None:
    rows = store.rows("SELECT * FROM canaries WHERE id = ?", [canary_id])
    return _decode(rows[0]) if rows else None


def recent(store: Store, limit: int = 10) -> list[dict]:
    """Ended canaries, newest first."""
    return [_decode(r) for r in store.rows("SELECT * FROM canaries WHERE ended_at IS NOT NULL ORDER BY id DESC "
                                           "LIMIT ?", [limit])]


def _decode(row: dict) -> dict:
    row = dict(row)
    row["rule"] = json.loads(row["rule"]) if row["rule"] else None
    row["evidence"] = json.loads(row["evidence"]) if row["evidence"] else None
    return row


def check_share(share: float) -> None:
    if not 0 < share < 1:
        raise Invalid(f"share must be strictly between 0 and 1 (a fraction of users), not {share}", "share")


def check_start(store: Store, version: str, share: float) -> None:
    """What `start` refuses, checked without writing: NotFound (no such version), Invalid (share),
    Conflict (it serves already, or a canary runs)."""
    check_share(share)
    if not store.rows("SELECT 1 FROM adapters WHERE version = ?", [version]):
        raise NotFound(f"No adapter version `{version}`.", "version")
    serving, _ = cycles.serving_version(store)
    if version == serving:
        raise Conflict(f"{version} is the serving version already; a canary tries another version beside it.",
                       "canary_of_serving")
    other = running(store)
    if other is not None:
        raise Conflict(f"A canary of {other['version']} is running; promote or roll it back first.",
                       "canary_running")


def start(store: Store, version: str, share: float, by_user: str, rule: Rule) -> dict:
    """Put `version` on canary for `share` of users beside the serving version; refuses as
    `check_start` does, and writes nothing then."""
    now = time.time()
    with store.transaction() as db:  # a write lock from the start: no other canary can begin meanwhile
        check_start(store, version, share)
        serving, _ = cycles.serving_version(store)
        canary_id = db["canaries"].insert({
            "version": version, "baseline": serving, "share": share, "started_at": now, "updated_at": now,
            "by_user": by_user, "rule": json.dumps(asdict(rule))}).last_pk
    return get(store, canary_id)


def set_share(store: Store, share: float) -> dict:
    """Change the running canary's share. Raises Invalid or Conflict (none runs)."""
    check_share(share)
    with store.transaction() as db:
        cur = db.execute("UPDATE canaries SET share = ?, updated_at = ? WHERE ended_at IS NULL", [share, time.time()])
        if cur.rowcount == 0:
            raise Conflict("No canary is running.", "no_canary")
    return running(store)


def end(store: Store, canary_id: int, outcome: str, ended_by: str, evidence: dict | None = None) -> dict | None:
    """End the canary if it still runs: `promoted` also makes its version the serving one, in the
    same transaction. None when it had ended already (another gateway or operator was first)."""
    assert outcome in OUTCOMES, outcome
    with store.transaction() as db:
        cur = db.execute("UPDATE canaries SET ended_at = ?, updated_at = ?, outcome = ?, ended_by = ?, evidence = ? "
                         "WHERE id = ? AND ended_at IS NULL",
                         [time.time(), time.time(), outcome, ended_by, json.dumps(evidence), canary_id])
        if cur.rowcount == 0:
            return None
        if outcome == "promoted":
            version = db.execute("SELECT version FROM canaries WHERE id = ?", [canary_id]).fetchone()[0]
            cycles.record_promotion(store, version, "promote", ended_by)
    return get(store, canary_id)


def move_alias(store: Store, version: str | None, action: str, by_user: str) -> None:
    """Record a promotion or rollback of the alias, unless a canary runs (Conflict): its baseline
    would change under it. A canary ends through `end`."""
    with store.transaction():
        other = running(store)
        if other is not None:
            raise Conflict(f"A canary of {other['version']} is running; promote or roll it back first.",
                           "canary_running")
        cycles.record_promotion(store, version, action, by_user)


def stamp(store: Store) -> tuple:
    """Changes whenever what gateways route by changes (a promotion, a canary started, re-shared or
    ended): the cheap query each gateway polls."""
    return tuple(store.db.execute(
        "SELECT (SELECT max(id) FROM promotions), (SELECT id FROM canaries WHERE ended_at IS NULL), "
        "(SELECT updated_at FROM canaries WHERE ended_at IS NULL)").fetchone())


def alias_state(store: Store) -> dict:
    """What every gateway serves: {"stamp", "serving", "previous", "canary"} (versions; None = the base
    model; `previous` is the rollback target, kept loaded for instant rollback and comparisons;
    `canary` the running canary's row or None). The stamp is read first: a change made while the
    rest is read shows as a new stamp at the next poll."""
    state = {"stamp": stamp(store)}
    state["serving"], _ = cycles.serving_version(store)
    return {**state, "previous": cycles.rollback_target(store), "canary": running(store)}


def needed_versions(state: dict) -> set[str]:
    """The versions of an alias_state that no gateway may unload."""
    return {v for v in (state["serving"], state["previous"], (state["canary"] or {}).get("version")) if v}


# ---- evidence -----------------------------------------------------------------------------
def served_name(version: str | None, base_model: str) -> str:
    """What `completions.served_by` says for answers of `version` (None: the base model)."""
    return base_model if version is None else cycles.engine_name(version)


def evidence(store: Store, canary: dict, base_model: str) -> dict:
    """The live evidence for both versions over the canary's window (start to end, or now):

    {"since", "until",
     "canary"|"baseline": {"version", "served_by", "answers", "rated", "up", "rate", "ci95"},
     "difference": {"estimate", "ci95"},   # canary rate - baseline rate
     "head_to_head": winrates.head_to_head(canary, baseline) over the window}

    `answers` are answers to the `loopchat` alias (chat, stored); `rated` those that got a thumb
    (one per answer: only its user may rate it); `rate` the thumbs-up share of the rated ones.
    Intervals are plain 95% intervals for the figures as they stand (the dashboard's); the decision
    rule uses its own anytime-valid ones."""
    since, until = canary["started_at"], canary["ended_at"] or time.time()
    out = {"since": since, "until": until}
    for arm, version in (("canary", canary["version"]), ("baseline", canary["baseline"])):
        name = served_name(version, base_model)
        row = store.rows("""SELECT count(*) AS answers, count(f.id) AS rated, coalesce(sum(f.rating > 0), 0) AS up
                            FROM completions c LEFT JOIN feedback f ON f.completion_id = c.id
                            WHERE c.created_at >= ? AND c.created_at < ? AND c.model = 'loopchat'
                              AND c.source = 'chat' AND c.served_by = ?""", [since, until, name])[0]
        rate, half = mean_interval([1.0] * row["up"] + [0.0] * (row["rated"] - row["up"]))
        out[arm] = {"version": version, "served_by": name, **row, "rate": rate, "ci95": _interval(rate, half)}
    c, b = out["canary"], out["baseline"]
    diff = None if c["rate"] is None or b["rate"] is None else c["rate"] - b["rate"]
    se = sqrt(_var_rate(c) / c["rated"] + _var_rate(b) / b["rated"]) if diff is not None else None
    out["difference"] = {"estimate": diff, "ci95": None if diff is None else [diff - 1.96 * se, diff + 1.96 * se]}
    out["head_to_head"] = head_to_head(store, c["served_by"], b["served_by"], since, until)
    return out


def _interval(value: float | None, half: float | None) -> list[float] | None:
    return None if value is None or half is None else [max(0.0, value - half), min(1.0, value + half)]


def _var_rate(arm: dict) -> float:
    """Variance of one rated answer, smoothed (one pseudo up and one down) so that 0 or 1 of n
    is not mistaken for certainty."""
    p = (arm["up"] + 1) / (arm["rated"] + 2)
    return p * (1 - p)


# ---- the decision rule --------------------------------------------------------------------
def anytime_halfwidth(variance: float, alpha: float, target_variance: float) -> float:
    """Half-width of a two-sided (1 - alpha) confidence sequence for an estimate whose variance is
    `variance` now: Robbins' normal-mixture boundary on the running sum in information time
    I = 1/variance, |S_I| <= sqrt((I + r) (log((I + r) / r) + 2 log(1/alpha))), divided by I.

    Why this one: it holds at every look at once (Ville's inequality on the mixture martingale), so
    the gateways may re-evaluate the rule whenever they like, as often as they like, with no
    schedule of looks to keep and no alpha to spend; its cost is a width about 1.5-2x a fixed-
    sample interval. With estimated variances it is the asymptotic confidence sequence of
    Waudby-Smith et al. ("Time-uniform central limit theory", 2021); the minimum sample keeps the
    looks where that approximation holds, and tests/test_canary_rule.py checks the error rates by
    simulation. `r` puts the boundary's tightest point at `target_variance`."""
    info, target = 1.0 / variance, 1.0 / target_variance
    ell = 2 * log(1 / alpha)
    r = target / (ell + log(1 + ell))
    return sqrt((info + r) * (log((info + r) / r) + ell)) / info


def _verdict(name: str, estimate: float, variance: float, target_variance: float, n: int, needed: int,
             rule: Rule, alpha: float) -> dict:
    """One metric: `estimate` is the candidate's advantage (0 = as good as the baseline)."""
    out = {"metric": name, "n": n, "needed": needed, "ready": n >= needed, "estimate": estimate,
           "lower": None, "upper": None, "verdict": "too_few"}
    if not out["ready"]:
        return out
    half = anytime_halfwidth(variance, alpha, target_variance)
    out.update(lower=estimate - half, upper=estimate + half)
    if out["lower"] > -rule.margin:
        out["verdict"] = "not_worse"
    elif out["upper"] < 0:
        out["verdict"] = "worse"
    else:
        out["verdict"] = "unsure"
    return out


def decide(ev: dict, rule: Rule) -> dict:
    """The sequential test: {"state": waiting|promote|rollback, "reason", "alpha", "margin", "metrics"}.

    Two metrics, each with an anytime-valid interval at alpha/2 (so both together hold at alpha):
    the thumbs-up rate difference (candidate - baseline; ready once each version has
    `min_answers` rated answers) and the head-to-head win rate minus one half (ready after
    `min_votes` votes). A ready metric is `not_worse` when its interval lies above -margin, `worse`
    when it lies below 0 (and not above -margin), else `unsure`.
    Rollback when any ready metric is worse; promote when at least one is ready and every ready
    one is not worse; else wait. Hence P(rollback | the candidate is at least as good on both) <=
    alpha, and P(promote | it is worse by more than the margin on a metric that is ready) <= alpha/2,
    however often the rule is evaluated."""
    a = rule.alpha / 2
    thumbs_c, thumbs_b = ev["canary"], ev["baseline"]
    rated = min(thumbs_c["rated"], thumbs_b["rated"])
    thumbs = _verdict("thumbs_up_rate", ev["difference"]["estimate"] or 0.0,
                      _var_rate(thumbs_c) / max(thumbs_c["rated"], 1) + _var_rate(thumbs_b) / max(thumbs_b["rated"], 1),
                      0.5 / rule.min_answers, rated, rule.min_answers, rule, a)
    h2h = ev["head_to_head"]
    duel = _verdict("head_to_head", (h2h["win_rate"] - 0.5) if h2h["n"] else 0.0, _var_votes(h2h) / max(h2h["n"], 1),
                    0.25 / rule.min_votes, h2h["n"], rule.min_votes, rule, a)
    metrics = [thumbs, duel]
    ready = [m for m in metrics if m["ready"]]
    worse = [m for m in ready if m["verdict"] == "worse"]
    if worse:
        state, reason = "rollback", "; ".join(_say(m, "worse than the baseline") for m in worse)
    elif ready and all(m["verdict"] == "not_worse" for m in ready):
        state, reason = "promote", "; ".join(_say(m, f"not worse than the baseline by more than {rule.margin:g}")
                                             for m in ready)
    else:
        state = "waiting"
        reason = "; ".join(_say(m, "undecided") if m["ready"] else
                           f"{m['metric']}: {m['n']} of {m['needed']} needed" for m in metrics)
    return {"state": state, "reason": reason, "alpha": rule.alpha, "margin": rule.margin,
            "metrics": {m["metric"]: m for m in metrics}}


def _var_votes(h2h: dict) -> float:
    """Variance of one vote's score (win 1, tie 0.5, loss 0), smoothed by one pseudo win and loss."""
    n = h2h["n"] + 2
    w = (h2h["wins"] + 1 + h2h["ties"] / 2) / n
    return ((h2h["wins"] + 1) * (1 - w) ** 2 + (h2h["losses"] + 1) * w ** 2 + h2h["ties"] * (0.5 - w) ** 2) / n


def _say(m: dict, what: str) -> str:
    return (f"{m['metric']} {what} (advantage {m['estimate']:+.3f}, anytime interval "
            f"[{m['lower']:+.3f}, {m['upper']:+.3f}], n={m['n']})")
