"""The reward model: the base model + a LoRA adapter + a scalar head, trained on preference pairs.

r(prompt, response) is the head applied to the final hidden state of the last token of
prompt + response + EOS (the chat template's generation prompt, then the reply as the policy
would have generated it). The pairwise (Bradley-Terry) loss is

    -log sigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected)^2

where the second term keeps rewards near zero so they do not drift between cycles.
After training we store the mean and std of the rewards on the training answers; `RewardModel`
returns (r - mean) / std, so a score means the same across cycles and PPO's KL coefficient
keeps its scale.

Saved as a peft adapter with the head in `modules_to_save=["score"]`, so PPO can initialise
its value head from the reward head (see train.ppo).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import hardware
from train import common, data
from train.budget import FORWARD_SHARE, Pace
from train.sft import lora_config

STATS_FILE = "reward_stats.json"


@dataclass
class RewardConfig:
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = common.LORA_TARGETS
    lr: float = 5e-4
    epochs: int = 1
    max_steps: int | None = None
    time_budget_s: float | None = None  # run as many steps as fit (at most the fixed count above); see train.budget
    batch_size: int = 8  # pairs per step
    max_len: int = 1024
    margin: float = 0.0
    center_coef: float = 0.01
    eval_fraction: float = 0.1  # held-out share of prompts when no eval set is given
    seed: int = 0
    dtype: str = "auto"


def split_heldout(pairs: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out), split by a hash of the prompt so a prompt never lands on both sides
    and the split is the same on every run."""

    def key(pair: dict) -> str:
        return hashlib.sha256(json.dumps(pair["prompt"], sort_keys=True).encode()).hexdigest()

    prompts = sorted({key(p) for p in pairs})
    k = min(max(1, round(fraction * len(prompts))), len(prompts) - 1) if fraction > 0 and len(prompts) > 1 else 0
    heldout = set(prompts[:k])
    return [p for p in pairs if key(p) not in heldout], [p for p in pairs if key(p) in heldout]


def encode_pair(tokenizer, prompt: list[dict], response: str, max_len: int) -> list[int]:
    """Prompt + response + EOS; a too-long prompt loses its beginning so the reply is always seen."""
    return (common.encode_prompt(tokenizer, prompt) + common.encode_response(tokenizer, response))[-max_len:]


