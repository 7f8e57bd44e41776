"""The worker as real processes on a real SQLite file: the feedback trigger, one cycle at a
time across two workers, and a worker SIGKILLed in the middle of PPO."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import wait_for
from feedback_fixtures import add_completion
from train_fixtures import real_model_dir, tiny_model_dir  # noqa: F401

from feedback import Store, cycles

ROOT = Path(__file__).resolve().parent.parent
TINY_CYCLE = {
    "min_pairs": 4,
    "sft": {"max_steps": 2, "batch_size": 4, "max_len": 128},
    "rm": {"epochs": 1, "max_steps": 3, "batch_size": 4, "max_len": 128},
    "ppo": {"steps": 6, "batch_size": 4, "minibatches": 1, "ppo_epochs": 1, "max_new_tokens": 8},
    "gate": {"max_prompts": 4, "batch_size": 4, "max_new_tokens": 8, "canaries": [], "min_rm_accuracy": 0.0,
             "min_reward_gain": -1000.0, "max_kl": 1000.0},
}


def fill(store: Store, n: int = 24) -> None:
    """n comparisons, each voted for its shorter answer."""
    for i in range(n):
        a = add_completion(store, f"a{i}", prompt=f"Question {i}: what is {i} plus {i}?", answers=(f"{2 * i}.",))
        b = add_completion(store, f"b{i}", prompt=f"Question {i}: what is {i} plus {i}?",
                           answers=(f"Well, let me think about {i} plus {i} for a long while before answering.",))
        store.vote("alice", store.create_comparison("alice", a, b), "a")


def start_worker(data: Path, model: Path, config: Path, min_comparisons: int) -> subprocess.Popen:
    log = open(data / f"worker-{time.monotonic_ns()}.log", "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "loopchat.cli", "worker", "--data-dir", str(data), "--model", str(model),
         "--no-promote", "--config", str(config), "--cycle-minutes", "5", "--interval", "1", "--min-thumbs", "0",
         "--min-corrections", "0", "--min-comparisons", str(min_comparisons)],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(30)


@pytest.mark.slow
def test_trigger_one_cycle_at_a_time_and_sigkill_mid_ppo(tmp_path, tiny_model_dir):  # noqa: F811
    store = Store(tmp_path / "loopchat.db")
    fill(store)
    # PPO long enough (~10x the tiny cycle's) that a poller starved on a loaded machine still finds it running
    settings = {**TINY_CYCLE, "ppo": {**TINY_CYCLE["ppo"], "steps": 60}}
    config = tmp_path / "cycle.json"
    config.write_text(json.dumps(settings))

    # Below the threshold nothing runs, however many checks pass.
    idle = [start_worker(tmp_path, tiny_model_dir, config, min_comparisons=100) for _ in range(2)]
    time.sleep(8)  # an absence: 8 one-second checks may pass and must start nothing
    assert all(p.poll() is None for p in idle)
    stop(*idle)
    assert cycles.list_cycles(store) == []

    # Above it, two workers race and exactly one cycle starts.
    workers = [start_worker(tmp_path, tiny_model_dir, config, min_comparisons=10) for _ in range(2)]
    try:
        running = wait_for(lambda: (c := cycles.active_cycle(store)) and c["state"] == "ppo" and c, 240,
                           "a cycle reaching PPO")
        assert len(cycles.list_cycles(store)) == 1
        owner_pid = int(running["worker"].rsplit(":", 1)[1])
        owner = next(p for p in workers if p.pid == owner_pid)
        owner.send_signal(signal.SIGKILL)
        owner.wait()

        # The surviving worker fails the orphan, nothing was published, then it runs the next cycle.
        first = wait_for(lambda: (c := cycles.get_cycle(store, running["id"]))["state"] == "failed" and c, 60,
                         "the orphaned cycle marked failed")
        assert "died during ppo" in first["error"]
        assert cycles.list_adapters(store) == [] and cycles.serving_version(store) == (None, None)
        assert not list((tmp_path / "adapters").glob("v*"))
        second = wait_for(lambda: next((c for c in cycles.list_cycles(store) if c["id"] != running["id"]
                                        and c["state"] in cycles.TERMINAL), None), 300, "the next cycle ending")
        assert second["state"] == "published", second["error"]
        assert second["version"] == "v1" and (tmp_path / "adapters" / "v1" / "manifest.json").is_file()
        assert set(second["steps"]) >= {"building_data", "sft", "reward_model", "ppo", "evaluating"}
        # 5 minutes hold every fixed size of this tiny cycle
        assert second["budget_s"] == 300 and second["steps"]["ppo"]["planned_steps"] == settings["ppo"]["steps"]
        time.sleep(3)  # more checks pass: no new feedback, no new cycle
        assert len(cycles.list_cycles(store)) == 2
    finally:
        stop(*workers)


def test_the_worker_runs_a_queued_cycle_with_its_recipe(tmp_path, monkeypatch):
    """A cycle queued with a recipe (POST /admin/cycles {"recipe": ...}) runs it; one queued without
    runs the worker's (fast: the cycle's steps are replaced by a recorder)."""
    from train import cycle as cycle_module
    from train.worker import Thresholds, Worker

    ran = []
    monkeypatch.setattr(cycle_module, "_steps", lambda store, cycle_id, cfg, work, beat: ran.append(cfg.recipe))
    store = Store(tmp_path / "loopchat.db")
    cfg = cycle_module.CycleConfig(model_dir=tmp_path, adapters_dir=tmp_path / "adapters", recipe="rlhf")
    worker = Worker(store, cfg, Thresholds())
    queued = cycles.queue_cycle(store, recipe="sft")
    assert worker.poll()["recipe"] == "sft"
    cycles.advance(store, queued, "published")
    cycles.queue_cycle(store)
    assert worker.poll()["recipe"] == "rlhf" and ran == ["sft", "rlhf"]
