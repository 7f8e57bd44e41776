"""Best-of-n distillation: the policy is trained on each prompt's best sampled answer, as sampled."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from train.best_of_n import BestOfNConfig, _chosen_example, train_best_of_n
from train.data import DataError
from train_fixtures import real_model_dir, rule_reward, rule_scores_before_after, tiny_model_dir  # noqa: F401  (fixtures)
from test_train_real import SHORT_ANSWER_PROMPTS


def test_an_answer_keeps_its_end_of_turn_only_when_it_ended():
    eos, pad = 2, 0
    batch = {"responses": torch.tensor([[5, 6, eos, pad], [7, 8, 9, 10]]), "mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1.0]]),
             "ended": torch.tensor([True, False])}
    assert _chosen_example([1, 3], batch, 0, max_len=64) == ([1, 3, 5, 6, eos], [-100, -100, 5, 6, eos])
    assert _chosen_example([1, 3], batch, 1, max_len=64) == ([1, 3, 7, 8, 9, 10], [-100, -100, 7, 8, 9, 10])
    assert _chosen_example([1, 3], batch, 1, max_len=3) == ([8, 9, 10], [8, 9, 10])  # long ones keep their end


def test_best_of_n_trains_on_the_best_answers_and_reports_what_it_picked(tiny_model_dir, tmp_path):  # noqa: F811
    prompts = [[{"role": "user", "content": p}] for p in SHORT_ANSWER_PROMPTS[:6]]
    scored = []

    def longest(asked, texts):
        scored.append(len(texts))
        return torch.tensor([float(len(t)) for t in texts])

    cfg = BestOfNConfig(n=4, prompts=5, max_new_tokens=8, sample_batch_size=8, batch_size=4, dtype="float32", objective="sft", epochs=2)
    metrics = train_best_of_n(tiny_model_dir, [{"prompt": p} for p in prompts], tmp_path, longest, cfg, quiet=True)
    assert metrics["prompts"] == 5 and metrics["answers"] == 20 and sum(scored) == 20
    assert metrics["score_best"] > metrics["score_all"]  # random answers differ in length: the best is above the mean
    assert metrics["fit_steps"] == 4  # 5 examples, batches of 4, 2 epochs
    assert json.loads((tmp_path / "best_of_n.json").read_text())["answers"] == 20
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_the_kl_check_measures_the_policys_own_answers_and_goes_back_past_max_kl(tiny_model_dir, tmp_path):  # noqa: F811
    prompts = [{"prompt": [{"role": "user", "content": p}]} for p in SHORT_ANSWER_PROMPTS[:4]]
    cfg = BestOfNConfig(n=4, prompts=4, max_new_tokens=8, sample_batch_size=8, batch_size=2, dtype="float32",
                        objective="sft", lr=5e-2, epochs=3, max_kl=1e9, kl_every=4)
    free = train_best_of_n(tiny_model_dir, prompts, tmp_path / "free", rule_reward, cfg, quiet=True)
    lines = [json.loads(line) for line in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()]
    assert free["stop"] == "steps done" and free["fit_steps"] == len(lines) == 6
    assert [line["step"] for line in lines if "kl" in line] == [4]  # every 4 steps; step 6 is checked after the loop
    assert lines[3]["kl"] > 0 and free["kl"] > 0  # the policy moved from where it started

    bounded = train_best_of_n(tiny_model_dir, prompts, tmp_path / "bounded", rule_reward,
                              dataclasses.replace(cfg, max_kl=0.0, kl_every=1), quiet=True)
    assert bounded["fit_steps"] == 1 and bounded["stop"].endswith("back to step 0") and bounded["kl"] == 0.0
    saved = load_file(str(tmp_path / "bounded" / "adapter_model.safetensors"))
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and all(not v.any() for v in lora_b)  # the fresh LoRA's zero B: back where it started
    assert train_best_of_n(tiny_model_dir, prompts, tmp_path / "unchecked", rule_reward,
                           dataclasses.replace(cfg, max_kl=None), quiet=True)["kl"] is None


def test_a_time_budget_samples_fewer_prompts(tiny_model_dir, tmp_path):  # noqa: F811
    prompts = [{"prompt": [{"role": "user", "content": p}]} for p in SHORT_ANSWER_PROMPTS]
    cfg = BestOfNConfig(n=2, prompts=16, max_new_tokens=8, sample_batch_size=2, batch_size=4, dtype="float32", time_budget_s=0.01)
    metrics = train_best_of_n(tiny_model_dir, prompts, tmp_path, rule_reward, cfg, quiet=True)
    # A budget smaller than any batch: one batch, then one SFT step (the warm-up) at least.
    assert metrics["sampled_batches"] == 1 and metrics["prompts"] == 1 and metrics["fit_steps"] >= 1


@pytest.mark.slow
def test_best_of_n_raises_a_rule_reward_on_the_real_model(real_model_dir, tmp_path):  # noqa: F811
    # What DPO learns, unbounded: the KL check that may stop it early is tested on its own above.
    cfg = BestOfNConfig(n=8, prompts=16, max_new_tokens=24, objective="dpo", lr=1e-3, epochs=3, max_kl=None)
    metrics = train_best_of_n(real_model_dir, [{"prompt": [{"role": "user", "content": p}]} for p in SHORT_ANSWER_PROMPTS],
                              tmp_path, rule_reward, cfg, quiet=True)
    assert metrics["score_best"] > metrics["score_all"]

    before, after = rule_scores_before_after(real_model_dir, tmp_path, SHORT_ANSWER_PROMPTS)
    assert after > before + 0.15, (before, after)


def test_dpo_pairs_each_prompts_best_with_its_worst_and_moves_toward_the_best(tiny_model_dir, tmp_path):  # noqa: F811
    prompts = [{"prompt": [{"role": "user", "content": p}]} for p in SHORT_ANSWER_PROMPTS[:4]]
    cfg = BestOfNConfig(n=4, prompts=4, max_new_tokens=8, sample_batch_size=8, batch_size=4, dtype="float32",
                        objective="dpo", lr=1e-2, epochs=8)
    metrics = train_best_of_n(tiny_model_dir, prompts, tmp_path, lambda asked, texts: torch.tensor([float(len(t)) for t in texts]),
                              cfg, quiet=True)
    assert metrics["prompts"] == 4 and metrics["fit_steps"] == 8
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # log 2: the policy starts as its own reference
    assert losses[-1] < losses[0] - 0.05  # it learns to prefer the best answers to the worst
    with pytest.raises(ValueError, match="objective"):
        BestOfNConfig(objective="ppo")


def test_answers_the_reward_cannot_tell_apart_are_a_clear_error(tiny_model_dir, tmp_path):  # noqa: F811
    prompts = [{"prompt": [{"role": "user", "content": p}]} for p in SHORT_ANSWER_PROMPTS[:2]]
    cfg = BestOfNConfig(n=2, prompts=2, max_new_tokens=4, sample_batch_size=4, dtype="float32")
    with pytest.raises(DataError, match="scored all 2 answers to each prompt alike"):
        train_best_of_n(tiny_model_dir, prompts, tmp_path, lambda asked, texts: torch.zeros(len(texts)), cfg, quiet=True)
