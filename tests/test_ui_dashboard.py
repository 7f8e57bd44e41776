"""The operator dashboard's figures, built from given API JSON: what each plot shows (points, 95%
intervals, labels) and how rows that lack the newer fields are handled. The browser test of the
same tab is tests/test_ui_operator.py."""

from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from ui import canary_panel, learning_panel, operator_tab
from ui.client import Gateway, GatewayError
from ui.plots import Panel, estimate, figure

ADAPTERS = [{"version": "v1", "name": "policy-v1"}, {"version": "v2", "name": "policy-v2"},
            {"version": "v10", "name": "policy-v10"}]
WINRATES = [  # as GET /admin/winrates answers, in no particular order
    {"adapter": "v10", "version": "policy-v10", "opponent": "policy-v2", "wins": 3, "losses": 9, "ties": 0, "n": 12,
     "win_rate": 0.25, "ci95": [0.0, 0.51]},
    {"adapter": "v1", "version": "policy-v1", "opponent": "/models/SmolLM2-135M-Instruct", "wins": 8, "losses": 2,
     "ties": 2, "n": 12, "win_rate": 0.75, "ci95": [0.52, 0.98]},
    {"adapter": "v2", "version": "policy-v2", "opponent": "policy-v1", "wins": 0, "losses": 0, "ties": 0, "n": 0,
     "win_rate": None, "ci95": None},
]
# the capability guard's pass share by kind of item: facts rose, explanations fell most, instructions a little
KINDS = {"facts": {"candidate": 0.95, "baseline": 0.9}, "explanations": {"candidate": 0.5, "baseline": 0.75},
         "instructions": {"candidate": 0.8, "baseline": 0.85}}
OLD_CYCLE = {"id": 1, "state": "rejected", "rm_accuracy": 0.61, "mean_reward": 0.12, "kl": 0.02, "steps": {}}
NEW_CYCLE = {"id": 2, "state": "promoted", "rm_accuracy": 0.7, "kl": 0.3, "recipe": "sft_only",
             "steps": {"reward_model": {"accuracy": 0.7, "accuracy_ci95": [0.55, 0.82], "steps": 40},
                       "evaluating": {"kl": 0.3, "kl_base": 0.9, "held_out_prompts": 24, "capability_pass": 0.8,
                                      "capability_pass_baseline": 0.85, "capability_pass_base_model": 0.95,
                                      "capability_loglik": -1.234,
                                      "capability_loglik_baseline": -1.2,
                                      "capability_pass_kinds": KINDS}}}
NO_CAPABILITY = dict.fromkeys(learning_panel.CAPABILITY)


def points(fig) -> dict:
    """{panel title: {series: [(x label, value, (lo, hi)), ...]}} as drawn: error bars read back from the axes."""
    out = {}
    for ax in fig.axes:
        ticks = [t.get_text().split("\n")[0] for t in ax.get_xticklabels()]
        series = {}
        for container in ax.containers:
            line, _, (bars,) = container.lines
            spans = [(float(seg[0][1]), float(seg[1][1])) for seg in bars.get_segments()]
            series[container.get_label()] = [(ticks[round(x)], float(y), span)
                                             for x, y, span in zip(line.get_xdata(), line.get_ydata(), spans)]
        out[ax.get_title()] = series
    return out


def message(fig) -> str:
    """The words drawn where a panel has no point."""
    return " ".join(t.get_text() for ax in fig.axes for t in ax.texts)


def test_win_rates_per_version_against_predecessor_with_intervals_oldest_first():
    drawn = points(learning_panel.winrate_figure(WINRATES, ADAPTERS))
    (panel,) = drawn.values()
    assert panel == {"win rate": [("v1 vs base", 0.75, (0.52, 0.98)), ("v10 vs v2", 0.25, (0.0, 0.51))]}


def test_win_rate_tick_says_how_many_votes():
    ax = learning_panel.winrate_figure(WINRATES, ADAPTERS).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["v1 vs base\n12 votes", "v10 vs v2\n12 votes"]
    assert ax.get_lines()[-1].get_ydata()[0] == 0.5  # the coin-flip line


def test_no_votes_yet_says_so_instead_of_an_empty_plot():
    fig = learning_panel.winrate_figure([WINRATES[2]], ADAPTERS)
    assert points(fig) == {"Live win rate against the predecessor (95% interval)": {}}
    assert "No head-to-head votes" in message(fig)


