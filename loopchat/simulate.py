"""Simulated users: drive a running loopchat service through its public HTTP API only, and
measure whether its retrain loop learns what those users prefer.

Each round: collect feedback (comparisons voted by a preference function, thumbs by a score
threshold, some corrections), ask the worker for a cycle (`POST /admin/cycles`), wait for its
outcome, then measure on held-out prompts (never used for feedback) how often the promoted
policy (`loopchat`) beats the base model, judged by the same preference without noise.

Imports nothing from serve/ or train/ (only feedback's win-rate statistic, the one the live win
rates use): the gateway could be on another machine.
"""

from __future__ import annotations

import importlib
import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import httpx

from feedback.winrates import mean_interval

DEFAULT_PROMPTS = Path(__file__).parent / "data" / "prompts.txt"
FINAL_STATES = ("promoted", "rejected", "failed", "cancelled", "published")
CHOICES = ("a", "b", "tie", "both_bad")
LABELS = "abcd"  # candidates of a comparison of K answers, in the order shown
CYCLE_FIGURES = ("id", "state", "version", "recipe", "gate", "error", "rm_accuracy", "kl", "mean_reward", "n_pairs",
                 "n_sft", "n_prompts", "duration_s")
# Figures a cycle records in one of its steps rather than on its row (first found wins): name here -> key there.
# The RM step's `accuracy_ci95` is the [low, high] 95% interval of the row's `rm_accuracy`; the gate's
# capability figures are the candidate's share of capability items answered and the base model's, and per kind of
# item the candidate's and the replaced version's (`capability_pass_kinds`); `fell_back`
# is there when the full candidate failed the gate for moving too far and PPO's fallback was judged instead.
STEP_FIGURES = {"rm_accuracy_ci95": "accuracy_ci95", "kl_base": "kl_base", "capability_pass": "capability_pass",
                "capability_pass_base_model": "capability_pass_base_model", "capability_pass_kinds": "capability_pass_kinds",
                "fell_back": "fell_back"}
Log = Callable[[str], None]


class SimulationError(Exception):
    pass


@dataclass
class Population:
    """Who the simulated users are: the gateway they use, what they ask, what they prefer, how noisily."""

    gateway: str = "http://127.0.0.1:8000"
    prompts: Path = DEFAULT_PROMPTS
    preference: str = "concise"
    score: str | None = None
    noise: float = 0.1
    threshold: float = 0.5

    def as_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items() if k != "api_key"}


@dataclass
class SimSettings(Population):
    api_key: str | None = None
    user: str = "simulated-users"  # open mode: the X-Loopchat-User name (keyed: the key names the user)
    correction_rate: float = 0.2
    cycles: int = 3
    recipe: str | None = None  # sent with each cycle request; None: the worker's default
    rank_k: int = 2  # answers per comparison; above 2 the user ranks them all
    comparisons: int = 48  # per round
    thumbs: int = 24  # per round
    eval_prompts: int = 40  # held-out prompts, never used for feedback
    eval_samples: int = 1  # policy/base pairs per held-out prompt
    concurrency: int = 4
    max_tokens: int = 48
    temperature: float = 0.8
    seed: int = 0
    cycle_timeout: float = 3600.0
    poll_s: float = 3.0
    out: Path | None = None


