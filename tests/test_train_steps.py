"""SFT, reward model, PPO, the gate and the CLI on a tiny random Llama (fast)."""

import json

import click
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from feedback import Store, cycles
from train import common
from train.artifacts import check_adapter, list_versions, load_manifest
from train.evaluate import GateConfig, evaluate_adapter
from train.ppo import FALLBACK, VALUE_HEAD_FILE, PPOConfig, train_ppo
from train.reward import RewardConfig, RewardModel, early_layer, encode_pair, train_reward_model, value_head_init
from train.sft import SFTConfig, make_examples, train_sft
from train_fixtures import real_model_dir, rule_reward, tiny_model_dir  # noqa: F401  (fixtures)

WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "piano", "candle"]
DEMOS = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w} {w} {w}"}]} for w in WORDS]
PAIRS = [
    {"prompt": [{"role": "user", "content": f"Tell me about {w}."}], "chosen": [{"role": "assistant", "content": f"{w} is good"}], "rejected": [{"role": "assistant", "content": f"{w} bad bad"}]}
    for w in WORDS
]
PROMPTS = [f"Say {w}." for w in WORDS]


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    metrics = train_sft(tiny_model_dir, DEMOS * 4, out, SFTConfig(lr=1e-2, epochs=3, batch_size=8), eval_records=DEMOS, quiet=True)
    return out, metrics


@pytest.fixture(scope="module")
def rm_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    metrics = train_reward_model(tiny_model_dir, PAIRS * 2, out, RewardConfig(lr=1e-2, epochs=2, batch_size=4), eval_records=PAIRS[:2], quiet=True)
    return out, metrics


def test_sft_loss_only_on_the_assistant_tokens(tiny_model_dir):
    tok = common.load_tokenizer(tiny_model_dir)
    (ids, labels), = make_examples(tok, [DEMOS[0]["messages"]], max_len=1024)
    assert tok.decode(ids) == common.render(tok, DEMOS[0]["messages"])  # what the chat template renders, nothing else
    learned = tok.decode([t for t in labels if t != -100])
    assert learned == "apple apple apple<|im_end|>\n"


def test_sft_learns_and_saves_a_servable_adapter(sft_run, tiny_model_dir):
    out, metrics = sft_run
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.1
    config = check_adapter(out)
    assert set(config["target_modules"]) <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} and config["r"] <= 16
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == metrics["steps"] and {"step", "loss", "lr", "time_s"} <= lines[0].keys()


def test_sft_continues_from_an_adapter(sft_run, tiny_model_dir, tmp_path):
    out, first = sft_run
    again = train_sft(tiny_model_dir, DEMOS, tmp_path, SFTConfig(lr=1e-9, max_steps=1), init_adapter=out, eval_records=DEMOS, quiet=True)
    assert again["eval_loss_before"] == pytest.approx(first["eval_loss"], rel=1e-3)


def test_reward_model_trains_normalises_and_feeds_the_value_head(rm_run, tiny_model_dir):
    out, metrics = rm_run
    assert metrics["train_accuracy"] >= 0.75 and metrics["eval_pairs"] == 2
    rm = RewardModel(out, tiny_model_dir)
    prompts = [p["prompt"] for p in PAIRS] * 2
    answers = [p["chosen"][0]["content"] for p in PAIRS] + [p["rejected"][0]["content"] for p in PAIRS]
    scores = rm(prompts, answers)
    assert scores.shape == (16,) and abs(float(scores.mean())) < 0.3 and 0.7 < float(scores.std()) < 1.3
    weight, bias = value_head_init(out)
    raw = rm.raw(prompts[:2], answers[:2])
    assert weight.shape == (64,) and torch.allclose((raw - rm.stats["mean"]) / rm.stats["std"], rm(prompts[:2], answers[:2]))
    assert bias == pytest.approx(-rm.stats["mean"] / rm.stats["std"])


