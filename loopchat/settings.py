"""Settings shared by every command: where the data lives and which model serves.

Precedence: command-line flag > environment variable (LOOPCHAT_DATA_DIR, LOOPCHAT_MODEL,
LOOPCHAT_MAX_LORA_RANK) > default.
Each command's own options (ports, engine, thresholds) live with the command.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# The largest LoRA rank the server accepts (vLLM's --max-lora-rank); training caps its rank by it
# and promotion refuses a larger adapter. vLLM sizes its LoRA buffers by it, so keep it small.
DEFAULT_MAX_LORA_RANK = 16


@dataclass
class Settings:
    data_dir: Path = field(default_factory=lambda: Path(os.environ.get("LOOPCHAT_DATA_DIR", "./data")))
    model: Path | None = None  # a local HF checkpoint; None = the prepared default model
    max_lora_rank: int = field(default_factory=lambda: int(os.environ.get("LOOPCHAT_MAX_LORA_RANK",
                                                                          DEFAULT_MAX_LORA_RANK)))

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        if self.model is None and os.environ.get("LOOPCHAT_MODEL"):
            self.model = Path(os.environ["LOOPCHAT_MODEL"])
        if self.model is not None:
            self.model = Path(self.model).resolve()

    @property
    def db_path(self) -> Path:
        return self.data_dir / "loopchat.db"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def adapters_dir(self) -> Path:
        return self.data_dir / "adapters"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def cache_dir(self) -> Path:
        """vLLM's and torch inductor's compile caches: kept so that a second start is quick."""
        return self.data_dir / "cache"

    @property
    def model_dir(self) -> Path:
        """The checkpoint that serves: --model, else the prepared default."""
        return self.model if self.model is not None else self.models_dir / DEFAULT_MODEL_NAME

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.models_dir, self.adapters_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
