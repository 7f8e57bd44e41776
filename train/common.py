"""What every training step shares: device and dtype, model loading, chat encoding, run logs.

The chat encoding is the one place that decides which tokens a model sees; SFT, the reward
model, PPO and the gate all go through it so that a prompt is tokenized the same way at
training time as at serving time (the chat template, then the reply generated after it).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

import hardware

# vLLM serves LoRA on these Llama modules (rank <= 16 with the server's --max-lora-rank 16).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def quiet_transformers() -> None:
    """Weight-loading reports (e.g. 'score.weight MISSING' for a fresh reward head) are expected here."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def setup(model_dir, cfg):
    """What every trainer does first: seed (`cfg.seed`), pick the device and the dtype this hardware
    runs best (`cfg.dtype`, see hardware.choose), load the tokenizer. Returns (device, dtype, tokenizer)."""
    seed_all(cfg.seed)
    device = pick_device()
    return device, hardware.choose(cfg.dtype, device.type).torch_dtype, load_tokenizer(model_dir)


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def render(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer, prompt: list[dict]) -> list[int]:
    """The ids a served model sees before it starts answering."""
    return encode(tokenizer, render(tokenizer, prompt, generation_prompt=True))


def encode_response(tokenizer, response: str) -> list[int]:
    """A finished reply as the model would have generated it: its text, then EOS."""
    return encode(tokenizer, response) + [tokenizer.eos_token_id]


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Ids of a conversation and a 0/1 mask of the assistant tokens.

    Each assistant reply is tokenized on its own after the rendered generation prompt, exactly
    as the model produces it at serving time; its mask covers the reply and the template's
    end-of-turn tokens (so the model learns to stop)."""
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], generation_prompt=True)
        full = render(tokenizer, messages[: i + 1])
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise ValueError("the chat template does not render conversations as growing prefixes")
        before = encode(tokenizer, prefix[len(done) :])
        reply = encode(tokenizer, full[len(prefix) :])
        ids += before + reply
        mask += [0] * len(before) + [1] * len(reply)
        done = full
    return ids, mask


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def pad_left(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r for r in rows], dtype=torch.long)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as `generate` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


SHOWN = ("loss", "accuracy", "score", "kl", "clipfrac")  # on the progress bar; metrics.jsonl gets everything


class RunLog:
    """One line per step in `out_dir/metrics.jsonl` and a progress bar (steps, rate, ETA, loss)."""

    def __init__(self, out_dir: Path, total: int, desc: str, quiet: bool = False):
        from tqdm.auto import tqdm

        out_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=quiet, dynamic_ncols=True)
        self.start = time.monotonic()

    def replan(self, total: int) -> None:
        """A time budget has planned the run's length (train.budget): the bar's total and ETA follow it."""
        self.bar.total = total

    def step(self, step: int, **metrics) -> None:
        row = {"step": step, "time_s": round(time.monotonic() - self.start, 3), **metrics}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items() if k in SHOWN}
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        self.file.close()


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def load_lora_model(model_dir, *, device, dtype, lora=None, init_adapter=None, heads: int = 0):
    """The base checkpoint with a trainable LoRA adapter: `init_adapter` (a peft adapter dir)
    when given, else a fresh one from `lora` (a peft LoraConfig). `heads` > 0: a linear `score`
    layer with that many outputs instead of the LM head (reward models)."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet_transformers()
    if heads:
        base = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=heads, dtype=dtype)
        base.score.float()  # a scalar head trained with Adam: keep it in full precision
    else:
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = base.config.eos_token_id
    if init_adapter is not None:
        model = PeftModel.from_pretrained(base, str(init_adapter), is_trainable=True)
    else:
        model = get_peft_model(base, lora)
    return model.to(device)


def backbone_and_head(peft_model):
    """(the transformer trunk, the output layer) of a peft-wrapped model.

    Calling the trunk ourselves lets us apply the (49k-wide) LM head only at the positions we
    need and read the final hidden states for scalar heads."""
    inner = peft_model.get_base_model()
    head = inner.score if hasattr(inner, "score") else inner.get_output_embeddings()
    return getattr(inner, inner.base_model_prefix), head


def run_trunk(trunk, input_ids: torch.Tensor, attention_mask: torch.Tensor, every_layer: bool = False):
    """The trunk's output on right- or left-padded rows (positions counted from each row's first token);
    `every_layer`: with each layer's states too (`hidden_states`)."""
    return trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                 use_cache=False, output_hidden_states=every_layer)


def last_hidden(trunk, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    return run_trunk(trunk, input_ids, attention_mask).last_hidden_state