def test_reward_model_reading_the_means_of_the_reply(tiny_model_dir, tmp_path, caplog):
    metrics = train_reward_model(tiny_model_dir, PAIRS * 2, tmp_path / "mean",
                                 RewardConfig(lr=1e-2, epochs=2, batch_size=4), eval_records=PAIRS[:2], quiet=True)
    assert metrics["train_accuracy"] >= 0.75
    rm = RewardModel(tmp_path / "mean", tiny_model_dir)
    assert rm.pool == "last_mean_early"
    prompt, reply = PAIRS[0]["prompt"], PAIRS[0]["chosen"][0]["content"]
    # By hand: head 0 on the last token's final state, head 1 on the mean of the reply's final states,
    # head 2 on the mean of the reply's states a quarter of the way up, the reply's tokens only.
    ids, n_reply = encode_pair(rm.tokenizer, prompt, reply, 1024)
    assert rm.tokenizer.decode(ids[-n_reply:]) == reply + rm.tokenizer.eos_token
    trunk, head = common.backbone_and_head(rm.model)
    with torch.no_grad():
        out = trunk(input_ids=torch.tensor([ids]), output_hidden_states=True)
    hidden = out.last_hidden_state[0].float()
    early = out.hidden_states[early_layer(trunk)][0].float()
    assert not torch.allclose(early, hidden)
    by_hand = head(hidden[-1])[0] + head(hidden[-n_reply:].mean(0))[1] + head(early[-n_reply:].mean(0))[2]
    assert float(rm.raw([prompt], [reply])[0]) == pytest.approx(float(by_hand), rel=1e-3, abs=1e-3)
    assert value_head_init(tmp_path / "mean")[0].shape == (64,)

    probe = train_reward_model(tiny_model_dir, PAIRS * 2, tmp_path / "probe", RewardConfig(epochs=0),
                               eval_records=PAIRS[:2], quiet=True)  # the linear probe alone, no LoRA step
    assert probe["steps"] == 0 and probe["probe_answers"] == 16 and probe["train_accuracy"] >= 0.75

    caplog.set_level("WARNING", "loopchat.reward")
    warm = train_reward_model(tiny_model_dir, PAIRS, tmp_path / "warm", RewardConfig(max_steps=1, pool="last"),
                              eval_records=PAIRS[:2], init_from=tmp_path / "mean", quiet=True)
    assert "init_from" not in warm and "training from scratch" in caplog.text  # a model reading other states cannot seed it
    with pytest.raises(ValueError, match="pool"):
        RewardConfig(pool="max")


def test_ppo_runs_logs_and_keeps_the_value_head_out_of_the_adapter(tiny_model_dir, rm_run, tmp_path):
    rm_dir, _ = rm_run
    cfg = PPOConfig(steps=2, batch_size=4, minibatches=2, max_new_tokens=8)
    metrics = train_ppo(tiny_model_dir, PROMPTS, tmp_path, rule_reward, cfg, value_head_from=rm_dir, quiet=True)
    assert metrics["steps"] == 2 and metrics["stop"] == "steps done"
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"score", "kl", "entropy", "clipfrac", "vf_loss", "approx_kl", "pg_loss", "kl_coef", "samples_per_s"} <= lines[-1].keys()
    # A fresh LoRA (B = 0) is the reference: what is left is the rounding of the sampling pass's layout
    # (the policy's log-probs) against the reference pass's.
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    check_adapter(tmp_path)
    assert all("lora_" in k for k in load_file(str(tmp_path / "adapter_model.safetensors")))
    assert set(load_file(str(tmp_path / VALUE_HEAD_FILE))) == {"linear.weight", "linear.bias"}


