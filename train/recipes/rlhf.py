"""InstructGPT's recipe: SFT on demonstrations, a reward model on preference pairs, PPO against it."""

from train.recipes import steps

STEPS = (steps.sft, steps.reward_model, steps.ppo)
# In the proportions of run D's step durations (bench/RESULTS.md, four cycles on the AVX-512 machine:
# SFT 133 s, reward model 469 s, PPO 453 s, gate 189 s), so a machine as fast as that one runs run D's
# sizes unchanged within 10 minutes and a slower one shrinks every step alike.
SHARES = {"sft": 0.10, "reward_model": 0.35, "ppo": 0.35, "evaluating": 0.15}
