"""What the loop is learning, as plots: each version's live win rate against its predecessor, and per
cycle the reward model's held-out accuracy, the new policy's KL to the serving version and to the
base, and the capability guard (the alignment tax), each with its 95% interval where the API gives one.

Cycle rows written before these figures existed lack some of them: a missing figure is a gap in
the plot and an empty cell, never an error."""

from __future__ import annotations

from ui.plots import Estimate, Panel, estimate, figure

# The cycle step whose figures hold each learning figure (the reward model's, then the gate's).
RM_STEP, GATE_STEP = "reward_model", "evaluating"


def version_number(version: str | None) -> int:
    return int(version[1:]) if version and version[1:].isdigit() else -1


def winrate_estimates(winrates: list[dict], adapters: list[dict]) -> list[Estimate]:
    """One per version (`adapter`) that has votes against its predecessor, oldest version first. The
    API names the opponent by the engine model that answered (`policy-v2`, or the base model's name);
    `adapters` (the rows of GET /admin/adapters) turn that back into a version, any other name is the base."""
    versions = {a["name"]: a["version"] for a in adapters}
    rows = sorted(winrates, key=lambda w: version_number(w["adapter"]))
    return [e for e in (estimate(f"{w['adapter']} vs {versions.get(w['opponent'], 'base')}", w["win_rate"], w["ci95"],
                                 f"{w['n']} votes") for w in rows) if e]


def winrate_figure(winrates: list[dict], adapters: list[dict]):
    return figure(Panel("Live win rate against the predecessor (95% interval)",
                        {"win rate": winrate_estimates(winrates, adapters)}, reference=0.5,
                        empty="No head-to-head votes between a version and its predecessor yet."))


CAPABILITY = ("capability_pass", "capability_pass_baseline", "capability_pass_base_model", "capability_loglik",
              "capability_loglik_baseline", "capability_pass_kinds")


def learning_figures(cycle: dict) -> dict:
    """A cycle's learning figures, flat: rm_accuracy (+ _ci95), kl (to the serving version), kl_base,
    the capability guard's figures (candidate and baseline) and the recipe.

    Rows written before KL to the serving version was measured have no `kl_base` at all, and their
    one `kl` was to the base model (the old gate's reference): it is reported as kl_base."""
    steps = cycle.get("steps") or {}
    rm, gate = steps.get(RM_STEP) or {}, steps.get(GATE_STEP) or {}
    if "kl_base" in gate:
        kl, kl_base = gate.get("kl"), gate["kl_base"]
    else:
        kl, kl_base = None, gate.get("kl", cycle.get("kl"))
    return {"rm_accuracy": rm.get("accuracy", cycle.get("rm_accuracy")), "rm_accuracy_ci95": rm.get("accuracy_ci95"),
            "kl": kl, "kl_base": kl_base, **{k: gate.get(k) for k in CAPABILITY},
            "recipe": cycle.get("recipe") or "default"}


def capability_text(figures: dict) -> str:
    """The capability guard in a table cell: "pass 0.80 (was 0.85), loglik -1.23 (was -1.20)", and the kind
    of item whose pass share fell most, when one fell: "; explanations 0.22 (was 0.56)"."""
    parts = [f"{name} {figures[key]:.2f}" + (f" (was {figures[key + '_baseline']:.2f})"
                                              if figures.get(key + "_baseline") is not None else "")
             for name, key in (("pass", "capability_pass"), ("loglik", "capability_loglik"))
             if figures.get(key) is not None]
    kinds = by_kind(figures)
    fell = min(kinds.items(), key=lambda kv: kv[1]["candidate"] - kv[1]["baseline"], default=None)
    worst = f"; {fell[0]} {fell[1]['candidate']:.2f} (was {fell[1]['baseline']:.2f})" \
        if len(kinds) > 1 and fell[1]["candidate"] < fell[1]["baseline"] else ""
    return ", ".join(parts) + worst


def series(rows: list[tuple[str, dict]], key: str, ci_key: str | None = None) -> list[Estimate]:
    """The cycles that have figure `key`, as estimates at their cycle's place."""
    return [e for e in (estimate(x, f[key], f[ci_key] if ci_key else None) for x, f in rows) if e]


def cycle_figures(cycles: list[dict]):
    """Over cycles, oldest first: the RM's held-out accuracy with its interval; KL to serving and to
    base; the capability guard's pass share: the candidate, the version it would replace and the base model,
    and beside it the candidate's by kind of item."""
    rows = [(f"#{c['id']}", learning_figures(c)) for c in sorted(cycles, key=lambda c: c["id"])]
    order = tuple(x for x, _ in rows)
    return (figure(Panel("Reward model: held-out accuracy (95% interval)",
                         {"accuracy": series(rows, "rm_accuracy", "rm_accuracy_ci95")}, reference=0.5, lines=True,
                         x_order=order, empty="No cycle has measured its reward model yet.")),
            figure(Panel("Policy KL (nats per answer)",
                         {"to serving": series(rows, "kl"), "to base": series(rows, "kl_base")}, lines=True,
                         ylim=None, x_order=order, empty="No cycle has measured KL yet.")),
            figure(Panel("Capability guard: share of items answered right",
                         {"candidate": series(rows, "capability_pass"),
                          "replaced version": series(rows, "capability_pass_baseline"),
                          "base model": series(rows, "capability_pass_base_model")}, lines=True, x_order=order,
                         empty="No cycle has run the capability guard yet."),
                   Panel("Capability guard by kind of item: the candidate's share",
                         {kind: [e for e in (estimate(x, by_kind(f).get(kind, {}).get("candidate")) for x, f in rows) if e]
                          for kind in dict.fromkeys(k for _, f in rows for k in by_kind(f))},
                         lines=True, x_order=order, empty="No cycle has judged capability kind by kind yet.")))


def by_kind(figures: dict) -> dict:
    """A cycle's capability pass shares by kind of item, {} before the gate judged them kind by kind."""
    return figures.get("capability_pass_kinds") or {}
