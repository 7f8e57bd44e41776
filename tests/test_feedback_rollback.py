"""Which version a rollback goes back to, from the promotion history in the store."""

from __future__ import annotations

from feedback import Store, cycles


def _history(tmp_path, *steps: tuple[str, str]) -> Store:
    store = Store(tmp_path / "loop.db")
    for version in sorted({v for _, v in steps if v}):
        cycles.record_adapter(store, version, f"/adapters/{version}", {"version": int(version[1:])})
    for action, version in steps:
        cycles.record_promotion(store, version, action, "ops")
    return store


def test_rollback_goes_to_the_version_before(tmp_path):
    store = _history(tmp_path, ("promote", "v1"), ("promote", "v2"), ("promote", "v3"))
    assert cycles.rollback_target(store) == "v2"


def test_promoting_the_serving_version_again_does_not_make_it_its_own_rollback_target(tmp_path):
    store = _history(tmp_path, ("promote", "v1"), ("promote", "v2"), ("promote", "v3"), ("promote", "v3"))
    assert cycles.rollback_target(store) == "v2"


def test_rollback_after_rollback_keeps_going_back(tmp_path):
    store = _history(tmp_path, ("promote", "v1"), ("promote", "v2"), ("promote", "v3"), ("rollback", "v2"))
    assert cycles.rollback_target(store) == "v1"
    cycles.record_promotion(store, "v1", "rollback", "ops")
    assert cycles.rollback_target(store) is None
