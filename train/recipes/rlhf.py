"""InstructGPT's recipe: SFT on demonstrations, a reward model on preference pairs, then the policy
optimised against the reward model: first best-of-n (n answers per prompt, DPO on the reward model's
best against its worst, as Llama 2's rejection sampling precedes its PPO), then PPO.

Best-of-n comes first because it is what moves the policy on a taste few answers show: against one
frozen reward model it won 0.617 against the base model where 24 PPO steps won 0.517
(bench/RESULTS.md, "Best-of-n"); PPO then refines from there within its own KL bound."""

from train.recipes import steps

STEPS = (steps.sft, steps.reward_model, steps.best_of_n, steps.ppo)
# Run D's step durations (bench/RESULTS.md: SFT 133 s, reward model 469 s, PPO 453 s, gate 189 s) set
# SFT's, the reward model's and the gate's shares; best-of-n (64 prompts x 8 answers, ~270 s on the
# AVX-512 kind) takes most of what PPO had.
SHARES = {"sft": 0.10, "reward_model": 0.30, "best_of_n": 0.25, "ppo": 0.15, "evaluating": 0.15}