# ---- prompts -------------------------------------------------------------------------------
def load_prompts(path: Path) -> list[list[dict]]:
    """One prompt a line: plain text (a user message) or JSON (a list of messages, or
    {"messages": [...]}). Blank lines and lines starting with '#' are skipped."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line[0] in "[{":
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise SimulationError(f"{path}:{n}: not valid JSON: {e}") from e
            messages = value.get("messages") if isinstance(value, dict) else value
            if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
                raise SimulationError(f"{path}:{n}: expected a list of messages or {{\"messages\": [...]}}")
            out.append(messages)
        else:
            out.append([{"role": "user", "content": line}])
    return out


def prompt_text(messages: list[dict]) -> str:
    """What the preference function sees as the prompt: the last user message."""
    users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
    return users[-1] if users else (messages[-1].get("content") or "")


def split_prompts(prompts: list, n_eval: int, seed: int) -> tuple[list, list]:
    """(feedback prompts, held-out prompts): a fixed, seeded slice is kept for measurement."""
    order = list(range(len(prompts)))
    random.Random(f"split:{seed}").shuffle(order)
    n_eval = min(n_eval, len(prompts) - 1)
    if n_eval < 1:
        raise SimulationError(f"need at least 2 prompts to keep some held out (got {len(prompts)})")
    held = set(order[:n_eval])
    return [p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held]


class PromptCycler:
    """Draws prompts in a shuffled order, reshuffling when all have been used."""

    def __init__(self, prompts: list, rng: random.Random):
        self.prompts, self.rng, self.queue = prompts, rng, []

    def take(self, n: int) -> list:
        out = []
        while len(out) < n:
            if not self.queue:
                self.queue = self.rng.sample(self.prompts, len(self.prompts))
            out.append(self.queue.pop())
        return out


# ---- the simulated user ----------------------------------------------------------------------
def resolve(spec: str):
    """A built-in name (`concise`) or `module:attribute`."""
    from loopchat import preferences

    if ":" not in spec:
        if spec in preferences.BUILTINS:
            return preferences.BUILTINS[spec]
        raise SimulationError(f"unknown preference '{spec}': built-ins are {', '.join(preferences.BUILTINS)}, "
                              "or give module:function")
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SimulationError(f"cannot load {spec}: {e}") from e


def _companion(fn, name: str):
    """`fn.<name>`, else a module-level `<name>` next to fn, else None."""
    found = getattr(fn, name, None)
    if found is None:
        module = importlib.import_module(fn.__module__) if getattr(fn, "__module__", None) else None
        found = getattr(module, name, None) if module is not None else None
    return found if callable(found) else None


@dataclass
class Judge:
    """A simulated user's taste: the pairwise preference, plus thumbs and corrections."""

    prefer: Callable[[str, str, str], str]
    score: Callable[[str, str], float] | None = None
    correct: Callable[[str, str], str | None] | None = None
    noise: float = 0.0
    threshold: float = 0.5

    def vote(self, prompt: str, a: str, b: str, rng: random.Random, noisy: bool = True) -> str:
        if noisy and rng.random() < self.noise:
            return rng.choice(("a", "b"))
        choice = self.prefer(prompt, a, b)
        if choice not in CHOICES:
            raise SimulationError(f"the preference returned {choice!r}; expected one of {CHOICES}")
        return choice

    def rank(self, prompt: str, answers: dict[str, str], rng: random.Random) -> list[list[str]] | None:
        """The labels of `answers` in groups, best first (ties share a group), by Copeland score: each
        pairwise win counts +1, each loss -1, a tie or both_bad nothing. None when every pair was
        both_bad. With probability `noise` the whole ranking is a random strict order instead, as a
        noisy pairwise vote is a random a or b."""
        labels = list(answers)
        if rng.random() < self.noise:
            return [[label] for label in rng.sample(labels, len(labels))]
        score = dict.fromkeys(labels, 0)
        all_bad = True
        for i, x in enumerate(labels):
            for y in labels[i + 1:]:
                choice = self.vote(prompt, answers[x], answers[y], rng, noisy=False)
                all_bad = all_bad and choice == "both_bad"
                if choice in ("a", "b"):
                    winner, loser = (x, y) if choice == "a" else (y, x)
                    score[winner] += 1
                    score[loser] -= 1
        if all_bad:
            return None
        return [[label for label in labels if score[label] == s] for s in sorted(set(score.values()), reverse=True)]

    def ballot(self, prompt: str, answers: dict[str, str], rng: random.Random) -> dict:
        """The vote body `POST /v1/comparisons/{id}/vote` takes for these labelled answers: two
        answers get one choice (a|b|tie|both_bad, as always); more get their ranking, or `all_bad`
        when the judge found no answer good."""
        if len(answers) == 2:
            return {"choice": self.vote(prompt, *answers.values(), rng)}
        groups = self.rank(prompt, answers, rng)
        return {"choice": "all_bad"} if groups is None else {"ranking": groups}

    def thumb(self, prompt: str, answer: str, rng: random.Random) -> int:
        if rng.random() < self.noise:
            return rng.choice((1, -1))
        return 1 if self.score(prompt, answer) >= self.threshold else -1


