"""The browser UI's Compare tab in real headless Chromium against a real gateway and model: four
anonymous answers ranked (partly with the keyboard), the ranking stored in SQLite and turned into
its C(4,2) training pairs, the reveal of who wrote each; then two answers and a quick "A is best"."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from feedback import Store
from feedback.datasets import build_pairs

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).parent / "artifacts"


def ask(page, size: str, prompt: str, status: str) -> None:
    page.locator("#compare-n").get_by_label(size, exact=True).check()
    page.locator("#compare-prompt textarea").fill(prompt)
    page.locator("#compare-ask").click()
    expect(page.locator("#compare-status")).to_contain_text(status, timeout=180_000)


def stored(gateway, user: str) -> list[dict]:
    """The user's voted comparisons, newest last, each with its candidates in the order shown."""
    with contextlib.closing(gateway.db()) as db:
        rows = db.execute("SELECT p.id, v.choice, v.ranking FROM comparisons p JOIN votes v ON v.comparison_id = p.id "
                          "WHERE p.user = ? ORDER BY p.created_at", [user]).fetchall()
        return [{**dict(row), "candidates": [dict(c) for c in db.execute(
            "SELECT k.label, k.origin, c.served_by FROM candidates k JOIN completions c ON c.id = k.completion_id "
            "WHERE k.comparison_id = ? ORDER BY k.position", [row["id"]])]} for row in rows]


def test_compare_rank_four_answers_then_pick_the_best_of_two(vllm_gateway, open_page):
    page = open_page(vllm_gateway.url + "/ui/")
    expect(page.locator("#banner strong")).to_contain_text("web-")
    user = page.inner_text("#banner strong")
    page.get_by_role("tab", name="Compare").click()
    box = page.locator("#compare-max-tokens input[type=number]")
    box.fill("32")
    box.press("Tab")

    ask(page, "4", "Give me a tip for learning to cook.", "rank them")
    for x in "abcd":
        expect(page.locator(f"#answer-{x}")).to_have_text(re.compile(r"\S"))
        expect(page.locator(f"#author-{x}")).to_have_text("")  # anonymous until the vote
    for x, rank in (("a", "3"), ("b", "1")):  # the mouse
        page.locator(f"#rank-{x}").get_by_label(rank, exact=True).click()
    for x, rank in (("c", "4"), ("d", "2")):  # the keyboard: focus a rank, Space picks it
        page.locator(f"#rank-{x}").get_by_label(rank, exact=True).focus()
        page.keyboard.press("Space")
    page.locator("#compare-rank").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#compare-status")).to_contain_text("your vote (B > D > A > C) was saved")

    [ranked] = stored(vllm_gateway, user)
    assert (ranked["choice"], json.loads(ranked["ranking"])) == ("b", [["b"], ["d"], ["a"], ["c"]])
    for c in ranked["candidates"]:
        expect(page.locator(f"#author-{c['label']}")).to_contain_text(f"Written by {c['served_by']} ({c['origin']})")
    pairs = [p for p in build_pairs(Store(vllm_gateway.db_path)) if p["meta"].get("group") == ranked["id"]]
    assert len(pairs) == 6  # C(4,2): sampled answers differ
    assert sorted(p["meta"]["rank_gap"] for p in pairs) == [1, 1, 1, 2, 2, 3]
    expect(page.locator("#compare-a")).to_be_disabled()
    page.screenshot(path=ARTIFACTS / "ui-compare-ranking.png", full_page=True)

    page.locator("#compare-next").click()
    expect(page.locator("#compare-prompt textarea")).to_have_value("")
    expect(page.locator("#answer-a")).to_have_text("")
    expect(page.locator("#compare-next")).to_be_hidden()

    ask(page, "2", "Name a vegetable.", "Which answer is better?")
    expect(page.locator("#answer-c")).to_be_hidden()
    expect(page.locator("#compare-c")).to_be_hidden()
    page.locator("#compare-a").click()
    expect(page.locator("#compare-status")).to_contain_text("your vote (A is best) was saved")
    picked = stored(vllm_gateway, user)[-1]
    assert (picked["choice"], json.loads(picked["ranking"])) == ("a", [["a"], ["b"]])
    for c in picked["candidates"]:
        expect(page.locator(f"#author-{c['label']}")).to_contain_text(f"Written by {c['served_by']}")
    expect(page.locator("#compare-b")).to_be_disabled()
    page.screenshot(path=ARTIFACTS / "ui-compare.png", full_page=True)