def test_ppo_reference_is_the_base_and_kl_runaway_reverts(tiny_model_dir, sft_run, tmp_path):
    sft_dir, _ = sft_run
    cfg = PPOConfig(steps=3, batch_size=4, max_new_tokens=8, lr=5e-2, kl_stop=1e-4)
    metrics = train_ppo(tiny_model_dir, PROMPTS, tmp_path, rule_reward, cfg, init_adapter=sft_dir, quiet=True)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kl"] > 0.1  # the SFT adapter differs from the reference (the base with the adapter off)
    assert "reverted" in metrics["stop"] and metrics["steps"] < 3
    before, after = load_file(str(sft_dir / "adapter_model.safetensors")), load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # back to the last state under the bound


def test_ppo_saves_the_last_policy_within_fallback_kl_when_it_goes_further(tiny_model_dir, tmp_path):  # noqa: F811
    """From a fresh LoRA (the base model exactly, KL 0) at a large lr: the first rollout's policy is the
    only one within 1e-3 nats, so it is the fallback: the adapter before any update."""
    cfg = PPOConfig(steps=3, batch_size=4, max_new_tokens=8, lr=5e-2, fallback_kl=1e-3)
    metrics = train_ppo(tiny_model_dir, PROMPTS, tmp_path / "far", rule_reward, cfg, quiet=True)
    lines = [json.loads(x) for x in (tmp_path / "far" / "metrics.jsonl").read_text().splitlines()]
    assert metrics["steps"] == 3 and all(line["kl"] > 1e-3 for line in lines[1:])
    assert metrics["fallback_step"] == 1 and metrics["fallback_kl"] == pytest.approx(0.0, abs=1e-4)
    check_adapter(tmp_path / "far" / FALLBACK)
    fallback = load_file(str(tmp_path / "far" / FALLBACK / "adapter_model.safetensors"))
    trained = load_file(str(tmp_path / "far" / "adapter_model.safetensors"))
    assert fallback.keys() == trained.keys()
    assert all(not v.any() for k, v in fallback.items() if "lora_B" in k)  # B = 0: no update yet
    assert any(v.any() for k, v in trained.items() if "lora_B" in k)
    # A run that stays within it, or has none, leaves no fallback.
    for name, within in (("near", 1e6), ("none", None)):
        metrics = train_ppo(tiny_model_dir, PROMPTS, tmp_path / name, rule_reward, PPOConfig(**{**vars(cfg), "steps": 2,
                            "fallback_kl": within}), quiet=True)
        assert metrics["fallback_step"] is None and not (tmp_path / name / FALLBACK).exists()
    with pytest.raises(ValueError, match="fallback_kl"):
        PPOConfig(fallback_kl=0)


def test_gate_reports_figures_and_fails_on_thresholds(tiny_model_dir, sft_run, rm_run):
    sft_dir, _ = sft_run
    rm_dir, _ = rm_run
    cfg = GateConfig(max_new_tokens=8, canary_max_new_tokens=8, canaries=("Say apple.",))
    verdict = evaluate_adapter(tiny_model_dir, sft_dir, reward_model=rm_dir, prompts=PROMPTS[:4], cfg=cfg)
    checks = verdict["checks"]
    assert set(checks) == {"rm_accuracy", "reward_gain", "kl", "kl_base", "canaries", "capability_loglik", "capability_pass",
                           "capability_loglik_base", "capability_pass_base"}
    base_checks = {"capability_loglik_base", "capability_pass_base"}  # the base model is the baseline here
    assert all(checks[k]["passed"] is None for k in base_checks)
    assert all(c["value"] is not None for k, c in checks.items() if k not in base_checks)
    assert checks["kl"]["value"] > 0.1 and checks["kl"]["passed"]
    assert [a["prompt"] for a in verdict["canary_answers"]] == ["Say apple."] * cfg.canary_samples
    assert isinstance(verdict["passed"], bool)
    strict = evaluate_adapter(tiny_model_dir, sft_dir, reward_model=rm_dir, prompts=PROMPTS[:4], cfg=GateConfig(**{**cfg.__dict__, "min_rm_accuracy": 1.01, "max_kl": 0.0}))
    assert not strict["passed"] and not strict["checks"]["rm_accuracy"]["passed"] and not strict["checks"]["kl"]["passed"]
    no_rm = evaluate_adapter(tiny_model_dir, sft_dir, cfg=cfg)
    assert no_rm["checks"]["reward_gain"]["passed"] is None and no_rm["checks"]["rm_accuracy"]["passed"] is None