def load_judge(preference: str, score: str | None = None, noise: float = 0.0, threshold: float = 0.5) -> Judge:
    prefer = resolve(preference)
    if not callable(prefer):
        raise SimulationError(f"{preference} is not a function")
    score_fn = resolve(score) if score else _companion(prefer, "score")
    return Judge(prefer, score_fn, _companion(prefer, "correct"), noise, threshold)


# ---- the gateway, over HTTP ------------------------------------------------------------------
class Answer(NamedTuple):
    id: str
    text: str
    model: str  # the engine model that answered (the alias resolved: a version's name, or the base model)


class Gateway:
    """The few public API calls a population of users (and an operator) make."""

    def __init__(self, url: str, api_key: str | None = None, user: str | None = None, timeout: float = 300,
                 retries: int = 5, http: httpx.Client | None = None):
        self.headers = {}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        if user:
            self.headers["X-Loopchat-User"] = user
        self.url, self.api_key, self.timeout, self.retries = url, api_key, timeout, retries
        self.http = http or httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def as_user(self, user: str) -> "Gateway":
        """The same connections, speaking as another user (an open-mode gateway's `X-Loopchat-User`;
        a keyed gateway names the key's user whatever the header says)."""
        return Gateway(self.url, self.api_key, user, self.timeout, self.retries, self.http)

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, ok=(200,), **kwargs) -> httpx.Response:
        """Retries rate limits (429), an engine not ready (503) and dropped connections."""
        for attempt in range(self.retries + 1):
            try:
                r = self.http.request(method, path, headers=self.headers, **kwargs)
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise SimulationError(f"{method} {path}: {e}") from e
                time.sleep(min(2 ** attempt, 20))
                continue
            if r.status_code in (429, 503) and attempt < self.retries:
                time.sleep(float(r.headers.get("retry-after") or min(2 ** attempt, 20)))
                continue
            if r.status_code not in ok:
                raise SimulationError(f"{method} {path}: HTTP {r.status_code} {_message(r)}")
            return r
        raise AssertionError("unreachable")

    def models(self) -> list[dict]:
        return self.request("GET", "/v1/models").json()["data"]

    def base_model(self) -> str:
        for m in self.models():
            if m.get("parent") is None and m["id"] != "loopchat":
                return m["id"]
        raise SimulationError("GET /v1/models lists no base model")

    def chat(self, messages: list[dict], model: str = "loopchat", **sampling) -> Answer:
        body = {"model": model, "messages": messages, **sampling}
        data = self.request("POST", "/v1/chat/completions", json=body).json()
        return Answer(data["id"], data["choices"][0]["message"]["content"] or "", data["model"])

    def compare(self, messages: list[dict], **sampling) -> dict:
        return self.request("POST", "/v1/comparisons", json={"messages": messages, **sampling}).json()

    def vote(self, comparison_id: str, ballot: dict) -> None:
        """`ballot`: {"choice": ...} or {"ranking": [[labels], ...]} (Judge.ballot)."""
        self.request("POST", f"/v1/comparisons/{comparison_id}/vote", json=ballot)

    def feedback(self, completion_id: str, rating: int, correction: str | None = None) -> None:
        body = {"completion_id": completion_id, "rating": rating}
        if correction is not None:
            body["correction"] = correction
        self.request("POST", "/v1/feedback", json=body)

    def queue_cycle(self, recipe: str | None = None) -> int | None:
        """A new cycle's id; None when one is already active (409). `recipe`: one of feedback.cycles.RECIPES (None: the worker's)."""
        body = {"json": {"recipe": recipe}} if recipe else {}
        r = self.request("POST", "/admin/cycles", ok=(202, 409), **body)
        return r.json()["id"] if r.status_code == 202 else None

    def adapter_name(self, version: str) -> str:
        """The engine model name a version answers as (what a chat answer's `model` says)."""
        for row in self.request("GET", "/admin/adapters").json()["data"]:
            if row["version"] == version:
                return row["name"]
        raise SimulationError(f"no adapter version {version}")

    def start_canary(self, version: str, share: float) -> dict:
        return self.request("POST", f"/admin/adapters/{version}/canary", ok=(201,), json={"share": share}).json()

    def canary(self, canary_id: int | None = None) -> dict:
        """One canary's row (live evidence and the rule's decision while it runs); without an id, the
        status: the running canary (`canary`, null when none), its evidence, recent ended ones."""
        return self.request("GET", "/admin/canary" + (f"/{canary_id}" if canary_id is not None else "")).json()

    def cycles(self) -> list[dict]:
        return self.request("GET", "/admin/cycles").json()["data"]

    def cycle(self, cycle_id: int) -> dict:
        return self.request("GET", f"/admin/cycles/{cycle_id}").json()


