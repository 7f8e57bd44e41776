"""GET /admin/engine-config: what engines loopchat does not start need from it (serve/engine_config.py)."""

from __future__ import annotations

import httpx
from conftest import assert_error


def config(gw, **kwargs) -> dict:
    r = httpx.get(gw.url + "/admin/engine-config", **kwargs)
    assert r.status_code == 200, r.text
    return r.json()


def args_after(args: list[str], flag: str) -> list[str]:
    """The values that follow `flag` up to the next flag."""
    rest = args[args.index(flag) + 1:]
    return rest[:next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))]


def test_the_base_model_alone_needs_the_lora_flags_and_no_adapter(fake_gateway):
    cfg = config(fake_gateway)
    assert cfg["base_model"] == "base-model" and cfg["adapters"] == []
    assert cfg["alias"] == {"name": "loopchat", "serving": "base-model", "canary": None, "canary_share": 0.0}
    args = cfg["vllm"]["args"]
    assert args_after(args, "--served-model-name") == ["base-model"] and "--enable-lora" in args
    assert args_after(args, "--max-lora-rank") == ["16"] and "--lora-modules" not in args
    assert cfg["vllm"]["env"] == {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}


def test_it_lists_the_serving_canary_and_previous_versions_with_their_paths(fake_gateway):
    gw = fake_gateway
    v1, v2, v3, v4 = (gw.publish_adapter() for _ in range(4))
    for version in (v1, v2):
        assert httpx.post(f"{gw.url}/admin/adapters/{version}/promote").status_code == 200
    assert httpx.post(f"{gw.url}/admin/adapters/{v3}/canary", json={"share": 0.25}).status_code == 201
    paths = {a["version"]: a["path"] for a in httpx.get(gw.url + "/admin/adapters").json()["data"]}

    cfg = config(gw)
    assert cfg["alias"] == {"name": "loopchat", "serving": f"policy-{v2}", "canary": f"policy-{v3}",
                            "canary_share": 0.25}
    assert cfg["adapters"] == [{"name": f"policy-{v}", "version": v, "path": paths[v], "role": role}
                               for v, role in ((v2, "serving"), (v3, "canary"), (v1, "previous"))]
    assert args_after(cfg["vllm"]["args"], "--lora-modules") == [
        f"policy-{v}={paths[v]}" for v in (v2, v3, v1)]  # v4: published, not needed by any engine


def test_only_admins_may_read_it(fake_keyed_gateway):
    gw = fake_keyed_gateway
    assert_error(httpx.get(gw.url + "/admin/engine-config", headers=gw.headers("alice")), 403)
    assert_error(httpx.get(gw.url + "/admin/engine-config"), 401)
    assert config(gw, headers=gw.headers("ops"))["base_model"] == "base-model"