def test_gate_judges_only_on_enough_evidence(tiny_model_dir, sft_run, rm_run):
    """Too few held-out pairs: RM accuracy is reported, not judged. The reward gain fails
    unless the candidate gains `gain_margin_se` standard errors over `min_reward_gain`: by default one
    (measurably better); a negative margin lets it fall short by that many."""
    sft_dir, _ = sft_run
    rm_dir, _ = rm_run
    cfg = GateConfig(max_new_tokens=8, canaries=(), min_rm_accuracy=1.01, min_heldout_pairs=len(PAIRS) + 1)
    few = evaluate_adapter(tiny_model_dir, sft_dir, reward_model=rm_dir, prompts=PROMPTS, heldout_pairs=PAIRS, cfg=cfg)
    acc = few["checks"]["rm_accuracy"]
    assert acc["passed"] is None and f"{len(PAIRS)} held-out pairs" in acc["skipped"] and 0 <= acc["value"] <= 1
    enough = evaluate_adapter(tiny_model_dir, sft_dir, reward_model=rm_dir, prompts=PROMPTS, heldout_pairs=PAIRS,
                              cfg=GateConfig(**{**cfg.__dict__, "min_heldout_pairs": len(PAIRS)}))
    assert enough["checks"]["rm_accuracy"]["passed"] is False

    gain, se = few["checks"]["reward_gain"]["value"], few["figures"]["reward_gain_se"]
    assert se > 0 and few["checks"]["reward_gain"]["threshold"] == pytest.approx(se)
    assert few["checks"]["reward_gain"]["passed"] is (gain >= se)
    within = {**cfg.__dict__, "min_reward_gain": gain + se / 2}  # above the gain, within one standard error
    lenient = evaluate_adapter(tiny_model_dir, sft_dir, reward_model=rm_dir, prompts=PROMPTS,
                               cfg=GateConfig(**{**within, "gain_margin_se": -1.0}))
    assert lenient["checks"]["reward_gain"]["passed"]
    exact = evaluate_adapter(tiny_model_dir, sft_dir, reward_model=rm_dir, prompts=PROMPTS,
                             cfg=GateConfig(**{**within, "gain_margin_se": 0.0}))
    assert exact["checks"]["reward_gain"]["passed"] is False


def test_canaries_are_judged_against_the_baseline(tiny_model_dir, sft_run):
    """The same adapter as candidate and baseline: the same seeded samples, the same share of
    finished answers; it passes with no tolerance and fails when it must beat itself."""
    sft_dir, _ = sft_run
    cfg = GateConfig(max_new_tokens=4, canary_max_new_tokens=6, canaries=("Say apple.", "Say river."),
                     canary_samples=3, canary_tolerance=0.0)
    same = evaluate_adapter(tiny_model_dir, sft_dir, baseline_adapter=sft_dir, cfg=cfg)
    check = same["checks"]["canaries"]
    assert check["passed"] and check["value"] == same["figures"]["canaries_baseline"] == check["threshold"]
    assert len(same["canary_answers"]) == 6
    better = evaluate_adapter(tiny_model_dir, sft_dir, baseline_adapter=sft_dir,
                              cfg=GateConfig(**{**cfg.__dict__, "canary_tolerance": -0.01}))
    assert better["checks"]["canaries"]["passed"] is False


@pytest.fixture
def cli():
    from loopchat.commands.train import eval_command, train

    group = click.Group("loopchat", commands={"train": train, "eval": eval_command})
    return lambda *args: CliRunner().invoke(group, [str(a) for a in args])