def test_learning_figures_of_a_new_cycle():
    assert learning_panel.learning_figures(NEW_CYCLE) == {
        "rm_accuracy": 0.7, "rm_accuracy_ci95": [0.55, 0.82], "kl": 0.3, "kl_base": 0.9, "recipe": "sft_only",
        "capability_pass": 0.8, "capability_pass_baseline": 0.85, "capability_pass_base_model": 0.95, "capability_loglik": -1.234,
        "capability_loglik_baseline": -1.2, "capability_pass_kinds": KINDS}


def test_an_old_cycles_kl_was_to_the_base_and_it_has_no_interval_or_recipe():
    assert learning_panel.learning_figures(OLD_CYCLE) == {
        "rm_accuracy": 0.61, "rm_accuracy_ci95": None, "kl": None, "kl_base": 0.02, "recipe": "default",
        **NO_CAPABILITY}


def test_a_cycle_without_figures_yet_is_all_gaps():
    queued = {"id": 3, "state": "queued", "steps": {}}
    figures = learning_panel.learning_figures(queued)
    assert figures["rm_accuracy"] is None and figures["kl"] is None and figures["kl_base"] is None


def test_cycle_plots_over_cycles_oldest_first_with_gaps_for_missing_figures():
    queued = {"id": 3, "state": "queued", "steps": {}}
    accuracy, kl, capability = learning_panel.cycle_figures([queued, NEW_CYCLE, OLD_CYCLE])
    assert points(accuracy)["Reward model: held-out accuracy (95% interval)"] == {
        "accuracy": [("#1", 0.61, (0.61, 0.61)), ("#2", 0.7, (0.55, 0.82))]}
    assert points(kl)["Policy KL (nats per answer)"] == {
        "to serving": [("#2", 0.3, (0.3, 0.3))],
        "to base": [("#1", 0.02, (0.02, 0.02)), ("#2", 0.9, (0.9, 0.9))]}
    assert points(capability)["Capability guard: share of items answered right"] == {
        "candidate": [("#2", 0.8, (0.8, 0.8))], "replaced version": [("#2", 0.85, (0.85, 0.85))],
        "base model": [("#2", 0.95, (0.95, 0.95))]}
    assert points(capability)["Capability guard by kind of item: the candidate's share"] == {
        kind: [("#2", shares["candidate"], (shares["candidate"], shares["candidate"]))] for kind, shares in KINDS.items()}


def test_cycle_plots_before_any_cycle():
    assert all("No cycle" in message(fig) for fig in learning_panel.cycle_figures([]))


def test_cycles_table_has_the_learning_columns_and_blank_cells_for_old_rows():
    frame = operator_tab.table([operator_tab.cycle_row(c) for c in (NEW_CYCLE, OLD_CYCLE)], operator_tab.CYCLE_COLUMNS)
    new, old = frame.to_dict("records")
    assert (new["recipe"], new["rm_accuracy_ci95"], new["kl"], new["kl_base"]) == ("sft_only", "[0.55, 0.82]", 0.3, 0.9)
    assert (old["recipe"], old["rm_accuracy_ci95"], old["kl"], old["kl_base"]) == ("default", "", "", 0.02)
    assert new["capability"] == "pass 0.80 (was 0.85), loglik -1.23 (was -1.20); explanations 0.50 (was 0.75)"
    assert old["capability"] == ""
    # a cycle from before kinds, one with a single kind and one where no kind fell: the figures over all items alone
    for kinds in (None, {"general": KINDS["explanations"]}, {"facts": KINDS["facts"], "arithmetic": {"candidate": 1.0, "baseline": 1.0}}):
        figures = {**learning_panel.learning_figures(NEW_CYCLE), "capability_pass_kinds": kinds}
        assert learning_panel.capability_text(figures) == "pass 0.80 (was 0.85), loglik -1.23 (was -1.20)"


