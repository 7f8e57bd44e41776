"""The dashboard's figures: estimates with their 95% intervals as points with error bars, side by
side (a canary's two arms, versions against their predecessors) or joined over cycles.

Drawn with matplotlib's object API rather than pyplot: no global figure registry, so a figure is
freed with the last reference to it (gr.Plot renders it to an image once)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from matplotlib.figure import Figure

COLORS = ("#2563eb", "#ea580c", "#16a34a", "#9333ea")
MAX_LABELS = 12  # x labels per panel


@dataclass(frozen=True)
class Estimate:
    x: str  # where on the x axis: an arm, a version, a cycle
    value: float
    ci95: tuple[float, float] | None = None
    note: str = ""  # printed under the x label, e.g. how many answers it rests on


@dataclass(frozen=True)
class Panel:
    title: str
    series: dict[str, list[Estimate]]  # legend name -> its estimates
    reference: float | None = None  # a dashed line: a coin flip, no change
    lines: bool = False  # join each series' points (figures over cycles)
    ylim: tuple[float, float] | None = (0.0, 1.0)
    x_order: tuple[str, ...] = ()  # the x labels left to right; default: in the order the series first name them
    empty: str = "Nothing to show yet."  # shown in the panel's place while it has no point

    @property
    def xs(self) -> list[str]:
        named = dict.fromkeys(e.x for estimates in self.series.values() for e in estimates)
        return [x for x in self.x_order if x in named] + [x for x in named if x not in self.x_order]

    @property
    def is_empty(self) -> bool:
        return not any(self.series.values())


def estimate(x: str, value, ci95=None, note: str = "") -> Estimate | None:
    """An Estimate from API figures, or None when the value is missing; a malformed interval is dropped."""
    if value is None:
        return None
    well_formed = isinstance(ci95, (list, tuple)) and len(ci95) == 2 and None not in ci95
    return Estimate(x, float(value), (float(ci95[0]), float(ci95[1])) if well_formed else None, note)


def figure(*panels: Panel) -> Figure:
    """One row of panels, side by side."""
    fig = Figure(figsize=(4.8 * len(panels), 3.4), layout="constrained")
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        if panel.is_empty:
            ax.set_axis_off()
            ax.set_title(panel.title, fontsize=10)
            ax.text(0.5, 0.5, panel.empty, ha="center", va="center", wrap=True, color="0.4", transform=ax.transAxes)
        else:
            draw(ax, panel)
    return fig


def draw(ax, panel: Panel) -> None:
    xs = panel.xs
    notes = {}
    width = 0.0 if panel.lines else 0.12  # side-by-side series are nudged apart so their bars do not hide
    for i, (name, estimates) in enumerate(panel.series.items()):
        if not estimates:  # no point, no legend entry
            continue
        shift = (i - (len(panel.series) - 1) / 2) * width
        pos = [xs.index(e.x) + shift for e in estimates]
        values = [e.value for e in estimates]
        below = [e.value - e.ci95[0] if e.ci95 else 0.0 for e in estimates]
        above = [e.ci95[1] - e.value if e.ci95 else 0.0 for e in estimates]
        ax.errorbar(pos, values, yerr=[below, above], fmt="o-" if panel.lines else "o", capsize=4,
                    color=COLORS[i % len(COLORS)], label=name)
        for e in estimates:
            notes.setdefault(e.x, e.note)
    if panel.reference is not None:
        ax.axhline(panel.reference, color="0.5", linestyle="--", linewidth=1)
    every = math.ceil(len(xs) / MAX_LABELS)  # over many cycles, label every n-th point so labels do not overlap
    ax.set_xticks(range(len(xs)), [(f"{x}\n{notes[x]}" if notes.get(x) else x) if i % every == 0 else ""
                                   for i, x in enumerate(xs)])
    ax.set_xlim(-0.5, len(xs) - 0.5)
    if panel.ylim:
        ax.set_ylim(*panel.ylim)
    ax.set_title(panel.title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if len(panel.series) > 1:
        ax.legend(fontsize=8)
