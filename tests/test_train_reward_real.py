"""The real 135M model learns a preference from rankings (grouped loss) and continues from itself."""

import random

import pytest

from train.reward import RewardConfig, train_reward_model
from train_fixtures import real_model_dir  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow

TOPICS = ["the sea", "mountains", "coffee", "trains", "winter", "music", "gardens", "the moon", "rivers", "cats", "bread", "clocks",
          "rain", "books", "bridges", "forests", "tea", "maps", "candles", "bicycles", "stars", "islands", "kites", "owls"]
BODIES = ["{t} are worth a closer look", "people have loved {t} for ages", "{t} can teach us a lot", "there is much to say about {t}",
          "{t} show up in many old stories", "few things compare to {t}"]


def rankings(seed=0) -> list[dict]:
    """Per question a ranking of three answers: the one calling its topic 'delightful' first, the
    other two tied below it; so two pairs per ranking, sharing the group."""
    rng = random.Random(seed)
    out = []
    for topic in TOPICS:
        for question in (f"Tell me about {topic}.", f"What do you think of {topic}?"):
            good, bad1, bad2 = (b.format(t=topic) for b in rng.sample(BODIES, 3))
            best = f"{good}, and they are delightful." if rng.random() < 0.5 else f"Delightful! {good}."
            out += [{"prompt": [{"role": "user", "content": question}], "chosen": best, "rejected": f"{bad}.",
                     "meta": {"group": question, "rank_gap": 1}} for bad in (bad1, bad2)]
    return out


def test_grouped_reward_model_learns_from_rankings_and_continues(real_model_dir, tmp_path):
    data = rankings()
    cfg = RewardConfig(lr=1e-3, epochs=1, batch_size=4, eval_fraction=0.25)
    first = train_reward_model(real_model_dir, data, tmp_path / "first", cfg, quiet=True)
    assert first["eval_pairs"] >= 16 and first["train_groups"] == len(data) // 2 - first["eval_pairs"] // 2
    assert first["accuracy"] >= 0.9 and first["accuracy_ci95"][0] > 0.5, first

    again = train_reward_model(real_model_dir, data, tmp_path / "again", RewardConfig(max_steps=0, eval_fraction=0.25),
                               init_from=tmp_path / "first", quiet=True)
    assert again["accuracy"] == first["accuracy"] and again["new_pairs"] == 0
