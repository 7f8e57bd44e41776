"""Recipes: how a cycle turns its data into a candidate policy, and the reward model the gate judges
it with. The cycle (train.cycle) builds the data sets, runs its recipe's steps in order, then gates,
publishes and promotes the same way whatever the recipe.

A recipe is a small module with
  STEPS   the training steps it runs, in order: functions of a `Run` (train.recipes.steps), each
          named after the cycle state it runs in (feedback.cycles.STEPS);
  SHARES  the part of the cycle's time budget each of those steps and the gate (`evaluating`) get;
          what is left over pays for building the data, publishing and promoting.

  rlhf  SFT, reward model, PPO: InstructGPT's recipe (the default)
  sft   SFT on demonstrations and comparison winners, no PPO (see train.recipes.sft)
  bon   SFT, reward model, best-of-n with DPO, PPO (see train.recipes.bon)
"""

from __future__ import annotations

from types import ModuleType

from feedback.cycles import RECIPES
from train.recipes import bon, rlhf, sft

BY_NAME: dict[str, ModuleType] = {"rlhf": rlhf, "sft": sft, "bon": bon}
assert tuple(BY_NAME) == RECIPES, "feedback.cycles.RECIPES names the recipes the API accepts"
DEFAULT = RECIPES[0]


def get(name: str) -> ModuleType:
    if name not in BY_NAME:
        raise ValueError(f"unknown recipe {name!r}; one of {', '.join(BY_NAME)}")
    return BY_NAME[name]
