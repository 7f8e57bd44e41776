"""Terms added to PPO's update: PPO-ptx (an SFT loss on demonstrations, weight `ptx_coef`) and the stop floor
(`stop_floor`: the policy kept from ending its answers later than the reference would)."""

import json

import pytest
import torch

import hardware
from train import common
from train.ppo import (Clock, PPOConfig, ValueHead, demonstration_batches, forward, load_policy, lora_state, restore_lora, rollout,
                       train_ppo, update)
from train.sft import batches, lm_loss, make_examples
from train_fixtures import real_model_dir, rule_reward, tiny_model_dir  # noqa: F401  (fixtures)

WORDS = ["apple", "river", "stone", "cloud"]
DEMOS = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w} {w} {w}"}]} for w in WORDS]
PROMPTS = [[{"role": "user", "content": f"Tell me about {w}."}] for w in WORDS]


@pytest.fixture
def setup(tiny_model_dir):  # noqa: F811
    """A policy, its value head and optimiser, and one rollout batch; `fresh()` puts all of them back to this state."""
    cfg = PPOConfig(batch_size=4, minibatches=2, ppo_epochs=1, max_new_tokens=8, lr=1e-2, ptx_batch_size=4)
    device = torch.device("cpu")
    model = load_policy(tiny_model_dir, cfg, device=device, dtype=hardware.choose("float32").torch_dtype)
    tok = common.load_tokenizer(tiny_model_dir)
    value_head = ValueHead(model.get_base_model().config.hidden_size)
    torch.manual_seed(0)
    batch = rollout(model, value_head, tok, PROMPTS, rule_reward, cfg, cfg.kl_coef, Clock())
    start = lora_state(model)

    def fresh():
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k in start:
                    p.copy_(start[k])
        head = ValueHead(value_head.linear.in_features)
        params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
        return head, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0), params

    def demo_loss() -> float:
        ((ids, labels, attn),) = batches(make_examples(tok, [d["messages"] for d in DEMOS], 512), 8, tok.pad_token_id, None)
        with torch.no_grad():
            return float(lm_loss(model, ids, labels, attn))

    return cfg, model, tok, batch, fresh, demo_loss


def run_update(setup, ptx_coef, with_demos):
    cfg, model, tok, batch, fresh, demo_loss = setup
    cfg = PPOConfig(**{**cfg.__dict__, "ptx_coef": ptx_coef})
    head, opt, params = fresh()
    demos = demonstration_batches(tok, DEMOS, cfg, torch.device("cpu")) if with_demos else None
    stats = update(model, head, opt, params, batch, cfg, torch.Generator().manual_seed(0), demos)
    return stats, lora_state(model), demo_loss()


def test_ptx_off_is_the_plain_ppo_update_and_on_raises_the_demonstrations_likelihood(setup):
    plain_stats, plain, plain_loss = run_update(setup, 0.0, with_demos=False)
    off_stats, off, off_loss = run_update(setup, 0.0, with_demos=True)
    on_stats, on, on_loss = run_update(setup, 1.0, with_demos=True)
    assert all(torch.equal(plain[k], off[k]) for k in plain) and off_stats == plain_stats and "ptx_loss" not in off_stats
    assert any(not torch.equal(plain[k], on[k]) for k in plain)
    assert on_loss < plain_loss - 0.05, (on_loss, plain_loss)  # higher log-likelihood of the demonstrations
    assert on_stats["ptx_loss"] > 0


def test_train_ppo_mixes_demonstrations_and_logs_the_ptx_loss(tiny_model_dir, tmp_path):  # noqa: F811
    cfg = PPOConfig(steps=2, batch_size=4, minibatches=2, ppo_epochs=1, max_new_tokens=8, ptx_coef=0.5)
    metrics = train_ppo(tiny_model_dir, [p[0]["content"] for p in PROMPTS], tmp_path, rule_reward, cfg, demonstrations=DEMOS, quiet=True)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(line["ptx_loss"] > 0 for line in lines) and metrics["ptx_loss_last"] == lines[-1]["ptx_loss"]
    assert json.loads((tmp_path / "train_config.json").read_text())["ptx_coef"] == 0.5


def test_the_stop_floor_pulls_the_policys_readiness_to_end_up_to_the_references(real_model_dir):  # noqa: F811
    """Against a reference that would end at every position with probability 0.5, an update with the stop floor
    leaves the policy more ready to end its rollout's answers than the same update without it. The real model:
    a tiny random one's logits hardly move under LoRA."""
    cfg = PPOConfig(batch_size=4, minibatches=2, ppo_epochs=1, max_new_tokens=8, lr=1e-3, stop_floor=1.0)
    model = load_policy(real_model_dir, cfg, device=torch.device("cpu"), dtype=hardware.choose("float32").torch_dtype)
    tok = common.load_tokenizer(real_model_dir)
    head = ValueHead(model.get_base_model().config.hidden_size)
    torch.manual_seed(0)
    batch = rollout(model, head, tok, PROMPTS, rule_reward, cfg, cfg.kl_coef, Clock())
    assert batch["stop_id"] == tok.eos_token_id and batch["ref_stop"].shape == batch["logprobs"].shape
    batch["ref_stop"] = torch.full_like(batch["ref_stop"], 0.5).log()
    start, ready = lora_state(model), {}
    for floor in (0.0, 1.0):
        restore_lora(model, start)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        stats = update(model, ValueHead(head.linear.in_features), opt, params, batch,
                       PPOConfig(**{**cfg.__dict__, "stop_floor": floor}), torch.Generator().manual_seed(0))
        assert ("stop_kl" in stats) == (floor > 0)
        with torch.no_grad():
            _, _, stop = forward(model, None, batch["seq"], batch["attn"], batch["prompt_len"], batch["responses"], cfg.temperature,
                                 tok.eos_token_id)
        ready[floor] = float((stop * batch["mask"]).sum() / batch["mask"].sum())  # mean log-prob of ending, nats
    assert ready[1.0] > ready[0.0] + 0.5, ready
