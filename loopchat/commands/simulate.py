"""`loopchat simulate`: a population of simulated users drives a running service over HTTP and
measures whether the retrain loop learns their preference."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--gateway", default="http://127.0.0.1:8000", envvar="LOOPCHAT_GATEWAY", show_default=True,
              help="The running gateway (only its public HTTP API is used).")
@click.option("--api-key", envvar="LOOPCHAT_API_KEY", default=None,
              help="API key for a keyed gateway; must be an admin key to request cycles.")
@click.option("--prompts", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Prompt set: one prompt a line, or a JSON conversation a line (default: the shipped set).")
@click.option("--preference", default="concise", show_default=True,
              help="Built-in (concise, polite, no_lists) or module:function taking (prompt, a, b) and returning "
                   "a|b|tie|both_bad.")
@click.option("--score", default=None,
              help="module:function (prompt, answer) -> float for thumbs (default: the preference's own `score`).")
@click.option("--threshold", default=0.5, show_default=True, help="Thumbs up when the score reaches this.")
@click.option("--noise", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="Share of votes and thumbs given at random.")
@click.option("--correction-rate", default=0.2, show_default=True, type=click.FloatRange(0, 1),
              help="Share of thumbs that come with a correction (when the preference can correct).")
@click.option("--cycles", default=3, show_default=True, type=click.IntRange(0), help="Rounds of feedback + cycle.")
@click.option("--comparisons", default=48, show_default=True, type=click.IntRange(0), help="Comparisons per round.")
@click.option("--thumbs", default=24, show_default=True, type=click.IntRange(0), help="Thumbs per round.")
@click.option("--eval-prompts", default=40, show_default=True, type=click.IntRange(1),
              help="Held-out prompts (never used for feedback) for the win rate.")
@click.option("--eval-samples", default=1, show_default=True, type=click.IntRange(1),
              help="Policy/base answer pairs per held-out prompt.")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1))
@click.option("--max-tokens", default=48, show_default=True, type=click.IntRange(1))
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(0, 2))
@click.option("--seed", default=0, show_default=True)
@click.option("--cycle-timeout", default=3600.0, show_default=True, help="Seconds to wait for one cycle.")
@click.option("--user", default="simulated-users", show_default=True,
              help="Who the feedback comes from on an open-mode gateway (a keyed one names the key's user).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for report.json and report.png.")
def simulate(prompts, out, **opts):
    """Simulated users give feedback, request cycles and measure the win rate against the base model."""
    from loopchat.simulate import DEFAULT_PROMPTS, SimSettings, SimulationError, simulate as run, table

    settings = SimSettings(prompts=prompts or DEFAULT_PROMPTS, out=out, **opts)
    try:
        report = run(settings, log=lambda line: click.echo(line, err=True))
    except SimulationError as e:
        raise click.ClickException(str(e)) from e
    click.echo(table(report))
    if out:
        click.echo(f"report: {out / 'report.json'}, plot: {out / 'report.png'}")
