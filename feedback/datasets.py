"""Training sets from the store, in TRL's conversational formats; used by `loopchat export` and the trainer.

- pairs     {"prompt", "chosen", "rejected"}  (reward model, DPO) from comparison votes (every two
            answers a ranking puts in different groups: C(K, 2) minus the ties), a liked and a
            disliked answer to the same conversation, and a correction over the answer it corrects;
- unpaired  {"prompt", "completion", "label"}  (KTO) from thumbs;
- sft       {"messages"}                        from corrections, liked answers and the answer ranked
            above all others in each comparison (what users chose is the behaviour to imitate: with
            answers sampled from the serving policy this is best-of-K distillation, and
            it carries any preference the users have, not only the ones a reward model ranks).

Every record also carries `source` and `meta` ({"conversation", "ids", "created_at"}: the
feedback rows behind it, as "table:id", and the newest one's time), which TRL ignores and the
trainer keeps as its data snapshot. A pair from a vote also has `group` in its meta (the
comparison id: the pairs of one ranking, which a reward model trains together) and `rank_gap`
(how many ranking groups apart its answers are); other pairs have neither (each is a group of
one, one rank apart). Identical records collapse into one whose `ids` lists them all (its group
and gap are the first one's). The held-out split is decided by a hash of the conversation alone, so a conversation never
lands in both splits and a later export keeps every earlier record in its split.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from itertools import groupby
from typing import Callable

from feedback import rankings
from feedback.store import Store

HELDOUT_PERCENT = 10
SPLITS = ("train", "heldout", "all")
ROLES = ("system", "user", "assistant")  # conversations with other turns (tool calls) are left out


def split_of(conversation: str) -> str:
    bucket = int(hashlib.sha256(f"split:{conversation}".encode()).hexdigest()[:8], 16) % 100
    return "heldout" if bucket < HELDOUT_PERCENT else "train"


@dataclass(frozen=True)
class _Answer:
    """One answer with the feedback on it: a thumb, a correction or a side of a vote."""

    ref: str  # "feedback:12", "corrections:3", "votes:cmp-..."
    conversation: str
    prompt: list[dict]
    text: str
    created_at: float


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _choice_text(choices: str | None, output: str | None, index: int) -> str:
    parsed = json.loads(choices) if choices else []
    return parsed[index]["content"] if index < len(parsed) else (output or "")


def _answer(ref: str, row: dict, text: str) -> _Answer | None:
    """The answer to the completion in `row`; None when its conversation has turns we cannot train on."""
    prompt = json.loads(row["messages"])
    if not all(m.get("role") in ROLES for m in prompt):
        return None
    return _Answer(ref, row["conversation"], prompt, text, row["created_at"])


def _thumbs(store: Store) -> list[tuple[_Answer, bool]]:
    rows = store.rows("""SELECT f.id, f.rating, f.choice_index, f.created_at, c.messages, c.conversation,
                                c.choices, c.output
                         FROM feedback f JOIN completions c ON c.id = f.completion_id ORDER BY f.id""")
    out = []
    for r in rows:
        answer = _answer(f"feedback:{r['id']}", r, _choice_text(r["choices"], r["output"], r["choice_index"]))
        if answer:
            out.append((answer, r["rating"] > 0))
    return out


def _corrections(store: Store) -> list[tuple[_Answer, str]]:
    """Each correction with the text of the answer it corrects."""
    rows = store.rows("""SELECT k.id, k.content, k.created_at, f.choice_index, c.messages, c.conversation,
                                c.choices, c.output
                         FROM corrections k JOIN feedback f ON f.id = k.feedback_id
                         JOIN completions c ON c.id = k.completion_id ORDER BY k.id""")
    out = []
    for r in rows:
        answer = _answer(f"corrections:{r['id']}", r, r["content"])
        if answer:
            out.append((answer, _choice_text(r["choices"], r["output"], r["choice_index"])))
    return out


@dataclass(frozen=True)
class _RankedVote:
    """A vote's ranking with each candidate's answer; every ranked pair is (better, worse, gap)."""

    comparison_id: str
    answers: dict[str, _Answer]  # by label
    ranking: list[list[str]]

    def pairs(self) -> list[tuple[_Answer, _Answer, int]]:
        return [(self.answers[b], self.answers[w], gap) for b, w, gap in rankings.pairs(self.ranking)]

    def best(self) -> _Answer | None:
        label = rankings.best(self.ranking)
        return None if label is None else self.answers[label]


def _ranked_votes(store: Store) -> list[_RankedVote]:
    """Every vote as a ranking of its candidates' answers (a two-answer vote from before rankings were
    stored is read from its choice); votes on conversations we cannot train on are left out."""
    rows = store.rows("""SELECT v.comparison_id, v.choice, v.ranking, v.created_at, k.label, c.messages,
                                c.conversation, c.output
                         FROM votes v JOIN comparisons p ON p.id = v.comparison_id
                         JOIN candidates k ON k.comparison_id = p.id JOIN completions c ON c.id = k.completion_id
                         ORDER BY p.created_at, p.id, k.position""")
    out = []
    for comparison_id, group in groupby(rows, key=lambda r: r["comparison_id"]):
        group = list(group)
        first = group[0]
        ref = f"votes:{comparison_id}"
        answers = {r["label"]: _answer(ref, r, r["output"] or "") for r in group}
        if None in answers.values():
            continue
        ranking = rankings.stored(list(answers), first["choice"], first["ranking"])
        out.append(_RankedVote(comparison_id, answers, ranking))
    return out


class _Records:
    """Records keyed by content: a duplicate adds its feedback ids to the first one's meta."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, dict] = {}

    def add(self, key: tuple, record: dict, source: str, *answers: _Answer, meta: dict | None = None) -> None:
        """`meta`: more fields for a new record's meta; a duplicate keeps the first record's."""
        refs = [a.ref for a in answers]
        newest = max(a.created_at for a in answers)
        kept = self._by_key.get(key)
        if kept is None:
            self._by_key[key] = {**record, "source": source,
                                 "meta": {"conversation": answers[0].conversation, "ids": refs, "created_at": newest,
                                          **(meta or {})}}
            return
        kept["meta"]["ids"] += [r for r in refs if r not in kept["meta"]["ids"]]
        kept["meta"]["created_at"] = max(kept["meta"]["created_at"], newest)

    def select(self, split: str, since: float | None) -> list[dict]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}")
        return [r for r in self._by_key.values()
                if (split == "all" or split_of(r["meta"]["conversation"]) == split)
                and (since is None or r["meta"]["created_at"] > since)]


