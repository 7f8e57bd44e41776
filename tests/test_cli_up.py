"""`loopchat up` stops the retrain worker it started when it is itself stopped (SIGTERM)."""

from __future__ import annotations

import psutil
import pytest
from conftest import Server, free_port, wait_for

pytestmark = pytest.mark.slow


def exited(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_sigterm_to_up_stops_its_worker(vllm_gateway, model_dir, tmp_path):
    port = free_port()
    server = Server(["up", "--engine-url", vllm_gateway.engine_url, "--no-ui", "--port", str(port),
                     "--data-dir", str(tmp_path / "data"), "--model", str(model_dir)], tmp_path / "data", port).start()
    try:
        [worker] = [p for p in psutil.Process(server.proc.pid).children() if "worker" in p.cmdline()]
        server.proc.terminate()
        server.proc.wait(60)
        wait_for(lambda: exited(worker), 60, "the worker to exit with `loopchat up`")
    finally:
        server.stop()
