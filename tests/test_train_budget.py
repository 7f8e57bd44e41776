"""Steps sized by a time budget: the plan from a measured speed (a fake clock), each trainer and
the gate at the two ends of a budget (tiny random Llama, fast), and what a cycle records.

No test here depends on how fast this machine is: a budget of 0 s leaves every step at its
floor (the warm-up step and the timed one), a budget of a day at its cap."""

import json

import pytest
from click.testing import CliRunner
from feedback_fixtures import vote_shorter

from feedback import Store, cycles
from train.budget import Pace, plan_steps
from train.cycle import SHARES, CycleConfig, run_cycle, step_budget
from train.evaluate import GateConfig, evaluate_adapter
from train.ppo import PPOConfig, train_ppo
from train.reward import RewardConfig, train_reward_model
from train.sft import SFTConfig, train_sft
from train_fixtures import real_model_dir, rule_reward, tiny_model_dir  # noqa: F401  (fixtures)

WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "piano", "candle"]
DEMOS = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w} {w}"}]} for w in WORDS]
PAIRS = [{"prompt": [{"role": "user", "content": f"Tell me about {w}."}], "chosen": f"{w} is good", "rejected": f"{w} bad bad"}
         for w in WORDS]
PROMPTS = [f"Say {w}." for w in WORDS]
NONE, TINY, DAY = None, 0.0, 86400.0


# ---- the plan -------------------------------------------------------------------------------
def test_plan_fits_the_time_left_within_floor_and_cap():
    # 100 s budget, 20 s gone, 2 steps done at 4 s a step: 20 more fit
    assert plan_steps(100, 20, 4.0, done=2, cap=1000) == 22
    assert plan_steps(100, 20, 4.0, done=2, cap=1000, tail_steps=5) == 17  # 20 s kept for the work after
    assert plan_steps(100, 20, 4.0, done=2, cap=10) == 10
    assert plan_steps(100, 120, 4.0, done=2, cap=1000) == 2  # over budget: stop after the steps done
    assert plan_steps(100, 120, 4.0, done=2, cap=1000, floor=6) == 6


def test_pace_times_the_step_after_the_warm_up_and_plans_once():
    now = [0.0]
    pace = Pace(60.0, clock=lambda: now[0])
    now[0] = 5.0  # loading the model counts against the budget
    assert pace.start(cap=100, tail_steps=2) == 100
    now[0] = 15.0  # the warm-up step: slow, not timed
    assert pace.step_done(1) == 100
    now[0] = 17.0  # the timed step: 2 s; 43 s left, 4 of them for the tail: 19 more steps
    assert pace.step_done(2) == 21
    assert pace.figures() == {"time_budget_s": 60.0, "planned_steps": 21, "measured_s_per_step": 2.0}
    now[0] = 50.0  # a slower step later does not move the plan (nor the schedule that follows it)
    assert pace.step_done(3) == 21


def test_pace_without_a_budget_runs_the_cap_and_still_measures():
    now = [0.0]
    pace = Pace(None, clock=lambda: now[0])
    pace.start(cap=7)
    for step, t in ((1, 9.0), (2, 12.0), (3, 99.0)):
        now[0] = t
        assert pace.step_done(step) == 7
    assert pace.figures() == {"time_budget_s": None, "planned_steps": 7, "measured_s_per_step": 3.0}


