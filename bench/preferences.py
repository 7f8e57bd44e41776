"""A preference that is not one of loopchat's built-ins, for checking that the loop learns
preferences in general (bench/RESULTS.md): `--preference bench.preferences:plain_words`.

Pairwise only: no score and no corrections, so thumbs come from judging two answers against
each other and the loop has nothing but the users' choices to learn from.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[A-Za-z]+")


def mean_word_length(text: str) -> float | None:
    words = _WORD.findall(text)
    return sum(map(len, words)) / len(words) if words else None


def plain_words(prompt: str, a: str, b: str) -> str:
    """The answer in plainer words (shorter on average) is better; within 0.15 letters it is a tie."""
    la, lb = mean_word_length(a), mean_word_length(b)
    if la is None and lb is None:
        return "both_bad"
    if la is None or lb is None:
        return "a" if lb is None else "b"
    if abs(la - lb) <= 0.15:
        return "tie"
    return "a" if la < lb else "b"
