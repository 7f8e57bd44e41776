"""Whole cycles on a tiny random Llama in front of the in-process gateway (fake engine): the rlhf
recipe continues the serving version (PPO's KL and the gate's `kl` against it) and the newest reward model and may end at a canary; the sft recipe runs no PPO; the bon recipe runs best-of-n between the reward model and PPO; `init:
base` starts every cycle from the base model; a candidate that fails the gate only for moving too far has
PPO's shorter step judged instead; `ptx_data` says what PPO-ptx mixes in, and PPO-ptx switches on once the
capability guard has refused a candidate."""

import httpx
import pytest
from feedback_fixtures import vote_shorter
from train_fixtures import real_model_dir, tiny_model_dir  # noqa: F401  (fixtures)

from feedback import Store, cycles
from train import artifacts, cycle as cycle_module
from train.cycle import CycleConfig, run_cycle
from train.data import read_sft
from train.evaluate import CAPABILITIES, read_capabilities
from train.recipes import steps as steps_module
from train.reward import PROBE_READS, STATES, RewardConfig

TINY = {
    "cycle_minutes": 0,
    "sft": {"max_steps": 2, "batch_size": 4, "max_len": 128},
    "rm": {"epochs": 1, "max_steps": 2, "batch_size": 4, "max_len": 128},
    "best_of_n": {"n": 2, "prompts": 4, "max_new_tokens": 8, "sample_batch_size": 4, "batch_size": 4, "max_len": 128},
    "ppo": {"steps": 2, "batch_size": 4, "minibatches": 1, "ppo_epochs": 1, "max_new_tokens": 8, "ptx_coef": 0.1},
    "gate": {"max_prompts": 4, "batch_size": 4, "max_new_tokens": 8, "canaries": [], "capability_max_new_tokens": 4,
             "min_rm_accuracy": 0.0, "min_reward_gain": -1000.0, "max_kl": 1000.0, "max_kl_base": 1000.0,
             "max_loglik_drop": 1000.0, "max_pass_drop": 1.0},
}


def cycle(store: Store, tiny_model_dir, adapters_dir, gateway_url=None, recipe=None, **overrides) -> dict:  # noqa: F811
    cfg = CycleConfig.from_dict({"model_dir": tiny_model_dir, "adapters_dir": adapters_dir, "gateway_url": gateway_url},
                                {**TINY, **overrides})
    return run_cycle(store, cycles.queue_cycle(store, claim=True, recipe=recipe), cfg)


