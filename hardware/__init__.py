"""Hardware choices that serving and training share: which device, which dtype, and why.

One rule for both: bfloat16 where the hardware computes it natively (a CUDA GPU with bf16, or
a CPU with AVX512_BF16 or AMX), float32 everywhere else. On an AVX2-only CPU bf16 is emulated:
a 1024x1024 matmul ran at 0.8 GFLOP/s against 70 GFLOP/s in float32, and vLLM served 19.7 tok/s
in bf16 against 52 tok/s in float32 (shared/ENVIRONMENT.md). float16 is never picked: training
would need loss scaling, and CPUs gain nothing from it.

This module imports only torch, so `serve`, `train` and `loopchat` may all import it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

DTYPES = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class Choice:
    device: str  # "cuda" | "cpu"
    dtype: str  # "float32" | "bfloat16"
    reason: str  # one line, for start-up logs, /metrics and the cycle row

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_capability() -> str:
    """torch's own word for the CPU's vector ISA (e.g. AVX2, AVX512); honours ATEN_CPU_CAPABILITY."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def native_bf16_cpu() -> bool:
    """True when the CPU has bf16 arithmetic and torch is allowed to use AVX-512 (an
    ATEN_CPU_CAPABILITY=avx2 override makes a bf16 CPU behave like an AVX2 one)."""
    cap = cpu_capability()
    if not (cap.startswith("AVX512") or cap.startswith("AMX")):
        return False
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def choose(requested: str = "auto", device: str | None = None) -> Choice:
    """The device and dtype to compute in. `requested` is auto | float32 | bfloat16; anything
    but auto is honoured as given (an operator's override), with the reason saying so."""
    import torch

    if requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r}: choose one of {', '.join(DTYPES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        name = torch.cuda.get_device_name()
        native = torch.cuda.is_bf16_supported()
        where = f"GPU {name}"
    else:
        native = native_bf16_cpu()
        where = f"CPU {cpu_capability()}" + (" with native bf16" if native else " without native bf16")
    if requested != "auto":
        return Choice(device, requested, f"{requested} as requested ({where})")
    dtype = "bfloat16" if native else "float32"
    return Choice(device, dtype, f"{dtype} because {where}")


def describe() -> dict:
    """What benchmarks print and record beside their figures."""
    import torch

    auto = choose()
    return {"cpu_model": cpu_model(), "cpu_capability": cpu_capability(), "native_bf16": native_bf16_cpu(),
            "device": auto.device, "auto_dtype": auto.dtype, "torch": torch.__version__,
            "cores": len(os.sched_getaffinity(0))}
