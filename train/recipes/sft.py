"""SFT only: imitate corrections, liked answers and the chosen answer of each decided comparison
(best-of-two distillation, which gave most of run D's gain), with no PPO.

The reward model is still trained, for the gate alone: without it the gate could only say that the
candidate is not broken (KL, canaries, capabilities), never that users would like it less than the
serving policy (`reward_gain`), and imitating noisy winners can make it worse. It also keeps each
published version's reward model current, so an rlhf cycle after sft cycles warm-starts from one
that has seen all their pairs. What PPO's share of the budget would have bought goes to SFT and the
reward model (each still capped by its config's sizes).
"""

from train.recipes import steps

STEPS = (steps.sft, steps.reward_model)
SHARES = {"sft": 0.30, "reward_model": 0.45, "evaluating": 0.20}
