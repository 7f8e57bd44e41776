"""InstructGPT's recipe with best-of-n before PPO (as Llama 2's rejection sampling precedes its PPO):
SFT, the reward model, then best-of-n (8 answers to each of up to 64 training prompts, DPO on the
reward model's best answer against its worst, train.best_of_n), then PPO from there.

Not the default, on the evidence so far (bench/RESULTS.md, "Best-of-n"): against one frozen reward model
it learned a taste PPO did not (0.583-0.617 against the base model where 24 PPO steps won 0.517), but at
3 epochs the policy also lost shipped capability items, and the gate rejected it, as it did run L's first
cycle (with PPO after it). At 2 epochs (the default since) it passed the gate there. In the loop on that
taste (runs M and O) cycle 1 gained a little (0.51 -> 0.58, 0.52 -> 0.55) and cycle 2 went past the KL
bound without best-of-n's KL check and learned nothing with it."""

from train.recipes import steps

STEPS = (steps.sft, steps.reward_model, steps.best_of_n, steps.ppo)
# The rlhf recipe's shares for SFT, the reward model and the gate (run D's durations); best-of-n
# (64 prompts x 8 answers, ~270 s on the AVX-512 kind) takes most of what PPO had there.
SHARES = {"sft": 0.10, "reward_model": 0.30, "best_of_n": 0.25, "ppo": 0.15, "evaluating": 0.15}
