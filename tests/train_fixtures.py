"""Fixtures for the training tests (import them into a test module by name).

`real_model_dir` builds the default 135M checkpoint the way a fresh machine does
(loopchat.model.prepare, a no-op once done); `tiny_model_dir` is a 2-layer, 64-wide random
Llama with the real tokenizer and chat template, for fast unit tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    from loopchat.model import prepare

    return prepare(REAL_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(real_model_dir, tmp_path_factory) -> Path:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    config = AutoConfig.from_pretrained(real_model_dir)
    config.update(
        dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(real_model_dir).save_pretrained(out)
    return out


def rule_reward(prompts, responses):
    """A fixed rule the tests can check: short answers are good (1 for an empty answer, 0 at 20 words)."""
    import torch

    return torch.tensor([1.0 - min(len(r.split()), 40) / 20 for r in responses])


def rule_scores_before_after(model_dir: Path, adapter_dir: Path, prompts: list[str], max_new_tokens: int = 24) -> tuple[float, float]:
    """rule_reward's mean on the base model's answers and on the adapter's, sampled with the same seed."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import hardware
    from train import common
    from train.ppo import generate

    tok = common.load_tokenizer(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=hardware.choose(device="cpu").torch_dtype)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    messages = [[{"role": "user", "content": p}] for p in prompts]

    def mean_rule_score(adapter_on: bool) -> float:
        torch.manual_seed(1)
        if adapter_on:
            texts = generate(model, tok, messages, max_new_tokens, 0.7)["texts"]
        else:
            with model.disable_adapter():
                texts = generate(model, tok, messages, max_new_tokens, 0.7)["texts"]
        return float(rule_reward(messages, texts).mean())

    return mean_rule_score(False), mean_rule_score(True)
