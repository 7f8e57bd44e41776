"""Best-of-n: the policy writes `n` answers to each of up to `prompts` training prompts, the reward
model scores them, and the policy is trained toward each prompt's best answer: with DPO against the
same prompt's worst answer (`objective="dpo"`, the default), or by imitating it (`"sft"`, Llama 2's
rejection-sampling fine-tuning). It is the reward model used the way best-of-n sampling uses it at
serving time, then distilled into the policy.

Why, beside PPO: PPO learns from the reward's differences within a batch of 8 answers to 8 different
prompts, and for a taste that only a few answers show at all, that signal sits below its noise (run K
in bench/RESULTS.md: no trend in 24 steps). Here the n answers share a prompt, so the reward model
only has to rank answers to the same question, which is what it was trained on, and the policy is
pulled toward the best it can already write. One round can buy at most the oracle's best-of-n win
rate (bench/frozen_reward.py measures both).

The answers are trained on exactly as they were sampled (the same tokens); an answer cut off at
`max_new_tokens` is trained without an end-of-turn token, so the policy learns its words, not to stop
mid-sentence. With a time budget, sampling and scoring stop at `sample_share` of it by their
running speed; training gets what is left, sized by train.budget.

What it costs: DPO moves the policy fast. At 3 epochs against a frozen reward model it lost shipped
capability items the gate guards, and in a loop (run M) its second cycle went past the gate's KL bound,
so training stops where the policy's KL from where it started passes `max_kl`, undoing the steps since
the last check. It is the `bon` recipe, not the default, until a loop shows it (bench/RESULTS.md,
"Best-of-n" and runs M-O).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from train import common, data
from train.budget import Pace
from train.ppo import (POLICY, RewardFn, exact_kl, generate, load_policy, lora_state, reference_model, response_logprobs,
                       restore_lora, token_logprobs)
from train.sft import SFTConfig, chunks, fit, labelled_logits, padded

OBJECTIVES = ("sft", "dpo")


@dataclass
class BestOfNConfig(SFTConfig):
    """SFT's settings (lr, epochs, batch_size, LoRA...) for the training, plus how to sample."""

    n: int = 8  # answers per prompt
    prompts: int = 64  # prompts at most; a time budget may sample fewer
    max_new_tokens: int = 64
    temperature: float = 0.7
    sample_batch_size: int = 16  # answers per generate call (n of them share a prompt)
    max_prompt_len: int = 512
    # Of the time budget, for sampling and scoring; training gets the rest. On the 135M model a prompt's
    # 8 answers cost about as much to sample (~4 s) as 8 DPO pairs do to train on once, and each prompt
    # gives one pair trained `epochs` times: about 4 parts sampling to 1 training (run M, bench/RESULTS.md).
    sample_share: float = 0.8
    # `dpo`: prefer each prompt's best answer to its worst (DPO's loss, the policy as it was before this
    # step the reference, at `beta`); `sft`: imitate the best answer. DPO at a LoRA learning rate of 1e-3
    # learned an unseen taste from a frozen reward model where SFT on the same answers, at 2e-4 or 5e-4,
    # and PPO did not, and at beta 0.5 it did not either. Epochs trade the taste against capabilities:
    # 1 passed the gate but learned within noise, 3 learned most but lost capability items the gate
    # guards, 2 learned as much as the reward model's own pick of 8 and passed (bench/RESULTS.md, "Best-of-n").
    objective: str = "dpo"
    beta: float = 0.1
    lr: float = 1e-3
    epochs: int = 2
    # Nats per answer: every `kl_every` steps and after the last, the policy answers the first batch's
    # prompts and its KL from where best-of-n started is measured on those answers as the gate measures it
    # (its own samples, exact per token: train.ppo.exact_kl); past `max_kl` the steps since the last check
    # are undone and training stops (None: no check). The gate bounds a whole cycle by 10 nats from the
    # serving version; in run M's second cycle two epochs of DPO alone went past it (PPO started at >= 16.8),
    # so best-of-n keeps half of it and SFT and PPO share the rest. Measured on the sampled answers instead
    # (run N's first cycle), the KL read 3x the gate's: DPO's rejected answers are where it moves most.
    max_kl: float | None = 5.0
    kl_every: int = 4

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")