def test_rlhf_continues_the_serving_version_and_ends_at_a_canary(fake_gateway, tiny_model_dir, tmp_path):  # noqa: F811
    store = fake_gateway.store
    vote_shorter(store, 16)
    first = cycle(store, tiny_model_dir, tmp_path / "adapters", fake_gateway.url)
    assert first["state"] == "promoted", first["error"]
    assert first["recipe"] == "rlhf" and cycles.serving_version(store)[0] == "v1"
    v1 = tmp_path / "adapters" / "v1"
    assert artifacts.reward_model_dir(v1) is not None
    artifacts.verify(v1)  # the reward model's files are in the manifest's checksums
    assert {"reward_model/adapter_model.safetensors", "reward_model/reward_stats.json"} <= set(artifacts.load_manifest(v1)["files"])
    steps = first["steps"]
    assert list(steps)[:4] == ["building_data", "sft", "reward_model", "ppo"]
    assert steps["ppo"]["reference"] == "base" and steps["reward_model"]["init_from"] is None
    readable = {"+".join(STATES[i] for i in reads) for reads in PROBE_READS[RewardConfig().pool]}
    assert steps["reward_model"]["probe_reads"] in readable and steps["reward_model"]["probe_l2"] > 0
    assert steps["evaluating"]["kl"] == steps["evaluating"]["kl_base"]  # the base model served: one reference

    second = cycle(store, tiny_model_dir, tmp_path / "adapters", fake_gateway.url, end_at="canary", canary_share=0.25)
    assert second["state"] == "published" and second["gate"] == "pass", second["error"]
    steps = second["steps"]
    assert steps["published"]["canary"] == 0.25 and steps["published"]["canary_id"]
    running = httpx.get(fake_gateway.url + "/admin/canary").json()["canary"]
    assert running["version"] == "v2" and running["share"] == 0.25 and running["baseline"] == "v1"
    assert cycles.serving_version(store)[0] == "v1"  # the alias did not move
    # PPO's KL and the gate's `kl` are to v1, the policy being replaced; KL to the base is reported beside it
    assert steps["ppo"]["reference"] == "v1" and steps["ppo"]["kl_base_last"] is not None
    assert steps["ppo"]["ptx_loss_last"] is not None  # PPO-ptx mixed in the skills set (ppo.ptx_coef)
    assert steps["reward_model"]["init_from"] == "v1" and steps["reward_model"]["accuracy_ci95"] is not None
    gate = steps["evaluating"]
    assert gate["kl"] != gate["kl_base"] and gate["kl_base"] > 0
    assert {"capability_loglik", "capability_loglik_baseline", "capability_pass", "capability_pass_baseline",
            "capability_pass_base_model"} <= gate.keys()
    verdict = artifacts.load_manifest(tmp_path / "adapters" / "v2")["gate"]
    assert verdict["checks"]["capability_pass_base"]["passed"] is not None  # held to the base model as well
    assert verdict["figures"]["baseline"] == "serving adapter" and verdict["checks"]["kl"]["value"] == gate["kl"]
    # the next cycle may start while the canary runs: `published` is terminal
    assert cycles.active_cycle(store) is None


def test_sft_recipe_runs_no_ppo_and_init_base_starts_from_the_base(tiny_model_dir, tmp_path):  # noqa: F811
    store = Store(tmp_path / "loopchat.db")
    vote_shorter(store, 16)
    adapters = tmp_path / "adapters"
    sft = cycle(store, tiny_model_dir, adapters, recipe="sft")
    assert sft["state"] == "published" and sft["recipe"] == "sft", sft["error"]
    assert set(sft["steps"]) == {"building_data", "sft", "reward_model", "evaluating"}
    assert sft["steps"]["building_data"]["recipe"] == "sft"
    assert sft["rm_accuracy"] is not None and artifacts.reward_model_dir(adapters / "v1") is not None
    manifest = artifacts.load_manifest(adapters / "v1")
    assert manifest["hyperparameters"]["recipe"] == "sft" and "ppo" not in manifest["metrics"]

    cycles.record_promotion(store, "v1", "promote", "test")  # v1 serves
    probe_only = {**TINY["rm"], "epochs": 0}  # a probe alone keeps the states it read for the next one
    vote_shorter(store, 4, start=16)
    based = cycle(store, tiny_model_dir, adapters, init="base", rm=probe_only)
    assert based["state"] == "published", based["error"]
    steps = based["steps"]
    assert steps["building_data"]["init"] == "base" and steps["ppo"]["reference"] == "base"
    assert steps["reward_model"]["init_from"] == "v1"  # the reward model continues either way
    assert artifacts.load_manifest(adapters / "v2")["gate"]["figures"]["baseline"] == "serving adapter"

    # v2 was published, not promoted: the next reward model continues v2's, the newest, and reads only new answers
    vote_shorter(store, 4, start=20)
    third = cycle(store, tiny_model_dir, adapters, rm=probe_only)
    rm = third["steps"]["reward_model"]
    assert cycles.serving_version(store)[0] == "v1" and rm["init_from"] == "v2", third["error"]
    assert 0 < rm["probe_answers_read"] < rm["probe_answers"]


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_canary_share_must_be_a_fraction(tiny_model_dir, tmp_path, share):  # noqa: F811
    with pytest.raises(ValueError, match="canary_share"):
        CycleConfig.from_dict({"model_dir": tiny_model_dir, "adapters_dir": tmp_path}, {"end_at": "canary",
                                                                                        "canary_share": share})


