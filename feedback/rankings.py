"""Votes on a comparison of K answers (labelled a, b, c, d) as rankings, and a ranking as its pairs.

A ranking is a list of groups of labels, best first; labels in one group are tied. Every vote
becomes one: `{"choice": "c"}` is c above all the others (tied among themselves), `tie` and
`both_bad`/`all_bad` put every answer in one group. This module is the one place that reads a
vote: the store validates with it, the datasets and the live win rates take its pairs.
"""

from __future__ import annotations

import json
from itertools import combinations

from feedback.errors import Invalid

LABELS = "abcd"
MIN_CANDIDATES, MAX_CANDIDATES = 2, len(LABELS)
TIE, ALL_BAD = "tie", "all_bad"
WORDS = (TIE, "both_bad", ALL_BAD)  # both_bad and all_bad are one verdict: stored as both_bad for two answers
RANKED = "ranked"  # the stored one-word choice of a ranking whose top group is not one answer

Ranking = list[list[str]]


def labels_for(k: int) -> list[str]:
    if not MIN_CANDIDATES <= k <= MAX_CANDIDATES:
        raise ValueError(f"a comparison has {MIN_CANDIDATES} to {MAX_CANDIDATES} candidates, not {k}")
    return list(LABELS[:k])


def check_form(choice: str | None, ranking: object) -> None:
    """What can be refused without knowing the comparison: exactly one of `choice` and `ranking`."""
    if choice is not None and ranking is not None:
        raise Invalid("Give either `choice` or `ranking`, not both.", "ranking")
    if choice is None and ranking is None:
        raise Invalid("Give `choice` (a label, tie, both_bad or all_bad) or `ranking` (groups of labels, best "
                      "first).", "choice")


def normalise(labels: list[str], choice: str | None = None, ranking: object = None) -> tuple[str, Ranking]:
    """(the one-word choice to store, the ranking) of a vote on candidates `labels`.

    Raises Invalid (param `choice` or `ranking`) for anything but a choice among this comparison's
    labels and words, or a ranking that names each of its labels exactly once."""
    check_form(choice, ranking)
    if choice is not None:
        if choice in labels:
            return choice, [[choice], [x for x in labels if x != choice]]
        if choice in WORDS:
            word = TIE if choice == TIE else ("both_bad" if len(labels) == 2 else ALL_BAD)
            return word, [list(labels)]
        raise Invalid(f"choice must be one of {', '.join(labels + list(WORDS))}", "choice")
    groups = _checked(labels, ranking)
    if len(groups) == 1:
        return TIE, groups
    return (groups[0][0] if len(groups[0]) == 1 else RANKED), groups


def stored(labels: list[str], choice: str, ranking_json: str | None) -> Ranking:
    """A stored vote's ranking: its `ranking` column, or, for a two-answer vote from before rankings
    were stored, the one its choice means."""
    return json.loads(ranking_json) if ranking_json else normalise(labels, choice)[1]


def _checked(labels: list[str], ranking: object) -> Ranking:
    allowed = ", ".join(labels)
    if not isinstance(ranking, list) or not ranking or not all(isinstance(g, list) and g for g in ranking):
        raise Invalid(f"ranking must be a list of non-empty groups of labels, best first, e.g. [[\"a\"], "
                      f"[\"b\", \"c\"]]; this comparison's labels are {allowed}", "ranking")
    named = [x for group in ranking for x in group]
    unknown = sorted({str(x) for x in named if x not in labels})
    if unknown:
        raise Invalid(f"ranking names {', '.join(unknown)}: this comparison's labels are {allowed}", "ranking")
    twice = sorted({x for x in named if named.count(x) > 1})
    if twice:
        raise Invalid(f"ranking names {', '.join(twice)} more than once", "ranking")
    missing = [x for x in labels if x not in named]
    if missing:
        raise Invalid(f"ranking leaves out {', '.join(missing)}: rank every answer (ties share a group)", "ranking")
    return [sorted(group) for group in ranking]


def pairs(ranking: Ranking) -> list[tuple[str, str, int]]:
    """(better, worse, rank gap) for every two labels in different groups: C(K, 2) minus the ties.
    The gap is how many groups apart they are (1 for neighbours)."""
    return [(better, worse, j - i)
            for (i, upper), (j, lower) in combinations(enumerate(ranking), 2)
            for better in upper for worse in lower]


def best(ranking: Ranking) -> str | None:
    """The label ranked above all the others, when one is (the demonstration to imitate)."""
    return ranking[0][0] if len(ranking) > 1 and len(ranking[0]) == 1 else None


def group_of(ranking: Ranking) -> dict[str, int]:
    """Each label's group index (0 = best)."""
    return {x: i for i, group in enumerate(ranking) for x in group}
