"""`loopchat export`, `loopchat feedback stats`, `loopchat users delete`: the feedback store from the shell."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from loopchat.options import open_store, settings_options


@click.command()
@click.option("--kind", type=click.Choice(["pairs", "unpaired", "sft"]), required=True,
              help="pairs: prompt/chosen/rejected (a ranking of K answers gives every two it orders, with "
                   "meta.group and meta.rank_gap); unpaired: prompt/completion/label; sft: messages.")
@click.option("--split", type=click.Choice(["train", "heldout", "all"]), default="all", show_default=True,
              help="The held-out split is fixed per conversation, so it is the same in every export.")
@click.option("--since", type=float, default=None, help="Only records with feedback newer than this Unix time.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The JSON Lines file to write (replaced).")
@settings_options
def export(settings, kind, split, since, output):
    """Write a training set in TRL's conversational format, one JSON record a line."""
    from feedback.datasets import BUILDERS

    records = BUILDERS[kind](open_store(settings), split=split, since=since)
    partial = output.with_name(output.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(partial, output)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise click.ClickException(f"cannot write {output}: {e.strerror or e}") from e
    click.echo(f"wrote {len(records)} {kind} lines ({split}) to {output}")


@click.group()
def feedback():
    """Look at the feedback users gave."""


@feedback.command()
@settings_options
def stats(settings):
    """Feedback counts by kind and day (UTC), and how many training records each source yields."""
    from feedback.stats import feedback_stats

    result = feedback_stats(open_store(settings))
    kinds = result["kinds"]
    days: dict[str, dict[str, int]] = {}
    for row in result["data"]:
        days.setdefault(row["day"], {})[row["kind"]] = row["count"]
    click.echo(f"{'day':<12}" + "".join(f"{k:>13}" for k in kinds))
    for day, counts in days.items():
        click.echo(f"{day:<12}" + "".join(f"{counts.get(k, 0):>13}" for k in kinds))
    click.echo(f"{'total':<12}" + "".join(f"{result['totals'][k]:>13}" for k in kinds))
    for kind, by_source in result["yields"].items():
        detail = ", ".join(f"{source} {n}" for source, n in sorted(by_source.items())) or "none"
        click.echo(f"{kind}: {sum(by_source.values())} ({detail})")


@click.group()
def users():
    """Manage users."""


@users.command()
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@settings_options
def delete(settings, name, yes):
    """Delete user NAME with their keys, completions and feedback (for privacy requests)."""
    store = open_store(settings)
    if not store.has_user(name):
        raise click.ClickException(f"no user named {name!r}")
    if not yes:
        click.confirm(f"Delete user {name!r} with all their keys, completions and feedback?", abort=True)
    counts = store.delete_user(name)
    detail = ", ".join(f"{n} {table}" for table, n in counts.items() if n)
    click.echo(f"deleted user {name}: {sum(counts.values())} rows ({detail})")
