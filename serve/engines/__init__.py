"""Engines behind one interface: a managed or external vLLM server, or in-process transformers."""

from serve.engines.base import Engine, EngineError, EngineUnavailable

__all__ = ["Engine", "EngineError", "EngineUnavailable", "create_engine"]


def create_engine(kind: str, *, model_dir, served_name: str, urls=(), port: int = 8100, log_dir=None,
                  max_model_len: int = 2048, dtype=None, max_lora_rank: int = 16, cache_dir=None,
                  enforce_eager: bool = False) -> Engine:
    """kind: auto | vllm | transformers. `auto` picks vLLM when it is importable.
    dtype: a `hardware.Choice` (None = hardware.choose())."""
    if kind == "auto":
        kind = "vllm" if urls or _vllm_installed() else "transformers"
    if kind == "vllm":
        from serve.engines.vllm import VLLMEngine
        return VLLMEngine(model_dir=model_dir, served_name=served_name, urls=urls, port=port, log_dir=log_dir,
                          max_model_len=max_model_len, dtype=dtype, max_lora_rank=max_lora_rank,
                          cache_dir=cache_dir, enforce_eager=enforce_eager)
    if kind == "transformers":
        from serve.engines.hf import TransformersEngine
        return TransformersEngine(model_dir=model_dir, served_name=served_name, max_model_len=max_model_len,
                                  dtype=dtype)
    raise ValueError(f"unknown engine {kind!r}: choose auto, vllm or transformers")


def _vllm_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("vllm") is not None
