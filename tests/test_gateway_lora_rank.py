"""An adapter whose rank is above the engine's maximum is refused at promotion with a clear 400
(vLLM would refuse it too, and its error would reach the operator as a 502)."""

import httpx


def test_promoting_an_adapter_above_the_max_rank_is_a_400_and_changes_nothing(fake_gateway):
    gw = fake_gateway
    too_big, fits = gw.publish_adapter(rank=32), gw.publish_adapter(rank=16)
    r = httpx.post(f"{gw.url}/admin/adapters/{too_big}/promote")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "adapter_rank_too_large" and "rank 32" in error["message"] and "16" in error["message"]
    assert gw.engine.loaded == {} and httpx.get(f"{gw.url}/admin/adapters").json()["serving"] is None
    assert httpx.post(f"{gw.url}/admin/adapters/{fits}/promote").json()["serving"] == fits
