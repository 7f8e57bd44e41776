"""Operator actions that ask first: each panel of the Operator tab has a question row (Confirm /
Cancel) under its buttons and a line that says how the action went, in the gateway's own words."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

import gradio as gr

from ui.client import Gateway, GatewayError


@dataclass(frozen=True)
class Action:
    question: Callable[..., str]  # the values of the action's inputs -> the question (markdown)
    run: Callable[..., Awaitable]  # (gateway, *values) -> the API call
    done: Callable[..., str]  # the values -> what happened
    check: Callable[..., str | None] = lambda *values: None  # the values -> what is missing, if anything


def api_message(e: GatewayError) -> str:
    """The gateway's message, or what a missing route or a non-admin caller means here."""
    if e.status == 403:
        return "needs an admin key"
    return "not available on this gateway yet" if e.not_available else e.message


class Confirmation:
    """Built where the question row should appear; `asks` wires a button to an action, `then`
    makes Confirm run it and refresh the tab."""

    def __init__(self, prefix: str, status_id: str):
        self.actions: dict[str, Action] = {}
        self.pending = gr.State(None)  # (action name, input values) while the question is shown
        with gr.Row(visible=False, elem_id=f"{prefix}confirm-row") as self.row:
            self.question = gr.Markdown()
            self.confirm = gr.Button("Confirm", variant="stop", scale=0, min_width=100, elem_id=f"{prefix}confirm")
            cancel = gr.Button("Cancel", scale=0, min_width=100, elem_id=f"{prefix}cancel")
        self.status = gr.Markdown(elem_id=status_id)
        cancel.click(lambda: (None, gr.update(visible=False)), None, [self.pending, self.row], queue=False)

    def asks(self, button: gr.Button, name: str, action: Action, inputs: tuple = ()) -> None:
        """Clicking `button` shows `action`'s question for the current values of `inputs`."""
        self.actions[name] = action

        def ask(*values):
            missing = action.check(*values)
            if missing:
                return None, gr.update(visible=False), "", missing
            return (name, values), gr.update(visible=True), action.question(*values), ""

        button.click(ask, list(inputs), [self.pending, self.row, self.question, self.status], queue=False)

    def then(self, auth: gr.State, refresh, refresh_inputs: list, outputs: list) -> None:
        """Confirm runs the pending action with the session's gateway, says how it went, then refreshes."""
        async def run(gw: Gateway, pending):
            if pending is None:
                return None, gr.update(visible=False), ""
            name, values = pending
            action = self.actions[name]
            try:
                await action.run(gw, *values)
            except GatewayError as e:
                return None, gr.update(visible=False), f"That did not work: {api_message(e).rstrip('.')}."
            return None, gr.update(visible=False), action.done(*values)

        ran = self.confirm.click(run, [auth, self.pending], [self.pending, self.row, self.status])
        # always_last: an action confirmed while the previous one's refresh still draws its plots must
        # refresh too (Gradio's default, once, drops a trigger that comes while the event is pending)
        ran.then(refresh, refresh_inputs, outputs, trigger_mode="always_last")
