"""Reward-model accuracy against the number of training pairs, for each variant, offline.

1. Samples K=4 answers per prompt from the base model with transformers (prompts from
   loopchat/data/prompts.txt, 48 new tokens, temperature 0.9) once, cached under .cache/bench/
   (never in the repo); a resumed run samples what a whole one would.
2. Simulated users rank each prompt's K answers (the judges of loopchat.simulate, each pairwise
   vote wrong 10% of the time); a ranking becomes its pairs, each with `meta.group` (the ranking)
   and `meta.rank_gap`, as feedback.datasets makes them. Preferences: the built-in concise, polite
   and no_lists, bench.preferences:plain_words, and `second_person` below (written here, not built in).
3. Trains each variant on the first rankings of a fixed order until they hold N pairs (--sizes),
   all variants on the same data, and prints held-out pair accuracy with its 95% Wilson interval
   and seconds per run (model loading included). Held-out pairs come from 50 prompts never trained
   on, labelled without noise (what the users actually prefer). `baseline` is the reward model as
   it was before groups: the same pairs as independent comparisons, the cycle's 2 epochs of 8 pairs.
4. `--warm N`: two cycles with the last variant, N/2 pairs then N, the second continuing the
   first (`init_from`) with replay 0 and 1; compare with the variant's row at N.

    .venv/bin/python bench/reward_model.py [--preferences concise polite ...] [--sizes 100 200 300]
                                           [--variants baseline grouped] [--warm 200] [--out FILE]

Each LoRA run is ~50 steps of the 135M model: minutes on 2 cores, so pick a few preferences and sizes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # the 2 cores are shared (see bench/ppo_vs_trl.py)

CACHE = REPO / ".cache" / "bench"
MODEL = REPO / ".cache" / "models" / "SmolLM2-135M-Instruct"
K, MAX_NEW_TOKENS, TEMPERATURE, SEED = 4, 48, 0.9, 0


def sample_answers(model_dir: Path, n_prompts: int | None = None, batch_prompts: int = 16) -> list[dict]:
    """[{"prompt": messages, "answers": [K strings]}] for the first `n_prompts` prompts, cached
    (and resumed) in .cache/bench/; the same seed gives the same answers."""
    import torch

    import hardware
    from loopchat.simulate import DEFAULT_PROMPTS, load_prompts
    from train import common
    from train.ppo import PPOConfig, generate, load_policy

    prompts = load_prompts(DEFAULT_PROMPTS)[:n_prompts]
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"rm-samples-{Path(model_dir).name}-k{K}-t{TEMPERATURE}-n{MAX_NEW_TOKENS}-s{SEED}.jsonl"
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    if len(done) < len(prompts):
        common.quiet_transformers()
        device = common.pick_device()
        tok = common.load_tokenizer(model_dir)
        # generate() reads a peft model's parts; a fresh LoRA adapter changes nothing (its B is zero): the base model
        model = load_policy(model_dir, PPOConfig(), device=device, dtype=hardware.choose("auto", device.type).torch_dtype).eval()
        with open(path, "a", encoding="utf-8") as f:
            for start in range(len(done), len(prompts), batch_prompts):
                torch.manual_seed(SEED + start)  # batch by batch, so a resumed run samples what a whole one would
                chunk = prompts[start : start + batch_prompts]
                texts = generate(model, tok, [p for p in chunk for _ in range(K)], MAX_NEW_TOKENS, TEMPERATURE)["texts"]
                for i, p in enumerate(chunk):
                    row = {"prompt": p, "answers": texts[i * K : (i + 1) * K]}
                    f.write(json.dumps(row) + "\n")
                    done.append(row)
                f.flush()
                print(f"  sampled {len(done)}/{len(prompts)} prompts", file=sys.stderr)
    return done[: len(prompts)]


_YOU = re.compile(r"\b(you|your|yours|yourself)\b", re.I)


def second_person(prompt: str, a: str, b: str) -> str:
    """A preference written for this bench (not a built-in): the answer that speaks to the reader
    ("you", "your") more often per word is better; within 1 per 100 words it is a tie."""
    def rate(text: str) -> float | None:
        n = len(text.split())
        return len(_YOU.findall(text)) / n if n else None

    ra, rb = rate(a), rate(b)
    if ra is None or rb is None:
        return "both_bad" if ra is None and rb is None else ("a" if rb is None else "b")
    return "tie" if abs(ra - rb) <= 0.01 else ("a" if ra > rb else "b")


PREFERENCES = ("concise", "polite", "no_lists", "bench.preferences:plain_words", "bench.reward_model:second_person")


def ranking_pairs(judge, prompt: list[dict], answers: list[str], group: str, rng: random.Random | None) -> list[dict]:
    """A user's ranking of the K answers as pairs: every two answers compared (each vote wrong at
    the judge's noise when `rng` is given), ranked by wins (a tie or both_bad is half a win each),
    and every two answers on different ranks make a pair with the group and the gap between ranks."""
    from loopchat.simulate import prompt_text

    text = prompt_text(prompt)
    wins = [0.0] * len(answers)
    for i, j in itertools.combinations(range(len(answers)), 2):
        vote = judge.vote(text, answers[i], answers[j], rng, noisy=True) if rng else judge.vote(text, answers[i], answers[j], None, noisy=False)
        wins[i] += {"a": 1, "b": 0}.get(vote, 0.5)
        wins[j] += {"a": 0, "b": 1}.get(vote, 0.5)
    levels = sorted(set(wins), reverse=True)
    rank = [levels.index(w) for w in wins]
    return [{"prompt": prompt, "chosen": [{"role": "assistant", "content": answers[i]}],
             "rejected": [{"role": "assistant", "content": answers[j]}],
             "meta": {"group": group, "rank_gap": rank[j] - rank[i]}}
            for i, j in itertools.permutations(range(len(answers)), 2)
            if rank[i] < rank[j] and answers[i].strip() != answers[j].strip()]


def labelled(preference: str, rows: list[dict], n_heldout: int, noise: float = 0.1):
    """(training rankings as lists of pairs in a fixed order, held-out pairs labelled without noise)."""
    from loopchat.simulate import load_judge

    judge = load_judge(preference, noise=noise)
    order = list(range(len(rows)))
    random.Random(f"order:{SEED}").shuffle(order)
    held = [p for k in order[:n_heldout] for p in ranking_pairs(judge, rows[k]["prompt"], rows[k]["answers"], f"h{k}", None)]
    rng = random.Random(f"votes:{preference}:{SEED}")
    train = [ranking_pairs(judge, rows[k]["prompt"], rows[k]["answers"], f"t{k}", rng) for k in order[n_heldout:]]
    return [r for r in train if r], held


def first_pairs(rankings: list[list[dict]], n: int) -> list[dict]:
    """Whole rankings, in order, until they hold at least `n` pairs."""
    out = []
    for r in rankings:
        if len(out) >= n:
            break
        out += r
    return out


def ungrouped(pairs: list[dict]) -> list[dict]:
    """The same pairs as independent comparisons (what the reward model saw before groups)."""
    return [{k: v for k, v in p.items() if k != "meta"} for p in pairs]


# name: (RewardConfig overrides, whether pairs keep their ranking's group)
VARIANTS = {
    "baseline": ({"epochs": 2, "batch_size": 8, "probe_l2": None}, False),  # the cycle's RM before groups
    "grouped": ({"epochs": 2, "batch_size": 2, "probe_l2": None}, True),
    "grouped_smooth": ({"epochs": 2, "batch_size": 2, "label_smoothing": 0.1, "probe_l2": None}, True),
    "grouped_mean": ({"epochs": 2, "batch_size": 2, "pool": "last_mean", "probe_l2": None}, True),
    "probe": ({"epochs": 0, "batch_size": 2, "pool": "last_mean"}, True),  # the linear probe alone
    "probe_early": ({"epochs": 0, "batch_size": 2, "pool": "last_mean_early"}, True),  # + an early layer's mean
    "probe_lora": ({"epochs": 2, "batch_size": 2, "pool": "last_mean"}, True),  # then LoRA steps from it
    "probe_lora_slow": ({"epochs": 2, "batch_size": 2, "pool": "last_mean", "lr": 1e-4}, True),
}


def run_variant(model_dir: Path, name: str, train: list[dict], held: list[dict], work: Path, **extra) -> dict:
    from train.reward import RewardConfig, train_reward_model

    overrides, grouped = VARIANTS[name]
    cfg = RewardConfig(max_len=384, **overrides, **{k: v for k, v in extra.items() if k != "init_from"})
    started = time.monotonic()
    m = train_reward_model(model_dir, train if grouped else ungrouped(train), work, cfg, eval_records=held, quiet=True,
                           init_from=extra.get("init_from"))
    label = name + "".join(f" {k}={Path(v).name if k == 'init_from' else v}" for k, v in extra.items())
    return {"variant": label, "train_pairs": len(train), "accuracy": m["accuracy"], "accuracy_ci95": m["accuracy_ci95"],
            "eval_pairs": m["eval_pairs"], "train_accuracy": m["train_accuracy"], "steps": m["steps"],
            "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    import hardware

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=MODEL)
    p.add_argument("--prompts", type=int, default=208, help="prompts to sample: 50 held out, the rest give 400-800 training pairs")
    p.add_argument("--sample-only", action="store_true")
    p.add_argument("--preferences", nargs="+", default=list(PREFERENCES))
    p.add_argument("--sizes", nargs="*", type=int, default=[100, 200, 300])
    p.add_argument("--variants", nargs="+", default=["baseline", "grouped"], choices=list(VARIANTS))
    p.add_argument("--warm", type=int, metavar="N", help="then two cycles with the last variant: N/2 pairs, then N with init_from")
    p.add_argument("--heldout-prompts", type=int, default=50)
    p.add_argument("--out", type=Path, default=CACHE / "rm-results.jsonl")
    args = p.parse_args()
    rows = sample_answers(args.model, args.prompts)
    print(f"{len(rows)} prompts x {K} answers")
    if args.sample_only:
        return
    choice = hardware.choose()
    print(f"CPU: {hardware.cpu_model()}, torch {hardware.cpu_capability()}, {os.cpu_count()} cores; {choice.dtype}")
    with tempfile.TemporaryDirectory() as tmp, open(args.out, "a", encoding="utf-8") as out:
        for pref in args.preferences:
            rankings, held = labelled(pref, rows, args.heldout_prompts)
            print(f"\n{pref}: {sum(map(len, rankings))} training pairs in {len(rankings)} rankings available, "
                  f"{len(held)} held-out pairs")
            print(f"{'variant':<34}{'pairs':>6}{'accuracy':>10}  {'95% CI':<15}{'train acc':>9}{'steps':>6}{'seconds':>8}")
            for n in args.sizes:
                train = first_pairs(rankings, n)
                for name in args.variants:
                    show({"preference": pref, **run_variant(args.model, name, train, held, Path(tmp) / pref / str(n) / name)}, out)
            if args.warm:
                warm_start(args.model, pref, args.variants[-1], rankings, held, args.warm, Path(tmp) / pref / "warm", out)


def show(r: dict, out) -> None:
    lo, hi = r["accuracy_ci95"]
    print(f"{r['variant']:<34}{r['train_pairs']:>6}{r['accuracy']:>10.3f}  [{lo:.3f}, {hi:.3f}]  "
          f"{r['train_accuracy']:>9.3f}{r['steps']:>6}{r['seconds']:>8.1f}", flush=True)
    out.write(json.dumps(r) + "\n")
    out.flush()


def warm_start(model_dir: Path, pref: str, name: str, rankings, held, n: int, work: Path, out) -> None:
    """Two cycles: the first trains on n/2 pairs; the second has all n and continues the first
    (init_from) with `replay` old groups per new one. Compare with the variant's row at n pairs,
    which started from scratch."""
    first, both = first_pairs(rankings, n // 2), first_pairs(rankings, n)
    show({"preference": pref, "cycle": 1, **run_variant(model_dir, name, first, held, work / "cycle1")}, out)
    for replay in (0.0, 1.0):
        show({"preference": pref, "cycle": 2, **run_variant(model_dir, name, both, held, work / f"replay{replay}", init_from=work / "cycle1",
                                        replay=replay)}, out)


if __name__ == "__main__":
    main()
