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


def vote_shorter(store: Store, n: int, start: int = 0) -> None:
    """n comparisons (questions start .. start + n - 1), each voted for its shorter answer."""
    for i in range(start, start + n):
        prompt = f"Question {i}: what is {i} plus {i}?"
        a = add_completion(store, f"a{i}", prompt=prompt, answers=(f"{2 * i}.",))
        b = add_completion(store, f"b{i}", prompt=prompt, answers=(f"Well, {i} plus {i} needs a long think first.",))
        store.vote("alice", store.create_comparison("alice", a, b), "a")
