"""`loopchat cycle run` beside a worker's cycle: it says which cycle runs, who started it and
since when, `--wait` runs the new one right after it, and a queued cycle nobody took runs here.
The cycle itself is replaced by a stand-in that publishes at once (fast; no model)."""

import json
import re

import httpx
import pytest
from click.testing import CliRunner

from feedback import Store, cycles
from loopchat.commands import loop

RUNNING = r"cycle 1 \(scheduled, started \d+ s ago by worker " + re.escape(cycles.this_worker()) + r"\) is in step ppo"


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")  # a checkpoint as far as the CLI can tell
    return tmp_path


@pytest.fixture
def ran(monkeypatch) -> list[int]:
    """The cycles the stand-in ran, in order."""
    done = []

    def run_cycle(store, cycle_id, cfg):
        done.append(cycle_id)
        cycles.advance(store, cycle_id, "published")
        return cycles.get_cycle(store, cycle_id)

    monkeypatch.setattr("train.cycle.run_cycle", run_cycle)
    return done


def running_cycle(store: Store) -> int:
    """A scheduled cycle in PPO, run by a live worker (this process)."""
    cycle_id = cycles.queue_cycle(store, trigger="scheduled")
    cycles.claim(store, cycle_id)
    cycles.advance(store, cycle_id, "ppo")
    return cycle_id


def cycle_run(data_dir, *args: str):
    return CliRunner().invoke(loop.cycle, ["run", "--data-dir", str(data_dir), "--model", str(data_dir / "model"),
                                           "--no-promote", *args])


def test_run_says_which_cycle_runs_who_started_it_and_since_when(data_dir, ran):
    store = Store(data_dir / "loopchat.db")
    running_cycle(store)
    result = cycle_run(data_dir)
    assert result.exit_code == 1 and ran == []
    assert re.fullmatch(f"Error: {RUNNING}; `loopchat cycle run --wait` runs yours right after it\n", result.output)


def test_run_wait_runs_right_after_the_running_cycle(data_dir, ran, monkeypatch, caplog):
    store = Store(data_dir / "loopchat.db")
    first = running_cycle(store)
    waits = []

    def the_worker_finishes(seconds):  # instead of sleeping: the other cycle ends meanwhile
        waits.append(seconds)
        cycles.advance(store, first, "promoted")

    monkeypatch.setattr(loop, "sleep", the_worker_finishes)
    caplog.set_level("INFO")
    result = cycle_run(data_dir, "--wait")
    assert result.exit_code == 0, result.output
    assert waits == [loop.WAIT_POLL_S] and re.search(f"waiting: {RUNNING}", caplog.text)
    second = cycles.get_cycle(store, ran[0])
    assert ran == [first + 1] and second["trigger"] == "manual" and second["worker"] == cycles.this_worker()
    assert result.output.startswith(f"cycle {first + 1}: published (manual)")


def test_run_takes_a_queued_cycle_that_no_worker_has_picked_up(data_dir, ran):
    store = Store(data_dir / "loopchat.db")
    queued = cycles.queue_cycle(store, trigger="manual")  # e.g. the dashboard's button with no worker running
    result = cycle_run(data_dir)
    assert result.exit_code == 0, result.output
    assert ran == [queued] and cycles.get_cycle(store, queued)["worker"] == cycles.this_worker()


def test_cycle_minutes_from_the_flag_else_the_config_else_ten(data_dir):
    from loopchat.settings import Settings

    settings = Settings(data_dir=data_dir, model=data_dir / "model")
    config = data_dir / "cycle.json"
    config.write_text(json.dumps({"cycle_minutes": 15, "ppo": {"steps": 3}}))

    def minutes(config_file, flag):
        return loop.cycle_config(settings, "http://gw", None, False, config_file, flag).cycle_minutes

    assert (minutes(None, None), minutes(config, None), minutes(config, 0.0), minutes(None, 4.5)) == (10.0, 15, 0.0, 4.5)
    assert "--cycle-minutes" in CliRunner().invoke(loop.worker, ["--help"]).output


def test_admin_409_says_the_same(fake_gateway):
    running_cycle(fake_gateway.store)
    r = httpx.post(fake_gateway.url + "/admin/cycles")
    assert r.status_code == 409
    message = r.json()["error"]["message"]
    assert re.fullmatch("C" + RUNNING[1:] + r"; ask again once it has ended \(`loopchat cycle run --wait` waits for it\)\.",
                        message), message


def test_a_policy_rank_the_server_refuses_is_a_one_line_error(data_dir, ran, monkeypatch):
    (data_dir / "cycle.json").write_text(json.dumps({"sft": {"lora_r": 32}}))
    monkeypatch.setenv("LOOPCHAT_MAX_LORA_RANK", "16")
    result = cycle_run(data_dir, "--config", str(data_dir / "cycle.json"))
    assert result.exit_code == 1 and "LoRA rank 32 is above the server's maximum 16" in result.output
    assert ran == []
    monkeypatch.setenv("LOOPCHAT_MAX_LORA_RANK", "32")
    assert cycle_run(data_dir, "--config", str(data_dir / "cycle.json")).exit_code == 0 and ran == [1]


