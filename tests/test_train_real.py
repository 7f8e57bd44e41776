"""The real 135M model: the reward model learns a preference, PPO moves the policy towards a
rule while staying near the reference, and the adapter loads into transformers + peft."""

import random

import pytest

from train.artifacts import check_adapter
from train.ppo import PPOConfig, train_ppo
from train.reward import RewardConfig, train_reward_model
from train_fixtures import real_model_dir, rule_reward, rule_scores_before_after  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

TOPICS = ["the sea", "mountains", "coffee", "trains", "winter", "music", "gardens", "the moon", "rivers", "cats", "bread", "clocks",
          "rain", "books", "bridges", "forests", "tea", "maps", "candles", "bicycles", "stars", "islands", "kites", "owls"]
OPENERS = ["Well,", "So,", "Honestly,", "I think", "In short,", "You know,"]
BODIES = ["{t} are worth a closer look", "people have loved {t} for ages", "{t} can teach us a lot", "there is much to say about {t}",
          "{t} show up in many old stories", "few things compare to {t}"]


def synthetic_pairs(seed=0):
    """Chosen answers mention the word 'delightful' somewhere; rejected ones never do. Wording,
    order and length vary, so only that word separates the two sides."""
    rng = random.Random(seed)
    pairs = []
    for topic in TOPICS:
        for question in (f"Tell me about {topic}.", f"What do you think of {topic}?"):
            good, bad = rng.sample(BODIES, 2)
            chosen = f"{rng.choice(OPENERS)} {good.format(t=topic)}, and they are delightful."
            if rng.random() < 0.5:
                chosen = f"Delightful question! {rng.choice(OPENERS)} {good.format(t=topic)}."
            rejected = f"{rng.choice(OPENERS)} {bad.format(t=topic)}" + rng.choice([".", ", as many would agree.", ", for sure."])
            pairs.append({"prompt": [{"role": "user", "content": question}], "chosen": chosen, "rejected": rejected})
    return pairs


def test_reward_model_learns_a_synthetic_preference(real_model_dir, tmp_path):
    pairs = synthetic_pairs()
    metrics = train_reward_model(real_model_dir, pairs, tmp_path, RewardConfig(lr=1e-3, epochs=1, batch_size=8, eval_fraction=0.25), quiet=True)
    assert metrics["eval_pairs"] >= 8
    assert metrics["accuracy"] >= 0.9, metrics


SHORT_ANSWER_PROMPTS = ["What is 2+2?", "Name a colour.", "Say hi.", "What is the capital of France?", "What is the opposite of up?",
                        "Give me a word that rhymes with cat.", "Is ice cold?", "What is 3 times 3?", "Name an animal.",
                        "What day comes after Monday?", "Spell the word dog.", "What colour is grass?", "How many legs does a cat have?",
                        "Say goodbye.", "What is the opposite of hot?", "Name a fruit."]


def test_ppo_raises_a_rule_reward_within_the_kl_bound(real_model_dir, tmp_path):
    # As a cycle runs it: 4 answers to each prompt, scored against each other (train.cycle's PPO default);
    # 4 steps of 4 prompts see each prompt once (with 1 answer per prompt, 3 steps of 16 raised it as far).
    cfg = PPOConfig(steps=4, batch_size=16, samples_per_prompt=4, minibatches=2, ppo_epochs=2, max_new_tokens=24, lr=3e-4, kl_stop=6.0)
    metrics = train_ppo(real_model_dir, SHORT_ANSWER_PROMPTS, tmp_path, rule_reward, cfg, quiet=True)
    assert metrics["stop"] == "steps done" and metrics["kl_last"] < cfg.kl_stop
    assert metrics["score_last"] > metrics["score_first"]
    check_adapter(tmp_path)  # LoRA on attention, rank <= 16, nothing vLLM cannot serve

    # The adapter loads into transformers + peft and, sampling with the same seed, answers
    # score higher under the rule than the base model's.
    before, after = rule_scores_before_after(real_model_dir, tmp_path, SHORT_ANSWER_PROMPTS)
    assert after > before + 0.15, (before, after)
