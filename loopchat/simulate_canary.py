"""Simulated users judge a canary: `loopchat simulate canary`.

Many distinct users (an open-mode gateway's `X-Loopchat-User`) chat with the `loopchat` alias; the
gateway puts each one, for good, on the canary version or on the serving one. Each user rates what
they were served (thumbs from the preference's score; a preference with no score compares the answer
with the base model's answer to the same prompt), and some of them vote on comparisons instead. They
keep going until `GET /admin/canary/{id}` shows the canary decided (promoted or rolled back by the
gateway's sequential test, or ended by an operator), then the report says how much evidence the
decision took: answers and thumbs per arm, votes, seconds.

Like `loopchat.simulate`, this speaks only HTTP to the gateway.
"""

from __future__ import annotations

import copy
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loopchat.simulate import (LABELS, Gateway, Judge, Log, Population, SimulationError, load_judge, load_prompts,
                               prompt_text)

ARMS = ("canary", "baseline")


@dataclass
class CanarySettings(Population):
    version: str | None = None  # put this version on canary first; None: drive the canary that is running
    share: float = 0.5  # of users, when starting one
    users: int = 60
    vote_share: float = 0.2  # of interactions that are a comparison to vote on rather than a rated answer
    rank_k: int = 2
    concurrency: int = 8
    max_tokens: int = 48
    temperature: float = 0.8
    seed: int = 0
    timeout: float = 1800.0  # seconds to wait for a decision
    poll_s: float = 2.0
    out: Path | None = None


@dataclass
class Tally:
    """What the simulated users did, by arm (which version answered them); thread-safe."""

    answers: dict = field(default_factory=lambda: {arm: {"answers": 0, "up": 0, "down": 0} for arm in ARMS})
    votes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def answer(self, arm: str, rating: int) -> None:
        with self.lock:
            row = self.answers[arm]
            row["answers"] += 1
            row["up" if rating > 0 else "down"] += 1

    def vote(self) -> None:
        with self.lock:
            self.votes += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {"arms": copy.deepcopy(self.answers), "votes": self.votes}


def rate(gw: Gateway, judge: Judge, messages: list[dict], answer: str, base: str, sampling: dict,
         rng: random.Random) -> int:
    """The user's thumb on `answer`: by the preference's score, or, for a pairwise-only preference,
    up unless the base model's answer to the same prompt (not stored) is preferred to it."""
    prompt = prompt_text(messages)
    if judge.score is not None:
        return judge.thumb(prompt, answer, rng)
    other = gw.chat(messages, base, store=False, **sampling).text
    return 1 if judge.vote(prompt, answer, other, rng) in ("a", "tie") else -1


def interact(gw: Gateway, judge: Judge, messages: list[dict], s: CanarySettings, canary_name: str, base: str,
             tally: Tally, rng: random.Random) -> None:
    """One user's one turn: a comparison voted on, or an answer from the alias rated."""
    sampling = {"max_tokens": s.max_tokens, "temperature": s.temperature}
    if rng.random() < s.vote_share:
        cmp = gw.compare(messages, **({"n": s.rank_k} if s.rank_k > 2 else {}), **sampling)
        answers = {c.get("label") or label: c["content"] or "" for label, c in zip(LABELS, cmp["candidates"])}
        gw.vote(cmp["id"], judge.ballot(prompt_text(messages), answers, rng))
        tally.vote()
        return
    served = gw.chat(messages, **sampling)
    rating = rate(gw, judge, messages, served.text, base, sampling, rng)
    gw.feedback(served.id, rating)
    tally.answer("canary" if served.model == canary_name else "baseline", rating)


def start_or_find(admin: Gateway, s: CanarySettings, log: Log) -> dict:
    """The running canary's row: started now for `s.version`, or the one already running."""
    running = admin.canary().get("canary")
    if s.version is None:
        if not running:
            raise SimulationError("no canary is running; give the version to put on canary")
        return running
    if running and running["version"] == s.version:
        log(f"canary {s.version} is already running for {running['share']:.0%} of users")
        return running
    started = admin.start_canary(s.version, s.share)
    log(f"canary {s.version} (id {started['id']}) started for {s.share:.0%} of users beside "
        f"{started['baseline'] or 'the base model'}")
    return started


