"""Policy steps against one frozen reward model, judged by a simulated user's preference.

Each variant trains a policy from the base model against the same reward model (a cycle's, e.g.
`DATA_DIR/adapters/vN/reward_model`) with the same seed and prompts, then every policy and the base
model answer the simulator's held-out prompts and the simulated user judges each against the base
model (ties half, 95% interval). Variants:

  ppo                 PPO as a cycle runs it (8 answers a step: `--batch-size`; `--missing-eos-penalty` 1.0)
  best-of-n           best-of-n distillation (train.best_of_n): SFT on each prompt's best answer
  best-of-n-dpo       the same answers, DPO on each prompt's best against its worst
  best-of-n+ppo       best-of-n distillation, then PPO from it

Each trained variant also goes through the cycle's gate against the base model (train.evaluate on
the held-out prompts): its KL to the base model in nats per answer, the share of the shipped
capability items it still answers, the share of canary answers that end, and which checks fail.

Two rows need no training and bound what one round of best-of-n can buy: `RM pick of n` (the
reward model picks one of the base model's n answers per prompt) and `oracle pick of n` (the
simulated user's own preference picks it).

    .venv/bin/python bench/frozen_reward.py --reward-model DIR --preference bench.reward_model:second_person \\
        [--variants ppo best-of-n] [--steps 24] [--batch-size 8] [--missing-eos-penalty 1.0] [--stop-floor 0] [--ptx-coef 0] [--ppo-lr 5e-5] [--samples-per-prompt 1] [--best-of 8] [--bon-prompts 32] [--eval-prompts 40] [--samples 3]
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

from train.best_of_n import BestOfNConfig  # noqa: E402
from train.ppo import PPOConfig  # noqa: E402

VARIANTS = ("ppo", "best-of-n", "best-of-n-dpo", "best-of-n+ppo")


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


def picked(answers: dict, n: int, samples: int, better) -> dict:
    """Per prompt, the one of its `n` answers that `better(i, j)` ranks first, repeated `samples` times."""
    out = {"prompts": [], "texts": [], "ended": []}
    for start in range(0, len(answers["texts"]), n):
        best = start
        for i in range(start + 1, start + n):
            best = i if better(i, best) else best
        for key in out:
            out[key] += [answers[key][best]] * samples
    return out


def gate(model_dir, adapter: Path, rm, heldout) -> dict:
    """The cycle's gate, candidate against the base model: KL, capability pass share, failed checks."""
    from train.evaluate import GateConfig, evaluate_adapter

    verdict = evaluate_adapter(model_dir, adapter, reward_model=rm, prompts=[{"prompt": m} for m in heldout],
                               cfg=GateConfig(max_prompts=len(heldout)))
    checks = verdict["checks"]
    return {"kl": round(checks["kl"]["value"], 2), "capability": round(checks["capability_pass"]["value"], 3),
            "capability_base": round(verdict["figures"]["capability_pass_baseline"], 3),
            "canaries_ended": round(checks["canaries"]["value"], 2), "canaries_base": round(verdict["figures"]["canaries_baseline"], 2),
            "gate_fails": [k for k, c in checks.items() if c.get("passed") is False]}


