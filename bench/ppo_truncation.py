"""How PPO should treat answers cut off at `max_new_tokens`, judged by a simulated user's preference.

PPO subtracts `missing_eos_penalty` from the score of every answer that did not end within
`max_new_tokens`. The reward model's scores are normalised to one standard deviation, so a penalty
of 1.0 weighs as much as the reward model's whole spread; when most sampled answers are cut off
(a cycle samples 48 tokens, and SmolLM2's answers run longer), the cheapest way up is to end
sooner, whatever the users asked for. That suits a taste for short answers and fights every other.

This runs PPO from the base model against one frozen reward model (a cycle's, e.g.
`DATA_DIR/adapters/vN/reward_model`), once per penalty, with the same seed, prompts and steps, then
samples every policy and the base model on the simulator's held-out prompts and reports, per
penalty: the win rate against the base model under the simulated user's preference (ties half,
95% interval), the reward model's mean score, the share of answers that ended, and their length.

    .venv/bin/python bench/ppo_truncation.py --reward-model DIR --preference bench.reward_model:second_person \\
        [--penalties 1 0] [--steps 24] [--eval-prompts 40] [--samples 3]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from loopchat.options import training_process  # noqa: E402

training_process()  # before torch loads: spinning OpenMP threads made a PPO step 10x slower on a shared box
import hardware  # noqa: E402
from feedback.winrates import mean_interval  # noqa: E402
from loopchat.simulate import DEFAULT_PROMPTS, load_judge, load_prompts, prompt_text, split_prompts  # noqa: E402


def sample(model, tokenizer, prompts, adapter: str | None, samples: int, max_new_tokens: int, seed: int) -> dict:
    """`samples` answers per prompt at temperature 0.7, with `adapter` on (None: the base model),
    drawn the way the gate draws them."""
    from train.evaluate import GateConfig, _flat, _samples

    rows = [p for p in prompts for _ in range(samples)]
    batches = _samples(model, tokenizer, rows, GateConfig(), adapter, max_new_tokens, seed)
    return {"prompts": rows, "texts": _flat(batches, "texts"), "ended": [bool(e) for b in batches for e in b["ended"]]}


def judge_against(judge, mine: dict, base: dict, seed: int) -> tuple[float, float]:
    rng, scores = random.Random(seed), []
    for messages, a, b in zip(mine["prompts"], mine["texts"], base["texts"]):
        flipped = rng.random() < 0.5  # the judge never knows which side is the policy
        choice = judge.vote(prompt_text(messages), *((b, a) if flipped else (a, b)), rng, noisy=False)
        win = {"a": 1.0, "b": 0.0}.get(choice, 0.5)
        scores.append(1.0 - win if flipped and win != 0.5 else win)
    return mean_interval(scores)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reward-model", type=Path, required=True, help="a trained reward model dir (a cycle's reward_model)")
    p.add_argument("--preference", required=True, help="the simulated user's preference, as `loopchat simulate` takes it")
    p.add_argument("--penalties", type=float, nargs="+", default=[1.0, 0.0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=48, help="PPO's rollout length (the cycle's is 48)")
    p.add_argument("--eval-prompts", type=int, default=40)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--eval-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loopchat.model import prepare
    from train import common
    from train.ppo import PPOConfig, train_ppo
    from train.reward import RewardModel

    model_dir = prepare(REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    train_prompts, heldout = split_prompts(load_prompts(DEFAULT_PROMPTS), args.eval_prompts, args.seed)
    judge = load_judge(args.preference)
    rm = RewardModel(args.reward_model, model_dir)
    work = Path(tempfile.mkdtemp(prefix="ppo-truncation-"))
    trained = {}
    for penalty in args.penalties:
        cfg = PPOConfig(steps=args.steps, batch_size=8, minibatches=2, ppo_epochs=2, max_new_tokens=args.max_new_tokens,
                        missing_eos_penalty=penalty, seed=args.seed)
        started = time.monotonic()
        metrics = train_ppo(model_dir, [{"prompt": m} for m in train_prompts], work / f"p{penalty}", rm, cfg)
        steps = [json.loads(line) for line in (work / f"p{penalty}" / "metrics.jsonl").read_text().splitlines()]
        trained[penalty] = {"seconds": round(time.monotonic() - started), "kl_last": metrics["kl_last"],
                            "eos_rate_first": steps[0]["eos_rate"], "eos_rate_last": steps[-1]["eos_rate"]}
        print(f"penalty {penalty}: {trained[penalty]}", flush=True)

    choice = hardware.choose()
    tokenizer = common.load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=choice.torch_dtype)
    names = {penalty: f"p{i}" for i, penalty in enumerate(args.penalties)}
    first, *rest = args.penalties
    model = PeftModel.from_pretrained(model, str(work / f"p{first}"), adapter_name=names[first])
    for penalty in rest:
        model.load_adapter(str(work / f"p{penalty}"), adapter_name=names[penalty])
    model = model.to(choice.device).eval()
    base = sample(model, tokenizer, heldout, None, args.samples, args.eval_tokens, args.seed)
    rows = [("base model", base, None)]
    for penalty in args.penalties:
        rows.append((f"penalty {penalty}", sample(model, tokenizer, heldout, names[penalty], args.samples, args.eval_tokens, args.seed), penalty))

    print(f"machine: {json.dumps(hardware.describe())}")
    print(f"preference {args.preference}; reward model {args.reward_model}; PPO {args.steps} steps x 8 answers of <= "
          f"{args.max_new_tokens} tokens from the base model; measured on {len(heldout)} held-out prompts x {args.samples}")
    print(f"{'':<14} {'win vs base':>16} {'RM score':>9} {'ended':>6} {'words':>6} {'PPO ended first->last':>22} {'KL':>6}")
    for label, answers, penalty in rows:
        rm_score = float(rm(answers["prompts"], answers["texts"]).mean())
        ended = sum(answers["ended"]) / len(answers["ended"])
        words = sum(len(t.split()) for t in answers["texts"]) / len(answers["texts"])
        if penalty is None:
            print(f"{label:<14} {'-':>16} {rm_score:>9.3f} {ended:>6.2f} {words:>6.1f}")
            continue
        rate, half = judge_against(judge, answers, base, args.seed)
        t = trained[penalty]
        print(f"{label:<14} {rate:>8.3f} +-{half:>5.3f} {rm_score:>9.3f} {ended:>6.2f} {words:>6.1f} "
              f"{t['eos_rate_first']:>10.2f} -> {t['eos_rate_last']:<8.2f} {t['kl_last']:>6.2f}")


if __name__ == "__main__":
    main()