def test_bon_recipe_runs_best_of_n_on_the_reward_model_then_ppo_from_it(tiny_model_dir, tmp_path):  # noqa: F811
    store = Store(tmp_path / "loopchat.db")
    vote_shorter(store, 16)
    row = cycle(store, tiny_model_dir, tmp_path / "adapters", recipe="bon")
    assert row["state"] == "published" and row["recipe"] == "bon", row["error"]
    steps = row["steps"]
    assert list(steps)[:5] == ["building_data", "sft", "reward_model", "best_of_n", "ppo"]
    assert steps["best_of_n"]["prompts"] == 4 and steps["best_of_n"]["answers"] == 8 and steps["best_of_n"]["steps"] > 0
    assert steps["best_of_n"]["score_best"] > steps["best_of_n"]["score_all"]
    assert steps["ppo"]["steps"] == TINY["ppo"]["steps"]  # PPO went on from best-of-n's policy
    assert artifacts.load_manifest(tmp_path / "adapters" / "v1")["hyperparameters"]["best_of_n"]["n"] == 2


@pytest.mark.parametrize("ptx_data", ["skills", "demonstrations"])
def test_ptx_data_says_what_ppo_mixes_in(tiny_model_dir, tmp_path, monkeypatch, ptx_data):  # noqa: F811
    """With `ppo.ptx_coef` > 0, `ptx_data: skills` (the default) mixes the shipped general-skills set into PPO's
    updates; `demonstrations`, the cycle's own. The cycle row and the manifest say which."""
    mixed, real_ppo = [], steps_module.train_ppo

    def ppo(*args, demonstrations=None, **kw):
        mixed.append(demonstrations)
        return real_ppo(*args, demonstrations=demonstrations, **kw)

    monkeypatch.setattr(steps_module, "train_ppo", ppo)
    store = Store(tmp_path / "loopchat.db")
    vote_shorter(store, 16)
    row = cycle(store, tiny_model_dir, tmp_path / "adapters", ptx_data=ptx_data)
    assert row["state"] == "published", row["error"]
    if ptx_data == "skills":
        assert mixed == [str(steps_module.SKILLS)]
    else:
        assert len(mixed) == 1 and mixed[0] and all("messages" in r for r in mixed[0])
    assert row["steps"]["ppo"]["ptx_data"] == ptx_data and row["steps"]["ppo"]["ptx_loss_last"] > 0
    assert artifacts.load_manifest(tmp_path / "adapters" / "v1")["hyperparameters"]["ptx_data"] == ptx_data


def test_the_skills_set_is_demonstrations_none_of_them_a_capability_item():
    records = read_sft(steps_module.SKILLS)
    assert len(records) >= 50 and all(len(r) == 2 and r[-1]["role"] == "assistant" and r[-1]["content"] for r in records)
    gate = {item["prompt"].casefold() for item in read_capabilities(CAPABILITIES)}
    assert not gate & {r[0]["content"].casefold() for r in records}