def rewards(model, rows: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """Raw scalar rewards (float32) at each sequence's last token."""
    ids = common.pad_right(rows, pad_id).to(device)
    mask = common.pad_right([[1] * len(r) for r in rows], 0).to(device)
    trunk, head = common.backbone_and_head(model)
    hidden = common.last_hidden(trunk, ids, mask)
    last = hidden[torch.arange(len(rows), device=device), mask.sum(-1) - 1]
    return head(last.float()).squeeze(-1)


@torch.no_grad()
def score_all(model, tokenizer, prompts, responses, max_len: int, batch_size: int, device) -> torch.Tensor:
    model.eval()
    rows = [encode_pair(tokenizer, p, r, max_len) for p, r in zip(prompts, responses)]
    out = [rewards(model, rows[i : i + batch_size], tokenizer.pad_token_id, device) for i in range(0, len(rows), batch_size)]
    return torch.cat(out).cpu() if out else torch.zeros(0)


def pair_accuracy(model, tokenizer, pairs, cfg, device) -> float | None:
    if not pairs:
        return None
    prompts = [p["prompt"] for p in pairs]
    chosen = score_all(model, tokenizer, prompts, [p["chosen"] for p in pairs], cfg.max_len, cfg.batch_size * 2, device)
    rejected = score_all(model, tokenizer, prompts, [p["rejected"] for p in pairs], cfg.max_len, cfg.batch_size * 2, device)
    return float((chosen > rejected).float().mean())


def train_reward_model(
    model_dir: str | Path,
    records,
    out_dir: str | Path,
    cfg: RewardConfig | None = None,
    *,
    eval_records=None,
    quiet: bool = False,
) -> dict:
    """Train a reward model on preference pairs and save it in `out_dir`.

    `records`/`eval_records`: a JSONL path or in-memory rows in the pairs format. Without
    `eval_records`, `cfg.eval_fraction` of the prompts are held out. Returns metrics with
    `accuracy` (held-out, None if nothing was held out), `train_accuracy`, `reward_mean/std`, and
    what the time budget chose (`planned_steps`, `measured_s_per_step`)."""
    cfg = cfg or RewardConfig()
    pace = Pace(cfg.time_budget_s)
    out_dir = Path(out_dir)
    common.seed_all(cfg.seed)
    device = common.pick_device()
    dtype = hardware.choose(cfg.dtype, device.type).torch_dtype
    tokenizer = common.load_tokenizer(model_dir)
    pairs = data.read_pairs(records)
    if eval_records is not None:
        train_pairs, eval_pairs = pairs, data.read_pairs(eval_records)
    else:
        train_pairs, eval_pairs = split_heldout(pairs, cfg.eval_fraction)
    if not train_pairs:
        raise data.DataError("no preference pairs to train on")

    lora = lora_config(cfg, task_type="SEQ_CLS", modules_to_save=["score"])
    model = common.load_lora_model(model_dir, device=device, dtype=dtype, lora=lora, seq_cls=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(train_pairs) / cfg.batch_size)
    fixed = min(cfg.max_steps or per_epoch * cfg.epochs, per_epoch * cfg.epochs)
    # After the loop every training answer and every held-out pair is scored once (no grad).
    total = pace.start(fixed, tail_steps=FORWARD_SHARE * (len(train_pairs) + len(eval_pairs)) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / pace.total)
    gen = torch.Generator().manual_seed(cfg.seed)
    encoded = [
        (encode_pair(tokenizer, p["prompt"], p["chosen"], cfg.max_len), encode_pair(tokenizer, p["prompt"], p["rejected"], cfg.max_len))
        for p in train_pairs
    ]

    log = common.RunLog(out_dir, total, "reward model", quiet)
    step, started = 0, time.monotonic()
    while step < total:
        order = torch.randperm(len(encoded), generator=gen).tolist()
        for i in range(0, len(order), cfg.batch_size):
            model.train()
            chunk = [encoded[j] for j in order[i : i + cfg.batch_size]]
            both = rewards(model, [c for c, _ in chunk] + [r for _, r in chunk], tokenizer.pad_token_id, device)
            r_c, r_r = both[: len(chunk)], both[len(chunk) :]
            loss = -F.logsigmoid(r_c - r_r - cfg.margin).mean() + cfg.center_coef * ((r_c + r_r) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            total = pace.step_done(step)
            log.replan(total)
            sched.step()
            log.step(step, loss=loss.item(), accuracy=(r_c > r_r).float().mean().item(), margin=(r_c - r_r).mean().item())
            if step >= total:
                break
    log.close()

    # Normalisation stats over every training answer, with the final weights.
    prompts = [p["prompt"] for p in train_pairs] * 2
    answers = [p["chosen"] for p in train_pairs] + [p["rejected"] for p in train_pairs]
    raw = score_all(model, tokenizer, prompts, answers, cfg.max_len, cfg.batch_size * 2, device)
    metrics = {
        "accuracy": pair_accuracy(model, tokenizer, eval_pairs, cfg, device),
        "train_accuracy": float((raw[: len(train_pairs)] > raw[len(train_pairs) :]).float().mean()),
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "reward_mean": float(raw.mean()),
        "reward_std": float(raw.std()) if len(raw) > 1 else 1.0,
        "steps": step,
        "seconds": round(time.monotonic() - started, 2),
        **pace.figures(),
    }
    model.save_pretrained(str(out_dir))
    stats = {"base_model": str(Path(model_dir).resolve()), "mean": metrics["reward_mean"], "std": max(metrics["reward_std"], 1e-6)}
    common.write_json(out_dir / STATS_FILE, {**stats, "metrics": metrics})
    common.write_json(out_dir / "train_config.json", {"step": "reward", "model": str(model_dir), **asdict(cfg)})
    return metrics


def load_stats(rm_dir: str | Path) -> dict:
    path = Path(rm_dir) / STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{rm_dir} is not a reward model directory (no {STATS_FILE})")
    return json.loads(path.read_text())


def value_head_init(rm_dir: str | Path) -> tuple[torch.Tensor, float]:
    """(weight, bias) of a linear head that outputs the reward model's *normalised* score:
    (w.h - mean) / std. PPO starts its value head from it."""
    from safetensors.torch import load_file

    stats = load_stats(rm_dir)
    weights = load_file(str(Path(rm_dir) / "adapter_model.safetensors"))
    (w,) = [v for k, v in weights.items() if k.endswith("score.weight")]
    return w.float().reshape(-1) / stats["std"], -stats["mean"] / stats["std"]


class RewardModel:
    """A trained reward model as a PPO/gate reward function: `rm(prompts, responses)` -> tensor."""

    def __init__(self, rm_dir: str | Path, model_dir: str | Path | None = None, *, batch_size: int = 16, max_len: int = 1024, dtype: str = "auto"):
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        self.path = Path(rm_dir)
        self.stats = load_stats(rm_dir)
        model_dir = model_dir or self.stats["base_model"]
        self.device = common.pick_device()
        common.quiet_transformers()
        base = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, dtype=hardware.choose(dtype, self.device.type).torch_dtype)
        base.score.float()
        if base.config.pad_token_id is None:
            base.config.pad_token_id = base.config.eos_token_id
        self.model = PeftModel.from_pretrained(base, str(rm_dir)).to(self.device).eval()
        self.tokenizer = common.load_tokenizer(model_dir)
        self.batch_size, self.max_len = batch_size, max_len

    @property
    def accuracy(self) -> float | None:
        """Held-out pair accuracy measured when it was trained."""
        return self.stats.get("metrics", {}).get("accuracy")

    @property
    def accuracy_pairs(self) -> int:
        """How many held-out pairs `accuracy` was measured on."""
        return self.stats.get("metrics", {}).get("eval_pairs", 0)

    def raw(self, prompts: list[list[dict]], responses: list[str]) -> torch.Tensor:
        return score_all(self.model, self.tokenizer, prompts, responses, self.max_len, self.batch_size, self.device)

    def score(self, prompts: list[list[dict]], responses: list[str]) -> torch.Tensor:
        """Normalised rewards, float32 on the CPU, one per (prompt, response)."""
        return (self.raw(prompts, responses) - self.stats["mean"]) / self.stats["std"]

    __call__ = score

    def accuracy_on(self, pairs) -> float | None:
        """Pair accuracy on `pairs` (a JSONL path or rows in the pairs format)."""
        pairs = data.read_pairs(pairs)
        if not pairs:
            return None
        prompts = [p["prompt"] for p in pairs]
        return float((self.raw(prompts, [p["chosen"] for p in pairs]) > self.raw(prompts, [p["rejected"] for p in pairs])).float().mean())
