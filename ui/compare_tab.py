"""The Compare tab: one prompt, 2 to 4 anonymous answers side by side, a vote, then the reveal of
which version wrote each.

The vote is either a quick verdict ("A is best", tie, all bad) or a full ranking: each answer gets
a rank (1 = best), answers with the same rank are tied. The rank selectors are radio buttons, so
they work with the mouse and with the keyboard (Tab to a rank, Space to pick it)."""

from __future__ import annotations

import gradio as gr

from ui.client import Gateway, GatewayError

LABELS = "abcd"
SIZES = ("2", "3", "4")
QUICK = [(f"{x.upper()} is best", x) for x in LABELS] + [("Tie", "tie"), ("All are bad", "all_bad")]


def error_text(e: GatewayError) -> str:
    return "Comparisons are not available on this gateway yet." if e.not_available else e.message


def ranking_of(ranks: dict[str, str | None]) -> list[list[str]] | None:
    """Groups of labels, best first, from each label's rank ("1" best; equal ranks tie); None while
    an answer has no rank."""
    if any(r is None for r in ranks.values()):
        return None
    order = sorted({int(r) for r in ranks.values()})
    return [[x for x, r in ranks.items() if int(r) == rank] for rank in order]


def controls(k: int, enabled: bool) -> list:
    """Updates for the quick buttons, the ranking's submit button and the four rank selectors."""
    quick = [gr.update(visible=choice not in LABELS or LABELS.index(choice) < k, interactive=enabled)
             for _, choice in QUICK]
    return [*quick, gr.update(interactive=enabled), *[gr.update(interactive=enabled)] * len(LABELS)]


async def ask(gw: Gateway, prompt: str, max_tokens: int, size: str):
    """Returns: the comparison ({"id", "labels"}), the 4 answers, the 4 answer columns, the 4 authors,
    the status, then `controls`."""
    k = int(size)
    blank = [None, *[""] * 4, *[gr.skip()] * 4, *[""] * 4]
    if not prompt.strip():
        return *blank, "Write a prompt first.", *controls(k, False)
    try:
        cmp = await gw.compare([{"role": "user", "content": prompt}], int(max_tokens), k)
    except GatewayError as e:
        return *blank, error_text(e), *controls(k, False)
    labels = [c["label"] for c in cmp["candidates"]]
    texts = [c["content"] for c in cmp["candidates"]] + [""] * (len(LABELS) - k)
    columns = [gr.update(visible=i < k) for i in range(len(LABELS))]
    rank_choices = [str(r) for r in range(1, k + 1)]
    hint = "Which answer is better?" if k == 2 else "Which answer is best? Or rank them all (1 = best)."
    ranks = [gr.update(choices=rank_choices, value=None, interactive=True) for _ in LABELS]
    return ({"id": cmp["id"], "labels": labels}, *texts, *columns, *[""] * 4, hint,
            *controls(k, True)[:-len(LABELS)], *ranks)


async def _send(gw: Gateway, comparison: dict | None, said: str, choice: str | None = None,
                ranking: list[list[str]] | None = None):
    """Returns: the 4 authors, the next button, the status, then `controls`."""
    k = len(comparison["labels"]) if comparison else len(LABELS)
    if not comparison:
        return *[gr.skip()] * 4, gr.skip(), "Get answers first.", *controls(k, False)
    try:
        result = await gw.vote(comparison["id"], choice=choice, ranking=ranking)
    except GatewayError as e:
        return *[gr.skip()] * 4, gr.skip(), error_text(e), *controls(k, True)
    authors = [f"Written by **{c.get('model') or 'unknown'}** ({c.get('origin') or 'unknown origin'})"
               for c in result["candidates"]]
    authors += [""] * (len(LABELS) - len(authors))
    return *authors, gr.update(visible=True), f"Thanks, your vote ({said}) was saved.", *controls(k, False)


def quick_voter(label: str, choice: str):
    async def vote(gw: Gateway, comparison: dict | None):
        return await _send(gw, comparison, label, choice=choice)
    return vote


async def rank_vote(gw: Gateway, comparison: dict | None, *ranks: str | None):
    if comparison:
        ranking = ranking_of(dict(zip(comparison["labels"], ranks)))
        if ranking is None:
            k = len(comparison["labels"])
            return (*[gr.skip()] * 5, "Give every answer a rank (1 = best; the same rank for a tie).",
                    *controls(k, True))
        said = " > ".join(" = ".join(x.upper() for x in group) for group in ranking)
        return await _send(gw, comparison, said, ranking=ranking)
    return await _send(gw, comparison, "")


def build(auth: gr.State) -> None:
    comparison = gr.State(None)
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", placeholder="Ask something; several versions will answer it.", scale=5,
                            elem_id="compare-prompt")
        with gr.Column(scale=1, min_width=180):
            get = gr.Button("Get answers", variant="primary", elem_id="compare-ask")
            size = gr.Radio(list(SIZES), value="2", label="Answers", elem_id="compare-n")
            max_tokens = gr.Slider(16, 1024, value=256, step=16, label="Max tokens", elem_id="compare-max-tokens")
    columns, answers, ranks, authors = [], [], [], []
    with gr.Row(equal_height=True):
        for i, x in enumerate(LABELS):
            with gr.Column(visible=i < 2, min_width=200) as column:
                gr.Markdown(f"### Answer {x.upper()}")
                answers.append(gr.Markdown(container=True, min_height=120, elem_id=f"answer-{x}"))
                ranks.append(gr.Radio(["1", "2"], label=f"Rank of {x.upper()} (1 = best)", interactive=False,
                                      elem_id=f"rank-{x}"))
                authors.append(gr.Markdown(elem_id=f"author-{x}"))
            columns.append(column)
    with gr.Row():
        quick = [gr.Button(label, interactive=False, visible=choice not in LABELS or LABELS.index(choice) < 2,
                           elem_id=f"compare-{choice.replace('_', '-')}") for label, choice in QUICK]
        submit = gr.Button("Submit ranking", interactive=False, variant="primary", elem_id="compare-rank")
    status = gr.Markdown(elem_id="compare-status")
    next_prompt = gr.Button("Next prompt", visible=False, elem_id="compare-next")

    vote_controls = [*quick, submit, *ranks]
    get.click(ask, [auth, prompt, max_tokens, size], [comparison, *answers, *columns, *authors, status, *vote_controls])
    after_vote = [*authors, next_prompt, status, *vote_controls]
    for button, (label, choice) in zip(quick, QUICK):
        button.click(quick_voter(label, choice), [auth, comparison], after_vote)
    submit.click(rank_vote, [auth, comparison, *ranks], after_vote)
    next_prompt.click(lambda: (None, "", *[""] * 8, gr.update(visible=False), "", *[gr.update(value=None)] * 4),
                      None, [comparison, prompt, *answers, *authors, next_prompt, status, *ranks], queue=False)
