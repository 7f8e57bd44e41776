"""Helpers for the feedback tests: completions written straight into a store (no engine needed)."""

from __future__ import annotations

from feedback import Store


def add_completion(store: Store, completion_id: str, user: str = "alice", prompt: str = "hi",
                   answers: tuple[str, ...] = ("hello",), served_by: str = "base", source: str = "chat") -> str:
    """Store a finished completion of `prompt` with one choice per answer; returns its id."""
    store.record_completion({
        "id": completion_id, "user": user, "source": source, "model": "loopchat", "served_by": served_by,
        "messages": [{"role": "user", "content": prompt}], "output": answers[0],
        "choices": [{"index": i, "content": a, "finish_reason": "stop"} for i, a in enumerate(answers)],
        "params": {"max_tokens": 8}, "status": "complete",
    })
    return completion_id
