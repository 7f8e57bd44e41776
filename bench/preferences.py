"""Preferences that are not loopchat's built-ins, for checking that the loop learns preferences
in general (bench/RESULTS.md): `--preference bench.preferences:plain_words`, `:long_words`, `:gives_examples`,
`:gives_figures`, `:uses_lists` or `:on_topic`.

Pairwise only: no score and no corrections, so thumbs come from judging two answers against
each other and the loop has nothing but the users' choices to learn from.
"""

from __future__ import annotations

import re

_WORD = re.compile(r"[A-Za-z]+")
_FIGURE = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*%?")
_LIST_MARKER = re.compile(r"^\s*\d+[.)]\s", re.M)  # "1. " numbering a list is no figure
_LIST_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+\S", re.M)
_EXAMPLE = re.compile(r"\b(?:for example|for instance|such as|including|e\.g\.)(?!\w)", re.I)
_FUNCTION_WORDS = frozenset("""about also been being could does doing each from have having into just more most much
must only other over should some such than that their them then there these they this those very what when where which
while will with would your yours""".split())


def mean_word_length(text: str) -> float | None:
    words = _WORD.findall(text)
    return sum(map(len, words)) / len(words) if words else None


def _by_word_length(a: str, b: str, shorter_wins: bool) -> str:
    """The answer whose words are shorter (or longer) on average is better; within 0.15 letters it is a
    tie; an answer without words loses."""
    la, lb = mean_word_length(a), mean_word_length(b)
    if la is None and lb is None:
        return "both_bad"
    if la is None or lb is None:
        return "a" if lb is None else "b"
    if abs(la - lb) <= 0.15:
        return "tie"
    return "a" if (la < lb) == shorter_wins else "b"


def plain_words(prompt: str, a: str, b: str) -> str:
    """The answer in plainer words (shorter on average) is better; within 0.15 letters it is a tie."""
    return _by_word_length(a, b, shorter_wins=True)


def long_words(prompt: str, a: str, b: str) -> str:
    """`plain_words` turned round: the answer in longer words on average is better (a reader who likes a learned
    register); within 0.15 letters it is a tie. Written in session 29, before any run of it: does the loop learn a
    taste against the plain, short answers it has learned before?"""
    return _by_word_length(a, b, shorter_wins=False)


def _more_is_better(a: str, b: str, count) -> str:
    """The answer with the higher `count` is better, the same is a tie; an empty answer loses."""
    if not a.strip() or not b.strip():
        return "both_bad" if not (a.strip() or b.strip()) else ("a" if a.strip() else "b")
    na, nb = count(a), count(b)
    return "tie" if na == nb else ("a" if na > nb else "b")


def gives_examples(prompt: str, a: str, b: str) -> str:
    """The answer that gives more concrete examples ("for example", "such as", "e.g.", ...) is better;
    the same number is a tie. Written in session 17, after every other taste here had been run."""
    return _more_is_better(a, b, lambda text: len(_EXAMPLE.findall(text)))


def gives_figures(prompt: str, a: str, b: str) -> str:
    """The answer that states more figures (numbers in digits: "3", "1,500", "4.5", "20%") is better; the
    same number is a tie; list numbering does not count. Written in session 19, after every other taste
    here had been run."""
    return _more_is_better(a, b, lambda text: len(_FIGURE.findall(_LIST_MARKER.sub("", text))))


def uses_lists(prompt: str, a: str, b: str) -> str:
    """The answer that lays its points out as more list items (lines opening with "-", "*", "\u2022", "1." or
    "1)") is better; the same number is a tie. Written in session 24, before any run of it; the base model
    writes a list item in 8% of its answers."""
    return _more_is_better(a, b, lambda text: len(_LIST_ITEM.findall(text)))


def _content_words(text: str) -> set[str]:
    """Lower-cased words of four letters or more that are not function words, a final "s" dropped."""
    words = (w.lower() for w in _WORD.findall(text) if len(w) >= 4)
    return {w[:-1] if w.endswith("s") else w for w in words if w not in _FUNCTION_WORDS}


def on_topic(prompt: str, a: str, b: str) -> str:
    """The answer that takes up more of the question's own content words is better (a crude "answers what
    was asked"); the same number is a tie. The only taste here that depends on the prompt. Written in
    session 25, before any run of it."""
    asked = _content_words(prompt)
    return _more_is_better(a, b, lambda text: len(asked & _content_words(text)))