def _message(r: httpx.Response) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:300]


# ---- doing many things at once, with progress ------------------------------------------------
class Progress:
    """Counts finished tasks and logs `done/total (rate/s, ETA)` at most every `every_s`."""

    def __init__(self, what: str, total: int, log: Log, every_s: float = 5.0):
        self.what, self.total, self.log, self.every_s = what, total, log, every_s
        self.done, self.start, self.last = 0, time.monotonic(), 0.0
        self.lock = threading.Lock()

    def step(self) -> None:
        with self.lock:
            self.done += 1
            now = time.monotonic()
            if self.done == self.total or now - self.last >= self.every_s:
                self.last = now
                self.log(self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        return f"  {self.what}: {self.done}/{self.total} ({rate:.2f}/s, ETA {eta:.0f} s)"


def run_all(tasks: list[Callable[[], dict]], concurrency: int, progress: Progress) -> list[dict]:
    def run(task):
        try:
            return task()
        finally:
            progress.step()

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        return list(pool.map(run, tasks))


# ---- one round of feedback -------------------------------------------------------------------
def comparison_task(gw: Gateway, judge: Judge, messages: list[dict], sampling: dict, rng: random.Random,
                    k: int = 2):
    """One comparison of `k` answers, voted on: a choice between two, a ranking of more."""
    def task() -> dict:
        cmp = gw.compare(messages, **({"n": k} if k > 2 else {}), **sampling)
        answers = {c.get("label") or label: c["content"] or "" for label, c in zip(LABELS, cmp["candidates"])}
        ballot = judge.ballot(prompt_text(messages), answers, rng)
        gw.vote(cmp["id"], ballot)
        return {"kind": "comparison", "choice": ballot.get("choice", "ranking")}
    return task


def thumbs_task(gw: Gateway, judge: Judge, messages: list[dict], sampling: dict, rng: random.Random,
                correction_rate: float):
    """Thumbs on one answer by the score; without a score, two answers to the same prompt judged
    against each other (the preferred one up, the other down)."""
    prompt = prompt_text(messages)

    def correction(answer: str) -> str | None:
        if judge.correct is None or rng.random() >= correction_rate:
            return None
        better = judge.correct(prompt, answer)
        return better if better and better.strip() and better.strip() != answer.strip() else None

    def task() -> dict:
        if judge.score is not None:
            cid, answer, _ = gw.chat(messages, **sampling)
            ratings = [(cid, answer, judge.thumb(prompt, answer, rng))]
        else:
            (ida, a, _), (idb, b, _) = gw.chat(messages, **sampling), gw.chat(messages, **sampling)
            choice = judge.vote(prompt, a, b, rng)
            up_a, up_b = {"a": (1, -1), "b": (-1, 1), "tie": (1, 1), "both_bad": (-1, -1)}[choice]
            ratings = [(ida, a, up_a), (idb, b, up_b)]
        out = {"kind": "thumbs", "up": 0, "down": 0, "corrections": 0}
        for cid, answer, rating in ratings:
            fix = correction(answer)
            gw.feedback(cid, rating, fix)
            out["up" if rating > 0 else "down"] += 1
            out["corrections"] += fix is not None
        return out
    return task


def collect_feedback(gw: Gateway, judge: Judge, cycler: PromptCycler, s: SimSettings, rng: random.Random,
                     label: str, log: Log) -> dict:
    sampling = {"max_tokens": s.max_tokens, "temperature": s.temperature}
    tasks = [comparison_task(gw, judge, m, sampling, random.Random(rng.random()), s.rank_k)
             for m in cycler.take(s.comparisons)]
    tasks += [thumbs_task(gw, judge, m, sampling, random.Random(rng.random()), s.correction_rate)
              for m in cycler.take(s.thumbs)]
    random.Random(rng.random()).shuffle(tasks)
    started = time.monotonic()
    results = run_all(tasks, s.concurrency, Progress(f"{label} feedback", len(tasks), log))
    votes = dict.fromkeys(CHOICES if s.rank_k == 2 else ("ranking", "all_bad"), 0)
    for r in results:
        if r["kind"] == "comparison":
            votes[r["choice"]] += 1
    thumbs = [r for r in results if r["kind"] == "thumbs"]
    return {"comparisons": sum(votes.values()), "votes": votes, "thumbs_up": sum(r["up"] for r in thumbs),
            "thumbs_down": sum(r["down"] for r in thumbs), "corrections": sum(r["corrections"] for r in thumbs),
            "seconds": round(time.monotonic() - started, 1)}


# ---- the cycle -------------------------------------------------------------------------------
def request_cycle(gw: Gateway, s: SimSettings, log: Log) -> int:
    """Queue a cycle; when one is already active, wait for it to end first."""
    deadline = time.monotonic() + s.cycle_timeout
    while time.monotonic() < deadline:
        cycle_id = gw.queue_cycle(s.recipe)
        if cycle_id is not None:
            return cycle_id
        active = next((c for c in gw.cycles() if c["state"] not in FINAL_STATES), None)
        if active is not None:
            log(f"  cycle {active['id']} is already {active['state']}; waiting for it to end")
            wait_cycle(gw, active["id"], s, log)
        else:
            time.sleep(s.poll_s)  # it ended between our two calls
    raise SimulationError(f"could not start a cycle within {s.cycle_timeout:.0f} s")


def wait_cycle(gw: Gateway, cycle_id: int, s: SimSettings, log: Log) -> dict:
    started, state = time.monotonic(), None
    published_at = started
    while True:
        row = gw.cycle(cycle_id)
        if row["state"] != state:
            state = row["state"]
            log(f"  cycle {cycle_id}: {state} ({time.monotonic() - started:.0f} s)")
        # `published` is final only for a worker with no gateway to promote through: give the promotion a minute.
        if state in FINAL_STATES and (state != "published" or time.monotonic() - published_at > 60):
            return row
        if state != "published":
            published_at = time.monotonic()
        if time.monotonic() - started > s.cycle_timeout:
            raise SimulationError(f"cycle {cycle_id} still {state} after {s.cycle_timeout:.0f} s")
        time.sleep(s.poll_s)


def cycle_figures(row: dict) -> dict:
    out = {k: row.get(k) for k in CYCLE_FIGURES}
    steps = row.get("steps") or {}
    for name, key in STEP_FIGURES.items():
        found = [row.get(key)] + [figures.get(key) for figures in steps.values() if isinstance(figures, dict)]
        out[name] = next((value for value in found if value is not None), None)
    out["steps"] = steps
    return out


# ---- measuring -------------------------------------------------------------------------------
def pair_task(gw: Gateway, judge: Judge, messages: list[dict], policy: str, base: str, sampling: dict,
              rng: random.Random):
    def task() -> dict:
        # store=False: measuring must not feed the loop (stored answers become training prompts)
        mine, theirs = (gw.chat(messages, model, store=False, **sampling).text for model in (policy, base))
        prompt = prompt_text(messages)
        flipped = rng.random() < 0.5  # the judge never knows which side is the policy
        choice = judge.vote(prompt, *((theirs, mine) if flipped else (mine, theirs)), rng, noisy=False)
        outcome = {"a": "win", "b": "loss"}.get(choice, "tie")
        if flipped and outcome != "tie":
            outcome = "loss" if outcome == "win" else "win"
        out = {"outcome": outcome, "policy_words": len(mine.split()), "base_words": len(theirs.split())}
        if judge.score is not None:
            out["policy_score"], out["base_score"] = judge.score(prompt, mine), judge.score(prompt, theirs)
        return out
    return task


def win_rate(gw: Gateway, judge: Judge, heldout: list, policy: str, base: str, s: SimSettings,
             rng: random.Random, label: str, log: Log) -> dict:
    """The policy's win rate against the base model on fresh samples; ties (and both_bad) count half."""
    sampling = {"max_tokens": s.max_tokens, "temperature": s.temperature}
    tasks = [pair_task(gw, judge, m, policy, base, sampling, random.Random(rng.random()))
             for m in heldout for _ in range(s.eval_samples)]
    started = time.monotonic()
    results = run_all(tasks, s.concurrency, Progress(f"{label} measuring", len(tasks), log))
    n = len(results)
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("win", "tie", "loss")}
    rate, half = mean_interval([{"win": 1.0, "tie": 0.5, "loss": 0.0}[r["outcome"]] for r in results])
    out = {"win_rate": None if rate is None else round(rate, 4),
           "ci95": None if half is None else round(half, 4), "n": n, **counts,
           "policy_words": _mean(r["policy_words"] for r in results),
           "base_words": _mean(r["base_words"] for r in results), "seconds": round(time.monotonic() - started, 1)}
    if judge.score is not None:
        out["policy_score"] = _mean(r["policy_score"] for r in results)
        out["base_score"] = _mean(r["base_score"] for r in results)
    return out


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


