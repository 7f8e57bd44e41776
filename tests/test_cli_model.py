"""`loopchat model prepare` and the CLI's one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT


def loopchat(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "loopchat.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_help_lists_every_command():
    out = loopchat("--help")
    assert out.returncode == 0
    for command in ("up", "serve", "worker", "cycle", "train", "eval", "export", "feedback", "users", "keys",
                    "model", "ui", "simulate"):
        assert f"  {command} " in out.stdout, command
        assert loopchat(command, "--help").returncode == 0, command


@pytest.mark.slow
def test_prepare_is_idempotent(model_dir, tmp_path):
    out_dir = tmp_path / "m"
    first = loopchat("model", "prepare", "--out", str(out_dir), "--data-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert (out_dir / "model.safetensors").stat().st_size > 200_000_000
    from transformers import AutoConfig, AutoTokenizer

    tok, config = AutoTokenizer.from_pretrained(out_dir), AutoConfig.from_pretrained(out_dir)
    # The special tokens are the GGUF's: the chat turn's end is the eos, and batching pads with it.
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|im_end|>", config.eos_token_id, config.pad_token_id)
    before = {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()}
    second = loopchat("model", "prepare", "--out", str(out_dir), "--data-dir", str(tmp_path))
    assert second.returncode == 0 and "already prepared" in second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out_dir.iterdir()} == before


def test_missing_gguf_is_a_one_line_error(tmp_path):
    out = loopchat("model", "prepare", "--source", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "m"))
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [f"Error: GGUF file not found: {tmp_path / 'nope.gguf'}"]


def test_model_dir_that_is_not_a_checkpoint(tmp_path):
    out = loopchat("serve", "--model", str(tmp_path), "--data-dir", str(tmp_path / "d"), "--engine", "transformers")
    assert out.returncode != 0
    assert "is not a Hugging Face checkpoint (no config.json)" in out.stderr
