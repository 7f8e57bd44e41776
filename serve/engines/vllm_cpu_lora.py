"""A vLLM plugin (entry point `vllm.general_plugins`) that keeps base-model rows out of LoRA
deltas on the CPU.

vLLM marks a token that uses no adapter with LoRA index -1. Its GPU kernels skip such tokens;
the PyTorch ops that the CPU build uses instead gather `weights[indices]`, and index -1 picks
the LAST adapter slot. So once the last slot holds an adapter (after `--max-loras` distinct
adapters have been used), a base-model request batched next to an adapter request is answered
with that adapter's weights: measured here with `--max-loras 4` after promoting v1..v4, base
answers came out word for word as v4's. Reported upstream as vllm-project/vllm PR 48421 (open).

The fix keeps the ops and restores the rows of no-adapter tokens after each one, so that for
them the op is a no-op, as on the GPU. It changes nothing where no token has index -1.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("loopchat.vllm_plugin")
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")  # the sgmv_* ops call these


def skip_no_lora_rows(op):
    """`op(inputs, weights, output, indices, ...)` that leaves rows with index -1 untouched."""

    @functools.wraps(op)
    def wrapped(inputs, weights, output, indices, *args, **kwargs):
        base = indices < 0
        if not bool(base.any()):
            return op(inputs, weights, output, indices, *args, **kwargs)
        # One index for every output row; or a single index broadcast over all of them.
        rows = base if base.shape[0] == output.shape[0] else base.all().expand(output.shape[0])
        kept = output[rows]
        op(inputs, weights, output, indices.clamp(min=0), *args, **kwargs)
        output[rows] = kept

    wrapped.skips_no_lora_rows = True
    return wrapped


def register() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name in OPS:
        op = getattr(lora_ops, name)
        if getattr(op, "skips_no_lora_rows", False):
            continue
        fixed = skip_no_lora_rows(op)
        for module in (lora_ops, torch_ops, punica_cpu):  # each holds its own reference
            setattr(module, name, fixed)
    log.info("loopchat: CPU LoRA ops skip base-model tokens (index -1)")