# ---- the whole simulation --------------------------------------------------------------------
def simulate(s: SimSettings, log: Log = print) -> dict:
    judge = load_judge(s.preference, s.score, s.noise, s.threshold)
    if judge.score is None:
        log("no score function: thumbs come from judging two answers to the same prompt")
    prompts = load_prompts(s.prompts)
    train, heldout = split_prompts(prompts, s.eval_prompts, s.seed)
    rng = random.Random(s.seed)
    cycler = PromptCycler(train, random.Random(rng.random()))
    gw = Gateway(s.gateway, s.api_key, None if s.api_key else s.user)
    started = time.monotonic()
    try:
        base = gw.base_model()
        log(f"gateway {s.gateway}: base model {base}; {len(train)} feedback prompts, {len(heldout)} held out")
        rounds = [{"round": 0, "eval": win_rate(gw, judge, heldout, "loopchat", base, s, rng, "round 0", log)}]
        log(f"round 0: win rate {rounds[0]['eval']['win_rate']:.3f} (before any cycle)")
        for k in range(1, s.cycles + 1):
            label = f"round {k}/{s.cycles}"
            t0 = time.monotonic()
            fb = collect_feedback(gw, judge, cycler, s, rng, label, log)
            t1 = time.monotonic()
            cycle_id = request_cycle(gw, s, log)
            row = wait_cycle(gw, cycle_id, s, log)
            t2 = time.monotonic()
            ev = win_rate(gw, judge, heldout, "loopchat", base, s, rng, label, log)
            rounds.append({"round": k, "feedback": fb, "cycle": cycle_figures(row), "eval": ev,
                           "timings": {"feedback_s": round(t1 - t0, 1), "cycle_s": round(t2 - t1, 1),
                                       "eval_s": round(time.monotonic() - t2, 1),
                                       "elapsed_s": round(time.monotonic() - started, 1)}})
            log(f"{label}: cycle {cycle_id} {row['state']}, win rate {ev['win_rate']:.3f}, "
                f"rm accuracy {_fmt(row.get('rm_accuracy'))}, kl {_fmt(row.get('kl'))}")
            if s.out:
                write_report(_report(s, base, rounds, started, train, heldout), s.out)
    finally:
        gw.close()
    report = _report(s, base, rounds, started, train, heldout)
    if s.out:
        write_report(report, s.out)
    return report