def _pairs(store: Store) -> _Records:
    out = _Records()

    def add(source: str, chosen: _Answer, rejected_text: str, *answers: _Answer, meta: dict | None = None) -> None:
        if chosen.text.strip() != rejected_text.strip():
            out.add((chosen.conversation, chosen.text, rejected_text),
                    {"prompt": chosen.prompt, "chosen": _assistant(chosen.text), "rejected": _assistant(rejected_text)},
                    source, *answers, meta=meta)

    for vote in _ranked_votes(store):
        for better, worse, gap in vote.pairs():
            add("comparison", better, worse.text, better, meta={"group": vote.comparison_id, "rank_gap": gap})
    by_conversation: dict[str, tuple[list[_Answer], list[_Answer]]] = defaultdict(lambda: ([], []))
    for answer, liked in _thumbs(store):
        by_conversation[answer.conversation][0 if liked else 1].append(answer)
    for liked, disliked in by_conversation.values():
        for good in liked:
            for bad in disliked:
                add("thumbs", good, bad.text, good, bad)
    for correction, corrected_text in _corrections(store):
        add("correction", correction, corrected_text, correction)
    return out


def _unpaired(store: Store) -> _Records:
    out = _Records()
    for answer, liked in _thumbs(store):
        out.add((answer.conversation, answer.text, liked),
                {"prompt": answer.prompt, "completion": _assistant(answer.text), "label": liked}, "thumbs", answer)
    return out


def _sft(store: Store) -> _Records:
    out = _Records()
    demonstrations = [(c, "correction") for c, _ in _corrections(store)]
    demonstrations += [(a, "thumbs") for a, liked in _thumbs(store) if liked]
    demonstrations += [(vote.best(), "comparison") for vote in _ranked_votes(store) if vote.best()]
    for answer, source in demonstrations:
        if answer.text.strip():
            out.add((answer.conversation, answer.text), {"messages": answer.prompt + _assistant(answer.text)},
                    source, answer)
    return out


def build_pairs(store: Store, split: str = "all", since: float | None = None) -> list[dict]:
    """Preference pairs. `since`: only records with feedback newer than this Unix time."""
    return _pairs(store).select(split, since)


def build_unpaired(store: Store, split: str = "all", since: float | None = None) -> list[dict]:
    """Thumbs as single labelled answers."""
    return _unpaired(store).select(split, since)


def build_sft(store: Store, split: str = "all", since: float | None = None) -> list[dict]:
    """Demonstrations: corrections, liked answers and comparison winners, as whole conversations."""
    return _sft(store).select(split, since)


BUILDERS: dict[str, Callable[..., list[dict]]] = {"pairs": build_pairs, "unpaired": build_unpaired, "sft": build_sft}


def dataset_yields(store: Store) -> dict[str, dict[str, int]]:
    """How many records of each kind each source yields, e.g. {"pairs": {"comparison": 3, ...}, ...}."""
    out: dict[str, dict[str, int]] = {}
    for kind, build in BUILDERS.items():
        counts: dict[str, int] = defaultdict(int)
        for record in build(store):
            counts[record["source"]] += 1
        out[kind] = dict(counts)
    return out


def count_new_feedback(store: Store, since_ts: float) -> dict[str, int]:
    """Feedback given (or changed) after `since_ts`: thumbs, decided-or-not comparison votes, corrections."""
    def count(table: str) -> int:
        return store.rows(f"SELECT count(*) AS n FROM {table} WHERE created_at > ?", [since_ts])[0]["n"]

    return {"thumbs": count("feedback"), "comparisons": count("votes"), "corrections": count("corrections")}


def build_prompts(store: Store, split: str = "all", limit: int = 512) -> list[dict]:
    """Distinct conversations users asked about, newest first, as `{"prompt": messages}` (PPO's input)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}")
    seen, out = set(), []
    for row in store.rows("SELECT conversation, messages FROM completions ORDER BY created_at DESC"):
        if row["conversation"] in seen or (split != "all" and split_of(row["conversation"]) != split):
            continue
        prompt = json.loads(row["messages"])
        if all(m.get("role") in ROLES for m in prompt):
            seen.add(row["conversation"])
            out.append({"prompt": prompt})
            if len(out) >= limit:
                break
    return out
