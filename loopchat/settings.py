"""Settings shared by every command: where the data lives and which model serves.

Precedence: command-line flag > environment variable (LOOPCHAT_DATA_DIR, LOOPCHAT_MODEL,
LOOPCHAT_MAX_LORA_RANK) > default.
Each command's own options (ports, engine, thresholds) live with the command.

The gateway's canary and comparison settings come from the environment only, so that every
gateway process of one service reads the same ones:
- LOOPCHAT_CANARY_AUTO (1/0, default 1): a canary's rule ends it by itself, or waits for an
  operator to confirm; LOOPCHAT_CANARY_MIN_ANSWERS, _MIN_VOTES, _MARGIN, _ALPHA: the rule
  (feedback.canary.Rule). New canaries take them; a running one keeps the rule it started with.
- LOOPCHAT_COMPARISON_MIX (e.g. "serving=0.5,previous=0.3,base=0.2"): where the comparison
  candidates after the first come from (serve.registry.Registry.comparison_models).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from feedback.canary import Rule

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
        """vLLM's and torch inductor's compile caches, kept so that a second start is quick, and the gate's
        capability answers of the versions it judged (`gate/`), so that a cycle in a new process samples them once."""
        return self.data_dir / "cache"

    @property
    def model_dir(self) -> Path:
        """The checkpoint that serves: --model, else the prepared default."""
        return self.model if self.model is not None else self.models_dir / DEFAULT_MODEL_NAME

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.models_dir, self.adapters_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)

    def canary_rule(self) -> Rule:
        """The decision rule new canaries get (LOOPCHAT_CANARY_*); ValueError names a bad value."""
        defaults = Rule()
        env = {"auto": ("LOOPCHAT_CANARY_AUTO", _flag), "min_answers": ("LOOPCHAT_CANARY_MIN_ANSWERS", int),
               "min_votes": ("LOOPCHAT_CANARY_MIN_VOTES", int), "margin": ("LOOPCHAT_CANARY_MARGIN", float),
               "alpha": ("LOOPCHAT_CANARY_ALPHA", float)}
        values = {}
        for key, (var, parse) in env.items():
            raw = os.environ.get(var)
            try:
                values[key] = getattr(defaults, key) if raw is None else parse(raw)
            except ValueError as e:
                raise ValueError(f"{var}={raw!r}: {e}") from None
        try:
            return Rule(**values)
        except ValueError as e:
            raise ValueError(f"LOOPCHAT_CANARY_*: {e}") from None

    def comparison_mix(self) -> dict[str, float]:
        """LOOPCHAT_COMPARISON_MIX parsed, else the gateway's default; ValueError names a bad value."""
        from serve.registry import DEFAULT_COMPARISON_MIX

        raw = os.environ.get("LOOPCHAT_COMPARISON_MIX")
        return dict(DEFAULT_COMPARISON_MIX) if raw is None else parse_mix(raw)


def _flag(raw: str) -> bool:
    if raw.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if raw.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected 1 or 0")


def parse_mix(raw: str) -> dict[str, float]:
    """"serving=0.5,previous=0.3,base=0.2" -> weights by origin (any non-negative numbers, not all 0)."""
    from serve.registry import ORIGINS

    mix = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        origin, _, weight = part.partition("=")
        origin = origin.strip()
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if origin not in ORIGINS or value < 0:
            raise ValueError(f"LOOPCHAT_COMPARISON_MIX={raw!r}: each part is ORIGIN=WEIGHT with ORIGIN one of "
                             f"{', '.join(ORIGINS)} and a weight >= 0")
        mix[origin] = value
    if not sum(mix.values()) > 0:
        raise ValueError(f"LOOPCHAT_COMPARISON_MIX={raw!r}: give at least one positive weight")
    return mix
