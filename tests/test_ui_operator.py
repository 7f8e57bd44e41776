"""The browser UI's Operator tab in real headless Chromium: the serving version, the retrain
cycles table, the plots, and actions that ask for confirmation first.

It runs against its own `loopchat up` (sharing vllm_gateway's vLLM server, no worker), so the
cycles it seeds and queues touch no other test."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from conftest import Server, free_port

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).parent / "artifacts"
FINISHED_CYCLES = [  # (rm_accuracy, mean_reward, kl)
    (0.61, 0.12, 0.02),
    (0.68, 0.31, 0.05),
]


@pytest.fixture(scope="module")
def operator_gateway(vllm_gateway, model_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("operator-gw")
    port = free_port()
    server = Server(["up", "--engine-url", vllm_gateway.engine_url, "--no-worker", "--port", str(port),
                     "--data-dir", str(data), "--model", str(model_dir)], data, port)
    yield server.start()
    server.stop()


def seed_finished_cycles(server) -> None:
    now = time.time()
    with server.db() as db:
        for i, (acc, reward, kl) in enumerate(FINISHED_CYCLES):
            start = now - 3600 * (len(FINISHED_CYCLES) - i)
            db.execute("INSERT INTO cycles (state, trigger, created_at, started_at, finished_at, duration_s, n_sft, "
                       "n_pairs, n_prompts, rm_accuracy, mean_reward, kl, gate) VALUES "
                       "('rejected', 'scheduled', ?, ?, ?, 600, 8, 16, 32, ?, ?, ?, 'fail')",
                       [start, start, start + 600, acc, reward, kl])


def rate_one_answer(server) -> None:
    """One thumb through the API, so the feedback-per-day plot has a bar."""
    headers = {"X-Loopchat-User": "operator-test"}
    chat = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=120,
                      json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}).json()
    httpx.post(server.url + "/v1/feedback", headers=headers, json={"completion_id": chat["id"], "rating": 1},
               timeout=30).raise_for_status()


def confirm(page, button: str, question: str) -> None:
    page.locator(f"#{button}").click()
    expect(page.locator("#confirm-row")).to_contain_text(question)
    page.locator("#confirm").click()
    expect(page.locator("#confirm-row")).to_be_hidden()


def test_operator_tab_shows_cycles_plots_and_confirms_actions(operator_gateway, open_page):
    seed_finished_cycles(operator_gateway)
    rate_one_answer(operator_gateway)
    page = open_page(operator_gateway.url + "/")  # `/` redirects to the UI
    expect(page.locator("#banner strong")).to_contain_text("web-")
    page.get_by_role("tab", name="Operator").click()

    expect(page.locator("#serving")).to_contain_text("Serving: the base model")
    cycles = page.locator("#cycles")
    for column in ("state", "rm_accuracy", "mean_reward", "kl", "gate", "version"):
        expect(cycles.get_by_role("columnheader", name=column, exact=True)).to_be_visible()
    expect(cycles.get_by_role("row")).to_have_count(1 + len(FINISHED_CYCLES))
    expect(cycles).to_contain_text("0.68")
    for plot in ("metrics-plot", "feedback-plot"):
        expect(page.locator(f"#{plot} canvas, #{plot} svg").first).to_be_visible()

    # an action asks first; Cancel does nothing
    page.locator("#rollback").click()
    expect(page.locator("#confirm-row")).to_contain_text("Roll back to the previously served version?")
    page.locator("#cancel").click()
    expect(page.locator("#confirm-row")).to_be_hidden()

    # confirmed, the gateway's answer is shown: nothing to roll back yet; a cycle is queued
    confirm(page, "rollback", "Roll back")
    expect(page.locator("#operator-status")).to_contain_text("nothing to roll back")
    confirm(page, "run-cycle", "Run a retrain cycle now?")
    expect(page.locator("#operator-status")).to_contain_text("A retrain cycle was started.")
    expect(cycles.get_by_role("row")).to_have_count(2 + len(FINISHED_CYCLES))
    expect(cycles).to_contain_text("queued")
    page.screenshot(path=ARTIFACTS / "ui-operator.png", full_page=True)