def test_the_sizes_cell_says_what_each_step_ran_and_what_ppo_paid_when_it_did():
    ran = {**NEW_CYCLE, "budget_s": 600, "steps": {**NEW_CYCLE["steps"], "ppo": {"steps": 6, "ptx_coef": 0.2}}}
    both = {**ran, "steps": {**ran["steps"], "ppo": {"steps": 6, "ptx_coef": 0.2, "kl_base_coef": 0.02}}}
    without = {**ran, "steps": {**ran["steps"], "ppo": {"steps": 6, "ptx_coef": 0, "kl_base_coef": 0}}}
    assert operator_tab.cycle_row(ran)["sizes"] == "10 min: rm 40, ppo 6 with ptx 0.2, gate 24"
    assert operator_tab.cycle_row(both)["sizes"] == "10 min: rm 40, ppo 6 with ptx 0.2 and KL-to-base price 0.02, gate 24"
    assert operator_tab.cycle_row(without)["sizes"] == "10 min: rm 40, ppo 6, gate 24"
    assert operator_tab.cycle_row(OLD_CYCLE)["sizes"] == ""


def test_a_cycle_judged_on_ppos_shorter_step_says_so_in_its_gate_cell():
    fell_back = {**NEW_CYCLE, "gate": "pass", "steps": {"evaluating": {**NEW_CYCLE["steps"]["evaluating"], "fell_back": {
        "failed": ["capability_pass", "canaries"], "kl": 7.1, "capability_pass": 0.7}}}}
    rows = operator_tab.table([operator_tab.cycle_row(c) for c in (fell_back, {**NEW_CYCLE, "gate": "pass"})],
                              operator_tab.CYCLE_COLUMNS).to_dict("records")
    assert rows[0]["gate"] == "pass on PPO's shorter step (the full one failed capability_pass, canaries)"
    assert rows[1]["gate"] == "pass"


def test_kl_of_a_new_cycle_whose_serving_version_is_the_base():
    """A new row names both KLs, even when they are the same reference: nothing moves to kl_base."""
    row = {"id": 4, "steps": {"evaluating": {"kl": 0.4, "kl_base": 0.4}}}
    assert (learning_panel.learning_figures(row)["kl"], learning_panel.learning_figures(row)["kl_base"]) == (0.4, 0.4)


@pytest.mark.parametrize("ci95", [None, [0.1], [None, 0.4], "0.1-0.4"])
def test_a_malformed_interval_is_dropped_not_drawn(ci95):
    assert estimate("v1", 0.3, ci95).ci95 is None


def test_side_by_side_series_do_not_hide_each_others_bars():
    fig = figure(Panel("t", {"a": [estimate("x", 0.2, [0.1, 0.3])], "b": [estimate("x", 0.6, [0.5, 0.7])]}))
    a, b = (c.lines[0].get_xdata()[0] for c in fig.axes[0].containers)
    assert a < b and round(a) == round(b) == 0


def test_refresh_reads_the_real_admin_api(fake_gateway):
    """The tab's refresh against the real gateway app (fake engine): the client's calls and the panels'
    readers agree with the routes' JSON."""
    v1, v2 = fake_gateway.publish_adapter(), fake_gateway.publish_adapter()
    (serving, adapters, _, cycles, winrates, accuracy, kl, capability, *_) = asyncio.run(
        operator_tab.refresh(Gateway(fake_gateway.url, user="ops")))
    assert "the base model" in serving and "not available" not in serving
    assert list(adapters["version"]) == [v1, v2] and cycles.empty
    assert "No head-to-head votes" in message(winrates)
    assert all("No cycle" in message(fig) for fig in (accuracy, kl, capability))


# ---- the canary panel ----------------------------------------------------------------------------
RULE = {"min_answers": 100, "min_votes": 30, "margin": 0.05, "alpha": 0.05, "auto": False}
RUNNING = {  # as GET /admin/canary answers while v2 is on canary beside v1
    "object": "canary.status",
    "canary": {"id": 3, "version": "v2", "baseline": "v1", "share": 0.2, "started_at": 1795684645.5, "ended_at": None,
               "outcome": None, "ended_by": None, "rule": RULE},
    "evidence": {
        "canary": {"version": "v2", "served_by": "policy-v2", "answers": 40, "rated": 30, "up": 21, "rate": 0.7,
                   "ci95": [0.53, 0.87]},
        "baseline": {"version": "v1", "served_by": "policy-v1", "answers": 160, "rated": 120, "up": 66, "rate": 0.55,
                     "ci95": [0.46, 0.64]},
        "difference": {"estimate": 0.15, "ci95": [-0.04, 0.34]},
        "head_to_head": {"version": "policy-v2", "opponent": "policy-v1", "wins": 9, "losses": 3, "ties": 0, "n": 12,
                         "win_rate": 0.75, "ci95": [0.49, 1.0]}},
    "decision": {"state": "waiting", "reason": "thumbs_up_rate: 30 of 100 needed; head_to_head: 12 of 30 needed"},
    "rule": RULE,
    "recent": [{"id": 2, "version": "v1", "baseline": None, "share": 0.5, "started_at": 1795600000.0,
                "ended_at": 1795603600.0, "outcome": "promoted", "ended_by": "auto"}],
}
NONE_RUNNING = {"object": "canary.status", "canary": None, "evidence": None, "decision": None, "rule": RULE,
                "recent": RUNNING["recent"]}


