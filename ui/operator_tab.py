"""The Operator tab: which version serves and since when, the adapter versions, the retrain
cycles and their metrics, feedback per day; run a cycle, promote, roll back (each confirmed)."""

from __future__ import annotations

import asyncio
import json
import time

import gradio as gr
import pandas as pd

from ui.client import Gateway, GatewayError

CYCLE_COLUMNS = ["id", "state", "created_at", "finished_at", "duration_s", "sizes", "n_sft", "n_pairs", "n_prompts",
                 "rm_accuracy", "mean_reward", "kl", "gate", "version", "error"]
ADAPTER_COLUMNS = ["version", "name", "created_at", "state", "metrics"]
METRICS = ("rm_accuracy", "mean_reward", "kl")
# (cycle step, short name, the figure that sizes it): optimizer steps, and the gate's held-out prompts
SIZES = (("sft", "sft", "steps"), ("reward_model", "rm", "steps"), ("ppo", "ppo", "steps"),
         ("evaluating", "gate", "held_out_prompts"))
QUESTIONS = {"cycle": "Run a retrain cycle now?", "promote": "Promote **{}** to serve all `loopchat` traffic?",
             "rollback": "Roll back to the previously served version?"}


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def cell(key: str, value) -> str | float | int:
    if key.endswith("_at"):
        return when(value)
    if isinstance(value, bool):
        return "pass" if value else "fail"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(", ", ": "))
    return "" if value is None else value


def table(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame([[cell(c, r.get(c)) for c in columns] for r in rows], columns=columns)


def sizes(cycle: dict) -> str:
    """What each step ran, after the cycle's time budget if it had one: "10 min: sft 12, rm 40, ppo 6, gate 24"."""
    steps = cycle.get("steps") or {}
    ran = [f"{name} {steps[step][key]}" for step, name, key in SIZES if steps.get(step, {}).get(key) is not None]
    budget = f"{cycle['budget_s'] / 60:g} min: " if cycle.get("budget_s") else ""
    return budget + ", ".join(ran)


def metrics_frame(cycles: list[dict]) -> pd.DataFrame:
    """Long format for the line plot: one row per (cycle, metric) that has a value, oldest cycle first."""
    rows = [{"cycle": c["id"], "metric": m, "value": float(c[m])}
            for c in sorted(cycles, key=lambda c: c.get("created_at") or 0) for m in METRICS
            if c.get(m) is not None]
    return pd.DataFrame(rows, columns=["cycle", "metric", "value"])


def feedback_frame(stats: dict) -> pd.DataFrame:
    return pd.DataFrame(stats.get("data", []), columns=["day", "kind", "count"])


def unavailable(e: GatewayError) -> str:
    if e.status == 403:
        return "needs an admin key"
    return "not available on this gateway yet" if e.not_available else e.message


async def fetch(call):
    try:
        return await call, None
    except GatewayError as e:
        return None, unavailable(e)


async def refresh(gw: Gateway):
    """Returns: serving text, adapters table, version choices, cycles table, metrics plot, feedback plot."""
    (adapters, a_err), (cycles, c_err), (stats, s_err) = await asyncio.gather(
        fetch(gw.adapters()), fetch(gw.cycles()), fetch(gw.feedback_stats()))
    if adapters is None:
        serving, versions = f"**Serving:** {a_err}", []
    else:
        since = f" (promoted {when(adapters['promoted_at'])})" if adapters.get("promoted_at") else ""
        serving = f"**Serving:** `{adapters.get('serving') or 'the base model'}`{since}"
        versions = [a["version"] for a in adapters["data"]]
    notes = [f"{name}: {err}." for name, err in (("Cycles", c_err), ("Feedback stats", s_err)) if err]
    return (serving + ("  \n" + " ".join(notes) if notes else ""),
            table(adapters["data"] if adapters else [], ADAPTER_COLUMNS),
            gr.update(choices=versions, value=versions[-1] if versions else None),
            table([{**c, "sizes": sizes(c)} for c in cycles or []], CYCLE_COLUMNS), metrics_frame(cycles or []),
            feedback_frame(stats or {}))


def ask(action: str, version: str | None):
    """Returns: pending action, confirm row, question, status."""
    if action == "promote" and not version:
        return None, gr.update(visible=False), "", "Pick a version to promote first."
    return (action, version), gr.update(visible=True), QUESTIONS[action].format(version), ""


async def confirm(gw: Gateway, pending: tuple[str, str | None] | None):
    """Returns: pending action, confirm row, status."""
    if pending is None:
        return None, gr.update(visible=False), ""
    action, version = pending
    calls = {"cycle": gw.run_cycle, "promote": lambda: gw.promote(version), "rollback": gw.rollback}
    try:
        await calls[action]()
    except GatewayError as e:
        return None, gr.update(visible=False), f"That did not work: {unavailable(e)}."
    done = {"cycle": "A retrain cycle was started.", "promote": f"Version {version} is promoted.",
            "rollback": "Rolled back."}
    return None, gr.update(visible=False), done[action]


def build(auth: gr.State):
    """Builds the tab; returns the refresh handler with its inputs and outputs, for the tab's select event."""
    pending = gr.State(None)
    with gr.Row():
        serving = gr.Markdown(elem_id="serving")
        refresh_button = gr.Button("Refresh", scale=0, min_width=100, elem_id="operator-refresh")
    with gr.Row():
        run_cycle = gr.Button("Run a cycle now", elem_id="run-cycle")
        version = gr.Dropdown([], label="Version", scale=1, min_width=120, elem_id="promote-version")
        promote = gr.Button("Promote", elem_id="promote")
        rollback = gr.Button("Roll back", elem_id="rollback")
    with gr.Row(visible=False, elem_id="confirm-row") as confirm_row:
        question = gr.Markdown()
        confirm_button = gr.Button("Confirm", variant="stop", scale=0, min_width=100, elem_id="confirm")
        cancel = gr.Button("Cancel", scale=0, min_width=100, elem_id="cancel")
    status = gr.Markdown(elem_id="operator-status")
    with gr.Row():
        metrics_plot = gr.LinePlot(x="cycle", y="value", color="metric", title="Reward model and policy per cycle",
                                   x_title="cycle", y_title="", elem_id="metrics-plot")
        feedback_plot = gr.BarPlot(x="day", y="count", color="kind", title="Feedback per day",
                                   elem_id="feedback-plot")
    cycles = gr.Dataframe(headers=CYCLE_COLUMNS, label="Retrain cycles", interactive=False, elem_id="cycles")
    adapters = gr.Dataframe(headers=ADAPTER_COLUMNS, label="Adapter versions", interactive=False,
                            elem_id="adapters")

    outputs = [serving, adapters, version, cycles, metrics_plot, feedback_plot]
    refresh_button.click(refresh, auth, outputs)
    for button, action in ((run_cycle, "cycle"), (promote, "promote"), (rollback, "rollback")):
        button.click(lambda v, a=action: ask(a, v), version, [pending, confirm_row, question, status], queue=False)
    cancel.click(lambda: (None, gr.update(visible=False)), None, [pending, confirm_row], queue=False)
    confirm_button.click(confirm, [auth, pending], [pending, confirm_row, status]).then(refresh, auth, outputs)
    return refresh, outputs