@pytest.mark.parametrize("failing, judged", [("capability_pass", 2), ("reward_gain", 1)])
def test_a_candidate_that_moved_too_far_falls_back_to_ppos_shorter_step(tiny_model_dir, tmp_path, monkeypatch,  # noqa: F811
                                                                          failing, judged):
    """The real gate, with one check of the first verdict turned to a failure: a capability loss sends
    the cycle to PPO's fallback (judged by the same gate, and published when it passes); a reward that
    did not rise does not, since a shorter step in the same direction gains less."""
    calls, real_gate = [], cycle_module.evaluate_adapter

    def gate(model_dir, policy, **kw):
        verdict = real_gate(model_dir, policy, **kw)
        if not calls:
            verdict["checks"][failing]["passed"], verdict["passed"] = False, False
        calls.append(policy)
        return verdict

    monkeypatch.setattr(cycle_module, "evaluate_adapter", gate)
    store = Store(tmp_path / "loopchat.db")
    vote_shorter(store, 16)
    row = cycle(store, tiny_model_dir, tmp_path / "adapters", ppo={**TINY["ppo"], "steps": 3, "lr": 5e-2, "fallback_kl": 1e-3, "ptx_coef": 0})
    assert len(calls) == judged and row["steps"]["ppo"]["fallback_step"] is not None
    if failing == "reward_gain":
        assert row["state"] == "rejected" and row["error"] == "gate failed: reward_gain"
        assert "fell_back" not in row["steps"]["evaluating"] and row["steps"]["evaluating"]["failed"] == ["reward_gain"]
        return
    assert row["state"] == "published" and row["gate"] == "pass", row["error"]
    assert calls[1].name == "fallback" and calls[1].parent == calls[0]
    assert row["steps"]["evaluating"]["fell_back"]["failed"] == ["capability_pass"]
    assert row["steps"]["evaluating"]["failed"] == []  # the fallback's verdict
    published = artifacts.load_manifest(tmp_path / "adapters" / "v1")
    assert published["metrics"]["fell_back"]["failed"] == ["capability_pass"]


