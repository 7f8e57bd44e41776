"""`loopchat simulate`: the simulated users' pieces on their own, then a short simulation end to
end against a real gateway and a real worker on the real 135M model (one tiny cycle)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import httpx
import pytest
from conftest import LOOPCHAT, ROOT, Server, free_port

from loopchat import preferences
from loopchat.simulate import (DEFAULT_PROMPTS, Judge, SimulationError, load_judge, load_prompts, plot, resolve,
                               split_prompts, table)

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


def test_table_and_plot(tmp_path):
    ev = {"win_rate": 0.5, "ci95": 0.4, "n": 4, "win": 1, "tie": 2, "loss": 1}
    report = {"settings": {"preference": "concise", "noise": 0.1}, "base_model": "base", "total_s": 12.0,
              "final_win_rate": 0.75, "rounds": [
                  {"round": 0, "eval": ev},
                  {"round": 1, "eval": {**ev, "win_rate": 0.75, "win": 3, "tie": 0}, "timings": {"cycle_s": 60},
                   "feedback": {"comparisons": 8, "thumbs_up": 2, "thumbs_down": 2, "corrections": 1},
                   "cycle": {"state": "promoted", "version": "v1", "rm_accuracy": 0.8, "kl": 0.3}}]}
    text = table(report)
    assert "promoted v1" in text and "0.750 +- 0.400" in text and "0.800" in text
    plot(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


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
@pytest.mark.timeout(600)
def test_simulation_end_to_end(sim_service, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    started = time.monotonic()
    run = subprocess.run(
        LOOPCHAT + ["simulate", "--gateway", sim_service.url, "--prompts", str(prompts), "--preference", "concise",
                    "--noise", "0.1", "--cycles", "1", "--comparisons", "10", "--thumbs", "6",
                    "--correction-rate", "0.5", "--eval-prompts", "3", "--concurrency", "2", "--max-tokens", "24",
                    "--cycle-timeout", "400", "--out", str(out), "--seed", "3"],
        capture_output=True, text=True, cwd=ROOT, timeout=540)
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
    assert fb["thumbs_up"] + fb["thumbs_down"] == 6 and fb["corrections"] >= 1
    assert set(one["timings"]) >= {"feedback_s", "cycle_s", "eval_s"}

    cycle = one["cycle"]
    assert cycle["state"] in ("promoted", "rejected"), cycle
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
