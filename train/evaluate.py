"""The promotion gate: is a freshly trained adapter good enough to serve?

Four checks, each with its figure and threshold (a check without its inputs is skipped):
  rm_accuracy  the reward model's held-out pair accuracy is above `min_rm_accuracy`
               (a reward model that cannot rank held-out pairs must not steer a policy);
               judged only on at least `min_heldout_pairs` pairs (those given, else those the
               RM held out itself when it was trained): on 7 pairs an RM that is right 70% of
               the time fails a 0.6 threshold about a third of the time;
  reward_gain  on held-out prompts, the candidate's mean normalised RM score, paired prompt by
               prompt with the serving policy's (or the base model's), gains at least
               `min_reward_gain` less `gain_tolerance_se` standard errors: a candidate fails
               when it is measurably worse, not when a dozen samples happen to score lower;
  kl           the candidate's KL to the reference (the base model), nats per response on its
               own samples, is under `max_kl` (a guard against reward hacking and drift);
  canaries     on canary prompts, the share of sampled answers that are non-empty and end with
               EOS is at most `canary_tolerance` below the baseline's. Sampled and relative, not
               greedy and absolute: the base model's own first token for "What is the capital of
               France?" is "The" at p=0.155 against "L" at 0.140, so any adapter may flip the greedy
               answer into "L'Étoile, la femme, ..." without changing what users get, and the base
               itself does not finish "Say thank you in one short sentence." within 64 tokens.
One base model is loaded; the candidate, the baseline adapter and the base itself are
switched with peft's adapter controls. With a time budget the held-out prompts are taken batch by
batch, as many batches as fit (see train.budget), never fewer than `min_prompts`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import hardware
from train import common, data
from train.budget import Pace
from train.ppo import generate, response_logprobs


@dataclass
class GateConfig:
    min_rm_accuracy: float = 0.6
    min_heldout_pairs: int = 20  # fewer and rm_accuracy is reported, not judged
    min_reward_gain: float = 0.0  # normalised RM units (std of training rewards)
    gain_tolerance_se: float = 1.0
    max_kl: float = 10.0  # nats per response
    max_prompts: int = 64  # held-out prompts used for reward and KL
    # With a budget, at least this many (when there are): the reward gain's standard error needs them.
    min_prompts: int = 16
    time_budget_s: float | None = None  # as many held-out prompts as fit, from min_prompts to max_prompts
    batch_size: int = 16
    max_new_tokens: int = 64
    temperature: float = 0.7
    canaries: tuple[str, ...] = ("Hello! Who are you?", "What is the capital of France?", "Say thank you in one short sentence.")
    canary_samples: int = 4  # answers per canary prompt, for the candidate and the baseline alike
    canary_max_new_tokens: int = 128
    canary_tolerance: float = 0.25
    seed: int = 0
    # Full precision: in bf16 a left-padded batch shifts logits by ~0.7 against the same prompt alone.
    dtype: str = "float32"


def _check(value, threshold, passed) -> dict:
    return {"value": value, "threshold": threshold, "passed": passed}


def _skipped(why: str) -> dict:
    return {"value": None, "threshold": None, "passed": None, "skipped": why}


def _flat(batches: list[dict], key: str) -> list:
    return [x for b in batches for x in b[key]]


def _samples(model, tokenizer, prompts, cfg: GateConfig, adapter: str | None, max_new_tokens: int, seed: int) -> list[dict]:
    """Generate with one adapter active (None = the base model), batch by batch, from `seed`."""
    torch.manual_seed(seed)
    if adapter is not None:
        model.set_adapter(adapter)
    out = []
    for i in range(0, len(prompts), cfg.batch_size):
        if adapter is None:
            with model.disable_adapter():
                out.append(generate(model, tokenizer, prompts[i : i + cfg.batch_size], max_new_tokens, cfg.temperature))
        else:
            out.append(generate(model, tokenizer, prompts[i : i + cfg.batch_size], max_new_tokens, cfg.temperature))
    return out


@torch.no_grad()
def _kl(model, batches, temperature: float) -> list[torch.Tensor]:
    """KL(policy || reference) in nats per response on the active adapter's own samples, one
    tensor per batch: the exact KL between the two next-token distributions, summed over each
    response's tokens (never negative, far less noisy than averaging log-ratios of the sampled tokens)."""
    per_seq = []
    for b in batches:
        args = (b["seq"], b["attn"], b["prompt_len"], temperature)
        logp, _ = response_logprobs(model, *args)
        with model.disable_adapter():
            ref, _ = response_logprobs(model, *args)
        per_token = (logp.exp() * (logp - ref)).sum(-1)
        per_seq.append((per_token * b["mask"]).sum(1))
    return per_seq


def _rm_accuracy(reward_model, heldout_pairs, cfg: GateConfig) -> dict:
    """Measured on `heldout_pairs` when given, else the figure the reward model recorded when it
    was trained (on the pairs it held out itself); judged only on `min_heldout_pairs` or more."""
    if reward_model is None:
        return _skipped("no reward model")
    if heldout_pairs is not None:
        pairs = data.read_pairs(heldout_pairs)
        acc, n = reward_model.accuracy_on(pairs), len(pairs)
    else:
        acc, n = reward_model.accuracy, reward_model.accuracy_pairs
    if n < cfg.min_heldout_pairs:
        return {**_skipped(f"{n} held-out pairs; judged from {cfg.min_heldout_pairs}"), "value": acc}
    return _check(acc, cfg.min_rm_accuracy, acc > cfg.min_rm_accuracy)