def test_canary_summary_says_what_runs_against_what_and_what_the_rule_says():
    text = canary_panel.summary(RUNNING)
    assert "`v2` answers 20% of users, beside `v1`" in text
    assert "an operator promotes or rolls back" in text  # the rule's auto is off
    assert "**Rule:** waiting for evidence: thumbs_up_rate: 30 of 100 needed" in text
    decided = {**RUNNING, "rule": {**RULE, "auto": True},
               "decision": {"state": "rollback", "reason": "thumbs_up_rate worse than the baseline"}}
    text = canary_panel.summary(decided)
    assert "roll back: thumbs_up_rate worse" in text and "the gateway ends it" in text


def test_canary_summary_with_none_running_or_an_error():
    assert "none running" in canary_panel.summary(NONE_RUNNING)
    assert canary_panel.summary(None, "needs an admin key") == "**Canary:** needs an admin key."


def test_canary_evidence_plot_shows_both_arms_and_the_head_to_head_with_intervals():
    fig = canary_panel.evidence_figure(RUNNING)
    assert points(fig) == {
        "Thumbs-up rate per rated answer (95% interval)": {
            "rate": [("v2 (canary)", 0.7, (0.53, 0.87)), ("v1 (baseline)", 0.55, (0.46, 0.64))]},
        "Head-to-head win rate of the canary (95% interval)": {"win rate": [("v2 vs v1", 0.75, (0.49, 1.0))]}}
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["v2 (canary)\n30 rated of 40", "v1 (baseline)\n120 rated of 160"]


def test_canary_evidence_before_any_vote_or_thumb():
    fresh = {**RUNNING, "canary": {**RUNNING["canary"], "baseline": None}, "evidence": {
        "canary": {"answers": 3, "rated": 0, "up": 0, "rate": None, "ci95": None},
        "baseline": {"answers": 9, "rated": 1, "up": 1, "rate": 1.0, "ci95": None},
        "head_to_head": {"n": 0, "win_rate": None, "ci95": None}}}
    fig = canary_panel.evidence_figure(fresh)
    assert points(fig)["Thumbs-up rate per rated answer (95% interval)"] == {
        "rate": [("base model (baseline)", 1.0, (1.0, 1.0))]}  # one rated answer: no interval yet
    assert "No votes between the two versions yet." in message(fig)
    assert canary_panel.evidence_figure(NONE_RUNNING) is None


def test_canary_panel_outputs_follow_whether_one_runs():
    adapters = {"serving": "v1", "data": [{"version": v} for v in ("v1", "v2", "v3")]}
    summary, plot, recent, version, promote, rollback = canary_panel.show(RUNNING, None, adapters)
    assert plot["visible"] and promote["interactive"] and rollback["interactive"]
    assert version["choices"] == ["v3"]  # neither the serving version nor the running canary
    assert recent.to_dict("records")[0] | {"started_at": "", "ended_at": ""} == {
        "version": "v1", "baseline": "", "share": "50%", "started_at": "", "ended_at": "", "outcome": "promoted",
        "ended_by": "auto"}
    _, plot, _, version, promote, rollback = canary_panel.show(NONE_RUNNING, None, adapters)
    assert not plot["visible"] and not promote["interactive"] and not rollback["interactive"]
    assert version["choices"] == ["v2", "v3"] and version["value"] == "v3"


def test_starting_a_canary_needs_a_version_first():
    start = canary_panel.ACTIONS["start"]
    assert start.check(None, 0.1) == "Pick a published version for the canary first."
    assert start.check("v2", 0.1) is None
    assert start.question("v2", 0.25) == "Start a canary: **v2** answers 25% of users beside the serving version?"


