"""Read training data in TRL's conversational formats (what the feedback room exports).

    sft       {"messages": [{"role": ..., "content": ...}, ...]}   the last message is the answer
    pairs     {"prompt": [messages], "chosen": [assistant msg], "rejected": [assistant msg]}
    unpaired  {"prompt": [messages], "completion": [assistant msg], "label": true|false}
    prompts   {"prompt": [messages]}, or a plain string (one user message) per line

Every reader takes a JSONL path or records already in memory (a list of dicts) and returns
plain Python values: conversations as lists of {"role", "content"} dicts, answers as strings.
A bad line stops the run with `file:line: what is wrong`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A one-line description of a malformed record, prefixed by where it is."""


def _rows(source: str | Path | Iterable) -> Iterator[tuple[str, object]]:
    """(location, parsed value) for each non-blank line of a file, or each in-memory record."""
    if not isinstance(source, (str, Path)):
        for i, record in enumerate(source, 1):
            yield f"record {i}", record
        return
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if line[0] not in '{["':  # a bare line of text: only meaningful as a prompt
                yield f"{path}:{i}", line
                continue
            try:
                yield f"{path}:{i}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None


def _messages(value, where: str, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {field!r} must be a non-empty list of messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {field}[{j}] must be {{'role': one of {'/'.join(ROLES)}, 'content': str}}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(value, where: str, field: str) -> str:
    """An answer given as [{"role": "assistant", "content": ...}] (or simply a string)."""
    if isinstance(value, str):
        return value
    msgs = _messages(value, where, field)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise DataError(f"{where}: {field!r} must hold exactly one assistant message")
    return msgs[0]["content"]


def _object(value, where: str, keys: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object with {', '.join(keys)}")
    missing = [k for k in keys if k not in value]
    if missing:
        raise DataError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    return value


def read_sft(source) -> list[list[dict]]:
    """Demonstrations as conversations ending with the assistant's answer.

    Also takes unpaired rows: a liked completion (label true) is a demonstration, a disliked
    one is skipped."""
    out = []
    for where, value in _rows(source):
        if isinstance(value, dict) and "completion" in value:
            row = _unpaired(value, where)
            if row["label"]:
                out.append(row["prompt"] + [{"role": "assistant", "content": row["completion"]}])
            continue
        msgs = _messages(_object(value, where, ("messages",))["messages"], where, "messages")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer")
        out.append(msgs)
    return out


def read_pairs(source) -> list[dict]:
    """[{"prompt": messages, "chosen": str, "rejected": str}]"""
    out = []
    for where, value in _rows(source):
        row = _object(value, where, ("prompt", "chosen", "rejected"))
        out.append(
            {
                "prompt": _messages(row["prompt"], where, "prompt"),
                "chosen": _answer(row["chosen"], where, "chosen"),
                "rejected": _answer(row["rejected"], where, "rejected"),
            }
        )
    return out


def read_unpaired(source) -> list[dict]:
    """[{"prompt": messages, "completion": str, "label": bool}]"""
    return [_unpaired(value, where) for where, value in _rows(source)]


def _unpaired(value, where: str) -> dict:
    row = _object(value, where, ("prompt", "completion", "label"))
    if not isinstance(row["label"], bool):
        raise DataError(f"{where}: 'label' must be true or false")
    return {
        "prompt": _messages(row["prompt"], where, "prompt"),
        "completion": _answer(row["completion"], where, "completion"),
        "label": row["label"],
    }


def read_prompts(source) -> list[list[dict]]:
    """Prompts for PPO and the gate: {"prompt": messages} rows, or strings (one user message)."""
    out = []
    for where, value in _rows(source):
        if isinstance(value, str):
            if not value.strip():
                raise DataError(f"{where}: empty prompt")
            out.append([{"role": "user", "content": value}])
            continue
        out.append(_messages(_object(value, where, ("prompt",))["prompt"], where, "prompt"))
    return out
