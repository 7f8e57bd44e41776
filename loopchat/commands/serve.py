"""`loopchat up` (gateway + engine + UI + worker) and `loopchat serve` (gateway + engine)."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
import sys

import click

import hardware
from loopchat.options import ensure_model, open_store, settings_options
from loopchat.settings import DEFAULT_MAX_LORA_RANK

log = logging.getLogger("loopchat")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def gateway_options(func):
    options = [
        click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on."),
        click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535)),
        click.option("--engine", type=click.Choice(["auto", "vllm", "transformers"]), default="auto",
                     show_default=True, envvar="LOOPCHAT_ENGINE",
                     help="auto = vLLM when installed, else transformers."),
        click.option("--engine-url", "engine_urls", multiple=True,
                     help="A vLLM server already running (repeat for replicas); none = start one."),
        click.option("--engine-port", default=8100, show_default=True, type=click.IntRange(1, 65535),
                     help="Port of the vLLM server loopchat starts."),
        click.option("--max-model-len", default=2048, show_default=True, type=click.IntRange(64)),
        click.option("--dtype", type=click.Choice(hardware.DTYPES), default="auto", show_default=True,
                     envvar="LOOPCHAT_DTYPE",
                     help="auto = bfloat16 where the hardware computes it natively (GPU, AVX512_BF16/AMX CPU), "
                          "else float32."),
        click.option("--enforce-eager/--compile", "enforce_eager", default=False, show_default=True,
                     help="vLLM on a GPU: skip torch.compile and CUDA graphs (quicker start, slower decoding). "
                          "vLLM's CPU build never compiles with LoRA on, so on a CPU it changes nothing "
                          "(measured: bench/RESULTS.md)."),
        click.option("--max-lora-rank", type=click.IntRange(1, 512), default=None,
                     help=f"Largest LoRA rank the engine accepts (default: $LOOPCHAT_MAX_LORA_RANK or "
                          f"{DEFAULT_MAX_LORA_RANK}); promotion refuses larger adapters."),
        click.option("--max-request-bytes", default=1_000_000, show_default=True, type=click.IntRange(1024)),
        click.option("--feedback-rate-limit", default=0, show_default=True, type=click.IntRange(0),
                     help="Feedback posts per user per minute (0 = no limit)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def run_gateway(settings, host, port, engine, engine_urls, engine_port, max_model_len, dtype, enforce_eager,
                max_lora_rank, max_request_bytes, feedback_rate_limit=0, mount=None) -> None:
    import uvicorn

    from serve.engines import create_engine
    from serve.gateway import GatewayConfig, create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = open_store(settings)
    local = is_loopback(host)
    if not local and store.key_count() == 0:
        raise click.ClickException(f"refusing to listen on {host} without an API key: "
                                   "run `loopchat keys create NAME --admin` first")
    model_dir = ensure_model(settings) if not engine_urls else settings.model_dir
    served_name = model_dir.name
    if max_lora_rank is not None:
        settings.max_lora_rank = max_lora_rank
    choice = hardware.choose(dtype)
    eng = create_engine(engine, model_dir=model_dir, served_name=served_name, urls=engine_urls,
                        port=engine_port, log_dir=settings.logs_dir, max_model_len=max_model_len, dtype=choice,
                        max_lora_rank=settings.max_lora_rank, cache_dir=settings.cache_dir,
                        enforce_eager=enforce_eager)
    try:
        follow = {"canary_rule": settings.canary_rule(), "comparison_mix": settings.comparison_mix()}
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    app = create_app(store, eng, GatewayConfig(keys_required=not local, max_body_bytes=max_request_bytes,
                                               feedback_rate_limit=feedback_rate_limit,
                                               max_lora_rank=settings.max_lora_rank, **follow))
    if mount:
        mount(app)
    if store.key_count() == 0:
        log.warning("no API keys exist: open mode on %s, anyone who can reach it may call it (admin included)",
                    host)
    log.info("loopchat gateway on http://%s:%d (engine: %s, model: %s, data: %s)", host, port, eng.kind,
             served_name, settings.data_dir)
    log.info("serving in %s on %s: %s", eng.info["dtype"], eng.info["device"], eng.info["reason"])
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10)


@click.command()
@gateway_options
@settings_options
def serve(settings, **opts):
    """Run the OpenAI-compatible gateway and its engine (no UI, no worker)."""
    run_gateway(settings, **opts)


@click.command()
@gateway_options
@click.option("--no-ui", is_flag=True, help="Do not serve the browser UI at /ui.")
@click.option("--no-worker", is_flag=True, help="Do not start the retrain worker.")
@click.option("--worker-interval", default=300.0, show_default=True, help="Seconds between the worker's checks.")
@click.option("--cycle-minutes", type=click.FloatRange(0), default=None,
              help="Each retrain cycle's time budget (0 = the fixed step sizes); default: the worker's.")
@settings_options
def up(settings, no_ui, no_worker, worker_interval, cycle_minutes, **opts):
    """Run everything on one machine: gateway, engine, browser UI and retrain worker."""
    host = opts["host"]
    local_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') or is_loopback(host) else host}:{opts['port']}"

    def mount_ui(app):
        import gradio as gr
        from fastapi.responses import RedirectResponse

        from ui.app import build_app

        gr.mount_gradio_app(app, build_app(local_url), path="/ui", footer_links=[])
        app.add_api_route("/", lambda: RedirectResponse("/ui/"), include_in_schema=False)

    if not opts["engine_urls"]:
        ensure_model(settings)  # once, here, before the worker starts and looks for it too
    worker = None if no_worker else start_worker(settings, local_url, worker_interval, cycle_minutes)
    try:
        run_gateway(settings, **opts, mount=None if no_ui else mount_ui)
    finally:
        if worker:
            worker.terminate()
            worker.wait(30)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the gateway's process ends. uvicorn re-raises the SIGTERM it
    shut down on, so `up` dies before its `finally` could stop the worker."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG (Linux)


def start_worker(settings, gateway_url: str, interval: float, cycle_minutes: float | None) -> subprocess.Popen:
    """The retrain worker as its own process, so training never slows serving."""
    env = dict(os.environ)
    store = open_store(settings)
    if store.key_count() > 0:  # keyed gateway: the worker gets its own admin key, minted per start
        env["LOOPCHAT_ADMIN_KEY"] = store.create_key("loopchat-worker", admin=True)
    cmd = [sys.executable, "-m", "loopchat.cli", "worker", "--gateway", gateway_url, "--interval", str(interval),
           "--data-dir", str(settings.data_dir)]
    if settings.model is not None:
        cmd += ["--model", str(settings.model)]
    if cycle_minutes is not None:
        cmd += ["--cycle-minutes", str(cycle_minutes)]
    settings.ensure_dirs()
    with open(settings.logs_dir / "worker.log", "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
    log.info("retrain worker started (pid %d, log: %s)", proc.pid, settings.logs_dir / "worker.log")
    return proc