def drive(s: CanarySettings, log: Log = print) -> dict:
    """Simulated users until the canary is decided; the report (also written to `s.out`)."""
    judge = load_judge(s.preference, s.score, s.noise, s.threshold)
    prompts = load_prompts(s.prompts)
    rng = random.Random(f"canary:{s.seed}")
    users = [f"sim-canary-{s.seed}-{i:03d}" for i in range(s.users)]
    admin = Gateway(s.gateway)
    try:
        base = admin.base_model()
        canary = start_or_find(admin, s, log)
        version = canary["version"]
        canary_name = admin.adapter_name(version)
        tally, stop, started = Tally(), threading.Event(), time.monotonic()

        def user_loop(seed: float) -> None:
            mine = random.Random(seed)
            while not stop.is_set():
                interact(admin.as_user(mine.choice(users)), judge, mine.choice(prompts), s, canary_name, base, tally,
                         mine)

        with ThreadPoolExecutor(s.concurrency) as pool:
            loops = [pool.submit(user_loop, rng.random()) for _ in range(s.concurrency)]
            try:
                last_log = 0.0
                while True:
                    row = admin.canary(canary["id"])
                    if row["ended_at"] is not None:
                        evidence, seconds = tally.snapshot(), round(time.monotonic() - started, 1)
                        break
                    failed = next((f for f in loops if f.done() and f.exception()), None)
                    if failed is not None:
                        raise failed.exception()
                    if time.monotonic() - started > s.timeout:
                        raise SimulationError(f"canary {version} still undecided after {s.timeout:.0f} s "
                                              f"({_line(tally.snapshot())})")
                    if time.monotonic() - last_log >= 10:
                        last_log = time.monotonic()
                        rule = (row.get("evidence") or {}).get("decision") or {}
                        log(f"  canary {version}: {_line(tally.snapshot())} ({last_log - started:.0f} s); "
                            f"rule: {rule.get('state', '?')}: {rule.get('reason', '')}")
                    time.sleep(s.poll_s)
            finally:
                stop.set()
    finally:
        admin.close()
    report = {"settings": s.as_dict(), "version": version, "base_model": base, "decision": row.get("outcome"),
              "ended_by": row.get("ended_by"), "canary": row, "counted": counted(row), **evidence,
              "seconds": seconds}
    log(f"canary {version}: {report['decision']} (by {report['ended_by']}) after {_line(evidence)} "
        f"in {report['seconds']:.0f} s")
    if s.out:
        s.out.mkdir(parents=True, exist_ok=True)
        (s.out / "canary.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _line(snapshot: dict) -> str:
    arms = snapshot["arms"]
    return ", ".join(f"{arm} {arms[arm]['answers']} answers ({arms[arm]['up']} up)" for arm in ARMS) + \
        f", {snapshot['votes']} votes"


def counted(row: dict) -> dict:
    """What the gateway's rule counted when the canary ended: rated answers per arm, head-to-head
    votes, and the rule's reason (from the evidence kept with the ended canary)."""
    ev = {k: v or {} for k, v in (row.get("evidence") or {}).items()}
    return {"canary_rated": ev.get("canary", {}).get("rated"), "baseline_rated": ev.get("baseline", {}).get("rated"),
            "votes": ev.get("head_to_head", {}).get("n"), "reason": ev.get("decision", {}).get("reason")}


def summary(report: dict) -> str:
    arms, rule = report["arms"], report["counted"]
    head = f"{'canary':<8}{'decision':<14}{'by':<10}" + "".join(f"{arm + ' n/up':>16}" for arm in ARMS) + \
        f"{'votes':>7}{'seconds':>9}"
    cells = "".join(f"{arms[arm]['answers']:>10}/{arms[arm]['up']:<5}" for arm in ARMS)
    return "\n".join([head, f"{report['version']:<8}{str(report['decision']):<14}{str(report['ended_by']):<10}"
                            f"{cells}{report['votes']:>7}{report['seconds']:>9.0f}",
                      f"the gateway counted {rule['canary_rated']} and {rule['baseline_rated']} rated answers, "
                      f"{rule['votes']} head-to-head votes; its rule: {rule['reason']}"])
