"""`loopchat up` stops the retrain worker it started when it is itself stopped (SIGTERM)."""

from __future__ import annotations

import time

import psutil
import pytest
from conftest import Server, free_port

pytestmark = pytest.mark.slow


def test_sigterm_to_up_stops_its_worker(vllm_gateway, model_dir, tmp_path):
    port = free_port()
    server = Server(["up", "--engine-url", vllm_gateway.engine_url, "--no-ui", "--port", str(port),
                     "--data-dir", str(tmp_path / "data"), "--model", str(model_dir)], tmp_path / "data", port).start()
    try:
        [worker] = [p for p in psutil.Process(server.proc.pid).children() if "worker" in p.cmdline()]
        server.proc.terminate()
        server.proc.wait(60)
        deadline = time.monotonic() + 30
        while worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    finally:
        server.stop()