def _report(s: SimSettings, base: str, rounds: list[dict], started: float, train: list, heldout: list) -> dict:
    return {"settings": s.as_dict(), "base_model": base, "n_feedback_prompts": len(train),
            "n_heldout_prompts": len(heldout), "rounds": rounds,
            "final_win_rate": rounds[-1]["eval"]["win_rate"], "total_s": round(time.monotonic() - started, 1)}


# ---- output ----------------------------------------------------------------------------------
def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else f"{value:{spec}}"


def table(report: dict) -> str:
    """One line per round. The RM's held-out accuracy gets its 95% (Wilson) interval, KL splits into
    KL to the serving version and KL to the base model, and the capability guard's pass share (the
    candidate's, then the base model's) shows, when the cycles recorded them. A cycle marked `fb` was
    judged on PPO's fallback, its full candidate having moved too far."""
    cycles = [r["cycle"] for r in report["rounds"] if r.get("cycle")]
    with_ci = any(c.get("rm_accuracy_ci95") is not None for c in cycles)
    kl_base = any(c.get("kl_base") is not None for c in cycles)
    capability = any(c.get("capability_pass") is not None for c in cycles)
    acc_w = 20 if with_ci else 7
    kl_head = f"{'kl srv':>8}{'kl base':>8}" if kl_base else f"{'kl':>8}"
    cap_head = f"{'capab. (base)':>15}" if capability else ""
    lines = [f"{'round':>5}  {'cycle':<16}{'win rate (95% CI)':>18}  {'W/T/L':<11}{'rm acc':>{acc_w}}{kl_head}{cap_head}  "
             f"{'votes':>5} {'thumbs':>6} {'fixes':>5}  {'cycle s':>7}"]
    for r in report["rounds"]:
        cyc, fb, ev = r.get("cycle") or {}, r.get("feedback") or {}, r["eval"]
        state = f"{cyc.get('state', '-')}" + (f" {cyc['version']}" if cyc.get("version") else "")
        state += " fb" if cyc.get("fell_back") else ""
        thumbs = fb.get("thumbs_up", 0) + fb.get("thumbs_down", 0) if fb else None
        wtl = f"{ev['win']}/{ev['tie']}/{ev['loss']}"
        rate = _fmt(ev["win_rate"]) + (f" +- {ev['ci95']:.3f}" if ev.get("ci95") is not None else "")
        ci = cyc.get("rm_accuracy_ci95")
        acc = _fmt(cyc.get("rm_accuracy")) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        kl = _fmt(cyc.get("kl")).rjust(8) + (_fmt(cyc.get("kl_base")).rjust(8) if kl_base else "")
        if capability:
            base = cyc.get("capability_pass_base_model")
            kl += (_fmt(cyc.get("capability_pass")) + (f" ({base:.3f})" if base is not None else "")).rjust(15)
        lines.append(f"{r['round']:>5}  {state:<16}{rate:>18}  {wtl:<11}{acc:>{acc_w}}{kl}  "
                     f"{_fmt(fb.get('comparisons'), 'd'):>5} {_fmt(thumbs, 'd'):>6} "
                     f"{_fmt(fb.get('corrections'), 'd'):>5}  "
                     f"{_fmt((r.get('timings') or {}).get('cycle_s'), '.0f'):>7}")
    lines.append(f"final win rate {_fmt(report['final_win_rate'])} against {report['base_model']} "
                 f"in {report['total_s']:.0f} s")
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "report.json.partial"
    partial.write_text(json.dumps(report, indent=2, default=str))
    partial.replace(out / "report.json")
    plot(report, out / "report.png")


