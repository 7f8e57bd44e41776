"""Head-to-head win rates between two versions from what users voted, and the one interval for them.

A version is what answered (`completions.served_by`): an engine name such as `policy-v3`, or the
base model's name. Every vote on a comparison that has answers of both versions is one
observation: its score is the share of (version, opponent) answer pairs in it that the ranking
puts version's answer above (a tie, both_bad and all_bad count half). With one answer of each,
the common case, a score is 1, 0.5 or 0. The rate is the mean score with a normal 95% interval
(`mean_interval`), the same statistic `loopchat simulate` prints for its offline judge.
"""

from __future__ import annotations

from itertools import groupby
from math import sqrt

from feedback import cycles, rankings
from feedback.store import Store

Z95 = 1.96


def mean_interval(scores: list[float]) -> tuple[float | None, float | None]:
    """(mean, half-width of its 95% interval: 1.96 * sample sd / sqrt(n)); None where n is too small."""
    n = len(scores)
    if not n:
        return None, None
    mean = sum(scores) / n
    if n < 2:
        return mean, None
    sd = sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1))
    return mean, Z95 * sd / sqrt(n)


def vote_scores(store: Store, version: str, opponent: str, since: float | None = None,
                until: float | None = None) -> list[float]:
    """One score per vote between answers of `version` and `opponent` cast in [since, until), oldest first."""
    rows = store.rows("""SELECT v.comparison_id, v.choice, v.ranking, k.label, c.served_by
                         FROM votes v JOIN candidates k ON k.comparison_id = v.comparison_id
                         JOIN completions c ON c.id = k.completion_id
                         WHERE v.created_at >= ? AND v.created_at < ?
                           AND v.comparison_id IN (SELECT k2.comparison_id FROM candidates k2
                                                   JOIN completions c2 ON c2.id = k2.completion_id
                                                   WHERE c2.served_by = ?)
                         ORDER BY v.created_at, v.comparison_id, k.position""",
                      [since if since is not None else float("-inf"), until if until is not None else float("inf"),
                       version])
    scores = []
    for _, group in groupby(rows, key=lambda r: r["comparison_id"]):
        group = list(group)
        mine = [r["label"] for r in group if r["served_by"] == version]
        theirs = [r["label"] for r in group if r["served_by"] == opponent]
        if not theirs:
            continue
        first = group[0]
        rank = rankings.group_of(rankings.stored([r["label"] for r in group], first["choice"], first["ranking"]))
        points = [1.0 if rank[m] < rank[t] else 0.0 if rank[m] > rank[t] else 0.5 for m in mine for t in theirs]
        scores.append(sum(points) / len(points))
    return scores


def head_to_head(store: Store, version: str, opponent: str, since: float | None = None,
                 until: float | None = None) -> dict:
    """{"version", "opponent", "wins", "losses", "ties", "n", "win_rate", "ci95": [lo, hi]} from the votes
    cast in [since, until) (Unix times; None: unbounded). A vote is a win when its score is above
    one half, a loss below, a tie at it. win_rate and ci95 are None without votes; ci95 needs two
    and is clipped to [0, 1]."""
    scores = vote_scores(store, version, opponent, since, until)
    rate, half = mean_interval(scores)
    return {"version": version, "opponent": opponent, "wins": sum(s > 0.5 for s in scores),
            "losses": sum(s < 0.5 for s in scores), "ties": sum(s == 0.5 for s in scores), "n": len(scores),
            "win_rate": rate, "ci95": None if half is None else [max(0.0, rate - half), min(1.0, rate + half)]}


def live_win_rates(store: Store, base_model: str) -> list[dict]:
    """Each published version, oldest first, against its predecessor: the version it was trained from
    (`adapters.parent`, its number), or the base model (`base_model`, its served name) when it has
    none. Each row is head_to_head's with `adapter` (the version, e.g. "v3") added."""
    out = []
    for row in cycles.list_adapters(store):
        parent = row["parent"]  # the parent's number, as the manifest's parent_version
        opponent = base_model if parent is None else cycles.engine_name(f"v{parent}")
        out.append({"adapter": row["version"], **head_to_head(store, cycles.engine_name(row["version"]), opponent)})
    return out
