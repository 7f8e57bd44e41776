"""Published policy versions: `adapters/v{N}/` holds a servable peft adapter and its manifest.

    adapters/v3/adapter_config.json        peft's standard format: vLLM's /v1/load_lora_adapter
    adapters/v3/adapter_model.safetensors  and transformers + peft both load the folder as is
    adapters/v3/manifest.json              version, parent, base model, data snapshot,
                                           hyperparameters, metrics, gate verdict, sha256 of files
    adapters/v3/reward_model/              the reward model the cycle trained beside it (optional):
                                           the next cycle's reward model continues from the
                                           newest one (train.reward's `init_from`)

Publishing is atomic: the files are written and fsynced in a hidden temp folder in the same
parent, then the folder is renamed to `v{N}` (a rename within one file system is atomic).
A crash leaves at most a hidden `.v{N}.tmp-*` folder, which is never listed as a version and
is swept by the next publish. A lock file serialises concurrent publishers.
Only the adapter's two files are copied to the top of the folder: no value head or other training
state reaches what vLLM serves (it reads those two files, never a subfolder).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST = "manifest.json"
REWARD_MODEL = "reward_model"
VERSION_DIR = re.compile(r"^v(\d+)$")


class ArtifactError(RuntimeError):
    """A one-line problem with an adapter or version folder."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def list_versions(adapters_dir: str | Path) -> list[int]:
    """Published version numbers, ascending (folders `v{N}` that hold a manifest)."""
    root = Path(adapters_dir)
    if not root.is_dir():
        return []
    found = [int(m.group(1)) for p in root.iterdir() if (m := VERSION_DIR.match(p.name)) and (p / MANIFEST).is_file()]
    return sorted(found)


def next_version(adapters_dir: str | Path) -> int:
    versions = list_versions(adapters_dir)
    return versions[-1] + 1 if versions else 1


def version_dir(adapters_dir: str | Path, version: int) -> Path:
    return Path(adapters_dir) / f"v{version}"


def load_manifest(path: str | Path) -> dict:
    """The manifest of a version folder."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise ArtifactError(f"{path}: no {MANIFEST}; not a published version")
    return json.loads(file.read_text())


def verify(path: str | Path) -> None:
    """Raise ArtifactError unless every file listed in the manifest has its recorded sha256."""
    path = Path(path)
    for name, digest in load_manifest(path)["files"].items():
        if not (path / name).is_file() or sha256(path / name) != digest:
            raise ArtifactError(f"{path / name}: missing or does not match its checksum")


def reward_model_dir(path: str | Path) -> Path | None:
    """The reward model published with a version folder, or None when it has none."""
    rm = Path(path) / REWARD_MODEL
    return rm if rm.is_dir() else None


def check_adapter(adapter_dir: str | Path, max_rank: int | None = None) -> dict:
    """The adapter's config, after checking it is one vLLM can serve (LoRA, no extra modules, and a
    rank within the server's --max-lora-rank when `max_rank` is given)."""
    adapter_dir = Path(adapter_dir)
    for name in ADAPTER_FILES:
        if not (adapter_dir / name).is_file():
            raise ArtifactError(f"{adapter_dir}: missing {name}; not a peft adapter folder")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ArtifactError(f"{adapter_dir}: peft_type is {config.get('peft_type')!r}, vLLM serves LORA only")
    if config.get("modules_to_save"):
        raise ArtifactError(f"{adapter_dir}: has modules_to_save {config['modules_to_save']}; vLLM cannot serve it")
    if max_rank is not None and (config.get("r") or 0) > max_rank:
        raise ArtifactError(f"{adapter_dir}: LoRA rank {config['r']} is above the server's maximum {max_rank} "
                            "(LOOPCHAT_MAX_LORA_RANK / --max-lora-rank)")
    return config


@contextmanager
def _locked(root: Path):
    with open(root / ".publish.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(
    adapter_dir: str | Path,
    adapters_dir: str | Path,
    *,
    base_model: str,
    parent_version: int | None = None,
    data_snapshot: dict | None = None,
    hyperparameters: dict | None = None,
    metrics: dict | None = None,
    gate: dict | None = None,
    reward_model: str | Path | None = None,
) -> Path:
    """Copy a trained adapter into `adapters_dir/v{N}` (N = next free number) with its manifest, and
    the files of the `reward_model` folder, when given, into its `reward_model/`.

    Returns the new version folder. The caller's dicts go into the manifest as they are."""
    config = check_adapter(adapter_dir)
    root = Path(adapters_dir)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        for stale in root.glob(".v*.tmp-*"):  # left by a publisher that died
            shutil.rmtree(stale, ignore_errors=True)
        version = next_version(root)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version}.tmp-", dir=root))
        try:
            copied = list(ADAPTER_FILES)
            for name in ADAPTER_FILES:
                shutil.copyfile(Path(adapter_dir) / name, tmp / name)
            if reward_model is not None:
                (tmp / REWARD_MODEL).mkdir()
                for f in sorted(p for p in Path(reward_model).iterdir() if p.is_file()):
                    shutil.copyfile(f, tmp / REWARD_MODEL / f.name)
                    copied.append(f"{REWARD_MODEL}/{f.name}")
                _fsync(tmp / REWARD_MODEL)
            for name in copied:
                _fsync(tmp / name)
            manifest = {
                "version": version,
                "name": f"policy-v{version}",
                "parent_version": parent_version,
                "base_model": str(base_model),
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "lora": {k: config.get(k) for k in ("r", "lora_alpha", "target_modules")},
                "data": data_snapshot or {},
                "hyperparameters": hyperparameters or {},
                "metrics": metrics or {},
                "gate": gate,
                "files": {name: sha256(tmp / name) for name in copied},
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
            _fsync(tmp / MANIFEST)
            tmp.chmod(0o755)
            final = version_dir(root, version)
            os.rename(tmp, final)
            _fsync(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
