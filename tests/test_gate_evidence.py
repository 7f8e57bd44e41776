"""The gate judges the reward model's accuracy only on enough held-out pairs, wherever the
pairs come from: given to the gate, or held out by the reward model itself when a cycle has
none of its own (tiny random Llama, fast)."""

import json

import pytest

from train.evaluate import GateConfig, evaluate_adapter
from train.reward import RewardConfig, train_reward_model
from train.sft import SFTConfig, train_sft
from train_fixtures import real_model_dir, tiny_model_dir  # noqa: F401  (fixtures)

WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "piano", "candle"]
PAIRS = [{"prompt": [{"role": "user", "content": f"Tell me about {w}."}], "chosen": f"{w} is good", "rejected": f"{w} bad bad"}
         for w in WORDS]
DEMOS = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]} for w in WORDS]
# An accuracy no reward model reaches: judged, the check fails; reported, it passes as None.
STRICT = dict(max_new_tokens=4, canaries=(), capabilities=None, min_rm_accuracy=1.01)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """An adapter, and a reward model given no held-out pairs: it holds out a quarter of its prompts."""
    sft_dir, rm_dir = tmp_path_factory.mktemp("sft"), tmp_path_factory.mktemp("rm")
    train_sft(tiny_model_dir, DEMOS, sft_dir, SFTConfig(max_steps=1), quiet=True)
    metrics = train_reward_model(tiny_model_dir, PAIRS, rm_dir, RewardConfig(max_steps=1, eval_fraction=0.25), quiet=True)
    assert metrics["eval_pairs"] == 2 and metrics["accuracy"] is not None
    return sft_dir, rm_dir


def gate(tiny_model_dir, trained, **kwargs):
    sft_dir, rm_dir = trained
    min_pairs = kwargs.pop("min_heldout_pairs", 20)
    return evaluate_adapter(tiny_model_dir, sft_dir, reward_model=rm_dir, prompts=["Say apple."],
                            cfg=GateConfig(**STRICT, min_heldout_pairs=min_pairs), **kwargs)["checks"]["rm_accuracy"]


def test_the_accuracy_the_rm_recorded_is_judged_only_on_enough_pairs(tiny_model_dir, trained):  # noqa: F811
    """What a cycle with no held-out pairs does (heldout_pairs=None): the RM's own 2 pairs are too few."""
    reported = gate(tiny_model_dir, trained, heldout_pairs=None)
    assert reported["passed"] is None and "2 held-out pairs; judged from 20" in reported["skipped"]
    assert 0 <= reported["value"] <= 1
    judged = gate(tiny_model_dir, trained, heldout_pairs=None, min_heldout_pairs=2)
    assert judged["passed"] is False and judged["value"] == reported["value"]


def test_held_out_pairs_count_from_a_file_and_when_empty(tiny_model_dir, trained, tmp_path):  # noqa: F811
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PAIRS[:3]))
    from_file = gate(tiny_model_dir, trained, heldout_pairs=path)
    assert from_file["passed"] is None and "3 held-out pairs" in from_file["skipped"] and from_file["value"] is not None
    assert gate(tiny_model_dir, trained, heldout_pairs=path, min_heldout_pairs=3)["passed"] is False
    empty = gate(tiny_model_dir, trained, heldout_pairs=[])
    assert empty["passed"] is None and empty["value"] is None and "0 held-out pairs" in empty["skipped"]
