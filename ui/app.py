"""The browser UI: a Gradio app that is only a client of the gateway's HTTP API.

Each browser gets its own identity: in open mode a `web-…` name kept in localStorage and sent
as `X-Loopchat-User`; when the gateway requires keys, the API key the user signs in with."""

from __future__ import annotations

import secrets

import gradio as gr

from ui import chat_tab, compare_tab, operator_tab
from ui.client import Gateway, GatewayError

CONCURRENCY = 32  # sessions answered at once; handlers are async and mostly wait on the gateway


def build_app(gateway_url: str, api_key: str | None = None) -> gr.Blocks:
    gateway_url = gateway_url.rstrip("/")

    async def start(browser: dict):
        """Returns: session gateway, browser state, login box, tabs, banner."""
        browser = {**browser, "user": browser.get("user") or f"web-{secrets.token_hex(4)}"}
        gw = Gateway(gateway_url, user=browser["user"], api_key=api_key)
        try:
            await gw.models()
        except GatewayError as e:
            if e.needs_key:
                return None, browser, gr.update(visible=True), gr.update(visible=False), ""
            return gw, browser, gr.update(visible=False), gr.update(visible=True), f"⚠️ {e.message}"
        who = "with the configured API key" if api_key else f"as **{gw.user}** (open mode)"
        return gw, browser, gr.update(visible=False), gr.update(visible=True), f"Chatting {who}."

    async def sign_in(key: str):
        """Returns: session gateway, login box, tabs, banner, login message."""
        gw = Gateway(gateway_url, api_key=key.strip())
        try:
            await gw.models()
        except GatewayError as e:
            message = "That key was not accepted." if e.needs_key else e.message
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), message
        return gw, gr.update(visible=False), gr.update(visible=True), "Signed in with your API key.", ""

    with gr.Blocks(title="loopchat") as app:
        # A stable secret, so identities and histories survive a restart. Nothing here needs hiding from the
        # browser: in open mode any caller may name itself, and API keys are never stored there.
        browser = gr.BrowserState({"user": None, "conversations": []}, storage_key="loopchat",
                                  secret="loopchat-browser-state")
        auth = gr.State(None)
        banner = gr.Markdown(elem_id="banner")
        with gr.Column(visible=False, elem_id="login") as login:
            gr.Markdown("## Sign in\nThis loopchat needs an API key (ask its operator for one).")
            key = gr.Textbox(label="API key", type="password", elem_id="api-key")
            sign_in_button = gr.Button("Sign in", variant="primary", elem_id="sign-in")
            login_message = gr.Markdown(elem_id="login-message")
        with gr.Tabs(visible=False, elem_id="tabs") as tabs:
            with gr.Tab("Chat", elem_id="chat-tab"):
                chat_tab.build(auth, browser)
            with gr.Tab("Compare", elem_id="compare-tab"):
                compare_tab.build(auth)
            with gr.Tab("Operator", elem_id="operator-tab") as operator:
                refresh, inputs, outputs = operator_tab.build(auth)
        operator.select(refresh, inputs, outputs)
        app.load(start, browser, [auth, browser, login, tabs, banner])
        for event in (sign_in_button.click, key.submit):
            event(sign_in, key, [auth, login, tabs, banner, login_message])
    return app.queue(default_concurrency_limit=CONCURRENCY)
