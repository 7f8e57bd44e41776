"""PPO's KL reference: the adapter being replaced (a second, frozen adapter on the same base) or the base model."""

import json

import torch
from safetensors.torch import load_file

import hardware
from train import common
from train.evaluate import GateConfig, evaluate_adapter
from train.ppo import POLICY, REFERENCE, PPOConfig, load_policy, reference_model, train_ppo
from loop_fixtures import random_adapter
from train_fixtures import real_model_dir, rule_reward, tiny_model_dir  # noqa: F401  (fixtures)

PROMPTS = [f"Say {w}." for w in ("apple", "river", "stone", "cloud")]


def serving_adapter(model_dir, out):
    """An adapter far from the base by construction (random, non-zero LoRA weights). A few SFT steps
    on the tiny random model moved it so little that the sampled KL estimate to the base came out
    anywhere from -0.03 to 0.3 depending on the sampler's random stream (CPU vs GPU)."""
    return random_adapter(model_dir, out, seed=0)


def test_kl_to_the_adapter_it_starts_from_is_zero_and_to_the_base_is_not(tiny_model_dir, tmp_path):  # noqa: F811
    serving = serving_adapter(tiny_model_dir, tmp_path / "serving")
    # float32: the policy's log-probs come from the sampling pass, the reference's from a full-sequence pass,
    # and in bf16 the two layouts' rounding alone is ~0.004 nats a token (see train.ppo).
    cfg = PPOConfig(steps=2, batch_size=4, minibatches=1, ppo_epochs=1, max_new_tokens=8, lr=1e-2, dtype="float32")
    metrics = train_ppo(tiny_model_dir, PROMPTS, tmp_path / "ppo", rule_reward, cfg, init_adapter=serving,
                        reference_adapter=serving, quiet=True)
    assert abs(metrics["kl_first"]) < 1e-4  # the policy is the reference
    assert metrics["kl_base_first"] > 0.1  # the serving adapter is far from the base
    assert metrics["reference"] == str(serving)
    lines = [json.loads(x) for x in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert lines[1]["kl"] != 0 and {"kl_base", "seconds_base", "seconds_reference"} <= lines[1].keys()
    # Only the policy is saved: the reference stays what it was, and nothing of it lands in the output.
    assert not (tmp_path / "ppo" / REFERENCE).exists()
    after, before = load_file(str(tmp_path / "ppo" / "adapter_model.safetensors")), load_file(str(serving / "adapter_model.safetensors"))
    assert set(after) == set(before) and any(not torch.equal(after[k], before[k]) for k in before)


def test_without_a_reference_adapter_the_base_is_the_reference(tiny_model_dir, tmp_path):  # noqa: F811
    serving = serving_adapter(tiny_model_dir, tmp_path / "serving")
    cfg = PPOConfig(steps=1, batch_size=4, minibatches=1, ppo_epochs=1, max_new_tokens=8)
    metrics = train_ppo(tiny_model_dir, PROMPTS, tmp_path / "ppo", rule_reward, cfg, init_adapter=serving, quiet=True)
    assert metrics["kl_first"] > 0.1 and metrics["kl_first"] == metrics["kl_base_first"] and metrics["reference"] == "base"


def test_a_price_on_kl_to_the_base_pulls_the_policy_back_toward_it(tiny_model_dir, tmp_path):  # noqa: F811
    """With no reward to chase, PPO from the serving adapter (its KL reference) drifts at random; with
    `kl_base_coef` it gives back KL to the base model, as the gate measures it (exact per token: the
    sampled estimate PPO logs is too noisy on a random tiny model to tell)."""
    serving = serving_adapter(tiny_model_dir, tmp_path / "serving")
    gate = GateConfig(max_prompts=16, batch_size=8, max_new_tokens=8, canaries=(), capabilities=None)

    def kl_base(adapter) -> float:
        prompts = [{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS * 4]
        verdict = evaluate_adapter(tiny_model_dir, adapter, prompts=prompts, baseline_adapter=serving, cfg=gate)
        return verdict["checks"]["kl_base"]["value"]

    def trained(coef: float) -> float:
        cfg = PPOConfig(steps=6, batch_size=8, minibatches=1, ppo_epochs=2, max_new_tokens=8, lr=1e-2, dtype="float32",
                        kl_base_coef=coef)
        train_ppo(tiny_model_dir, PROMPTS, tmp_path / f"ppo-{coef}", lambda p, r: torch.zeros(len(r)), cfg,
                  init_adapter=serving, reference_adapter=serving, quiet=True)
        return kl_base(tmp_path / f"ppo-{coef}")

    assert trained(3.0) < min(kl_base(serving), trained(0.0))


def test_the_reference_is_frozen_and_switching_to_it_leaves_the_policy_trainable(tiny_model_dir, tmp_path):  # noqa: F811
    serving = serving_adapter(tiny_model_dir, tmp_path / "serving")
    dtype = hardware.choose("float32").torch_dtype
    model = load_policy(tiny_model_dir, PPOConfig(), device=torch.device("cpu"), dtype=dtype, reference_adapter=serving)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(f".{POLICY}." in k for k in trainable)
    tok = common.load_tokenizer(tiny_model_dir)
    ids = torch.tensor([common.encode_prompt(tok, [{"role": "user", "content": "Say apple."}])])
    logits = {}
    with torch.no_grad():
        logits["policy"] = model(input_ids=ids).logits  # a fresh adapter: the base model's logits
        with reference_model(model):
            logits["reference"] = model(input_ids=ids).logits
        with model.disable_adapter():
            logits["base"] = model(input_ids=ids).logits
    assert torch.allclose(logits["policy"], logits["base"], atol=1e-5)
    assert not torch.allclose(logits["reference"], logits["base"], atol=1e-2)
    assert {k for k, p in model.named_parameters() if p.requires_grad} == trainable and model.active_adapter == POLICY


def test_a_grouped_rollout_answers_each_prompt_several_times_and_starts_the_value_head_at_zero(tiny_model_dir, tmp_path):  # noqa: F811
    seen = []

    def reward(prompts, responses):
        seen.append([p[-1]["content"] for p in prompts])
        return rule_reward(prompts, responses)

    cfg = PPOConfig(steps=2, batch_size=8, samples_per_prompt=4, minibatches=2, ppo_epochs=1, max_new_tokens=8)
    # Not a reward model: reading a value head from it would fail, and with grouped scores none is read.
    not_a_reward_model = serving_adapter(tiny_model_dir, tmp_path / "s")
    train_ppo(tiny_model_dir, PROMPTS, tmp_path / "ppo", reward, cfg, value_head_from=not_a_reward_model, quiet=True)
    assert len(seen) == 2
    for batch in seen:  # two prompts a step, four answers to each side by side
        assert batch[:4] == [batch[0]] * 4 and batch[4:] == [batch[4]] * 4
    assert sorted(seen[0][::4] + seen[1][::4]) == sorted(PROMPTS)  # one pass over the prompts
