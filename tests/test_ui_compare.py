"""The browser UI's Compare tab in real headless Chromium against a real gateway and model:
two anonymous answers, a vote stored in SQLite, then the reveal of who wrote each."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).parent / "artifacts"


def test_compare_two_answers_vote_and_reveal(vllm_gateway, open_page):
    page = open_page(vllm_gateway.url + "/ui/")
    expect(page.locator("#banner strong")).to_contain_text("web-")
    user = page.inner_text("#banner strong")
    page.get_by_role("tab", name="Compare").click()
    box = page.locator("#compare-max-tokens input[type=number]")
    box.fill("32")
    box.press("Tab")

    page.locator("#compare-prompt textarea").fill("Give me a tip for learning to cook.")
    page.locator("#compare-ask").click()
    expect(page.locator("#compare-status")).to_contain_text("Which answer is better?", timeout=120_000)
    for side in ("a", "b"):
        expect(page.locator(f"#answer-{side}")).to_have_text(re.compile(r"\S"))
        expect(page.locator(f"#author-{side}")).to_have_text("")  # anonymous until the vote

    page.get_by_role("button", name="A is better").click()
    expect(page.locator("#compare-status")).to_contain_text("was saved")
    with vllm_gateway.db() as db:
        cmp = db.execute("SELECT c.*, v.choice FROM comparisons c JOIN votes v ON v.comparison_id = c.id "
                         "WHERE c.user = ?", [user]).fetchone()
        models = {row["id"]: row["served_by"] for row in db.execute(
            "SELECT id, served_by FROM completions WHERE id IN (?, ?)", [cmp["a_id"], cmp["b_id"]])}
    assert cmp["choice"] == "a"
    expect(page.locator("#author-a")).to_contain_text(f"Written by {models[cmp['a_id']]}")
    expect(page.locator("#author-b")).to_contain_text(f"Written by {models[cmp['b_id']]}")
    expect(page.get_by_role("button", name="B is better")).to_be_disabled()
    page.screenshot(path=ARTIFACTS / "ui-compare.png", full_page=True)

    page.locator("#compare-next").click()
    expect(page.locator("#compare-prompt textarea")).to_have_value("")
    expect(page.locator("#answer-a")).to_have_text("")
    expect(page.locator("#compare-next")).to_be_hidden()