def test_ppo_ptx_switches_on_once_the_guard_has_refused_capability(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    """PPO runs with `ppo.ptx_coef` (0 here) until the gate's capability checks have refused a candidate, or the
    full step of one whose fallback they judged instead; from then on at `ptx_after_capability_loss` (0: never).
    A recipe without PPO does not say it switched ptx on."""
    coefs, real_ppo = [], steps_module.train_ppo
    monkeypatch.setattr(steps_module, "train_ppo", lambda *a, **kw: coefs.append(a[4].ptx_coef) or real_ppo(*a, **kw))
    store = Store(tmp_path / "loopchat.db")
    vote_shorter(store, 16)

    def judged(figures: dict) -> int:  # a cycle the gate refused with these figures
        cycle_id = cycles.queue_cycle(store, claim=True)
        cycles.advance(store, cycle_id, "evaluating")
        cycles.advance(store, cycle_id, "rejected", figures)
        return cycle_id

    judged({"failed": ["reward_gain", "kl"]})
    before = cycle(store, tiny_model_dir, tmp_path / "adapters", ppo={**TINY["ppo"], "ptx_coef": 0})
    refused = judged({"failed": ["kl"], "fell_back": {"failed": ["kl", "capability_pass_base"]}})
    after = cycle(store, tiny_model_dir, tmp_path / "adapters", ppo={**TINY["ppo"], "ptx_coef": 0})
    no_ppo = cycle(store, tiny_model_dir, tmp_path / "adapters", recipe="sft")
    never = cycle(store, tiny_model_dir, tmp_path / "adapters", ppo={**TINY["ppo"], "ptx_coef": 0}, ptx_after_capability_loss=0)
    assert coefs == [0, 0.2, 0]
    assert before["steps"]["ppo"]["ptx_loss_last"] is None and "ptx_since_cycle" not in before["steps"]["building_data"]
    assert after["steps"]["ppo"]["ptx_coef"] == 0.2 and after["steps"]["ppo"]["ptx_loss_last"] > 0
    assert after["steps"]["ppo"]["ptx_data"] == "skills" and after["steps"]["building_data"]["ptx_since_cycle"] == refused
    assert no_ppo["state"] == "published" and "ptx_since_cycle" not in no_ppo["steps"]["building_data"]
    assert never["steps"]["ppo"]["ptx_loss_last"] is None


def test_ppo_pays_for_kl_to_the_base_once_the_serving_version_is_near_the_gates_bound(fake_gateway, tiny_model_dir,  # noqa: F811
                                                                                      tmp_path, monkeypatch):
    """Less than one cycle's trust region (`gate.max_kl`) from `gate.max_kl_base`, PPO also pays
    `kl_base_coef_near_bound` per nat of KL to the base; further away, or at 0, it does not."""
    coefs, real_ppo = [], steps_module.train_ppo
    monkeypatch.setattr(steps_module, "train_ppo", lambda *a, **kw: coefs.append(a[4].kl_base_coef) or real_ppo(*a, **kw))
    store = fake_gateway.store
    vote_shorter(store, 16)
    first = cycle(store, tiny_model_dir, tmp_path / "adapters", fake_gateway.url)
    assert first["state"] == "promoted", first["error"]
    serving_kl_base = first["steps"]["evaluating"]["kl_base"]  # v1's, as its gate measured it; v1 keeps serving

    def with_room(room: float, **overrides) -> dict:  # nats left below max_kl_base, against a max_kl of 10
        gate = {**TINY["gate"], "max_kl": 10.0, "max_kl_base": serving_kl_base + room}
        return cycle(store, tiny_model_dir, tmp_path / "adapters", gate=gate, **overrides)

    far, near, off = with_room(10.5), with_room(9.5), with_room(9.5, kl_base_coef_near_bound=0)
    assert coefs == [0, 0, 0.01, 0]
    assert "serving_kl_base" not in far["steps"]["building_data"] and far["steps"]["ppo"]["kl_base_coef"] == 0
    assert near["steps"]["building_data"]["serving_kl_base"] == serving_kl_base
    assert near["steps"]["ppo"]["kl_base_coef"] == 0.01 and "serving_kl_base" not in off["steps"]["building_data"]


def test_a_cycle_leaves_the_gate_what_the_last_one_took(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    """The last gate judged two candidates in 600 s, more than its share of a 10-minute budget: PPO's budget
    leaves 300 s for the gate, PPO keeps 300 s more for judging its fallback once it has one (here from its
    second step), and the first judgement takes half the gate's budget."""
    ppo_cfgs, gate_cfgs = [], []
    real_ppo, real_gate = steps_module.train_ppo, cycle_module.evaluate_adapter
    monkeypatch.setattr(steps_module, "train_ppo", lambda *a, **kw: ppo_cfgs.append(a[4]) or real_ppo(*a, **kw))
    monkeypatch.setattr(cycle_module, "evaluate_adapter", lambda *a, cfg, **kw: gate_cfgs.append(cfg) or real_gate(*a, cfg=cfg, **kw))
    store = Store(tmp_path / "loopchat.db")
    vote_shorter(store, 16)
    last = cycles.queue_cycle(store, claim=True)
    cycles.advance(store, last, "evaluating")
    cycles.advance(store, last, "rejected", {"duration_s": 600.0, "fell_back": {"failed": ["kl"]}})
    row = cycle(store, tiny_model_dir, tmp_path / "adapters", cycle_minutes=10,
                ppo={**TINY["ppo"], "steps": 3, "lr": 5e-2, "fallback_kl": 1e-3, "ptx_coef": 0},
                gate={**TINY["gate"], "max_pass_drop": 0.0, "max_loglik_drop": 0.0, "capability_tolerance_se": -1000.0})
    (ppo_cfg,) = ppo_cfgs
    assert ppo_cfg.fallback_reserve_s == 300.0
    assert (600 - 300 - 120) * 0.35 / 0.40 < ppo_cfg.time_budget_s <= (600 - 300) * 0.35 / 0.40  # SFT and RM took < 2 min
    ppo = row["steps"]["ppo"]
    assert ppo["fallback_step"] == 1 and ppo["steps"] == ppo["planned_steps"] == 2  # not the 3 the budget held
    first, second = gate_cfgs  # the full step failed the capability checks made impossible above
    assert first.time_budget_s < second.time_budget_s
