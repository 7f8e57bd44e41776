"""Helpers for the loop's tests: adapters made without training, published like a cycle would."""

from __future__ import annotations

import json
from pathlib import Path

from feedback import Store, cycles
from train import artifacts


def random_adapter(model_dir: Path, out: Path, seed: int, rank: int = 16) -> Path:
    """A rank-`rank` LoRA on the attention projections with random (non-zero) weights, so its
    answers differ from the base model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.save_pretrained(out)
    return out


def fake_adapter(out: Path, rank: int = 8) -> Path:
    """A folder shaped like a peft LoRA adapter (its config, placeholder weights): enough for the
    fake engine, which loads names, not weights."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))
    (out / "adapter_model.safetensors").write_bytes(b"placeholder weights")
    return out


def publish(store_path: Path, src: Path, base_model: str, metrics: dict | None = None) -> str:
    """Publish the adapter folder `src` into the data dir next to `store_path` and record it; its version."""
    version_dir = artifacts.publish(src, store_path.parent / "adapters", base_model=base_model, metrics=metrics)
    manifest = artifacts.load_manifest(version_dir)
    version = f"v{manifest['version']}"
    cycles.record_adapter(Store(store_path), version, str(version_dir), manifest)
    return version


def publish_random(store_path: Path, model_dir: Path, work: Path, seed: int) -> str:
    """Publish a random adapter into the data dir next to `store_path` and record it; its version."""
    src = random_adapter(model_dir, work / f"src-{seed}", seed)
    return publish(store_path, src, base_model=str(model_dir), metrics={"seed": seed})