def train_variant(variant: str, model_dir, prompts, rm, work: Path, args) -> dict:
    from train.best_of_n import train_best_of_n
    from train.ppo import train_ppo
    from train.recipes.steps import SKILLS

    out, figures, policy = work / variant, {}, None
    if variant.startswith("best-of-n"):
        bon = train_best_of_n(model_dir, prompts, work / "bon" if "+" in variant else out, rm.score,
                              BestOfNConfig(n=args.best_of, prompts=args.bon_prompts, max_new_tokens=args.max_new_tokens,
                                            epochs=args.bon_epochs, lr=args.bon_lr, beta=args.bon_beta, seed=args.seed,
                                            objective="dpo" if variant == "best-of-n-dpo" else "sft"), quiet=True)
        policy = work / "bon" if "+" in variant else out
        figures.update(score_all=round(bon["score_all"], 3), score_best=round(bon["score_best"], 3),
                       best_ended=round(bon["best_ended"], 2))
    if variant.endswith("ppo"):
        cfg = PPOConfig(steps=args.steps, batch_size=args.batch_size, minibatches=2, ppo_epochs=2, max_new_tokens=args.max_new_tokens,
                        missing_eos_penalty=args.missing_eos_penalty, stop_floor=args.stop_floor, ptx_coef=args.ptx_coef,
                        samples_per_prompt=args.samples_per_prompt, lr=args.ppo_lr, seed=args.seed)
        metrics = train_ppo(model_dir, prompts, out, rm, cfg, init_adapter=policy, demonstrations=str(SKILLS))
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        figures.update(ppo_score=f"{steps[0]['score']:.2f} -> {steps[-1]['score']:.2f}", ppo_kl=round(metrics["kl_last"], 2),
                       ppo_ended=f"{steps[0]['eos_rate']:.2f} -> {steps[-1]['eos_rate']:.2f}",
                       **({"stop_kl_last": round(steps[-1]["stop_kl"], 3)} if args.stop_floor > 0 else {}))
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reward-model", type=Path, required=True, help="a trained reward model dir (a cycle's reward_model)")
    p.add_argument("--preference", required=True, help="the simulated user's preference, as `loopchat simulate` takes it")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=24, help="PPO steps")
    p.add_argument("--batch-size", type=int, default=8, help="PPO's answers a step (a cycle's: 8)")
    p.add_argument("--missing-eos-penalty", type=float, default=PPOConfig.missing_eos_penalty,
                   help="taken off the score of each PPO answer that did not end (train.ppo)")
    p.add_argument("--stop-floor", type=float, default=PPOConfig.stop_floor,
                   help="weight of PPO's loss on ending later than the base model would (train.ppo's stop_kl; 0: off)")
    p.add_argument("--ptx-coef", type=float, default=PPOConfig.ptx_coef,
                   help="PPO-ptx's weight on the shipped skills set, as a cycle mixes it in (0: off)")
    p.add_argument("--ppo-lr", type=float, default=PPOConfig.lr)
    p.add_argument("--samples-per-prompt", type=int, default=1, help="PPO's answers to each prompt of a step (train.ppo)")
    p.add_argument("--best-of", type=int, default=8, help="answers per prompt for best-of-n and the pick rows")
    p.add_argument("--bon-prompts", type=int, default=32, help="prompts best-of-n distils")
    p.add_argument("--bon-epochs", type=int, default=BestOfNConfig.epochs, help="SFT epochs over best-of-n's picks")
    p.add_argument("--bon-lr", type=float, default=BestOfNConfig.lr)
    p.add_argument("--bon-beta", type=float, default=BestOfNConfig.beta, help="DPO's beta (best-of-n-dpo)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="training answers' length (a cycle's is 48)")
    p.add_argument("--eval-prompts", type=int, default=40)
    p.add_argument("--samples", type=int, default=3)
    p.add_argument("--eval-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loopchat.model import prepare
    from train import common
    from train.reward import RewardModel

    model_dir = prepare(REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    train_prompts, heldout = split_prompts(load_prompts(DEFAULT_PROMPTS), args.eval_prompts, args.seed)
    prompts = [{"prompt": m} for m in train_prompts]
    judge = load_judge(args.preference)
    rm = RewardModel(args.reward_model, model_dir)
    work = Path(tempfile.mkdtemp(prefix="frozen-reward-"))
    trained = {}
    for variant in args.variants:
        started = time.monotonic()
        trained[variant] = train_variant(variant, model_dir, prompts, rm, work, args)
        trained[variant]["seconds"] = round(time.monotonic() - started)
        trained[variant].update(gate(model_dir, work / variant, rm, heldout))
        print(f"{variant}: {trained[variant]}", flush=True)

    choice = hardware.choose()
    tokenizer = common.load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=choice.torch_dtype)
    first, *rest = args.variants
    model = PeftModel.from_pretrained(model, str(work / first), adapter_name=first)
    for variant in rest:
        model.load_adapter(str(work / variant), adapter_name=variant)
    model = model.to(choice.device).eval()
    base = sample(model, tokenizer, heldout, None, args.samples, args.eval_tokens, args.seed)
    rows = [("base model", base)]
    many = sample(model, tokenizer, heldout, None, args.best_of, args.eval_tokens, args.seed + 1)
    rm_many = rm(many["prompts"], many["texts"]).tolist()
    rows.append((f"RM pick of {args.best_of}", picked(many, args.best_of, args.samples, lambda i, j: rm_many[i] > rm_many[j])))
    rows.append((f"oracle pick of {args.best_of}", picked(many, args.best_of, args.samples, lambda i, j: judge.vote(
        prompt_text(many["prompts"][i]), many["texts"][i], many["texts"][j], None, noisy=False) == "a")))
    for variant in args.variants:
        rows.append((variant, sample(model, tokenizer, heldout, variant, args.samples, args.eval_tokens, args.seed)))

    print(f"machine: {json.dumps(hardware.describe())}")
    print(f"preference {args.preference}; reward model {args.reward_model}; from the base model: PPO {args.steps} steps x {args.batch_size} "
          f"answers ({args.samples_per_prompt} to each prompt, lr {args.ppo_lr}, missing-EOS penalty {args.missing_eos_penalty}, stop floor {args.stop_floor}, ptx {args.ptx_coef}), "
          f"best-of-{args.best_of} on {args.bon_prompts} prompts, answers of <= {args.max_new_tokens} tokens; "
          f"measured on {len(heldout)} held-out prompts x {args.samples}")
    print(f"{'':<20} {'win vs base':>16} {'RM score':>9} {'ended':>6} {'words':>6}  training")
    for label, answers in rows:
        rm_score = float(rm(answers["prompts"], answers["texts"]).mean())
        ended = sum(answers["ended"]) / len(answers["ended"])
        words = sum(len(t.split()) for t in answers["texts"]) / len(answers["texts"])
        win = "-" if answers is base else "{:>8.3f} +-{:>5.3f}".format(*judge_against(judge, answers, base, args.seed))
        print(f"{label:<20} {win:>16} {rm_score:>9.3f} {ended:>6.2f} {words:>6.1f}  {trained.get(label, '')}")


if __name__ == "__main__":
    main()