def kind_series(guard: list[tuple[int, dict]]) -> dict[str, list[tuple[int, float]]]:
    """{kind of capability item: [(round, the candidate's pass share of that kind), ...]} over the cycles whose
    gate judged capability kind by kind."""
    out: dict[str, list[tuple[int, float]]] = {}
    for k, c in guard:
        for kind, shares in (c.get("capability_pass_kinds") or {}).items():
            out.setdefault(kind, []).append((k, shares["candidate"]))
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    xs = [r["round"] for r in rounds]
    cyc = [r for r in rounds if r.get("cycle")]
    guard = [(r["round"], r["cycle"]) for r in cyc if r["cycle"].get("capability_pass") is not None]
    fig, axes = plt.subplots(4 if guard else 3, 1, figsize=(6, 9 if guard else 7), sharex=True)
    axes[0].errorbar(xs, [r["eval"]["win_rate"] for r in rounds], yerr=[r["eval"].get("ci95") or 0 for r in rounds],
                     fmt="o-", color="tab:blue", capsize=3)
    axes[0].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("win rate vs base")
    axes[0].set_ylim(0, 1)
    for ax, key, color, label in ((axes[1], "rm_accuracy", "tab:green", None),
                                  (axes[2], "kl", "tab:red", "kl to serving"),
                                  (axes[2], "kl_base", "tab:purple", "kl to base")):
        rows = [(r["round"], r["cycle"]) for r in cyc if r["cycle"].get(key) is not None]
        errors = None
        if key == "rm_accuracy":  # the Wilson interval: below and above, not symmetric
            cis = [(c[key], c.get("rm_accuracy_ci95") or (c[key], c[key])) for _, c in rows]
            errors = [[acc - lo for acc, (lo, _) in cis], [hi - acc for acc, (_, hi) in cis]]
        ax.errorbar([k for k, _ in rows], [c[key] for _, c in rows], yerr=errors, fmt="o-", color=color, capsize=3,
                    label=label)
    axes[1].set_ylabel("rm accuracy")
    axes[2].set_ylabel("kl")
    if any(r["cycle"].get("kl_base") is not None for r in cyc):
        axes[2].legend()
    axes[1].set_ylim(0, 1)
    if guard:  # the alignment tax: each candidate's capability pass rate, hollow where the cycle was not promoted
        ax = axes[3]
        ax.plot([k for k, _ in guard], [c["capability_pass"] for _, c in guard], "-", color="tab:orange")
        for promoted, style in ((True, {"label": "promoted"}), (False, {"mfc": "white", "label": "not promoted"})):
            kept = [(k, c) for k, c in guard if (c.get("state") == "promoted") == promoted]
            if kept:
                ax.plot([k for k, _ in kept], [c["capability_pass"] for _, c in kept], "o", color="tab:orange", **style)
        for kind, points in kind_series(guard).items():  # thin dashed lines: each kind of item, where the gate judged kinds
            ax.plot([k for k, _ in points], [v for _, v in points], "--", lw=0.9, label=kind)
        base = next((c["capability_pass_base_model"] for _, c in guard if c.get("capability_pass_base_model") is not None), None)
        if base is not None:
            ax.axhline(base, color="grey", lw=0.8, ls="--", label="base model")
        ax.set_ylabel("capability pass rate")
        ax.set_ylim(0, 1)
        ax.legend(fontsize="x-small", ncol=2)
    axes[-1].set_xlabel("cycle")
    axes[-1].set_xticks(xs)
    s = report["settings"]
    fig.suptitle(f"loopchat simulate: {s['preference']}, noise {s['noise']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
