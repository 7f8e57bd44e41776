"""`loopchat simulate`: the simulated users' pieces on their own, then a short simulation end to
end against a real gateway and a real worker on the real 135M model (one tiny cycle)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time

import httpx
import pytest
from click.testing import CliRunner
from conftest import LOOPCHAT, ROOT, Server, free_port

from feedback import Store, cycles
from loopchat import preferences
from loopchat.cli import cli
from loopchat.simulate import (DEFAULT_PROMPTS, Judge, SimSettings, SimulationError, load_judge, kind_series, load_prompts, plot,
                               resolve, simulate, split_prompts, table)

TINY_CYCLE = {
    "min_pairs": 4,
    "sft": {"max_steps": 4, "batch_size": 4, "max_len": 256},
    "rm": {"epochs": 2, "batch_size": 4, "max_len": 256},
    "ppo": {"steps": 3, "batch_size": 4, "minibatches": 1, "ppo_epochs": 1, "max_new_tokens": 24},
    "gate": {"max_prompts": 4, "batch_size": 4, "max_new_tokens": 24, "canary_max_new_tokens": 32},
}
PROMPTS = ["What is the capital of France?", "Why is the sky blue?", "How do I boil an egg?",
           "Name a fruit that is yellow.", "What is 2 plus 2?", "Give me a tip for sleeping better.",
           "What do bees make?", "How many legs does a cat have?", "What is the largest ocean?",
           "Suggest a name for a dog.", "What colour is grass?", "Why do we need water?",
           '[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is ice?"}]',
           '{"messages": [{"role": "user", "content": "Say hello in French."}]}']


# ---- the pieces --------------------------------------------------------------------------------
def test_prompt_set_ships_and_parses(tmp_path):
    prompts = load_prompts(DEFAULT_PROMPTS)
    assert len(prompts) >= 200 and all(p[-1]["role"] == "user" for p in prompts)
    assert len({p[-1]["content"] for p in prompts}) == len(prompts)
    path = tmp_path / "p.txt"
    path.write_text("# a comment\n\n" + "\n".join(PROMPTS) + "\n")
    mixed = load_prompts(path)
    assert len(mixed) == len(PROMPTS) and mixed[-2][0] == {"role": "system", "content": "Answer briefly."}
    train, held = split_prompts(mixed, 3, seed=1)
    assert len(held) == 3 and len(train) == len(PROMPTS) - 3 and not any(h in train for h in held)
    assert split_prompts(mixed, 3, seed=1) == (train, held)
    path.write_text("{not json\n")
    with pytest.raises(SimulationError):
        load_prompts(path)


def test_builtins_and_plugins():
    assert resolve("concise") is preferences.concise
    assert resolve("loopchat.preferences:polite") is preferences.polite
    with pytest.raises(SimulationError):
        resolve("nonexistent")
    judge = load_judge("concise")
    assert judge.score is preferences.concise_score and judge.correct is preferences.concise_correct
    short, long_cut = "Paris.", "Paris is the capital of France, a large country with a long history and"
    assert preferences.concise("q", short, long_cut) == "a" and preferences.concise("q", long_cut, short) == "b"
    assert preferences.concise_correct("q", "Paris is big. It has many museums and") == "Paris is big."
    assert preferences.polite("q", "Paris.", "Thanks for asking! Paris.") == "b"
    assert preferences.no_lists("q", "- one\n- two", "One and two.") == "b"
    # A plain function with no score: thumbs are derived by comparing two answers.
    assert load_judge("random:choice").score is None

    rng = random.Random(0)
    always_a = Judge(lambda p, a, b: "a", noise=0.5)
    votes = [always_a.vote("q", "x", "y", rng) for _ in range(400)]
    assert 0.15 < votes.count("b") / 400 < 0.35  # half the votes random, half of those "b"
    assert all(always_a.vote("q", "x", "y", rng, noisy=False) == "a" for _ in range(50))
    with pytest.raises(SimulationError):
        Judge(lambda p, a, b: "maybe").vote("q", "x", "y", rng)
    plain = load_judge("bench.preferences:plain_words")  # the benchmark's non-built-in user: pairwise only
    assert plain.score is None and plain.correct is None
    assert plain.vote("q", "It is big and old.", "Its magnificence is considerable.", rng, noisy=False) == "a"
    assert plain.vote("q", "A cat sat.", "A dog sat.", rng, noisy=False) == "tie"
    learned = load_judge("bench.preferences:long_words")
    assert learned.vote("q", "It is big and old.", "Its magnificence is considerable.", rng, noisy=False) == "b"
    assert learned.vote("q", "A cat sat.", "A dog sat.", rng, noisy=False) == "tie"
    assert learned.vote("q", "Considerable magnificence.", "", rng, noisy=False) == "a"
    examples = load_judge("bench.preferences:gives_examples")
    assert examples.vote("q", "Fruit is sweet.", "Fruit, such as figs (e.g. dried), is sweet.", rng, noisy=False) == "b"
    assert examples.vote("q", "Such as it is.", "For instance, figs.", rng, noisy=False) == "tie"
    assert examples.vote("q", "Suchas eg.", "", rng, noisy=False) == "a"
    figures = load_judge("bench.preferences:gives_figures")
    assert figures.vote("q", "It is far.", "It is 384,400 km away, 1.3 light-seconds.", rng, noisy=False) == "b"
    assert figures.vote("q", "About 20% of it, in 1969.", "1. Two, in v2, cost 3.5 and 4.", rng, noisy=False) == "tie"
    lists = load_judge("bench.preferences:uses_lists")
    assert lists.vote("q", "Three:\n- red\n- blue\n\u2022 green", "1. red\n2) blue", rng, noisy=False) == "a"
    assert lists.vote("q", "It is -5 degrees, **cold**.", "**Cold** * 2", rng, noisy=False) == "tie"
    topic = load_judge("bench.preferences:on_topic")
    question = "Why do volcanoes erupt, and what would happen next?"
    assert topic.vote(question, "Magma rises.", "A volcano erupts when magma rises.", rng, noisy=False) == "b"
    assert topic.vote(question, "What would they do? They erupt.", "It erupts.", rng, noisy=False) == "tie"


def test_ranking_by_the_judge():
    rng = random.Random(0)
    judge = load_judge("concise")
    answers = {"a": "Paris is the capital of France, and it is a big city with a lot of museums.",
               "b": "Paris.", "c": "It is Paris, in France.", "d": "Paris is, in the end, the one"}
    # concise: b (1 word) beats c (5 words) beats a (18 words, ended) beats d (unfinished)
    assert judge.rank("q", answers, rng) == [["b"], ["c"], ["a"], ["d"]]
    # Equal answers share a group; the others keep their order.
    assert judge.rank("q", {"a": "Yes.", "b": "It is yes, surely.", "c": "No."}, rng) == [["a", "c"], ["b"]]
    # A cycle (rock, paper, scissors) gives every answer the same Copeland score: one group.
    beats = {("rock", "scissors"), ("scissors", "paper"), ("paper", "rock")}
    rps = Judge(lambda p, x, y: "a" if (x, y) in beats else "b" if (y, x) in beats else "tie")
    assert rps.rank("q", {"a": "rock", "b": "paper", "c": "scissors"}, rng) == [["a", "b", "c"]]
    # Every pair both_bad: no ranking, and the vote says all_bad.
    hates = Judge(lambda p, x, y: "both_bad")
    assert hates.rank("q", {"a": "x", "b": "y", "c": "z"}, rng) is None
    assert hates.ballot("q", {"a": "x", "b": "y", "c": "z"}, rng) == {"choice": "all_bad"}
    # Two answers keep today's single choice; more get the ranking.
    assert judge.ballot("q", {"a": answers["a"], "b": answers["b"]}, rng) == {"choice": "b"}
    assert judge.ballot("q", answers, rng) == {"ranking": [["b"], ["c"], ["a"], ["d"]]}
    # Noise: a share `noise` of rankings is a random strict order of all the labels.
    noisy = Judge(preferences.concise, noise=0.5)
    ranks = [noisy.rank("q", answers, rng) for _ in range(400)]
    assert all(sorted(x for g in r for x in g) == list("abcd") and all(len(g) == 1 for g in r) for r in ranks)
    assert 0.45 < sum(r != [["b"], ["c"], ["a"], ["d"]] for r in ranks) / 400 < 0.58  # 0.5 * 23/24


def test_table_and_plot(tmp_path):
    ev = {"win_rate": 0.5, "ci95": 0.4, "n": 4, "win": 1, "tie": 2, "loss": 1}
    report = {"settings": {"preference": "concise", "noise": 0.1}, "base_model": "base", "total_s": 12.0,
              "final_win_rate": 0.75, "rounds": [
                  {"round": 0, "eval": ev},
                  {"round": 1, "eval": {**ev, "win_rate": 0.75, "win": 3, "tie": 0}, "timings": {"cycle_s": 60},
                   "feedback": {"comparisons": 8, "thumbs_up": 2, "thumbs_down": 2, "corrections": 1},
                   "cycle": {"state": "promoted", "version": "v1", "rm_accuracy": 0.8, "kl": 0.3}},
                  {"round": 2, "eval": ev, "cycle": {"state": "promoted", "version": "v2", "fell_back": {"failed": ["kl"]}}}]}
    text = table(report)
    assert "promoted v1" in text and "0.750 +- 0.400" in text and "0.800" in text
    assert "promoted v2 fb" in text and "promoted v1 fb" not in text  # v2 is PPO's shorter step
    assert "capab." not in text  # cycles that did not run the capability guard get no column
    plot(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    # Cycles that ran the capability guard get a fourth panel: their candidates' pass rates.
    report["rounds"][1]["cycle"].update(capability_pass=0.7, capability_pass_base_model=0.72)
    report["rounds"][2]["cycle"].update(state="rejected", capability_pass=0.2, capability_pass_base_model=0.72)
    plot(report, tmp_path / "guard.png")
    png_height = lambda name: int.from_bytes((tmp_path / name).read_bytes()[20:24], "big")
    assert png_height("guard.png") > png_height("r.png")
    # and, where the gate judged kinds of item, a line for each kind
    report["rounds"][2]["cycle"]["capability_pass_kinds"] = {"facts": {"candidate": 0.9, "baseline": 0.8},
                                                              "explanations": {"candidate": 0.1, "baseline": 0.5}}
    guard = [(r["round"], r["cycle"]) for r in report["rounds"] if r.get("cycle")]
    assert kind_series(guard) == {"facts": [(2, 0.9)], "explanations": [(2, 0.1)]}
    plot(report, tmp_path / "kinds.png")
    assert (tmp_path / "kinds.png").read_bytes() != (tmp_path / "guard.png").read_bytes()


# ---- the whole simulation on the fake engine ----------------------------------------------------------
class InstantWorker:
    """Stands in for `loopchat worker` on a gateway's store: takes each queued cycle and ends it at once as
    `rejected` with the figures a real cycle records (on its row and in its steps)."""

    FIGURES = {"reward_model": {"accuracy": 0.7, "accuracy_ci95": [0.55, 0.82]},
               "evaluating": {"kl": 0.25, "kl_base": 3.5, "capability_pass": 0.9, "capability_pass_base_model": 1.0}}

    def __init__(self, db_path):
        self.store, self.stop = Store(db_path), threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            row = cycles.active_cycle(self.store)
            if row and row["state"] == "queued" and cycles.claim(self.store, row["id"]):
                cycles.advance(self.store, row["id"], "reward_model")
                cycles.advance(self.store, row["id"], "evaluating", self.FIGURES["reward_model"], rm_accuracy=0.7)
                cycles.advance(self.store, row["id"], "rejected", self.FIGURES["evaluating"], kl=0.25)
            self.stop.wait(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(10)


def test_simulation_ranks_k_answers_and_asks_for_the_recipe(fake_gateway, tmp_path):
    """--rank-k 3: every comparison asks for three answers and is voted with a ranking the API stores as sent;
    --recipe reaches the cycle request; the table shows the RM's interval and both KLs."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    settings = SimSettings(gateway=fake_gateway.url, prompts=prompts, cycles=1, comparisons=12, thumbs=2,
                           eval_prompts=3, rank_k=3, recipe="sft", noise=0.5, concurrency=2, poll_s=0.05)
    with InstantWorker(fake_gateway.db_path):
        report = simulate(settings, log=lambda line: None)

    fb, cyc = report["rounds"][1]["feedback"], report["rounds"][1]["cycle"]
    assert fb["comparisons"] == 12 and sum(fb["votes"].values()) == 12 and set(fb["votes"]) == {"ranking", "all_bad"}
    with fake_gateway.db() as db:
        sizes = [r[0] for r in db.execute("SELECT count(*) FROM candidates GROUP BY comparison_id")]
        rankings = [json.loads(r[0]) for r in db.execute("SELECT ranking FROM votes")]
        recipe = db.execute("SELECT recipe FROM cycles WHERE id = ?", [cyc["id"]]).fetchone()[0]
    assert sizes == [3] * 12 and len(rankings) == 12
    assert all(sorted(x for group in r for x in group) == ["a", "b", "c"] for r in rankings)
    # The fake engine gives the three candidates the same text: the judge ties them (one group), and only
    # noise (half the votes) orders them.
    assert any(len(r) == 3 for r in rankings) and any(len(r) == 1 for r in rankings)
    assert recipe == "sft" and cyc["recipe"] == "sft"
    assert cyc["rm_accuracy"] == 0.7 and cyc["rm_accuracy_ci95"] == [0.55, 0.82]
    assert cyc["kl"] == 0.25 and cyc["kl_base"] == 3.5
    text = table(report)
    assert "0.700 [0.55, 0.82]" in text and "kl srv" in text and "kl base" in text and "3.500" in text
    assert cyc["capability_pass"] == 0.9 and "capab. (base)" in text and "0.900 (1.000)" in text
    plot(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"

    # The command with neither option: no recipe in the request (the worker's default), pairwise choices.
    with InstantWorker(fake_gateway.db_path):
        run = CliRunner().invoke(cli, ["simulate", "--gateway", fake_gateway.url, "--prompts", str(prompts),
                                       "--cycles", "1", "--comparisons", "2", "--thumbs", "0", "--eval-prompts", "3",
                                       "--out", str(tmp_path / "out")])
    assert run.exit_code == 0, run.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rounds"][1]["cycle"]["recipe"] is None and report["settings"]["rank_k"] == 2
    assert report["rounds"][1]["feedback"]["votes"].keys() == {"a", "b", "tie", "both_bad"}
    with fake_gateway.db() as db:  # this run's two votes, stored as the choices it reports
        latest = sorted(r[0] for r in db.execute("SELECT choice FROM votes ORDER BY created_at DESC LIMIT 2"))
    assert latest == sorted(c for c, n in report["rounds"][1]["feedback"]["votes"].items() for _ in range(n))


# ---- end to end --------------------------------------------------------------------------------
@pytest.fixture
def sim_service(vllm_gateway, model_dir, tmp_path):
    """A gateway of its own in front of the shared vLLM server, and a worker on its data dir that
    only runs cycles someone asks for (its feedback thresholds are out of reach)."""
    data = tmp_path / "data"
    port = free_port()
    gateway = Server(["serve", "--engine-url", vllm_gateway.engine_url, "--port", str(port), "--data-dir", str(data),
                      "--model", str(model_dir)], data, port).start()
    config = tmp_path / "cycle.json"
    config.write_text(json.dumps(TINY_CYCLE))
    log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen(
        LOOPCHAT + ["worker", "--data-dir", str(data), "--model", str(model_dir), "--gateway", gateway.url,
                    "--config", str(config), "--interval", "2", "--min-thumbs", "100000",
                    "--min-comparisons", "100000", "--min-corrections", "100000"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    gateway.worker_log = tmp_path / "worker.log"
    yield gateway
    worker.terminate()
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()
    gateway.stop()


@pytest.mark.slow
@pytest.mark.timeout(1000)
def test_simulation_end_to_end(sim_service, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    started = time.monotonic()
    run = subprocess.run(
        LOOPCHAT + ["simulate", "--gateway", sim_service.url, "--prompts", str(prompts), "--preference", "concise",
                    "--noise", "0.1", "--cycles", "1", "--comparisons", "10", "--thumbs", "6",
                    "--correction-rate", "1.0", "--eval-prompts", "3", "--concurrency", "2", "--max-tokens", "24",
                    "--cycle-timeout", "700", "--out", str(out), "--seed", "3"],
        capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert run.returncode == 0, f"{run.stderr[-3000:]}\n--- worker ---\n{sim_service.worker_log.read_text()[-3000:]}"
    assert "ETA" in run.stderr and "final win rate" in run.stdout

    report = json.loads((out / "report.json").read_text())
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert report["settings"]["preference"] == "concise" and report["settings"]["noise"] == 0.1
    assert "api_key" not in report["settings"]
    assert report["base_model"] == "SmolLM2-135M-Instruct" and report["n_heldout_prompts"] == 3
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    for r in report["rounds"]:
        ev = r["eval"]
        assert ev["n"] == 3 and ev["win"] + ev["tie"] + ev["loss"] == 3 and 0 <= ev["win_rate"] <= 1
        assert ev["ci95"] >= 0
    assert report["final_win_rate"] == report["rounds"][1]["eval"]["win_rate"]
    assert report["total_s"] <= time.monotonic() - started

    one = report["rounds"][1]
    fb = one["feedback"]
    assert fb["comparisons"] == 10 and sum(fb["votes"].values()) == 10
    # Every rated answer gets the user's correction where it differs (at a rate of 0.5, three answers to
    # correct gave none about one run in eight).
    assert fb["thumbs_up"] + fb["thumbs_down"] == 6 and 1 <= fb["corrections"] <= 6
    assert set(one["timings"]) >= {"feedback_s", "cycle_s", "eval_s"}

    cycle = one["cycle"]
    assert cycle["state"] in ("promoted", "rejected"), f"{cycle}\n--- worker ---\n{sim_service.worker_log.read_text()[-3000:]}"
    assert set(cycle["steps"]) >= {"building_data", "sft", "reward_model", "ppo", "evaluating"}
    assert cycle["n_pairs"] >= 4 and cycle["version"] == "v1"
    assert cycle["kl"] is not None and "rm_accuracy" in cycle
    row = httpx.get(f"{sim_service.url}/admin/cycles/{cycle['id']}").json()
    assert row["state"] == cycle["state"] and row["trigger"] == "manual"
    if cycle["state"] == "promoted":  # the alias now serves the new version
        listing = httpx.get(f"{sim_service.url}/admin/adapters").json()
        assert listing["serving"] == "v1"

    # The feedback went through the public API, as the simulated users' own.
    with sim_service.db() as db:
        givers = {r[0] for r in db.execute("SELECT c.user FROM votes v JOIN comparisons c ON c.id = v.comparison_id "
                                           "UNION SELECT user FROM feedback")}
        n_votes = db.execute("SELECT count(*) FROM votes").fetchone()[0]
        n_corrections = db.execute("SELECT count(*) FROM corrections").fetchone()[0]
        stored = dict(db.execute("SELECT source, count(*) FROM completions GROUP BY source").fetchall())
    assert n_votes == 10 and n_corrections == fb["corrections"]
    # Two answers per comparison and one per thumb; the measuring traffic (store: false) left nothing.
    assert stored == {"comparison": 20, "chat": 6}
    assert givers == {"simulated-users"}  # who voted (a vote is its comparison's) and who gave thumbs


def test_simulate_command_is_registered():
    out = subprocess.run([sys.executable, "-m", "loopchat.cli", "simulate", "--help"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0 and "--preference" in out.stdout and "--cycles" in out.stdout
