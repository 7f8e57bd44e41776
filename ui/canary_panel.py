"""The canary panel: start a canary of a published version for a share of users, watch both arms'
live evidence with 95% intervals (thumbs-up rate per answer, and the head-to-head win rate), read
what the decision rule says and why, and promote or roll it back by hand (each confirmed).

Everything shown comes from `GET /admin/canary`; the figures are built from its JSON alone."""

from __future__ import annotations

import gradio as gr

from ui.actions import Action, Confirmation
from ui.plots import Panel, estimate, figure
from ui.tables import keep, table, when

RECENT_COLUMNS = ["version", "baseline", "share", "started_at", "ended_at", "outcome", "ended_by"]
RULE_STATES = {"waiting": "waiting for evidence", "promote": "promote", "rollback": "roll back"}


def percent(share) -> str:
    return f"{float(share):.0%}" if share is not None else "?"


def arm_name(version: str | None) -> str:
    return version or "base model"


def summary(state: dict | None, error: str | None = None) -> str:
    """Which canary runs against what, since when, what the rule says and why, and who ends it."""
    if error:
        return f"**Canary:** {error}."
    running = (state or {}).get("canary")
    if not running:
        return "**Canary:** none running. Start one below: a published version answers a share of users " \
               "beside the serving version."
    decision = state.get("decision") or {}
    verdict = RULE_STATES.get(decision.get("state"), decision.get("state") or "unknown")
    who = "the gateway ends it as soon as the rule decides" if (state.get("rule") or {}).get("auto") else \
        "the rule advises; an operator promotes or rolls back"
    return (f"**Canary:** `{running['version']}` answers {percent(running.get('share'))} of users, beside "
            f"`{arm_name(running.get('baseline'))}`, since {when(running.get('started_at'))} ({who}).  \n"
            f"**Rule:** {verdict}" + (f": {decision['reason']}" if decision.get("reason") else ""))


def evidence_figure(state: dict | None):
    """Thumbs-up rate of the rated answers of both arms, and the canary's head-to-head win rate against
    the baseline, each with its 95% interval; None while no canary runs."""
    running = (state or {}).get("canary")
    if not running:
        return None
    evidence = state.get("evidence") or {}
    arms = []
    for arm, version in (("canary", running["version"]), ("baseline", running.get("baseline"))):
        figures = evidence.get(arm) or {}
        arms.append(estimate(f"{arm_name(version)} ({arm})", figures.get("rate"), figures.get("ci95"),
                             f"{figures.get('rated', 0)} rated of {figures.get('answers', 0)}"))
    duel = evidence.get("head_to_head") or {}
    votes = estimate(f"{running['version']} vs {arm_name(running.get('baseline'))}", duel.get("win_rate"),
                     duel.get("ci95"), f"{duel.get('n', 0)} votes")
    return figure(Panel("Thumbs-up rate per rated answer (95% interval)", {"rate": [a for a in arms if a]},
                        empty="No rated answers on either version yet."),
                  Panel("Head-to-head win rate of the canary (95% interval)", {"win rate": [votes] if votes else []},
                        reference=0.5, empty="No votes between the two versions yet."))


def recent_table(state: dict | None):
    rows = (state or {}).get("recent") or []
    return table([{**r, "share": percent(r.get("share"))} for r in rows], RECENT_COLUMNS)


def candidates(adapters: dict | None, state: dict | None) -> list[str]:
    """Versions a canary may start with: published, neither serving nor already the canary."""
    running = ((state or {}).get("canary") or {}).get("version")
    serving = (adapters or {}).get("serving")
    return [a["version"] for a in (adapters or {}).get("data", []) if a["version"] not in (serving, running)]


def show(state: dict | None, error: str | None, adapters: dict | None, picked: str | None = None) -> tuple:
    """`picked`: the version chosen for a canary now, kept while it may still start one (else the newest).
    Returns: summary, evidence plot, recent canaries, start-version choices, promote and rollback buttons
    (usable while a canary runs; the one the rule recommends stands out)."""
    running = bool((state or {}).get("canary"))
    advice = ((state or {}).get("decision") or {}).get("state")
    return (summary(state, error), gr.update(value=evidence_figure(state), visible=running), recent_table(state),
            keep(candidates(adapters, state), picked),
            *(gr.update(interactive=running, variant="primary" if advice == action else "secondary")
              for action in ("promote", "rollback")))


ACTIONS = {
    "start": Action(lambda v, s: f"Start a canary: **{v}** answers {percent(s)} of users beside the serving version?",
                    lambda gw, v, s: gw.start_canary(v, float(s)),
                    lambda v, s: f"Canary {v} started for {percent(s)} of users.",
                    check=lambda v, s: None if v else "Pick a published version for the canary first."),
    "promote": Action(lambda: "Promote the canary to serve all `loopchat` traffic?", lambda gw: gw.promote_canary(),
                      lambda: "The canary is promoted."),
    "rollback": Action(lambda: "Roll the canary back (its users go back to the serving version)?",
                       lambda gw: gw.rollback_canary(), lambda: "The canary was rolled back."),
}


def build() -> tuple[list, gr.Dropdown, Confirmation]:
    """Builds the panel; returns its outputs (in `show`'s order), its version dropdown (an input of the
    tab's refresh) and its confirmation, for the tab to wire."""
    gr.Markdown("### Canary")
    text = gr.Markdown(elem_id="canary-summary")
    plot = gr.Plot(show_label=False, format="png", visible=False, elem_id="canary-plot")
    with gr.Row():
        version = gr.Dropdown([], label="Canary version", min_width=120, elem_id="canary-version")
        share = gr.Slider(0.01, 0.99, value=0.1, step=0.01, label="Share of users", elem_id="canary-share")
        start = gr.Button("Start canary", elem_id="canary-start")
        promote = gr.Button("Promote canary", interactive=False, elem_id="canary-promote")
        rollback = gr.Button("Roll back canary", interactive=False, elem_id="canary-rollback")
    confirmation = Confirmation("canary-", "canary-status")
    confirmation.asks(start, "start", ACTIONS["start"], (version, share))
    confirmation.asks(promote, "promote", ACTIONS["promote"])
    confirmation.asks(rollback, "rollback", ACTIONS["rollback"])
    recent = gr.Dataframe(headers=RECENT_COLUMNS, label="Recent canaries", interactive=False, elem_id="canary-recent")
    return [text, plot, recent, version, promote, rollback], version, confirmation
