"""API rows as the dashboard shows them: tables (timestamps as local times, verdicts as words, nested
figures as JSON) and version pickers."""

from __future__ import annotations

import json
import time

import gradio as gr
import pandas as pd


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def cell(key: str, value) -> str | float | int:
    if key.endswith("_at"):
        return when(value)
    if isinstance(value, bool):
        return "pass" if value else "fail"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "))
    return "" if value is None else value


def table(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame([[cell(c, r.get(c)) for c in columns] for r in rows], columns=columns)


def keep(choices: list[str], current: str | None) -> dict:
    """A version dropdown's new choices, keeping the operator's pick while it is still one (else the newest),
    so a refresh, the timed one included, never changes what the operator chose."""
    return gr.update(choices=choices, value=current if current in choices else choices[-1] if choices else None)
