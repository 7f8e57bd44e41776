"""The Compare tab: one prompt, two anonymous answers side by side, a vote, then the reveal of
which version wrote each."""

from __future__ import annotations

import gradio as gr

from ui.client import Gateway, GatewayError

VOTES = {"A is better": "a", "B is better": "b", "Tie": "tie", "Both are bad": "both_bad"}


def vote_buttons(enabled: bool) -> list:
    return [gr.update(interactive=enabled)] * len(VOTES)


def error_text(e: GatewayError) -> str:
    return "Comparisons are not available on this gateway yet." if e.not_available else e.message


async def ask(gw: Gateway, prompt: str, max_tokens: int):
    """Returns: comparison id, answer A, answer B, status, the four vote buttons."""
    if not prompt.strip():
        return None, "", "", "Write a prompt first.", *vote_buttons(False)
    try:
        cmp = await gw.compare([{"role": "user", "content": prompt}], int(max_tokens))
    except GatewayError as e:
        return None, "", "", error_text(e), *vote_buttons(False)
    a, b = (c["content"] for c in cmp["candidates"])
    return cmp["id"], a, b, "Which answer is better?", *vote_buttons(True)


def voter(label: str, choice: str):
    async def vote(gw: Gateway, comparison_id: str | None):
        """Returns: who wrote A, who wrote B, the next button, status, the four vote buttons."""
        try:
            result = await gw.vote(comparison_id, choice)
        except GatewayError as e:
            return gr.skip(), gr.skip(), gr.skip(), error_text(e), *vote_buttons(True)
        a, b = (f"Written by **{c.get('model') or 'unknown'}**" for c in result["candidates"])
        return a, b, gr.update(visible=True), f"Thanks, your vote ({label}) was saved.", *vote_buttons(False)
    return vote


def build(auth: gr.State) -> None:
    comparison = gr.State(None)
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", placeholder="Ask something; two versions will answer it.", scale=5,
                            elem_id="compare-prompt")
        with gr.Column(scale=1, min_width=180):
            get = gr.Button("Get two answers", variant="primary", elem_id="compare-ask")
            max_tokens = gr.Slider(16, 1024, value=256, step=16, label="Max tokens", elem_id="compare-max-tokens")
    with gr.Row(equal_height=True):
        with gr.Column():
            gr.Markdown("### Answer A")
            answer_a = gr.Markdown(container=True, min_height=120, elem_id="answer-a")
            author_a = gr.Markdown(elem_id="author-a")
        with gr.Column():
            gr.Markdown("### Answer B")
            answer_b = gr.Markdown(container=True, min_height=120, elem_id="answer-b")
            author_b = gr.Markdown(elem_id="author-b")
    with gr.Row():
        buttons = [gr.Button(label, interactive=False) for label in VOTES]
    status = gr.Markdown(elem_id="compare-status")
    next_prompt = gr.Button("Next prompt", visible=False, elem_id="compare-next")

    get.click(ask, [auth, prompt, max_tokens], [comparison, answer_a, answer_b, status, *buttons])
    for button, (label, choice) in zip(buttons, VOTES.items()):
        button.click(voter(label, choice), [auth, comparison], [author_a, author_b, next_prompt, status, *buttons])
    next_prompt.click(lambda: (None, "", "", "", "", "", gr.update(visible=False), ""),
                      None, [comparison, prompt, answer_a, answer_b, author_a, author_b, next_prompt, status],
                      queue=False)