def test_cli_bad_input_is_one_line(cli, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(DEMOS[0]) + "\n{not json\n")
    result = cli("train", "sft", "--model", tiny_model_dir, "--data-dir", tmp_path, "--data", bad, "-q")
    assert result.exit_code == 1 and result.output.strip() == f"Error: {bad}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)"
    result = cli("train", "ppo", "--model", tiny_model_dir, "--data-dir", tmp_path, "--reward-model", tmp_path, "--prompts", bad)
    assert result.exit_code == 1 and "not a reward model directory" in result.output and "Traceback" not in result.output
    result = cli("train", "ppo", "--model", tiny_model_dir, "--data-dir", tmp_path, "--reward-model", tmp_path, "--prompts", bad,
                 "--batch-size", "6", "--samples-per-prompt", "4")
    assert result.exit_code == 2 and "samples_per_prompt must divide batch_size (6), not 4" in result.output and "Traceback" not in result.output
    result = cli("eval", "--model", tiny_model_dir, "--data-dir", tmp_path, "--adapter", tmp_path)
    assert result.exit_code == 1 and "not a peft adapter folder" in result.output
    train_sft(tiny_model_dir, DEMOS[:1], tmp_path / "sft", SFTConfig(max_steps=1), quiet=True)
    result = cli("eval", "--model", tiny_model_dir, "--data-dir", tmp_path, "--adapter", tmp_path / "sft", "--capabilities", bad)
    assert result.exit_code == 1 and result.output.strip() == (f"Error: {bad}:1: expected {{'prompt': str, 'reference': str, 'contains_any': [str, ...]}} "
                                                     "and optionally 'kind': str")


def test_cli_steps_chain_and_publish(cli, tiny_model_dir, rm_run, tmp_path):
    rm_dir, _ = rm_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    demos = tmp_path / "demos.jsonl"
    demos.write_text("\n".join(json.dumps(d) for d in DEMOS) + "\n")
    base = ("--model", tiny_model_dir, "--data-dir", tmp_path)
    result = cli("train", "sft", *base, "--data", demos, "--out", tmp_path / "sft", "--steps", "1", "--publish", "-q")
    assert result.exit_code == 0, result.output
    result = cli("train", "ppo", *base, "--reward-model", rm_dir, "--prompts", prompts, "--init-adapter", tmp_path / "adapters" / "v1",
                 "--steps", "1", "--batch-size", "2", "--max-new-tokens", "4", "--out", tmp_path / "ppo", "--publish", "-q")
    assert result.exit_code == 0, result.output
    assert list_versions(tmp_path / "adapters") == [1, 2] and load_manifest(tmp_path / "adapters" / "v2")["parent_version"] == 1
    recorded = [(a["version"], a["path"]) for a in cycles.list_adapters(Store(tmp_path / "loopchat.db"))]
    assert recorded == [(f"v{n}", str(tmp_path / "adapters" / f"v{n}")) for n in (1, 2)]  # promotable
    # Judged against itself as the serving baseline, it gains exactly 0 and finishes its canaries as often: the gate passes.
    v2 = tmp_path / "adapters" / "v2"
    result = cli("eval", *base, "--adapter", v2, "--baseline", v2, "--reward-model", rm_dir, "--prompts", prompts, "--max-new-tokens", "8")
    assert all(check in result.output for check in ("rm_accuracy", "reward_gain", "kl_base", "capability_pass"))
    assert result.exit_code == 0 and "gate: PASSED" in result.output, result.output
    # the shipped capability set is judged kind by kind, each kind on its line under its check
    lines = result.output.splitlines()
    below = lines[next(i for i, line in enumerate(lines) if line.startswith("capability_pass ")) + 1:][:4]
    assert sorted(line.split()[0] for line in below) == ["arithmetic", "explanations", "facts", "instructions"], below
    assert all(line.startswith("  ") and line.endswith("pass") for line in below)
