"""Options every command shares, turned into a Settings object."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import click

from loopchat.settings import Settings


def settings_options(func):
    """Adds --data-dir and --model; the command receives `settings`."""

    @click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="LOOPCHAT_DATA_DIR",
                  default="./data", show_default=True, help="Where the database, models, adapters and logs live.")
    @click.option("--model", "model", type=click.Path(exists=True, file_okay=False, path_type=Path),
                  envvar="LOOPCHAT_MODEL", default=None,
                  help="A local Hugging Face checkpoint (default: the prepared SmolLM2-135M-Instruct).")
    @functools.wraps(func)
    def wrapper(*args, data_dir, model, **kwargs):
        return func(*args, settings=Settings(data_dir=data_dir, model=model), **kwargs)

    return wrapper


def ensure_model(settings: Settings) -> Path:
    """The serving checkpoint, preparing the default one on first use."""
    from loopchat.model import ModelError, prepare

    if settings.model is not None:
        if not (settings.model / "config.json").is_file():
            raise click.ClickException(f"{settings.model} is not a Hugging Face checkpoint (no config.json)")
        return settings.model
    try:
        return prepare(settings.model_dir, log=click.echo)
    except ModelError as e:
        raise click.ClickException(str(e)) from e


def open_store(settings: Settings):
    from feedback import Store

    settings.ensure_dirs()
    return Store(settings.db_path)


def training_process() -> None:
    """Call before torch loads in a process that trains beside a serving engine.

    OpenMP's default spin-waiting makes torch's idle threads burn the cores vLLM needs (and
    vice versa); measured here at load 7, a 16x100-token forward took 7.7 s spinning and 2.7 s
    with PASSIVE waits."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