# ---- the trainers and the gate at both ends of a budget --------------------------------------
def lines(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("budget, steps", [(NONE, 8), (TINY, 2), (DAY, 8)])
def test_sft_runs_what_fits_up_to_its_data(tiny_model_dir, tmp_path, budget, steps):  # noqa: F811
    cfg = SFTConfig(epochs=2, batch_size=4, max_len=64, time_budget_s=budget)  # 16 examples: 8 steps at most
    metrics = train_sft(tiny_model_dir, DEMOS * 2, tmp_path, cfg, quiet=True)
    assert metrics["steps"] == metrics["planned_steps"] == steps and metrics["time_budget_s"] == budget
    assert metrics["measured_s_per_step"] > 0
    log = lines(tmp_path)
    assert len(log) == steps and log[-1]["lr"] == 0.0  # the schedule decays to zero at the planned end


def test_sft_never_runs_more_than_its_fixed_steps(tiny_model_dir, tmp_path):  # noqa: F811
    cfg = SFTConfig(epochs=2, max_steps=3, batch_size=4, max_len=64, time_budget_s=DAY)
    assert train_sft(tiny_model_dir, DEMOS * 2, tmp_path, cfg, quiet=True)["steps"] == 3


@pytest.mark.parametrize("budget, steps", [(TINY, 2), (DAY, 6)])
def test_reward_model_runs_what_fits(tiny_model_dir, tmp_path, budget, steps):  # noqa: F811
    cfg = RewardConfig(epochs=3, batch_size=4, max_len=64, time_budget_s=budget)  # 8 pairs: 6 steps at most
    metrics = train_reward_model(tiny_model_dir, PAIRS, tmp_path, cfg, eval_records=PAIRS[:2], quiet=True)
    assert metrics["steps"] == metrics["planned_steps"] == steps and metrics["measured_s_per_step"] > 0
    assert metrics["accuracy"] is not None and len(lines(tmp_path)) == steps


@pytest.mark.parametrize("budget, steps", [(TINY, 2), (DAY, 4)])
def test_ppo_runs_what_fits_up_to_its_steps(tiny_model_dir, tmp_path, budget, steps):  # noqa: F811
    cfg = PPOConfig(steps=4, batch_size=2, minibatches=1, ppo_epochs=1, max_new_tokens=4, time_budget_s=budget)
    metrics = train_ppo(tiny_model_dir, PROMPTS, tmp_path, rule_reward, cfg, quiet=True)
    assert metrics["steps"] == metrics["planned_steps"] == steps and metrics["stop"] == "steps done"
    assert metrics["measured_s_per_step"] > 0 and len(lines(tmp_path)) == steps


@pytest.mark.parametrize("reserve, steps", [(0.0, 6), (DAY, 2)])
def test_ppo_keeps_time_for_judging_its_fallback_past_it(tiny_model_dir, tmp_path, reserve, steps):  # noqa: F811
    # Within 1e-3 nats only the first policy: from step 2 on the run is past its fallback, and keeping a
    # day for the gate to judge it leaves no time for more steps (the budget of a day held all six before).
    cfg = PPOConfig(steps=6, batch_size=2, minibatches=1, ppo_epochs=1, max_new_tokens=4, lr=5e-2, fallback_kl=1e-3,
                    time_budget_s=DAY, fallback_reserve_s=reserve)
    metrics = train_ppo(tiny_model_dir, PROMPTS, tmp_path, rule_reward, cfg, quiet=True)
    assert metrics["steps"] == metrics["planned_steps"] == steps and metrics["fallback_step"] == 1


def test_ppo_holds_time_for_its_fallback_only_while_past_it(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    # KL scripted per step (1 nat above the start is the fallback's bound): past it at steps 2-3, back
    # within from step 4 on, so the time held for judging a fallback is given back and none is saved.
    import train.ppo as ppo

    kls, holds = iter([0.0, 5.0, 5.0, 0.5, 0.5, 0.5]), []

    def scripted(*args, **kwargs):
        batch = real_rollout(*args, **kwargs)
        batch["stats"]["kl"] = next(kls)
        return batch

    def recorded(self, seconds, done):
        holds.append((seconds, done))
        return real_hold(self, seconds, done)

    real_rollout, real_hold = ppo.rollout, Pace.hold
    monkeypatch.setattr(ppo, "rollout", scripted)
    monkeypatch.setattr(Pace, "hold", recorded)
    cfg = PPOConfig(steps=6, batch_size=2, minibatches=1, ppo_epochs=1, max_new_tokens=4, fallback_kl=1.0,
                    time_budget_s=DAY, fallback_reserve_s=100.0)
    metrics = train_ppo(tiny_model_dir, PROMPTS, tmp_path, rule_reward, cfg, quiet=True)
    assert holds == [(100.0, 2), (0.0, 4)]
    assert metrics["steps"] == 6 and metrics["fallback_step"] is None and not (tmp_path / "fallback").exists()


def test_pace_holds_time_found_needed_mid_loop_and_gives_it_back():
    now = [0.0]
    pace = Pace(100.0, clock=lambda: now[0])
    pace.start(cap=1000)
    now[0] = 10.0
    pace.step_done(1)
    now[0] = 12.0  # 2 s a step, 88 s left: 44 more
    assert pace.step_done(2) == 46
    now[0] = 30.0  # at step 11, 70 s left: keeping 30 of them leaves 20 more steps
    assert pace.hold(30.0, 11) == 31 and pace.step_done(11) == 31
    assert pace.hold(1000.0, 12) == 12  # never fewer than the steps done
    assert pace.hold(0.0, 12) == 12 + 70 // 2  # given back: the plan grows again
    now[0] = 0.0
    late = Pace(100.0, clock=lambda: now[0])  # a hold before the plan is kept for it
    late.start(cap=1000)
    late.hold(20.0, 0)
    late.step_done(1)
    now[0] = 2.0
    assert late.step_done(2) == 2 + (100 - 2 - 20) // 2


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("sft")
    train_sft(tiny_model_dir, DEMOS, out, SFTConfig(max_steps=1), quiet=True)
    return out


@pytest.mark.parametrize("budget, prompts", [(NONE, 8), (TINY, 4), (DAY, 8)])
def test_gate_takes_the_held_out_prompts_that_fit_but_never_fewer_than_its_floor(tiny_model_dir, adapter, budget,
                                                                                 prompts):  # noqa: F811
    cfg = GateConfig(batch_size=2, min_prompts=4, max_new_tokens=4, canaries=(), time_budget_s=budget)
    figures = evaluate_adapter(tiny_model_dir, adapter, prompts=PROMPTS, cfg=cfg)["figures"]
    assert figures["held_out_prompts"] == prompts and figures["kl_on"] == "held-out prompts"
    assert figures["time_budget_s"] == budget and figures["measured_s_per_batch"] > 0


# ---- the cycle --------------------------------------------------------------------------------
def test_step_budgets_are_shares_of_the_time_left():
    assert step_budget("sft", 600) == pytest.approx(600 * SHARES["sft"])
    # SFT took none of its 60 s: the steps after it share them in their proportions
    assert step_budget("reward_model", 600) == pytest.approx(600 * SHARES["reward_model"] / 0.90)
    assert step_budget("evaluating", 100) == pytest.approx(100 * 0.15 / 0.20)
    assert step_budget("ppo", -5) == 0.0


def test_training_steps_leave_the_gate_what_it_was_seen_to_take():
    # The gate's share of 600 s is 90 s: a gate measured at 50 s changes nothing
    assert step_budget("sft", 600, gate_s=50) == pytest.approx(step_budget("sft", 600))
    # one measured at 250 s: the training steps share the 350 s left after it, in their proportions
    assert step_budget("sft", 600, gate_s=250) == pytest.approx(350 * 0.10 / 0.85)
    assert step_budget("ppo", 300, gate_s=250) == pytest.approx(50 * 0.35 / 0.40)
    assert step_budget("ppo", 200, gate_s=250) == 0.0
    assert step_budget("evaluating", 100, gate_s=250) == pytest.approx(100 * 0.15 / 0.20)  # the gate: as before


def test_judging_seconds_are_the_last_gates_per_candidate_judged(tmp_path):
    from train.cycle import judging_seconds

    store = Store(tmp_path / "loopchat.db")
    assert judging_seconds(store) is None  # no cycle yet

    def cycle(**evaluating):
        cycle_id = cycles.queue_cycle(store, claim=True)
        cycles.advance(store, cycle_id, "evaluating")
        cycles.advance(store, cycle_id, "published" if evaluating else "failed", evaluating or None)

    cycle(duration_s=120.0)
    assert judging_seconds(store) == 120.0
    cycle(duration_s=250.0, fell_back={"failed": ["kl"]})  # the full step and PPO's fallback: two candidates
    assert judging_seconds(store) == 125.0
    cycle()  # one that failed in the gate, without figures: the newest figure stands
    assert judging_seconds(store) == 125.0


def test_a_cycle_records_its_budget_and_what_each_step_chose(tiny_model_dir, tmp_path):  # noqa: F811
    from loopchat.commands.loop import show

    store = Store(tmp_path / "loopchat.db")
    vote_shorter(store, 24)
    overrides = {"cycle_minutes": 1e-4,  # 6 ms: every step at its floor
                 "sft": {"max_steps": 6, "batch_size": 4, "max_len": 128},
                 "rm": {"epochs": 1, "max_steps": 6, "batch_size": 4, "max_len": 128},
                 "best_of_n": {"n": 2, "prompts": 8, "max_new_tokens": 8, "sample_batch_size": 4, "batch_size": 4, "max_len": 128},
                 "ppo": {"steps": 6, "batch_size": 4, "minibatches": 1, "ppo_epochs": 1, "max_new_tokens": 8},
                 "gate": {"batch_size": 1, "min_prompts": 1, "max_new_tokens": 8, "canaries": []}}
    cfg = CycleConfig.from_dict({"model_dir": tiny_model_dir, "adapters_dir": tmp_path / "adapters", "gateway_url": None},
                                overrides)
    cycle_id = cycles.queue_cycle(store, claim=True, recipe="bon")  # every step there is
    row = run_cycle(store, cycle_id, cfg)
    assert row["state"] in ("published", "rejected"), row["error"]
    assert row["budget_s"] == pytest.approx(0.006)
    assert row["steps"]["best_of_n"]["sampled_batches"] == 1  # the one it samples whatever the budget
    for step in ("sft", "reward_model", "best_of_n", "ppo"):
        chosen = row["steps"][step]
        assert chosen["time_budget_s"] == 0.0 and chosen["planned_steps"] == chosen["steps"] == 2, (step, chosen)
        assert chosen["measured_s_per_step"] > 0
    gate = row["steps"]["evaluating"]
    assert gate["time_budget_s"] == 0.0 and gate["measured_s_per_batch"] > 0
    assert gate["held_out_prompts"] == 2 < row["steps"]["building_data"]["heldout_prompts"]  # two batches of one

    shown = CliRunner().invoke(show, [str(cycle_id), "--data-dir", str(tmp_path)])
    assert shown.exit_code == 0, shown.output
    assert "(budget 0.006 s)" in shown.output
    assert "planned_steps=2" in shown.output and "held_out_prompts=2" in shown.output
