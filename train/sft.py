"""Supervised fine-tuning of the policy's LoRA adapter on demonstrations.

The loss is next-token cross-entropy on the assistant's tokens only (the prompt is context,
not something to imitate), averaged over those tokens. Conversations go through the model's
own chat template (see common.encode_chat), so what is learned is what gets served.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from train import common, data
from train.budget import FORWARD_SHARE, Pace


@dataclass
class SFTConfig:
    lora_r: int = 16  # at most the server's max LoRA rank (LOOPCHAT_MAX_LORA_RANK, default 16)
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = common.LORA_TARGETS
    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None  # stop earlier than `epochs` when set
    time_budget_s: float | None = None  # run as many steps as fit (at most the fixed count above); see train.budget
    batch_size: int = 8
    max_len: int = 1024  # tokens per conversation; longer ones are cut at the end
    seed: int = 0
    dtype: str = "auto"  # auto | bfloat16 | float32


def lora_config(cfg, task_type: str = "CAUSAL_LM", modules_to_save=None):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules),
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def make_examples(tokenizer, conversations: list[list[dict]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per conversation; labels are -100 outside the assistant's tokens."""
    out = []
    for messages in conversations:
        ids, mask = common.encode_chat(tokenizer, messages)
        ids, mask = ids[:max_len], mask[:max_len]
        if any(mask[1:]):  # something left to learn after truncation
            out.append((ids, [t if m else -100 for t, m in zip(ids, mask)]))
    return out


def labelled_logits(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
    """(logits, their target tokens, their rows) at the labelled positions only: the LM head runs nowhere else."""
    trunk, head = common.backbone_and_head(model)
    hidden = common.last_hidden(trunk, input_ids, attention_mask)[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    return head(hidden[keep]), targets[keep], keep.nonzero()[:, 0]


def lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled tokens."""
    logits, targets, _ = labelled_logits(model, input_ids, labels, attention_mask)
    return F.cross_entropy(logits.float(), targets)


def padded(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, labels, attention mask) of (ids, labels) examples, padded on the right."""
    ids = common.pad_right([e[0] for e in examples], pad_id)
    labels = common.pad_right([e[1] for e in examples], -100)
    mask = common.pad_right([[1] * len(e[0]) for e in examples], 0)
    return ids, labels, mask


def chunks(examples: list, batch_size: int, generator: torch.Generator | None):
    """`examples` in batches, shuffled by `generator` (None: in order)."""
    order = torch.randperm(len(examples), generator=generator).tolist() if generator is not None else list(range(len(examples)))
    for i in range(0, len(order), batch_size):
        yield [examples[j] for j in order[i : i + batch_size]]


def batches(examples, batch_size: int, pad_id: int, generator: torch.Generator | None):
    for chunk in chunks(examples, batch_size, generator):
        yield padded(chunk, pad_id)


@torch.no_grad()
def eval_loss(model, examples, batch_size: int, pad_id: int, device) -> float:
    model.eval()
    total, n = 0.0, 0
    for ids, labels, mask in batches(examples, batch_size, pad_id, None):
        k = int((labels[:, 1:] != -100).sum())
        total += float(lm_loss(model, ids.to(device), labels.to(device), mask.to(device))) * k
        n += k
    return total / max(n, 1)


def fit(model, examples, cfg: SFTConfig, pace: Pace, out_dir: Path, pad_id: int, device, quiet: bool,
        tail_steps: float = 0.0, batch_loss=None, after_step=None) -> dict:
    """The training loop on a LoRA model already loaded: `cfg.epochs` over `examples` (at most
    `cfg.max_steps`, or as many steps as `pace`'s budget holds), linear decay to 0; one line per step in
    `out_dir/metrics.jsonl`. `batch_loss(examples) -> (loss, tokens)`; by default SFT's on (ids, labels).
    `after_step(step) -> (figures for the step's line, why to stop or None)`: a check after each step."""

    def sft_loss(chunk):
        ids, labels, mask = padded(chunk, pad_id)
        return lm_loss(model, ids.to(device), labels.to(device), mask.to(device)), int((labels != -100).sum())

    batch_loss = batch_loss or sft_loss
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    fixed = min(cfg.max_steps or per_epoch * cfg.epochs, per_epoch * cfg.epochs)
    total = pace.start(fixed, tail_steps=tail_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / pace.total)  # linear decay to 0 at the end
    gen = torch.Generator().manual_seed(cfg.seed)
    metrics = {"steps": 0}
    log = common.RunLog(out_dir, total, "sft", quiet)
    step, started, stop = 0, time.monotonic(), None
    while step < total and stop is None:
        for chunk in chunks(examples, cfg.batch_size, gen):
            model.train()
            loss, tokens = batch_loss(chunk)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            opt.step()
            step += 1
            figures, stop = after_step(step) if after_step is not None else ({}, None)
            total = pace.step_done(step)
            log.replan(total)
            sched.step()
            log.step(step, loss=loss.item(), lr=sched.get_last_lr()[0], grad_norm=grad_norm, tokens=tokens, **figures)
            metrics["train_loss"] = loss.item()
            if step >= total or stop is not None:
                break
    log.close()
    if stop is not None:
        metrics["stop"] = stop
    metrics.update(steps=step, seconds=round(time.monotonic() - started, 2), **pace.figures())
    return metrics


def train_sft(
    model_dir: str | Path,
    records,
    out_dir: str | Path,
    cfg: SFTConfig | None = None,
    *,
    init_adapter: str | Path | None = None,
    eval_records=None,
    quiet: bool = False,
) -> dict:
    """Fine-tune a LoRA adapter on demonstrations and save it (peft format) in `out_dir`.

    `records`/`eval_records`: a JSONL path or in-memory rows (sft or unpaired format, see
    train.data). `init_adapter`: continue from an existing adapter instead of a fresh one.
    Returns the metrics (with what the time budget chose: `planned_steps`, `measured_s_per_step`);
    one line per step in `out_dir/metrics.jsonl`."""
    cfg = cfg or SFTConfig()
    pace = Pace(cfg.time_budget_s)
    out_dir = Path(out_dir)
    device, dtype, tokenizer = common.setup(model_dir, cfg)
    train_ex = make_examples(tokenizer, data.read_sft(records), cfg.max_len)
    eval_ex = make_examples(tokenizer, data.read_sft(eval_records), cfg.max_len) if eval_records is not None else []
    if not train_ex:
        raise data.DataError("no demonstrations to train on")

    model = common.load_lora_model(model_dir, device=device, dtype=dtype, lora=lora_config(cfg), init_adapter=init_adapter)
    metrics = {"examples": len(train_ex)}
    if eval_ex:
        metrics["eval_loss_before"] = eval_loss(model, eval_ex, cfg.batch_size, tokenizer.pad_token_id, device)
    tail = FORWARD_SHARE * math.ceil(len(eval_ex) / cfg.batch_size)
    metrics.update(fit(model, train_ex, cfg, pace, out_dir, tokenizer.pad_token_id, device, quiet, tail_steps=tail))
    if eval_ex:
        metrics["eval_loss"] = eval_loss(model, eval_ex, cfg.batch_size, tokenizer.pad_token_id, device)
    model.save_pretrained(str(out_dir))
    common.write_json(out_dir / "train_config.json", {"step": "sft", "model": str(model_dir), "init_adapter": init_adapter, **asdict(cfg)})
    return metrics
