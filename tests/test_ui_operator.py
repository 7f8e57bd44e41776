"""The browser UI's Operator tab in real headless Chromium: the serving version, the retrain
cycles table with its learning figures, the plots, actions that ask for confirmation first, and a
canary started, watched and rolled back from the canary panel. (What each plot draws is
tests/test_ui_dashboard.py's, on given JSON.)

It runs against its own `loopchat up` (sharing vllm_gateway's vLLM server, no worker), so the
cycles it seeds and queues touch no other test."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from conftest import Server, free_port
from loop_fixtures import publish, random_adapter

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).parent / "artifacts"
FINISHED_CYCLES = [  # (rm_accuracy, mean_reward, kl): rows as older gateways wrote them, KL to the base only
    (0.61, 0.12, 0.02),
    (0.68, 0.31, 0.05),
]
# A row with the newer figures: the RM's held-out accuracy with its interval, KL to serving and to base, the
# capability guard, a recipe
LEARNING_STEPS = {"reward_model": {"accuracy": 0.74, "accuracy_ci95": [0.58, 0.86], "steps": 12},
                  "evaluating": {"kl": 0.07, "kl_base": 0.19, "held_out_prompts": 16, "capability_pass": 0.75,
                                 "capability_pass_baseline": 0.8, "capability_loglik": -1.5,
                                 "capability_loglik_baseline": -1.45}}


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
            start = now - 3600 * (len(FINISHED_CYCLES) + 1 - i)
            db.execute("INSERT INTO cycles (state, trigger, created_at, started_at, finished_at, duration_s, n_sft, "
                       "n_pairs, n_prompts, rm_accuracy, mean_reward, kl, gate) VALUES "
                       "('rejected', 'scheduled', ?, ?, ?, 600, 8, 16, 32, ?, ?, ?, 'fail')",
                       [start, start, start + 600, acc, reward, kl])
        start = now - 3600
        db.execute("INSERT INTO cycles (state, trigger, created_at, started_at, finished_at, duration_s, n_sft, "
                   "n_pairs, n_prompts, rm_accuracy, mean_reward, kl, gate, steps, recipe) VALUES "
                   "('rejected', 'scheduled', ?, ?, ?, 600, 8, 16, 32, 0.74, 0.2, 0.07, 'fail', ?, 'sft_only')",
                   [start, start, start + 600, json.dumps(LEARNING_STEPS)])


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
    for column in ("state", "recipe", "rm_accuracy", "rm_accuracy_ci95", "mean_reward", "kl", "kl_base", "capability",
                   "gate", "version"):
        expect(cycles.get_by_role("columnheader", name=column, exact=True)).to_be_visible()
    seeded = len(FINISHED_CYCLES) + 1
    expect(cycles.get_by_role("row")).to_have_count(1 + seeded)
    newest = cycles.get_by_role("row").nth(1)
    for text in ("sft_only", "0.74", "[0.58, 0.86]", "0.07", "0.19", "pass 0.75 (was 0.80), loglik -1.50 (was -1.45)"):
        expect(newest).to_contain_text(text)
    expect(cycles.get_by_role("row").nth(2)).to_contain_text("default")  # an older row: the default recipe
    expect(cycles).to_contain_text("0.68")
    for plot in ("winrate-plot", "rm-accuracy-plot", "kl-plot", "capability-plot"):  # matplotlib figures, as images
        expect(page.locator(f"#{plot} img")).to_have_attribute("src", re.compile(r"^data:image/png"))
    expect(page.locator("#feedback-plot")).to_contain_text("thumbs_up")  # the bar's kind, in the chart's legend

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
    expect(cycles.get_by_role("row")).to_have_count(2 + seeded)
    expect(cycles).to_contain_text("queued")
    page.screenshot(path=ARTIFACTS / "ui-operator.png", full_page=True)


def publish_unclaimed(server, engine_url: str, src: Path, model_dir: Path, count: int) -> list[str]:
    """Publish the adapter folder `src` `count` times into `server`'s data dir, under versions whose engine
    names no other gateway sharing the vLLM server has loaded (vLLM keeps one adapter per name, and
    another test's `policy-v1` may still be there)."""
    loaded = {m["id"] for m in httpx.get(engine_url + "/v1/models", timeout=30).json()["data"]}
    versions = []
    while len(versions) < count:
        version = publish(server.db_path, src, base_model=str(model_dir))
        if f"policy-{version}" not in loaded:
            versions.append(version)
    return versions


def test_operator_starts_a_canary_watches_it_and_rolls_it_back(operator_gateway, vllm_gateway, model_dir, tmp_path,
                                                                 open_page):
    src = random_adapter(model_dir, tmp_path / "src", seed=41)
    version, other = publish_unclaimed(operator_gateway, vllm_gateway.engine_url, src, model_dir, 2)
    page = open_page(operator_gateway.url + "/ui/")
    page.get_by_role("tab", name="Operator").click()
    summary, status = page.locator("#canary-summary"), page.locator("#canary-status")
    expect(summary).to_contain_text("none running")
    expect(page.locator("#canary-plot")).to_be_hidden()
    expect(page.locator("#canary-rollback")).to_be_disabled()

    # start one for 20% of users: asked first, then the panel shows it with its live evidence and the rule's state
    start_canary(page, version, "0.2")
    expect(page.locator("#canary-confirm-row")).to_contain_text(f"Start a canary: {version} answers 20% of users")
    page.locator("#canary-confirm").click()
    expect(status).to_contain_text(f"Canary {version} started for 20% of users.")
    expect(summary).to_contain_text(f"{version} answers 20% of users")
    expect(summary).to_contain_text("Rule: waiting for evidence")
    expect(page.locator("#canary-plot img")).to_have_attribute("src", re.compile(r"^data:image/png"))
    running = httpx.get(operator_gateway.url + "/admin/canary", timeout=30).json()
    assert running["canary"]["version"] == version and running["canary"]["share"] == pytest.approx(0.2)

    # a second canary is refused: the panel shows the API's own message, and the first one still runs
    start_canary(page, other, "0.3")
    page.locator("#canary-confirm").click()
    expect(status).to_contain_text(f"That did not work: A canary of {version} is running")
    expect(summary).to_contain_text(f"{version} answers 20% of users")

    # roll it back: asked first; the panel then shows it among the ended ones
    page.locator("#canary-rollback").click()
    expect(page.locator("#canary-confirm-row")).to_contain_text("Roll the canary back")
    page.locator("#canary-confirm").click()
    expect(status).to_contain_text("The canary was rolled back.")
    expect(summary).to_contain_text("none running")
    expect(page.locator("#canary-rollback")).to_be_disabled()
    newest = page.locator("#canary-recent").get_by_role("row").nth(1)
    expect(newest).to_contain_text(version)
    expect(newest).to_contain_text("rolled_back")
    ended = httpx.get(operator_gateway.url + "/admin/canary", timeout=30).json()
    assert ended["canary"] is None and ended["recent"][0]["outcome"] == "rolled_back"
    page.screenshot(path=ARTIFACTS / "ui-operator-canary.png", full_page=True)


def start_canary(page, version: str, share: str) -> None:
    page.locator("#canary-version input").click()
    page.get_by_role("option", name=version, exact=True).click()
    box = page.locator("#canary-share input[type=number]")
    box.fill(share)
    box.press("Tab")
    page.locator("#canary-start").click()
