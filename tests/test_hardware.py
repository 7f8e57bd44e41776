"""One dtype rule for serving and training: bf16 only where the hardware computes it natively."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import hardware
from serve.engines import create_engine


@pytest.fixture
def cpu(monkeypatch):
    """cpu(capability, flags): pretend to be a CPU torch reports as `capability` with those flags."""

    def set_cpu(capability: str, flags: set[str]):
        monkeypatch.setattr(hardware, "cpu_capability", lambda: capability)
        monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))

    return set_cpu


def test_avx2_cpu_computes_in_float32(cpu):
    cpu("AVX2", {"avx2", "fma"})
    choice = hardware.choose(device="cpu")
    assert choice.dtype == "float32" and "without native bf16" in choice.reason


def test_avx512_without_bf16_instructions_computes_in_float32(cpu):
    cpu("AVX512", {"avx2", "avx512f"})
    assert hardware.choose(device="cpu").dtype == "float32"


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_native_bf16_cpu_computes_in_bfloat16(cpu, flag):
    cpu("AVX512", {"avx2", "avx512f", flag})
    choice = hardware.choose(device="cpu")
    assert choice.dtype == "bfloat16" and "with native bf16" in choice.reason


def test_an_operator_override_wins_and_says_so(cpu):
    cpu("AVX2", {"avx2"})
    choice = hardware.choose("bfloat16", device="cpu")
    assert choice.dtype == "bfloat16" and "as requested" in choice.reason


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="float16"):
        hardware.choose("float16")


def test_torch_capability_override_makes_a_bf16_cpu_choose_float32():
    """ATEN_CPU_CAPABILITY=avx2 (how a bf16 machine imitates an AVX2 one) is honoured."""
    code = "import hardware; c = hardware.choose(device='cpu'); print(c.dtype, hardware.cpu_capability())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent, env={"ATEN_CPU_CAPABILITY": "avx2", "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["float32", "AVX2"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_both_engines_take_the_choice(tmp_path, dtype):
    choice = hardware.choose(dtype, device="cpu")
    vllm = create_engine("vllm", model_dir=tmp_path, served_name="m", dtype=choice, max_lora_rank=32,
                         cache_dir=tmp_path / "cache")
    command = vllm.process.command()
    assert command[command.index("--dtype") + 1] == dtype
    assert command[command.index("--max-lora-rank") + 1] == "32"
    assert vllm.info["dtype"] == dtype
    hf = create_engine("transformers", model_dir=tmp_path, served_name="m", dtype=choice)
    assert hf.info == {"dtype": dtype, "device": "cpu", "reason": choice.reason}


def test_the_gateway_shows_how_its_engine_computes(fake_gateway):
    ready = httpx.get(fake_gateway.url + "/readyz").json()
    assert {ready["dtype"], ready["device"]} == {"float32", "cpu"} and ready["reason"]
    metrics = httpx.get(fake_gateway.url + "/metrics").text
    assert 'loopchat_engine_info{device="cpu",dtype="float32",kind="fake"' in metrics


@pytest.mark.slow
def test_up_serves_the_dtype_this_cpu_computes_natively_and_says_why(vllm_gateway):
    expected = hardware.choose()
    ready = httpx.get(vllm_gateway.url + "/readyz").json()
    assert (ready["dtype"], ready["reason"]) == (expected.dtype, expected.reason)
    assert f"serving in {expected.dtype} on cpu: {expected.reason}" in vllm_gateway.log_path.read_text()
    assert f"'dtype': '{expected.dtype}'" in (vllm_gateway.data_dir / "logs" / "vllm.log").read_text()