def _chosen_example(prompt_ids: list[int], batch: dict, row: int, max_len: int) -> tuple[list[int], list[int]]:
    """(ids, labels) of one sampled answer: the prompt unlabelled, the answer's own tokens labelled
    (with its end-of-turn token only when it ended)."""
    tokens = batch["responses"][row][batch["mask"][row].bool()].tolist()
    ids = (prompt_ids + tokens)[-max_len:]
    labels = ([-100] * len(prompt_ids) + tokens)[-max_len:]
    return ids, labels


def sequence_logprobs(model, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of its labelled tokens."""
    logits, targets, rows = labelled_logits(model, ids, labels, mask)
    logp = token_logprobs(logits, targets, 1.0)
    return torch.zeros(len(ids), device=ids.device).index_add_(0, rows, logp)


@torch.no_grad()
def kl_from_start(model, batch: dict, temperature: float) -> float:
    """Mean KL(policy || the policy training started from) in nats per answer on `batch` (a `generate`
    output), exact per token as the gate measures it."""
    model.eval()
    args = (batch["seq"], batch["attn"], batch["prompt_len"], temperature)
    logp, _ = response_logprobs(model, *args)
    with reference_model(model):
        start, _ = response_logprobs(model, *args)
    return float(exact_kl(logp, start, batch["mask"]).mean())


def dpo_pairs(model, pairs: list[tuple], pad_id: int, device, batch_size: int) -> list[tuple]:
    """(chosen, rejected, their log-probabilities under the model as it is now: DPO's reference)."""
    out = []
    model.eval()
    with torch.no_grad():
        for chunk in chunks(pairs, batch_size, None):
            ids, labels, mask = padded([c for c, _ in chunk] + [r for _, r in chunk], pad_id)
            logp = sequence_logprobs(model, ids.to(device), labels.to(device), mask.to(device)).cpu()
            out += [(c, r, float(logp[i]), float(logp[len(chunk) + i])) for i, (c, r) in enumerate(chunk)]
    return out


def train_best_of_n(
    model_dir: str | Path,
    prompts,
    out_dir: str | Path,
    reward_fn: RewardFn,
    cfg: BestOfNConfig | None = None,
    *,
    init_adapter: str | Path | None = None,
    quiet: bool = False,
) -> dict:
    """Sample, pick each prompt's best answer by `reward_fn`, fine-tune on them, save the adapter in
    `out_dir`. `prompts`: a JSONL path or rows (train.data.read_prompts); `init_adapter`: the policy
    to sample from and continue (None: the base model and a fresh LoRA). Returns figures: the mean
    score of all answers and of the chosen ones (`score_all`, `score_best`), the share of chosen
    answers that ended, what the budget chose, and the training loop's own figures (`fit_*`)."""
    cfg = cfg or BestOfNConfig()
    started = time.monotonic()
    out_dir = Path(out_dir)
    rows = data.read_prompts(prompts)
    if not rows:
        raise data.DataError("no prompts to sample from")
    device, dtype, tokenizer = common.setup(model_dir, cfg)
    # With a KL check, the starting policy stays beside the trained one, frozen (the base model when none).
    model = load_policy(model_dir, cfg, device=device, dtype=dtype, init_adapter=init_adapter,
                        reference_adapter=init_adapter if cfg.max_kl is not None else None)

    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    chosen_rows = [rows[i] for i in order[: cfg.prompts]]
    per_call = max(1, cfg.sample_batch_size // cfg.n)
    groups = [chosen_rows[i : i + per_call] for i in range(0, len(chosen_rows), per_call)]  # one generate call each
    # Sampling needs no planned end (no schedule to finish), so it stops at its share of the budget by
    # its running speed: a batch whose answers all end early is faster than one cut off at max_new_tokens.
    sample_budget = None if cfg.time_budget_s is None else cfg.time_budget_s * cfg.sample_share
    sampling_started = time.monotonic()
    examples, all_scores, best_scores, best_ended = [], [], [], []  # examples: (ids, labels), or (best, worst) for dpo
    done, kl_prompts = 0, None
    while done < len(groups):
        group = groups[done]
        asked = [p for p in group for _ in range(cfg.n)]
        with torch.no_grad():
            batch = generate(model, tokenizer, asked, cfg.max_new_tokens, cfg.temperature, cfg.max_prompt_len)
            scores = reward_fn(asked, batch["texts"]).float().cpu().view(len(group), cfg.n)
        kl_prompts = kl_prompts or asked  # the KL check's prompts
        for i, prompt in enumerate(group):
            best, worst = i * cfg.n + int(scores[i].argmax()), i * cfg.n + int(scores[i].argmin())
            prompt_ids = common.encode_prompt(tokenizer, prompt)[-cfg.max_prompt_len :]
            example = _chosen_example(prompt_ids, batch, best, cfg.max_len)
            if cfg.objective == "dpo":
                if scores[i].max() == scores[i].min():
                    continue  # nothing to prefer
                example = (example, _chosen_example(prompt_ids, batch, worst, cfg.max_len))
            examples.append(example)
            best_ended.append(bool(batch["ended"][best]))
        all_scores += scores.flatten().tolist()
        best_scores += scores.max(1).values.tolist()
        done += 1
        s_per_batch = (time.monotonic() - sampling_started) / done
        total = len(groups)
        if sample_budget is not None:
            total = min(total, done + max(0, int((sample_budget - (time.monotonic() - started)) // s_per_batch)))
        if not quiet:
            print(f"best-of-{cfg.n}: {done}/{total} batches, {len(asked) / s_per_batch:.1f} answers/s, "
                  f"ETA {(total - done) * s_per_batch:.0f} s", flush=True)
        if done >= total:
            break
    if not examples:
        raise data.DataError(f"the reward model scored all {cfg.n} answers to each prompt alike: nothing to prefer")
    sampled = {"prompts": len(examples), "answers": len(all_scores), "sample_s": round(time.monotonic() - started, 2),
               "score_all": sum(all_scores) / len(all_scores), "score_best": sum(best_scores) / len(best_scores),
               "best_ended": sum(best_ended) / len(best_ended), "sampled_batches": done,
               "measured_s_per_batch": round(s_per_batch, 3)}

    left = None if cfg.time_budget_s is None else max(0.0, cfg.time_budget_s - (time.monotonic() - started))

    def dpo_loss(chunk):
        k = len(chunk)
        ids, labels, mask = padded([c[0] for c in chunk] + [c[1] for c in chunk], tokenizer.pad_token_id)
        logp = sequence_logprobs(model, ids.to(device), labels.to(device), mask.to(device))
        reference = torch.tensor([[c[2], c[3]] for c in chunk], device=device)
        margin = (logp[:k] - reference[:, 0]) - (logp[k:] - reference[:, 1])
        return -torch.nn.functional.logsigmoid(cfg.beta * margin).mean(), int((labels != -100).sum())

    safe, kls = lora_state(model), {0: 0.0}  # step -> the KL of the weights after it, at each check passed

    def check(step: int) -> tuple[dict, str | None]:
        """The policy's KL from where it started, on its own answers; past `max_kl`, back to the last check."""
        with torch.no_grad():
            own = generate(model, tokenizer, kl_prompts, cfg.max_new_tokens, cfg.temperature, cfg.max_prompt_len)
        kl = kl_from_start(model, own, cfg.temperature)
        if kl > cfg.max_kl:
            restore_lora(model, safe)
            return {"kl": kl}, f"KL {kl:.2f} > {cfg.max_kl} after step {step}: back to step {max(kls)}"
        safe.update(lora_state(model))
        kls[step] = kl
        return {"kl": kl}, None

    def every_few_steps(step: int) -> tuple[dict, str | None]:
        return check(step) if cfg.max_kl is not None and step % cfg.kl_every == 0 else ({}, None)

    if cfg.objective == "dpo":
        examples = dpo_pairs(model, examples, tokenizer.pad_token_id, device, cfg.batch_size)
    trained = fit(model, examples, cfg, Pace(left), out_dir, tokenizer.pad_token_id, device, quiet,
                  batch_loss=dpo_loss if cfg.objective == "dpo" else None, after_step=every_few_steps)
    if cfg.max_kl is not None and "stop" not in trained and trained["steps"] not in kls:  # steps after the last check
        trained["stop"] = check(trained["steps"])[1] or "steps done"
    model.save_pretrained(str(out_dir), selected_adapters=[POLICY])
    common.write_json(out_dir / "train_config.json", {"step": "best_of_n", "model": str(model_dir),
                                                      "init_adapter": init_adapter, **asdict(cfg)})
    common.write_json(out_dir / "best_of_n.json", sampled)
    return {**sampled, **{f"fit_{k}": v for k, v in trained.items()}, "kl": kls[max(kls)] if cfg.max_kl is not None else None,
            "stop": trained.get("stop", "steps done"), "time_budget_s": cfg.time_budget_s,
            "planned_steps": trained["planned_steps"], "measured_s_per_step": trained["measured_s_per_step"]}