# ---- recipes ------------------------------------------------------------------------------------
def test_admin_queues_a_cycle_with_its_recipe_and_refuses_an_unknown_one(fake_gateway):
    from conftest import assert_error

    url = fake_gateway.url + "/admin/cycles"
    for body, param in (({"recipe": "dpo-ish"}, "recipe"), ({"recipe": 3}, "recipe"), ({"recipes": "sft"}, "recipes")):
        assert_error(httpx.post(url, json=body), 400, param=param, code="invalid_value")
    assert_error(httpx.post(url, json=["sft"]), 400, code="invalid_value")
    assert cycles.list_cycles(fake_gateway.store) == []  # nothing queued
    r = httpx.post(url, json={"recipe": "sft"})
    assert r.status_code == 202 and r.json()["recipe"] == "sft" and r.json()["state"] == "queued"
    cycles.request_cancel(fake_gateway.store, r.json()["id"])
    r = httpx.post(url)  # no body: the worker's recipe
    assert r.status_code == 202 and r.json()["recipe"] is None


def test_a_queued_recipe_wins_over_the_config_and_is_recorded(data_dir, monkeypatch):
    """What the worker and `cycle run` do: run_cycle runs the row's recipe, else the config's, and writes it down."""
    from train import cycle as cycle_module

    ran = []
    monkeypatch.setattr(cycle_module, "_steps", lambda store, cycle_id, cfg, work, beat: ran.append(cfg.recipe))
    store = Store(data_dir / "loopchat.db")
    cfg = cycle_module.CycleConfig(model_dir=data_dir / "model", adapters_dir=data_dir / "adapters", recipe="rlhf")
    queued = cycles.queue_cycle(store, recipe="sft", claim=True)
    assert cycle_module.run_cycle(store, queued, cfg)["recipe"] == "sft"
    cycles.advance(store, queued, "published")
    plain = cycles.queue_cycle(store, claim=True)
    assert cycle_module.run_cycle(store, plain, cfg)["recipe"] == "rlhf"
    assert ran == ["sft", "rlhf"]


def test_cycle_run_recipe_flag_is_stored_and_validated(data_dir, ran):
    store = Store(data_dir / "loopchat.db")
    result = cycle_run(data_dir, "--recipe", "sft")
    assert result.exit_code == 0, result.output
    assert cycles.get_cycle(store, ran[0])["recipe"] == "sft"
    result = cycle_run(data_dir, "--recipe", "nope")
    assert result.exit_code == 2 and "'nope' is not one of 'rlhf', 'sft', 'bon'" in result.output and ran == [1]
    assert "--recipe [rlhf|sft|bon]" in CliRunner().invoke(loop.worker, ["--help"]).output


@pytest.mark.parametrize("overrides, message", [({"recipe": "ppo-only"}, "unknown recipe 'ppo-only'; one of rlhf, sft, bon"),
                                                ({"init": "scratch"}, "init must be one of serving, base"),
                                                ({"end_at": "canary", "canary_share": 1.5}, "canary_share must be between 0 and 1"),
                                                ({"ptx_data": "wiki"}, "ptx_data must be demonstrations or skills or a JSONL file, not 'wiki'")])
def test_a_bad_cycle_config_is_a_one_line_error(data_dir, ran, overrides, message):
    (data_dir / "cycle.json").write_text(json.dumps(overrides))
    result = cycle_run(data_dir, "--config", str(data_dir / "cycle.json"))
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert ran == []


def test_recipe_flag_over_the_config_file(data_dir):
    from loopchat.settings import Settings

    settings = Settings(data_dir=data_dir, model=data_dir / "model")
    config = data_dir / "cycle.json"
    config.write_text(json.dumps({"recipe": "sft", "init": "base", "end_at": "canary", "canary_share": 0.2}))
    cfg = loop.cycle_config(settings, "http://gw", None, False, config, None)
    assert (cfg.recipe, cfg.init, cfg.end_at, cfg.canary_share) == ("sft", "base", "canary", 0.2)
    assert loop.cycle_config(settings, "http://gw", None, False, config, None, "rlhf").recipe == "rlhf"
    assert loop.cycle_config(settings, "http://gw", None, False, None, None).recipe == "rlhf"


def test_the_gate_keeps_capability_answers_in_the_data_dir_whatever_the_config_file_sets(data_dir):
    from loopchat.settings import Settings

    settings = Settings(data_dir=data_dir, model=data_dir / "model")
    config = data_dir / "cycle.json"
    config.write_text(json.dumps({"gate": {"max_kl": 5.0}}))
    gate = loop.cycle_config(settings, "http://gw", None, False, config, None).gate
    assert gate.max_kl == 5.0 and gate.cache_dir == str(data_dir / "cache" / "gate")
