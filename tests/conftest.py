"""Shared fixtures. Slow servers start once per test session and are shared.

- `model_dir`: the real SmolLM2-135M checkpoint, prepared once into .cache/ (kept between runs).
- `vllm_gateway`: `loopchat up --engine vllm` as a real process on the real model (open mode).
- `hf_gateway`: `loopchat up --engine transformers` as a real process (open mode).
- `keyed_gateway`: a second gateway with API keys, in front of vllm_gateway's vLLM server.

The fast tier (not marked slow) uses `fake_gateway` / `fake_keyed_gateway`: the real gateway app
in this process in front of tests/fake_engine.py. Helpers every tier shares: `wait_for` (never
sleep and then assert), `assert_error` (OpenAI's error shape), `ask` and `StreamingLoad` (hot swaps
under load).
"""

from __future__ import annotations

import importlib.util
import json
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see loopchat.options.training_process
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
LOOPCHAT = [sys.executable, "-m", "loopchat.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `loopchat` command run as a real process, with its own data dir and log."""

    def __init__(self, args: list[str], data_dir: Path, port: int, env: dict | None = None):
        self.data_dir, self.port, self.args = data_dir, port, args
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = data_dir / "server.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "loopchat.db"

    def start(self, timeout: float = 300) -> "Server":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(LOOPCHAT + self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=ROOT)
        try:
            self.wait_ready(timeout)
        except BaseException:  # a server that never got ready must not outlive the session
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if "--engine-url" in self.args:
            self._release_adapters(self.args[self.args.index("--engine-url") + 1])

    def _release_adapters(self, engine_url: str) -> None:
        """Unload from a shared vLLM server the adapters this data dir loaded. A gateway that stops
        leaves its adapters loaded (others may serve them); in tests, where gateways with their own
        data dirs share one server, the next one's `policy-v1` would clash with ours (409)."""
        try:
            models = httpx.get(engine_url + "/v1/models", timeout=30).json()["data"]
        except httpx.ConnectError:
            return  # a server that is down holds nothing
        ours = [m["id"] for m in models if Path(m["root"]).resolve().is_relative_to(self.data_dir.resolve())]
        for name in ours:
            r = httpx.post(engine_url + "/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
            assert r.status_code in (200, 404), r.text

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        """Run a `loopchat` command against this server's data dir."""
        return run_cli(self.data_dir, *args, input=input)


def run_cli(data_dir: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """`loopchat ARGS --data-dir DATA_DIR` as a real process."""
    return subprocess.run(LOOPCHAT + list(args) + ["--data-dir", str(data_dir)], capture_output=True, text=True,
                          cwd=ROOT, input=input, timeout=600)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from loopchat.model import prepare

    return prepare(CACHE / "models" / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def vllm_gateway(model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("vllm-gw")
    port, engine_port = free_port(), free_port()
    # The browser tests use its /ui; a machine without gradio (bench/gpu_check.sh's GPU machine) serves none.
    ui = [] if importlib.util.find_spec("gradio") else ["--no-ui"]
    server = Server(["up", "--no-worker", *ui, "--engine", "vllm", "--port", str(port), "--engine-port", str(engine_port),
                     "--data-dir", str(data), "--model", str(model_dir)], data, port)
    server.engine_url = f"http://127.0.0.1:{engine_port}"
    yield server.start(timeout=600)  # a cold vLLM start on a busy 2-core machine can pass 300 s
    server.stop()


@pytest.fixture(scope="session")
def hf_gateway(model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("hf-gw")
    port = free_port()
    server = Server(["up", "--no-worker", "--no-ui", "--engine", "transformers", "--port", str(port), "--data-dir", str(data),
                     "--model", str(model_dir)], data, port)
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def keyed_gateway(vllm_gateway, model_dir, tmp_path_factory):
    """Keys required; shares vllm_gateway's vLLM server (starts in seconds). Has `.keys`:
    alice (user), bob (user), ops (admin)."""
    data = tmp_path_factory.mktemp("keyed-gw")
    port = free_port()
    server = Server(["serve", "--engine-url", vllm_gateway.engine_url, "--port", str(port), "--data-dir",
                     str(data), "--model", str(model_dir)], data, port)
    server.keys = {}
    for name, admin in (("alice", False), ("bob", False), ("ops", True)):
        out = server.cli("keys", "create", name, *(["--admin"] if admin else []))
        assert out.returncode == 0, out.stderr
        server.keys[name] = out.stdout.strip()
    yield server.start()
    server.stop()


# ---- the browser UI (tests/test_ui_*.py) -----------------------------------------------------
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-quic", "--no-first-run"]


@pytest.fixture(scope="module")
def chromium():
    """Headless Debian chromium (/usr/bin/chromium) driven by playwright; never downloads a browser."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")
    # Gradio's first load can take several seconds on 2 busy cores: 5 s (playwright's default) is flaky.
    sync_api.expect.set_options(timeout=30_000)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(chromium):
    """open_page(url) -> a page in a fresh browser context (its own storage, so its own UI identity)."""
    contexts = []

    def open_(url: str):
        context = chromium.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(url)
        return page

    yield open_
    for context in contexts:
        context.close()


# ---- the fast tier: the real gateway app in this process, in front of tests/fake_engine.py ----------------
class InProcessGateway:
    """`serve.gateway.create_app` on a real port (uvicorn in a thread), a real SQLite file, and the
    fake engine. Starts in well under a second; `.engine` is the FakeEngine, `.store` the Store.
    Has the same `.url`, `.db()` and `.db_path` as `Server`."""

    def __init__(self, data_dir: Path, *, keys: dict[str, bool] | None = None, token_delay: float = 0.0,
                 **config):
        import uvicorn

        from fake_engine import FakeEngine
        from feedback import Store
        from serve.gateway import GatewayConfig, create_app

        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.db_path)
        self.keys = {name: self.store.create_key(name, admin=admin) for name, admin in (keys or {}).items()}
        self.engine = FakeEngine(token_delay=token_delay)
        self.app = create_app(self.store, self.engine, GatewayConfig(keys_required=bool(keys), **config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def db_path(self) -> Path:
        return self.data_dir / "loopchat.db"

    def db(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=10)
        conn.row_factory = sqlite3.Row
        return conn

    def headers(self, who: str) -> dict:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def cli(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        """Run a `loopchat` command against this gateway's data dir, in this process (click's runner:
        the same command code, exit code and output streams as `Server.cli`, without a Python start)."""
        from click.testing import CliRunner

        from loopchat.cli import cli

        argv = list(args) + ["--data-dir", str(self.data_dir)]
        result = CliRunner().invoke(cli, argv, input=input)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return subprocess.CompletedProcess(["loopchat", *argv], result.exit_code, result.stdout, result.stderr)

    def publish_adapter(self, rank: int = 8) -> str:
        """Publish and record a LoRA-shaped adapter folder the way a cycle does; its version ("vN").
        The fake engine loads names, not weights, so the folder holds placeholder weights."""
        from loop_fixtures import fake_adapter, publish

        src = fake_adapter(self.data_dir / "adapter-src" / f"r{rank}-{time.monotonic_ns()}", rank)
        return publish(self.db_path, src, base_model=self.engine.served_name)

    def start(self, timeout: float = 30) -> "InProcessGateway":
        self.thread.start()
        wait_for(lambda: self.server.started and httpx.get(self.url + "/readyz").status_code == 200, timeout,
                 "the in-process gateway to be ready")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll `condition` until it returns something truthy (returned) or `timeout` s pass (AssertionError).
    Tests wait for what they expect with a generous deadline; they never sleep and then assert."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    """`r` is an error in OpenAI's shape with this status (and param, code when given); the error dict."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def ask(url: str, model: str = "loopchat") -> str:
    """The engine model that answers a short non-streamed request now."""
    r = httpx.post(url + "/v1/chat/completions", timeout=120,
                   json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r.json()["model"]


def read_stream(r: httpx.Response) -> dict | None:
    """A streamed chat answer's id, engine model (who answered) and text, when it was a 200 that
    ended with [DONE]; else None. Reads `r` to its end."""
    events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    if r.status_code != 200 or not events or events[-1] != "[DONE]":
        return None
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return {"id": chunks[0]["id"], "model": chunks[0]["model"], "text": text}


class StreamingLoad:
    """`clients` threads streaming chat completions back to back while the `with` block runs.

    `.results` gets one dict per request: ok, status, prompt, started and finished (time.monotonic())
    and, when ok, id, model (the engine model that answered) and text. `switch()` moves the alias
    under this load and records when, in `.phases`. With `users`, client i names itself `users[i]`
    (X-Loopchat-User, open mode; a canary routes by user) and each result also has `user`."""

    def __init__(self, url: str, clients: int = 8, max_tokens: int = 12, users: list[str] | None = None):
        self.url, self.max_tokens = url, max_tokens
        self.users = list(users) if users else [None] * clients
        self.results: list[dict] = []
        self.phases: list[tuple[float, float, str]] = []  # (switch asked, switch answered, engine model now)
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True)
                        for i in range(len(self.users))]

    def _client(self, i: int) -> None:
        user = self.users[i]
        prompt = f"Name a color, {user or f'client {i}'}."
        body = {"model": "loopchat", "stream": True, "max_tokens": self.max_tokens, "temperature": 0.8,
                "messages": [{"role": "user", "content": prompt}]}
        with httpx.Client(timeout=300, headers={"X-Loopchat-User": user} if user else None) as http:
            while not self.stop.is_set():
                result = {"ok": False, "user": user, "prompt": prompt, "started": time.monotonic()}
                try:
                    with http.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
                        result["status"] = r.status_code
                        answer = read_stream(r)
                    if answer:
                        result.update(ok=True, **answer)
                except httpx.HTTPError as e:
                    result["status"] = repr(e)
                result["finished"] = time.monotonic()
                self.results.append(result)

    def __enter__(self) -> "StreamingLoad":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(300)

    def ok_since(self, t: float) -> list[dict]:
        return [x for x in self.results if x["ok"] and x["started"] > t]

    def failures(self) -> list[dict]:
        return [x for x in self.results if not x["ok"]]

    def switch(self, admin: httpx.Client, path: str, version: str, timeout: float = 180) -> None:
        """POST the admin `path` (a promotion or rollback) that moves the alias to `version`, check the
        very next request gets it, then wait until a streamed answer sent after the switch has finished."""
        asked = time.monotonic()
        r = admin.post(path)
        assert r.status_code == 200, r.text
        assert r.json()["serving"] == version, r.json()
        switched, name = time.monotonic(), f"policy-{version}"
        self.phases.append((asked, switched, name))
        assert ask(self.url) == name
        wait_for(lambda: self.ok_since(switched), timeout, f"a streamed answer sent after the switch to {version}")

    def served_by_phase(self) -> list[set[str]]:
        """For each switch, the engine models that answered the requests sent after it was answered and
        finished before the next was asked. The gateway resolves the alias somewhere between a request's
        start and its end, so only a request wholly inside a phase must get that phase's version (one
        started just before a switch is asked may reach the gateway after it: either version)."""
        ends = [asked for asked, _, _ in self.phases[1:]] + [float("inf")]
        return [{x["model"] for x in self.results if x["ok"] and switched < x["started"] and x["finished"] < end}
                for (_, switched, _), end in zip(self.phases, ends)]

    def in_flight(self, asked: float, switched: float) -> list[dict]:
        """The answers in flight while a switch ran: sent before it was answered and finished after it was
        asked. (Not only those spanning all of it: a first promotion loads the adapter into vLLM for longer
        than a 12-token answer takes, and one CI run saw none span it.)"""
        return [x for x in self.results if x["ok"] and x["started"] < switched and x["finished"] > asked]

    def in_flight_across_switches(self) -> list[int]:
        """For each switch, how many answers were in flight while it ran (`in_flight`)."""
        return [len(self.in_flight(asked, switched)) for asked, switched, _ in self.phases]


@pytest.fixture
def fake_gateway(tmp_path):
    """An open-mode in-process gateway with the fake engine (fresh per test)."""
    gw = InProcessGateway(tmp_path / "gw").start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def fake_keyed_gateway(tmp_path_factory):
    """Keys required: alice and bob (users), ops (admin); `.headers(name)` gives the bearer header."""
    gw = InProcessGateway(tmp_path_factory.mktemp("fake-keyed"),
                          keys={"alice": False, "bob": False, "ops": True}).start()
    yield gw
    gw.stop()


def openai_client(gateway):
    """The `openai` SDK pointed at a gateway in open mode (no retries: a failure shows at once)."""
    import openai

    return openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused-in-open-mode", max_retries=0)


def stored_completion(gateway, completion_id: str):
    """The completions row a gateway stored under `completion_id` (None if none)."""
    import contextlib

    with contextlib.closing(gateway.db()) as db:
        return db.execute("SELECT * FROM completions WHERE id = ?", [completion_id]).fetchone()
