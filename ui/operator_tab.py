"""The Operator tab: which version serves and since when, the canary and its live evidence, what
the loop is learning (live win rates, reward-model accuracy and KL per cycle), the retrain cycles,
feedback per day, the adapter versions; run a cycle, promote, roll back (each confirmed)."""

from __future__ import annotations

import asyncio

import gradio as gr
import pandas as pd

from ui import canary_panel, learning_panel
from ui.actions import Action, Confirmation, api_message
from ui.client import Gateway, GatewayError
from ui.tables import keep, table, when

CYCLE_COLUMNS = ["id", "state", "recipe", "created_at", "finished_at", "duration_s", "sizes", "n_sft", "n_pairs",
                 "n_prompts", "rm_accuracy", "rm_accuracy_ci95", "mean_reward", "kl", "kl_base", "capability", "gate",
                 "version", "error"]
LIVE_EVERY_S = 10  # how often the tab refreshes itself while "Refresh every ..." is ticked
ADAPTER_COLUMNS = ["version", "name", "created_at", "state", "metrics"]
# (cycle step, short name, the figure that sizes it): optimizer steps, best-of-n's prompts, the gate's held-out prompts
SIZES = (("sft", "sft", "steps"), ("reward_model", "rm", "steps"), ("best_of_n", "best-of-n", "prompts"), ("ppo", "ppo", "steps"),
         ("evaluating", "gate", "held_out_prompts"))


def sizes(cycle: dict) -> str:
    """What each step ran, after the cycle's time budget if it had one, and what PPO paid besides the reward when it
    did (PPO-ptx's weight, the price of a nat of KL to the base): "10 min: sft 12, rm 40, ppo 6 with ptx 0.2, gate 24"."""
    steps = cycle.get("steps") or {}
    ppo = steps.get("ppo") or {}
    extras = [f"{what} {ppo[key]:g}" for key, what in (("ptx_coef", "ptx"), ("kl_base_coef", "KL-to-base price")) if ppo.get(key)]
    ran = [f"{name} {steps[step][key]}" + (" with " + " and ".join(extras) if step == "ppo" and extras else "")
           for step, name, key in SIZES if steps.get(step, {}).get(key) is not None]
    budget = f"{cycle['budget_s'] / 60:g} min: " if cycle.get("budget_s") else ""
    return budget + ", ".join(ran)


def feedback_frame(stats: dict) -> pd.DataFrame:
    return pd.DataFrame(stats.get("data", []), columns=["day", "kind", "count"])


async def fetch(call):
    try:
        return await call, None
    except GatewayError as e:
        return None, api_message(e)


async def refresh(gw: Gateway, picked: str | None = None, canary_picked: str | None = None):
    """`picked`, `canary_picked`: the versions chosen in the tab's two dropdowns now. Returns: serving text,
    adapters table, version choices, cycles table, the win-rate, RM accuracy, KL and capability plots, the
    feedback plot, then the canary panel's outputs."""
    (adapters, a_err), (cycles, c_err), (stats, s_err), (winrates, w_err), (canary, k_err) = await asyncio.gather(
        fetch(gw.adapters()), fetch(gw.cycles()), fetch(gw.feedback_stats()), fetch(gw.winrates()),
        fetch(gw.canary()))
    if adapters is None:
        serving, adapter_rows = f"**Serving:** {a_err}", []
    else:
        since = f" (promoted {when(adapters['promoted_at'])})" if adapters.get("promoted_at") else ""
        serving = f"**Serving:** `{adapters.get('serving') or 'the base model'}`{since}"
        adapter_rows = adapters["data"]
    versions = [a["version"] for a in adapter_rows]
    notes = [f"{name}: {err}." for name, err in (("Cycles", c_err), ("Feedback stats", s_err), ("Win rates", w_err))
             if err]
    return (serving + ("  \n" + " ".join(notes) if notes else ""), table(adapter_rows, ADAPTER_COLUMNS),
            keep(versions, picked),
            table([cycle_row(c) for c in cycles or []], CYCLE_COLUMNS),
            learning_panel.winrate_figure(winrates or [], adapter_rows), *learning_panel.cycle_figures(cycles or []),
            feedback_frame(stats or {}), *canary_panel.show(canary, k_err, adapters, canary_picked))