def evaluate_adapter(
    model_dir: str | Path,
    adapter_dir: str | Path,
    *,
    reward_model=None,
    prompts=None,
    baseline_adapter: str | Path | None = None,
    heldout_pairs=None,
    cfg: GateConfig | None = None,
) -> dict:
    """Run the gate on `adapter_dir` and return the verdict:

        {"passed": bool, "checks": {name: {"value", "threshold", "passed"[, "skipped"]}},
         "figures": {...}, "canary_answers": [...], "config": {...}}

    `reward_model`: a train.reward.RewardModel or its directory (needed for rm_accuracy and
    reward_gain). `prompts`: held-out prompts (JSONL path or rows); without them the canaries
    stand in for the KL check. `baseline_adapter`: the serving adapter to beat (None = base).
    `heldout_pairs`: pairs to measure the RM's accuracy on, instead of the figure it recorded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.reward import RewardModel

    cfg = cfg or GateConfig()
    pace = Pace(cfg.time_budget_s)
    device = common.pick_device()
    common.quiet_transformers()
    tokenizer = common.load_tokenizer(model_dir)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=hardware.choose(cfg.dtype, device.type).torch_dtype)
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name="candidate").to(device).eval()
    if baseline_adapter is not None:
        model.load_adapter(str(baseline_adapter), adapter_name="baseline")
    if reward_model is not None and not isinstance(reward_model, RewardModel):
        reward_model = RewardModel(reward_model, model_dir)
    held_out = data.read_prompts(prompts)[: cfg.max_prompts] if prompts is not None else []
    canaries = [[{"role": "user", "content": c}] for c in cfg.canaries]
    baseline_name = "baseline" if baseline_adapter is not None else None  # None: the base model
    checks, figures = {}, {}

    checks["rm_accuracy"] = _rm_accuracy(reward_model, heldout_pairs, cfg)

    # Canaries first: a fixed amount of work, done before the held-out prompts are sized to the time left.
    canary_answers = []
    if canaries:
        asked = [c for c in canaries for _ in range(cfg.canary_samples)]
        good = {}
        for name in ("candidate", baseline_name):
            batches = _samples(model, tokenizer, asked, cfg, name, cfg.canary_max_new_tokens, cfg.seed)
            texts, ended = _flat(batches, "texts"), [bool(e) for e in _flat(batches, "ended")]
            good[name] = sum(bool(t.strip()) and e for t, e in zip(texts, ended)) / len(asked)
            if name == "candidate":
                canary_answers = [{"prompt": p[-1]["content"], "answer": t, "ended": e}
                                  for p, t, e in zip(asked, texts, ended)]
        figures.update(canaries_baseline=good[baseline_name])
        threshold = good[baseline_name] - cfg.canary_tolerance
        checks["canaries"] = _check(good["candidate"], threshold, good["candidate"] >= threshold)
    else:
        checks["canaries"] = _skipped("no canary prompts")

    # Held-out prompts, one batch at a time, as many batches as the budget holds: the candidate's
    # samples and their KL, then the baseline's from the same seed, both scored by the reward model.
    total = pace.start(math.ceil(len(held_out) / cfg.batch_size), floor=math.ceil(cfg.min_prompts / cfg.batch_size))
    kls, new, old = [], [], []
    done = 0
    while done < total:
        batch = held_out[done * cfg.batch_size : (done + 1) * cfg.batch_size]
        candidate = _samples(model, tokenizer, batch, cfg, "candidate", cfg.max_new_tokens, cfg.seed + done)
        kls += _kl(model, candidate, cfg.temperature)
        if reward_model is not None:
            baseline = _samples(model, tokenizer, batch, cfg, baseline_name, cfg.max_new_tokens, cfg.seed + done)
            new.append(reward_model(batch, _flat(candidate, "texts")).float())
            old.append(reward_model(batch, _flat(baseline, "texts")).float())
        done += 1
        total = pace.step_done(done)
    held_out = held_out[: done * cfg.batch_size]
    if not held_out:  # the canaries stand in for the KL check
        kls = _kl(model, _samples(model, tokenizer, canaries, cfg, "candidate", cfg.max_new_tokens, cfg.seed), cfg.temperature)
    kl = float(torch.cat(kls).mean())
    checks["kl"] = _check(kl, cfg.max_kl, kl < cfg.max_kl)

    if reward_model is None or not held_out:
        checks["reward_gain"] = _skipped("no reward model" if reward_model is None else "no held-out prompts")
    else:
        new, old = torch.cat(new), torch.cat(old)
        diff = new - old
        gain = float(diff.mean())
        se = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else 0.0
        figures.update(reward_candidate=float(new.mean()), reward_baseline=float(old.mean()), reward_gain_se=se,
                       baseline="serving adapter" if baseline_adapter else "base model")
        threshold = cfg.min_reward_gain - cfg.gain_tolerance_se * se
        checks["reward_gain"] = _check(gain, threshold, gain >= threshold)

    chosen = pace.figures()  # its steps are batches of `batch_size` held-out prompts
    figures.update(held_out_prompts=len(held_out), kl_on="held-out prompts" if held_out else "canaries",
                   time_budget_s=chosen["time_budget_s"], measured_s_per_batch=chosen["measured_s_per_step"])
    passed = all(c["passed"] for c in checks.values() if c["passed"] is not None)
    return {"passed": passed, "checks": checks, "figures": figures, "canary_answers": canary_answers, "config": asdict(cfg)}
