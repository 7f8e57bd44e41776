"""Helpers for the loop's tests: real peft adapters made without training, published like a cycle would."""

from __future__ import annotations

from pathlib import Path

import torch

from feedback import Store, cycles
from train import artifacts


def random_adapter(model_dir: Path, out: Path, seed: int, rank: int = 16) -> Path:
    """A rank-`rank` LoRA on the attention projections with random (non-zero) weights, so its
    answers differ from the base model's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.save_pretrained(out)
    return out


def publish_random(store_path: Path, model_dir: Path, work: Path, seed: int) -> str:
    """Publish a random adapter into the data dir next to `store_path` and record it; its version."""
    adapters_dir = store_path.parent / "adapters"
    src = random_adapter(model_dir, work / f"src-{seed}", seed)
    version_dir = artifacts.publish(src, adapters_dir, base_model=str(model_dir), metrics={"seed": seed})
    manifest = artifacts.load_manifest(version_dir)
    version = f"v{manifest['version']}"
    cycles.record_adapter(Store(store_path), version, str(version_dir), manifest)
    return version
