"""At start-up the gateway restores the promoted version whatever the engine does meanwhile: it
waits out an engine that is unavailable, serves the base model when the version cannot be
restored, and becomes ready either way."""

from __future__ import annotations

import asyncio
import logging
from contextlib import contextmanager

import httpx
import pytest
from conftest import InProcessGateway

from feedback import cycles
from serve.engines import EngineError, EngineUnavailable


@contextmanager
def restarted_gateway(tmp_path, break_engine):
    """An in-process gateway whose store says v1 was promoted, started after `break_engine(engine)`;
    yields it once /readyz answers 200."""
    gw = InProcessGateway(tmp_path / "gw")
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    cycles.record_adapter(gw.store, "v1", str(tmp_path / "v1"), {})
    cycles.record_promotion(gw.store, "v1", "promote", "ops")
    break_engine(gw.engine)
    try:
        yield gw.start()
    finally:
        gw.stop()


def serving(gw) -> str:
    return httpx.get(gw.url + "/readyz").json()["serving"]


def unavailable_twice_on_load(engine):
    load, failures = engine.load_adapter, [EngineUnavailable("restarting")] * 2

    async def load_adapter(name, path):
        if failures:
            raise failures.pop()
        await load(name, path)

    engine.load_adapter = load_adapter


def down_for_a_moment_after_load(engine):
    """The engine drops right after the load: the probe and its clean-up unload both find it down."""
    load, dropped = engine.load_adapter, []

    async def load_adapter(name, path):
        await load(name, path)
        if not dropped:
            dropped.append(name)
            engine.up = False
            asyncio.get_running_loop().call_later(0.5, setattr, engine, "up", True)

    engine.load_adapter = load_adapter


@pytest.mark.parametrize("break_engine", [unavailable_twice_on_load, down_for_a_moment_after_load])
def test_restore_waits_out_an_unavailable_engine(tmp_path, break_engine):
    with restarted_gateway(tmp_path, break_engine) as gw:
        assert serving(gw) == "policy-v1"


def load_raises_unexpectedly(engine):
    async def load_adapter(name, path):
        raise RuntimeError("something nobody expected")

    engine.load_adapter = load_adapter


def probe_fails_and_unload_finds_the_engine_down(engine):
    stream = engine.stream

    async def failing_stream(model, messages, sampling):
        if model == "policy-v1":
            raise EngineError(500, "the adapter is broken")
        async for chunk in stream(model, messages, sampling):
            yield chunk

    async def unload_adapter(name):
        raise EngineUnavailable("the engine is restarting")

    engine.stream, engine.unload_adapter = failing_stream, unload_adapter


@pytest.mark.parametrize("break_engine", [load_raises_unexpectedly, probe_fails_and_unload_finds_the_engine_down])
def test_restore_serves_the_base_model_when_the_version_cannot_be_restored(tmp_path, caplog, break_engine):
    with caplog.at_level(logging.ERROR, logger="loopchat.hotswap"), restarted_gateway(tmp_path, break_engine) as gw:
        assert serving(gw) == gw.engine.served_name
    assert "could not restore v1" in caplog.text
