"""Built-in simulated users for `loopchat simulate`: each a preference over two answers.

A preference is any function `(prompt: str, a: str, b: str) -> "a" | "b" | "tie" | "both_bad"`.
It may carry (as attributes) or its module may define (as module-level functions):

- `score(prompt, answer) -> float`: how much this user likes one answer (thumbs use a threshold);
- `correct(prompt, answer) -> str | None`: the better answer this user would write, or None.

The built-ins score answers in [0, 1] (thumbs up from 0.5) and derive the pairwise choice from
the scores, so the two kinds of feedback always agree. Use one with `--preference concise`
(or `loopchat.preferences:concise`); write your own in any importable module.
"""

from __future__ import annotations

import re
from typing import Callable

Score = Callable[[str, str], float]
Correct = Callable[[str, str], "str | None"]

_ENDS = (".", "!", "?", "\"", "'", ")", "`", "*")
_SENTENCE = re.compile(r"^(.*?[.!?])(?:\s|$)", re.S)
_LIST_LINE = re.compile(r"^\s*(?:[-*+\u2022]|\d+[.)])\s+")
_POLITE = re.compile(r"\b(thanks|thank you|please|glad|happy to help|you're welcome|my pleasure|kindly)\b", re.I)


def ends_properly(text: str) -> bool:
    """The answer finished a sentence (a truncated one usually stops mid-word)."""
    text = text.rstrip()
    return bool(text) and text.endswith(_ENDS)


def words(text: str) -> int:
    return len(text.split())


def choose(score: Score, prompt: str, a: str, b: str, margin: float = 0.02, floor: float = 0.0) -> str:
    """The pairwise choice that `score` implies: the higher one, a tie within `margin`,
    both_bad when neither reaches `floor`."""
    sa, sb = score(prompt, a), score(prompt, b)
    if max(sa, sb) < floor:
        return "both_bad"
    if abs(sa - sb) <= margin:
        return "tie"
    return "a" if sa > sb else "b"


def preference(score: Score, correct: Correct | None = None, margin: float = 0.02, floor: float = 0.0):
    """A preference function built from a score (and an optional correction), carrying both."""
    def prefer(prompt: str, a: str, b: str) -> str:
        return choose(score, prompt, a, b, margin, floor)

    prefer.score, prefer.correct = score, correct
    return prefer


def first_sentence(text: str) -> str | None:
    """The first whole sentence of `text`, or its first dozen words closed with a full stop."""
    text = " ".join(text.split())
    if not text:
        return None
    m = _SENTENCE.match(text)
    if m and words(m.group(1)) >= 2:
        return m.group(1)
    head = " ".join(text.split()[:12]).rstrip(",;:-")
    return head + "." if not head.endswith(_ENDS) else head


# ---- concise: short answers that still end properly ------------------------------------------
def concise_score(prompt: str, answer: str) -> float:
    brevity = max(0.0, 1.0 - words(answer) / 60)
    return (0.5 if ends_properly(answer) else 0.0) + 0.5 * brevity


def concise_correct(prompt: str, answer: str) -> str | None:
    better = first_sentence(answer)
    return better if better and better.strip() != answer.strip() else None


concise = preference(concise_score, concise_correct)


# ---- polite: thanks, please, glad to help ----------------------------------------------------
def polite_score(prompt: str, answer: str) -> float:
    hits = len(_POLITE.findall(answer))
    return min(1.0, 0.6 * hits) if hits else 0.1 * ends_properly(answer)


def polite_correct(prompt: str, answer: str) -> str | None:
    if _POLITE.search(answer):
        return None
    body = first_sentence(answer) or "I hope this helps."
    return f"Thank you for asking! {body} I'm glad to help, please ask if you need more."


polite = preference(polite_score, polite_correct)


# ---- no_lists: prose, not bullet points ------------------------------------------------------
def no_lists_score(prompt: str, answer: str) -> float:
    lines = [line for line in answer.splitlines() if line.strip()]
    if not lines:
        return 0.0
    listed = sum(bool(_LIST_LINE.match(line)) for line in lines)
    prose = 1.0 - listed / len(lines)
    return 0.8 * prose + 0.2 * ends_properly(answer)


def no_lists_correct(prompt: str, answer: str) -> str | None:
    lines = [line.strip() for line in answer.splitlines() if line.strip()]
    if not any(_LIST_LINE.match(line) for line in lines):
        return None
    parts = [_LIST_LINE.sub("", line).rstrip(".;:,") for line in lines]
    text = "; ".join(p for p in parts if p)
    return text + "." if text else None


no_lists = preference(no_lists_score, no_lists_correct)

BUILTINS = {"concise": concise, "polite": polite, "no_lists": no_lists}