def cycle_row(cycle: dict) -> dict:
    """A cycle as the table shows it: what each step ran, its learning figures, and whether the gate
    judged PPO's shorter step because the full one moved too far."""
    figures = learning_panel.learning_figures(cycle)
    fell_back = ((cycle.get("steps") or {}).get(learning_panel.GATE_STEP) or {}).get("fell_back")
    gate = cycle.get("gate")
    if fell_back and gate:
        gate += f" on PPO's shorter step (the full one failed {', '.join(fell_back['failed'])})"
    return {**cycle, "sizes": sizes(cycle), **figures, "capability": learning_panel.capability_text(figures), "gate": gate}


ACTIONS = {
    "cycle": Action(lambda v: "Run a retrain cycle now?", lambda gw, v: gw.run_cycle(),
                    lambda v: "A retrain cycle was started."),
    "promote": Action(lambda v: f"Promote **{v}** to serve all `loopchat` traffic?", lambda gw, v: gw.promote(v),
                      lambda v: f"Version {v} is promoted.",
                      check=lambda v: None if v else "Pick a version to promote first."),
    "rollback": Action(lambda v: "Roll back to the previously served version?", lambda gw, v: gw.rollback(),
                       lambda v: "Rolled back."),
}


def build(auth: gr.State):
    """Builds the tab; returns the refresh handler, its inputs and its outputs, for the tab's select event."""
    with gr.Row():
        serving = gr.Markdown(elem_id="serving")
        live = gr.Checkbox(label=f"Refresh every {LIVE_EVERY_S} s", scale=0, min_width=160, elem_id="operator-live")
        refresh_button = gr.Button("Refresh", scale=0, min_width=100, elem_id="operator-refresh")
    timer = gr.Timer(LIVE_EVERY_S, active=False)
    with gr.Row():
        run_cycle = gr.Button("Run a cycle now", elem_id="run-cycle")
        version = gr.Dropdown([], label="Version", scale=1, min_width=120, elem_id="promote-version")
        promote = gr.Button("Promote", elem_id="promote")
        rollback = gr.Button("Roll back", elem_id="rollback")
    confirmation = Confirmation("", "operator-status")
    canary_outputs, canary_version, canary_confirmation = canary_panel.build()
    gr.Markdown("### Learning")
    with gr.Row():
        winrate_plot = gr.Plot(show_label=False, format="png", elem_id="winrate-plot")
        accuracy_plot = gr.Plot(show_label=False, format="png", elem_id="rm-accuracy-plot")
    with gr.Row():
        kl_plot = gr.Plot(show_label=False, format="png", elem_id="kl-plot")
        capability_plot = gr.Plot(show_label=False, format="png", elem_id="capability-plot")
    cycles = gr.Dataframe(headers=CYCLE_COLUMNS, label="Retrain cycles", interactive=False, elem_id="cycles")
    feedback_plot = gr.BarPlot(x="day", y="count", color="kind", title="Feedback per day", elem_id="feedback-plot")
    adapters = gr.Dataframe(headers=ADAPTER_COLUMNS, label="Adapter versions", interactive=False,
                            elem_id="adapters")

    outputs = [serving, adapters, version, cycles, winrate_plot, accuracy_plot, kl_plot, capability_plot,
               feedback_plot, *canary_outputs]
    inputs = [auth, version, canary_version]
    refresh_button.click(refresh, inputs, outputs)
    live.change(lambda on: gr.Timer(active=on), live, timer, queue=False)
    timer.tick(refresh, inputs, outputs, show_progress="hidden")
    for button, name in ((run_cycle, "cycle"), (promote, "promote"), (rollback, "rollback")):
        confirmation.asks(button, name, ACTIONS[name], (version,))
    for c in (confirmation, canary_confirmation):
        c.then(auth, refresh, inputs, outputs)
    return refresh, inputs, outputs
