"""Feedback counts for the operator: by kind and (UTC) day, and what each source yields for training."""

from __future__ import annotations

from feedback.datasets import dataset_yields
from feedback.store import Store

KINDS = ("thumbs_up", "thumbs_down", "correction", "comparison", "vote")

_BY_DAY = """
    SELECT date(created_at, 'unixepoch') AS day,
           CASE WHEN rating > 0 THEN 'thumbs_up' ELSE 'thumbs_down' END AS kind, count(*) AS n
    FROM feedback GROUP BY day, kind
    UNION ALL SELECT date(created_at, 'unixepoch'), 'correction', count(*) FROM corrections GROUP BY 1
    UNION ALL SELECT date(created_at, 'unixepoch'), 'comparison', count(*) FROM comparisons GROUP BY 1
    UNION ALL SELECT date(created_at, 'unixepoch'), 'vote', count(*) FROM votes GROUP BY 1"""


def feedback_stats(store: Store) -> dict:
    """{"kinds": [...], "data": [{"day": "YYYY-MM-DD", "kind", "count"}, ...] (oldest day first, one row
    per day and kind that has any; the dashboard plots it as is), "totals": {kind: n},
    "yields": {"pairs"|"unpaired"|"sft": {source: n}}}. A re-vote replaces the earlier one, so
    it counts once, on the day of the latest vote."""
    data = [{"day": r["day"], "kind": r["kind"], "count": r["n"]} for r in store.rows(_BY_DAY)]
    data.sort(key=lambda r: (r["day"], KINDS.index(r["kind"])))
    totals = {kind: sum(r["count"] for r in data if r["kind"] == kind) for kind in KINDS}
    return {"object": "feedback.stats", "kinds": list(KINDS), "data": data, "totals": totals,
            "yields": dataset_yields(store)}
