"""`loopchat simulate`: a population of simulated users drives a running service over HTTP and
measures whether the retrain loop learns their preference; `loopchat simulate canary`: they judge a
canary until the gateway decides it."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from feedback.cycles import RECIPES

USER_OPTIONS = [
    click.option("--gateway", default="http://127.0.0.1:8000", envvar="LOOPCHAT_GATEWAY", show_default=True,
                 help="The running gateway (only its public HTTP API is used)."),
    click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                 help="Prompt set: one prompt a line, or a JSON conversation a line (default: the shipped set)."),
    click.option("--preference", default="concise", show_default=True,
                 help="Built-in (concise, polite, no_lists) or module:function taking (prompt, a, b) and returning "
                      "a|b|tie|both_bad."),
    click.option("--score", default=None,
                 help="module:function (prompt, answer) -> float for thumbs (default: the preference's own `score`)."),
    click.option("--threshold", default=0.5, show_default=True, help="Thumbs up when the score reaches this."),
    click.option("--noise", default=0.1, show_default=True, type=click.FloatRange(0, 1),
                 help="Share of votes and thumbs given at random."),
    click.option("--rank-k", default=2, show_default=True, type=click.IntRange(2, 4),
                 help="Answers per comparison; with more than 2 the user ranks them all (Copeland order of the "
                      "preference's pairwise judgments)."),
    click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1)),
    click.option("--max-tokens", default=48, show_default=True, type=click.IntRange(1)),
    click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(0, 2)),
    click.option("--seed", default=0, show_default=True),
]


def user_options(func):
    """The simulated users' options, shared by the loop's simulation and the canary's."""
    for option in reversed(USER_OPTIONS):
        func = option(func)
    return func


@click.group(invoke_without_command=True)
@user_options
@click.option("--api-key", envvar="LOOPCHAT_API_KEY", default=None,
              help="API key for a keyed gateway; must be an admin key to request cycles.")
@click.option("--correction-rate", default=0.2, show_default=True, type=click.FloatRange(0, 1),
              help="Share of thumbs that come with a correction (when the preference can correct).")
@click.option("--cycles", default=3, show_default=True, type=click.IntRange(0), help="Rounds of feedback + cycle.")
@click.option("--recipe", type=click.Choice(RECIPES), default=None,
              help="The recipe each cycle runs (sent with the cycle request; default: the worker's).")
@click.option("--comparisons", default=48, show_default=True, type=click.IntRange(0), help="Comparisons per round.")
@click.option("--thumbs", default=24, show_default=True, type=click.IntRange(0), help="Thumbs per round.")
@click.option("--eval-prompts", default=40, show_default=True, type=click.IntRange(1),
              help="Held-out prompts (never used for feedback) for the win rate.")
@click.option("--eval-samples", default=1, show_default=True, type=click.IntRange(1),
              help="Policy/base answer pairs per held-out prompt.")
@click.option("--cycle-timeout", default=3600.0, show_default=True, help="Seconds to wait for one cycle.")
@click.option("--user", default="simulated-users", show_default=True,
              help="Who the feedback comes from on an open-mode gateway (a keyed one names the key's user).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for report.json and report.png.")
@click.pass_context
def simulate(ctx, prompts, out, **opts):
    """Simulated users give feedback, request cycles and measure the win rate against the base model.

    `loopchat simulate canary --help`: they judge a canary instead."""
    if ctx.invoked_subcommand is not None:
        given = [name for name in ctx.params if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"put --{given[0].replace('_', '-')} after `{ctx.invoked_subcommand}`")
        return
    from loopchat.simulate import DEFAULT_PROMPTS, SimSettings, simulate as run, table

    settings = SimSettings(prompts=prompts or DEFAULT_PROMPTS, out=out, **opts)
    _run(run, settings, table, f"report: {out / 'report.json'}, plot: {out / 'report.png'}" if out else None)


def _run(run, settings, render, written: str | None) -> None:
    """Run a simulation with its log on stderr, print its summary, and say where its report went."""
    from loopchat.simulate import SimulationError

    try:
        report = run(settings, log=lambda line: click.echo(line, err=True))
    except SimulationError as e:
        raise click.ClickException(str(e)) from e
    click.echo(render(report))
    if written:
        click.echo(written)


@simulate.command("canary")
@user_options
@click.option("--version", "version", default=None,
              help="Put this published version on canary first (default: drive the canary already running).")
@click.option("--share", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Share of users on the canary, when starting one.")
@click.option("--users", default=60, show_default=True, type=click.IntRange(1),
              help="Distinct simulated users (an open-mode gateway's X-Loopchat-User).")
@click.option("--vote-share", default=0.2, show_default=True, type=click.FloatRange(0, 1),
              help="Share of the users' turns spent on a comparison to vote on rather than a rated answer.")
@click.option("--timeout", default=1800.0, show_default=True, help="Seconds to wait for the decision.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for canary.json.")
def canary(prompts, out, **opts):
    """Many simulated users chat with `loopchat`, rate what they are served and vote, until the canary is decided.

    Needs an open-mode gateway (each user names itself; a key would make them all one user)."""
    from loopchat.simulate import DEFAULT_PROMPTS
    from loopchat.simulate_canary import CanarySettings, drive, summary

    settings = CanarySettings(prompts=prompts or DEFAULT_PROMPTS, out=out, **opts)
    _run(drive, settings, summary, f"report: {out / 'canary.json'}" if out else None)
