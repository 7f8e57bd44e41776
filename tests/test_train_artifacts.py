"""train.artifacts: versions are published whole or not at all, with a checkable manifest."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from train.artifacts import ArtifactError, list_versions, load_manifest, next_version, publish, verify

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def adapter(tmp_path) -> Path:
    """A small stand-in for a peft LoRA adapter folder, plus training leftovers that must not be published."""
    d = tmp_path / "run"
    d.mkdir()
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "modules_to_save": None}
    (d / "adapter_config.json").write_text(json.dumps(config))
    save_file({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(8, 64)}, str(d / "adapter_model.safetensors"))
    save_file({"linear.weight": torch.zeros(1, 64)}, str(d / "value_head.safetensors"))
    (d / "metrics.jsonl").write_text("{}\n")
    return d


def test_publish_numbers_versions_and_writes_a_manifest(adapter, tmp_path):
    root = tmp_path / "adapters"
    assert list_versions(root) == [] and next_version(root) == 1
    v1 = publish(adapter, root, base_model="m", data_snapshot={"pairs": ["votes:1"]}, hyperparameters={"lr": 1e-4}, metrics={"kl": 1.5}, gate={"passed": True})
    v2 = publish(adapter, root, base_model="m", parent_version=1)
    assert (v1.name, v2.name) == ("v1", "v2") and list_versions(root) == [1, 2] and next_version(root) == 3
    m = load_manifest(v1)
    assert m["version"] == 1 and m["parent_version"] is None and m["base_model"] == "m"
    assert m["data"] == {"pairs": ["votes:1"]} and m["hyperparameters"] == {"lr": 1e-4} and m["metrics"] == {"kl": 1.5} and m["gate"] == {"passed": True}
    assert load_manifest(v2)["parent_version"] == 1
    assert sorted(p.name for p in v1.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    verify(v1)
    (v1 / "adapter_model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="checksum"):
        verify(v1)


def test_adapters_vllm_cannot_serve_are_refused(adapter, tmp_path):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": ["score"]}))
    with pytest.raises(ArtifactError, match="modules_to_save"):
        publish(adapter, tmp_path / "adapters", base_model="m")
    with pytest.raises(ArtifactError, match="missing adapter_config.json"):
        publish(tmp_path, tmp_path / "adapters", base_model="m")
    assert list_versions(tmp_path / "adapters") == []


CHILD = """
import os, sys, time
from pathlib import Path
import train.artifacts as a
def stall(src, dst):  # the moment before the version appears: say so, then wait to be killed
    Path(sys.argv[3]).write_text("ready")
    time.sleep(600)
a.os.rename = stall
a.publish(sys.argv[1], sys.argv[2], base_model="m")
"""


def test_sigkill_mid_publish_leaves_no_version(adapter, tmp_path):
    root = tmp_path / "adapters"
    publish(adapter, root, base_model="m")
    ready = tmp_path / "ready"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(adapter), str(root), str(ready)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.poll() is None, "publisher exited early"
            assert time.monotonic() < deadline, "publisher never reached the rename"
            time.sleep(0.05)
        assert any(p.name.startswith(".v2.tmp-") for p in root.iterdir())  # it had written its files
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    assert list_versions(root) == [1] and not (root / "v2").exists()
    v2 = publish(adapter, root, base_model="m")  # the next publisher takes the number and sweeps the leftovers
    assert v2.name == "v2" and not any(p.name.startswith(".v") and "tmp" in p.name for p in root.iterdir())
    verify(v2)


def test_a_rank_above_the_servers_maximum_is_refused(adapter):
    from train.artifacts import check_adapter

    assert check_adapter(adapter, max_rank=8)["r"] == 8
    with pytest.raises(ArtifactError, match="rank 8 is above the server's maximum 4"):
        check_adapter(adapter, max_rank=4)