def test_refresh_shows_a_canary_started_through_the_real_api(fake_gateway):
    v1 = fake_gateway.publish_adapter()
    r = httpx.post(f"{fake_gateway.url}/admin/adapters/{v1}/canary", json={"share": 0.3}, timeout=30)
    assert r.status_code == 201, r.text
    for i in range(6):  # answers to six users, each rated up, on whichever arm each user is
        who = {"X-Loopchat-User": f"user-{i}"}
        answer = httpx.post(fake_gateway.url + "/v1/chat/completions", headers=who, timeout=30, json={
            "model": "loopchat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}).json()
        httpx.post(fake_gateway.url + "/v1/feedback", headers=who, timeout=30,
                   json={"completion_id": answer["id"], "rating": 1}).raise_for_status()
    outputs = asyncio.run(operator_tab.refresh(Gateway(fake_gateway.url, user="ops")))
    summary, plot, _, _, promote, _ = outputs[-6:]
    assert f"`{v1}` answers 30% of users, beside `base model`" in summary and promote["interactive"]
    drawn = points(plot["value"])["Thumbs-up rate per rated answer (95% interval)"]["rate"]
    assert drawn and all(value == 1.0 for _, value, _ in drawn)
    ticks = [t.get_text() for t in plot["value"].axes[0].get_xticklabels()]
    assert sum(int(re.search(r"(\d+) rated", t)[1]) for t in ticks) == 6  # every rated answer counted once


def test_a_series_without_points_is_left_out_of_the_legend():
    _, kl, _ = learning_panel.cycle_figures([OLD_CYCLE])
    assert points(kl) == {"Policy KL (nats per answer)": {"to base": [("#1", 0.02, (0.02, 0.02))]}}
    assert [t.get_text() for t in kl.axes[0].get_legend().get_texts()] == ["to base"]  # says which KL it is


def test_a_refresh_keeps_the_operators_pick_while_it_is_still_a_choice():
    adapters = {"serving": None, "data": [{"version": v} for v in ("v1", "v2", "v3")]}
    *_, version, _, _ = canary_panel.show(NONE_RUNNING, None, adapters, "v1")
    assert version["value"] == "v1"
    *_, version, _, _ = canary_panel.show(RUNNING, None, adapters, "v2")  # v2 is on canary now
    assert version["choices"] == ["v1", "v3"] and version["value"] == "v3"


def test_over_many_cycles_only_some_points_are_labelled():
    many = [{**NEW_CYCLE, "id": i} for i in range(1, 31)]
    labels = [t.get_text() for t in learning_panel.cycle_figures(many)[0].axes[0].get_xticklabels()]
    assert len(labels) == 30 and [x for x in labels if x] == ["#1", "#4", "#7", "#10", "#13", "#16", "#19", "#22",
                                                               "#25", "#28"]


def test_with_keys_the_operators_key_starts_a_canary_and_a_users_key_is_told_it_needs_one(fake_keyed_gateway):
    gw = fake_keyed_gateway
    version = gw.publish_adapter()
    alice, ops = Gateway(gw.url, api_key=gw.keys["alice"]), Gateway(gw.url, api_key=gw.keys["ops"])
    summary = asyncio.run(operator_tab.refresh(alice))[-6]
    assert summary == "**Canary:** needs an admin key."
    start = canary_panel.ACTIONS["start"]
    with pytest.raises(GatewayError) as refused:
        asyncio.run(start.run(alice, version, 0.2))
    assert refused.value.status == 403
    asyncio.run(start.run(ops, version, 0.2))
    try:
        assert f"`{version}` answers 20% of users" in asyncio.run(operator_tab.refresh(ops))[-6]
    finally:
        asyncio.run(canary_panel.ACTIONS["rollback"].run(ops))


def test_the_button_the_rule_recommends_stands_out():
    *_, promote, rollback = canary_panel.show(RUNNING, None, None)
    assert promote["variant"] == rollback["variant"] == "secondary"  # waiting
    advised = {**RUNNING, "decision": {"state": "rollback", "reason": "head_to_head worse than the baseline"}}
    *_, promote, rollback = canary_panel.show(advised, None, None)
    assert (promote["variant"], rollback["variant"]) == ("secondary", "primary")
