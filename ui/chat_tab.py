"""The Chat tab: streamed answers, thumbs with a reason and a comment, corrections written by
editing an answer (✎), and this browser's past conversations, whose earlier feedback is read
back from the gateway when one is reopened.

Per conversation the tab keeps `conv = {"id", "ids", "marks"}`: `ids` runs beside the chat
messages (the completion id of each assistant message, None for user messages) and `marks`
holds the feedback sent per completion id, re-sent whole since re-posting replaces it."""

from __future__ import annotations

import asyncio
import secrets

import gradio as gr

from ui.client import Gateway, GatewayError

REASONS = ["wrong", "unhelpful", "too long", "unsafe", "off-topic"]
MAX_SAVED_CONVERSATIONS = 50
NO_FEEDBACK_API = "Feedback is not available on this gateway yet."


def text_of(message: dict) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(p.get("text", "") for p in parts if isinstance(p, dict))


def api_messages(history: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": text_of(m)} for m in history]


def new_conversation() -> dict:
    return {"id": secrets.token_hex(6), "ids": [], "marks": {}}


def mark_label(mark: dict | None) -> str | None:
    rating = (mark or {}).get("rating")
    return {1: "Like", -1: "Dislike"}.get(rating)


def chatbot_view(history: list[dict], conv: dict):
    """The chat messages with each assistant message's thumb shown as given."""
    marks = [mark_label(conv["marks"].get(cid)) for m, cid in zip(history, conv["ids"]) if m["role"] == "assistant"]
    return gr.update(value=history, feedback_value=marks)


def feedback_error(e: GatewayError) -> str:
    return NO_FEEDBACK_API if e.not_available else f"Feedback was not saved: {e.message}"


# ---- composing the next answer: prepare the messages, stream, save ----------------------

def add_user_message(text: str, history: list[dict], conv: dict):
    if not text.strip():
        return gr.skip(), gr.skip(), gr.skip()
    history = history + [{"role": "user", "content": text}]
    return history, {**conv, "ids": conv["ids"] + [None]}, ""


def drop_last_answer(history: list[dict], conv: dict):
    """For "Regenerate": remove the trailing answer so the last user message is answered again."""
    n = len(history)
    while n and history[n - 1]["role"] == "assistant":
        n -= 1
    return history[:n], {**conv, "ids": conv["ids"][:n]}


async def answer(gw: Gateway, model: str, max_tokens: int, temperature: float, history: list[dict], conv: dict):
    """Streams an answer to the last user message (does nothing when the last message is an answer)."""
    if not history or history[-1]["role"] != "user":
        yield gr.skip(), gr.skip(), gr.skip()  # a generator that yields nothing would clear its outputs
        return
    ids = conv["ids"] + [None]
    conv, text = {**conv, "ids": ids}, ""
    yield chatbot_view(history + [{"role": "assistant", "content": ""}], conv), conv, ""
    try:
        async for cid, piece in gw.stream_chat(model or "loopchat", api_messages(history), int(max_tokens),
                                               float(temperature)):
            ids[-1], text = cid, text + piece
            yield chatbot_view(history + [{"role": "assistant", "content": text}], conv), conv, gr.skip()
    except GatewayError as e:
        if ids[-1] is None:
            conv = {**conv, "ids": ids[:-1]}
            yield chatbot_view(history, conv), conv, f"The answer failed: {e.message}"
            return
        yield gr.skip(), conv, f"The answer was cut short: {e.message}"


def save_conversation(browser: dict, history: list[dict], conv: dict):
    """Keeps this conversation first in the browser's history (localStorage)."""
    saved = [c for c in browser["conversations"] if c["id"] != conv["id"]]
    if history:
        title = text_of(next((m for m in history if m["role"] == "user"), history[0]))[:48]
        saved.insert(0, {"id": conv["id"], "title": title or "(untitled)", "messages": api_messages(history),
                         "ids": conv["ids"]})
    browser = {**browser, "conversations": saved[:MAX_SAVED_CONVERSATIONS]}
    return browser, history_choices(browser, conv["id"])


def history_choices(browser: dict, current: str | None):
    choices = [(c["title"], c["id"]) for c in browser["conversations"]]
    return gr.update(choices=choices, value=current if any(v == current for _, v in choices) else None)


# ---- feedback -----------------------------------------------------------------------------

async def send_mark(gw: Gateway, conv: dict, cid: str, thanks: str, **changes) -> tuple[dict, str]:
    """Sends the message's whole feedback with `changes` applied; returns the new conv and a status."""
    mark = {**conv["marks"].get(cid, {}), **changes}
    try:
        await gw.send_feedback(cid, mark["rating"], mark.get("reason"), mark.get("comment"), mark.get("correction"))
    except GatewayError as e:
        return conv, feedback_error(e)
    return {**conv, "marks": {**conv["marks"], cid: mark}}, thanks


async def on_like(gw: Gateway, history: list[dict], conv: dict, data: gr.LikeData):
    cid = conv["ids"][data.index] if data.index < len(conv["ids"]) else None
    hidden = gr.update(visible=False)
    if cid is None:
        return gr.skip(), conv, hidden, gr.skip(), gr.skip(), None, "Wait for the answer to finish, then rate it."
    if data.liked not in (True, False):  # the thumb was clicked again to clear it
        return chatbot_view(history, conv), conv, hidden, gr.skip(), gr.skip(), None, \
            "Your earlier rating stays recorded; pick the other thumb to change it."
    conv, status = await send_mark(gw, conv, cid, "Thanks, your rating was saved.", rating=1 if data.liked else -1)
    mark = conv["marks"].get(cid)
    if mark is None:
        return chatbot_view(history, conv), conv, hidden, gr.skip(), gr.skip(), None, status
    return (chatbot_view(history, conv), conv, gr.update(visible=True),
            gr.update(value=mark.get("reason"), visible=mark["rating"] < 0), mark.get("comment") or "", cid, status)


async def send_details(gw: Gateway, conv: dict, selected: str | None, reason: str | None, comment: str):
    """The reason and comment for the answer rated last (`selected`, its completion id)."""
    if selected not in conv["marks"]:
        return conv, "Rate an answer first."
    return await send_mark(gw, conv, selected, "Thanks, your comments were saved.", reason=reason or None,
                           comment=comment.strip() or None)


async def on_edit(gw: Gateway, history: list[dict], conv: dict, data: gr.EditData):
    """An edited answer is the better answer the user wrote (a correction; a thumb down unless
    they liked it); an edited question is asked again from there."""
    if history[data.index]["role"] == "user":
        return history[:data.index + 1], {**conv, "ids": conv["ids"][:data.index + 1]}, ""
    cid = conv["ids"][data.index]
    if cid is None:
        return gr.skip(), conv, "Only a finished answer can be corrected."
    rating = conv["marks"].get(cid, {}).get("rating", -1)
    conv, status = await send_mark(gw, conv, cid, "Thanks, your better answer was saved.", rating=rating,
                                   correction=text_of(history[data.index]))
    return chatbot_view(history, conv), conv, status


# ---- opening a conversation -----------------------------------------------------------------

async def open_conversation(gw: Gateway, browser: dict, conv_id: str | None):
    saved = next((c for c in browser["conversations"] if c["id"] == conv_id), None)
    if saved is None:
        return gr.skip(), gr.skip(), gr.skip()
    conv = {"id": saved["id"], "ids": saved["ids"], "marks": {}}
    cids = [cid for cid in saved["ids"] if cid]
    found = await asyncio.gather(*(gw.feedback_for(cid) for cid in cids), return_exceptions=True)
    errors = [f for f in found if isinstance(f, GatewayError)]
    conv["marks"] = {cid: f for cid, f in zip(cids, found) if isinstance(f, dict)}
    status = feedback_error(errors[0]) if errors else ""
    return chatbot_view(saved["messages"], conv), conv, status


async def on_ready(gw: Gateway | None, browser: dict, current: dict):
    """Once the session has a working identity: the model list and the saved conversations."""
    if gw is None:
        return gr.skip(), gr.skip(), gr.skip()
    try:
        models, status = await gw.models(), ""
    except GatewayError as e:
        models, status = ["loopchat"], f"Could not list the models: {e.message}"
    return gr.update(choices=models, value="loopchat" if "loopchat" in models else models[0]), \
        history_choices(browser, current["id"]), status


def build(auth: gr.State, browser: gr.BrowserState) -> None:
    conv = gr.State(new_conversation)
    selected = gr.State(None)  # the completion id the feedback details are about
    with gr.Row():
        with gr.Column(scale=1, min_width=220):
            new_chat = gr.Button("New chat", variant="primary", elem_id="new-chat")
            history = gr.Radio([], label="History", elem_id="history")
            with gr.Accordion("Settings", open=False):
                model = gr.Dropdown(["loopchat"], value="loopchat", label="Model", elem_id="model")
                max_tokens = gr.Slider(16, 1024, value=256, step=16, label="Max tokens", elem_id="max-tokens")
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", elem_id="temperature")
        with gr.Column(scale=4):
            chatbot = gr.Chatbot(feedback_options=("Like", "Dislike"), editable="all", height=480, elem_id="chatbot",
                                 label="loopchat", placeholder="Ask anything. Rate answers with 👍 / 👎; "
                                 "click ✎ under an answer to write a better one.")
            with gr.Row():
                message = gr.Textbox(placeholder="Message loopchat…", show_label=False, scale=6, elem_id="message",
                                     submit_btn=True)
                regenerate = gr.Button("Regenerate", scale=1, min_width=120, elem_id="regenerate")
            status = gr.Markdown(elem_id="chat-status")
            with gr.Group(visible=False, elem_id="feedback-details") as details:
                gr.Markdown("**Tell us more about that answer**, or click ✎ under it to write a better one.",
                            padding=True)
                reason = gr.Radio(REASONS, label="What was wrong with it?", elem_id="reason")
                comment = gr.Textbox(label="Comment (optional)", lines=2, elem_id="comment")
                send = gr.Button("Send feedback", elem_id="send-feedback")

    def busy(on: bool):  # no new message or regenerate while an answer is being written
        return gr.update(interactive=not on), gr.update(interactive=not on)

    def then_answer(event):
        event.then(lambda: busy(True), None, [message, regenerate], queue=False) \
            .then(answer, [auth, model, max_tokens, temperature, chatbot, conv], [chatbot, conv, status]) \
            .then(save_conversation, [browser, chatbot, conv], [browser, history], show_progress="hidden") \
            .then(lambda: busy(False), None, [message, regenerate], queue=False)

    then_answer(message.submit(add_user_message, [message, chatbot, conv], [chatbot, conv, message], queue=False))
    then_answer(regenerate.click(drop_last_answer, [chatbot, conv], [chatbot, conv], queue=False))
    then_answer(chatbot.edit(on_edit, [auth, chatbot, conv], [chatbot, conv, status]))
    chatbot.like(on_like, [auth, chatbot, conv], [chatbot, conv, details, reason, comment, selected, status])
    send.click(send_details, [auth, conv, selected, reason, comment], [conv, status])

    def start_new():
        return [], new_conversation(), gr.update(value=None), gr.update(visible=False), None, ""

    for event in (new_chat.click, chatbot.clear):
        event(start_new, None, [chatbot, conv, history, details, selected, status], queue=False)
    history.input(open_conversation, [auth, browser, history], [chatbot, conv, status]) \
        .then(lambda: (gr.update(visible=False), None), None, [details, selected], queue=False)
    auth.change(on_ready, [auth, browser, conv], [model, history, status])
