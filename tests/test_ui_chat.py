"""The browser UI's Chat tab in real headless Chromium against a real gateway and model:
streamed answers, thumbs with reasons, corrections, history with its feedback restored,
two sessions at once, and signing in when the gateway needs keys."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from conftest import LOOPCHAT, ROOT, free_port, wait_for

pytestmark = pytest.mark.slow
ARTIFACTS = Path(__file__).parent / "artifacts"
ANSWER_TIMEOUT = 120_000


def set_slider(page, elem_id: str, value: float) -> None:
    """Sets a slider in the Chat tab's Settings (opening them first)."""
    if not page.locator(f"#{elem_id}").is_visible():
        page.get_by_text("Settings", exact=True).click()
    box, slider = page.locator(f"#{elem_id} input[type=number]"), page.locator(f"#{elem_id} input[type=range]")
    for _ in range(3):  # on a loaded machine an input typed while the page still settles can be dropped
        box.fill(str(value))
        box.press("Tab")
        try:
            expect(slider).to_have_value(str(value), timeout=3000)
            return
        except AssertionError:
            pass
    expect(slider).to_have_value(str(value))


def send(page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#message textarea").press("Enter")


def wait_answered(page, title: str) -> None:
    """An answer is finished once its conversation is saved to the History list."""
    page.locator("#history label", has_text=title).wait_for(timeout=ANSWER_TIMEOUT)


def user_of(page) -> str:
    page.wait_for_selector("#banner strong")
    return page.inner_text("#banner strong")


def completions(server, user: str) -> list:
    with server.db() as db:
        return db.execute("SELECT * FROM completions WHERE user = ? ORDER BY created_at", [user]).fetchall()


def feedback_row(server, completion_id: str):
    with server.db() as db:
        return db.execute("SELECT f.*, c.content AS correction FROM feedback f LEFT JOIN corrections c "
                          "ON c.feedback_id = f.id WHERE f.completion_id = ?", [completion_id]).fetchone()


def watch_streaming(page) -> None:
    """Records every distinct text the last answer shows while it streams in (window.__seen)."""
    page.evaluate("""() => {
        window.__seen = new Set();
        new MutationObserver(() => {
            const bots = document.querySelectorAll('#chatbot .bot .message-content');
            if (bots.length) window.__seen.add(bots[bots.length - 1].innerText);
        }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
    }""")


def finished_after(page, action) -> None:
    """Runs `action` (a click that starts an answer chain) and waits until the chain has finished: Regenerate
    goes disabled, then enabled again once the conversation is saved. A MutationObserver watches it, so a
    short chain that starts and ends between two of Playwright's polls is not missed."""
    page.evaluate("""() => {
        const button = document.querySelector('#regenerate');
        if (window.__idleWatch) window.__idleWatch.disconnect();
        window.__finished = 0;
        let busy = button.disabled;
        window.__idleWatch = new MutationObserver(() => {
            if (button.disabled) busy = true;
            else if (busy) { busy = false; window.__finished += 1; }
        });
        window.__idleWatch.observe(button, {attributes: true, attributeFilter: ['disabled']});
    }""")
    action()
    page.wait_for_function("window.__finished > 0", timeout=ANSWER_TIMEOUT)


def answer_buttons(page):
    """The buttons under the last answer (copy, edit, thumbs)."""
    return page.locator("#chatbot .message-buttons-left").last


def rate(page, label: str) -> None:
    answer_buttons(page).get_by_role("button", name=label, exact=True).click()
    expect(page.locator("#chat-status")).to_contain_text("rating was saved")


def test_chat_streams_rates_corrects_and_restores_history(vllm_gateway, open_page):
    page = open_page(vllm_gateway.url + "/ui/")
    user = user_of(page)
    assert user.startswith("web-")
    set_slider(page, "max-tokens", 32)

    # a streamed answer, stored under this browser's own identity
    watch_streaming(page)
    send(page, "Name three colors.")
    wait_answered(page, "Name three colors.")
    assert page.locator("#chatbot .bot .message-content").last.inner_text().strip()
    assert page.evaluate("window.__seen.size") >= 3, "the answer did not arrive as a stream"
    [first] = completions(vllm_gateway, user)
    assert first["status"] == "complete" and "Name three colors." in first["messages"]

    # Regenerate replaces the answer with a new completion
    finished_after(page, page.locator("#regenerate").click)
    expect(page.locator("#chatbot .bot")).to_have_count(1)
    first, second = completions(vllm_gateway, user)
    assert second["messages"] == first["messages"]

    # thumbs up, then down with a reason and a comment (re-posting replaces)
    rate(page, "Like")
    assert feedback_row(vllm_gateway, second["id"])["rating"] == 1
    rate(page, "Dislike")
    page.locator("#reason label", has_text="too long").click()
    page.locator("#comment textarea").fill("it rambles")
    page.locator("#send-feedback").click()
    expect(page.locator("#chat-status")).to_contain_text("comments were saved")
    row = feedback_row(vllm_gateway, second["id"])
    assert (row["rating"], row["reason"], row["comment"]) == (-1, "too long", "it rambles")

    # Edit: the user writes the better answer, stored as a correction
    answer_buttons(page).get_by_role("button", name="Edit", exact=True).click()
    page.locator("#chatbot textarea").fill("Red, green and blue.")
    # the edit is stored, then the conversation with it is saved to History: wait for both before New chat
    finished_after(page, page.locator("#chatbot").get_by_role("button", name="Submit").click)
    expect(page.locator("#chat-status")).to_contain_text("better answer was saved")
    row = feedback_row(vllm_gateway, second["id"])
    assert (row["rating"], row["reason"], row["correction"]) == (-1, "too long", "Red, green and blue.")
    page.screenshot(path=ARTIFACTS / "ui-chat.png", full_page=True)

    # history survives a reload of the page, and the thumb given earlier is shown again
    page.locator("#new-chat").click()
    expect(page.locator("#chatbot .bot")).to_have_count(0)
    page.reload()
    assert user_of(page) == user
    page.locator("#history label", has_text="Name three colors.").click()
    expect(page.locator("#chatbot .bot-row").last).to_contain_text("Red, green and blue.")
    expect(answer_buttons(page).get_by_role("button", name="Disliked")).to_be_visible()
    page.screenshot(path=ARTIFACTS / "ui-chat-history.png", full_page=True)


def test_two_sessions_chat_at_once(vllm_gateway, open_page):
    """While one browser's long answer streams, another browser asks and gets its answer."""
    long, short = open_page(vllm_gateway.url + "/ui/"), open_page(vllm_gateway.url + "/ui/")
    long_user, short_user = user_of(long), user_of(short)
    assert long_user != short_user
    # At temperature 2 the model all but never ends an answer, on any CPU kind and dtype, so this one runs to
    # the slider's 1024-token limit (~23 s on vLLM alone): long enough that the other browser's question
    # reaches the gateway first even on a starved machine (one CI run took 10 s to send it).
    set_slider(long, "max-tokens", 1024)
    set_slider(long, "temperature", 2)
    set_slider(short, "max-tokens", 32)
    short.locator("#message textarea").fill("Hi")

    send(long, "Write a long story about a dragon.")
    expect(long.locator("#chatbot .bot .message-content")).to_have_text(re.compile(r"\S"), timeout=ANSWER_TIMEOUT)
    short.locator("#message textarea").press("Enter")
    wait_answered(short, "Hi")
    wait_answered(long, "Write a long story about a dragon.")

    [a], [b] = completions(vllm_gateway, long_user), completions(vllm_gateway, short_user)
    started = {name: c["created_at"] - c["latency_ms"] / 1000 for name, c in (("long", a), ("short", b))}
    assert started["long"] < started["short"] and b["created_at"] < a["created_at"], started


@pytest.fixture
def standalone_ui(keyed_gateway, tmp_path):
    """`loopchat ui` on its own in front of the gateway that requires keys."""
    port = free_port()
    log = open(tmp_path / "ui.log", "wb")
    proc = subprocess.Popen(LOOPCHAT + ["ui", "--gateway", keyed_gateway.url, "--port", str(port)], cwd=ROOT,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "ui.log").read_text()
        return httpx.get(url, timeout=2).status_code == 200

    wait_for(up, 60, "loopchat ui to start", interval=0.5)
    yield url
    proc.terminate()
    proc.wait(30)


def test_sign_in_with_an_api_key_when_the_gateway_requires_one(keyed_gateway, standalone_ui, open_page):
    before = len(completions(keyed_gateway, "alice"))  # other tests use alice's key too
    page = open_page(standalone_ui)
    key = page.locator("#api-key input")
    key.fill("lc-not-a-key")
    page.screenshot(path=ARTIFACTS / "ui-login.png")
    page.locator("#sign-in").click()
    expect(page.locator("#login-message")).to_contain_text("not accepted")
    expect(page.locator("#chatbot")).to_be_hidden()

    key.fill(keyed_gateway.keys["alice"])
    page.locator("#sign-in").click()
    expect(page.locator("#banner")).to_contain_text("Signed in")
    set_slider(page, "max-tokens", 32)
    send(page, "Hi")
    wait_answered(page, "Hi")
    assert len(completions(keyed_gateway, "alice")) == before + 1

    page.get_by_role("tab", name="Operator").click()
    expect(page.locator("#serving")).to_contain_text("needs an admin key")
