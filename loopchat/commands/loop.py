"""`loopchat worker` and `loopchat cycle run|list|show|cancel`: the retrain loop."""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path
from time import sleep

import click

from feedback.cycles import RECIPES
from loopchat.options import ensure_model, open_store, settings_options, training_process

log = logging.getLogger("loopchat.cycle")
WAIT_POLL_S = 5.0  # how often `cycle run --wait` looks whether the running cycle has ended


def loop_options(func):
    options = [
        click.option("--gateway", default="http://127.0.0.1:8000", envvar="LOOPCHAT_GATEWAY", show_default=True,
                     help="Gateway whose admin API promotes new versions."),
        click.option("--admin-key", envvar="LOOPCHAT_ADMIN_KEY", default=None,
                     help="Admin API key (not needed when the gateway runs in open mode)."),
        click.option("--no-promote", is_flag=True, help="Publish new versions but leave promotion to an operator."),
        click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help='JSON overrides, e.g. {"ppo": {"steps": 4, "ptx_coef": 0.1}, "gate": {"max_kl": 8}, '
                          '"min_pairs": 8, "cycle_minutes": 15, "init": "base", "end_at": "canary", '
                          '"canary_share": 0.2}.'),
        click.option("--cycle-minutes", type=click.FloatRange(min=0), default=None,
                     help="Time budget of a cycle: each step gets a share and sizes its work to it from the speed "
                          "it measures on its first batches, never beyond the step sizes of the config. "
                          "0: the config's step sizes as they are. Default: the --config file's cycle_minutes, "
                          "else 10."),
        click.option("--recipe", type=click.Choice(RECIPES), default=None,
                     help="How a cycle trains its policy: rlhf (SFT, reward model, PPO) or sft (SFT, and the "
                          "reward model for the gate). Default: the --config file's recipe, else rlhf. A cycle "
                          "queued with a recipe (POST /admin/cycles {\"recipe\": ...}) runs that one."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def cycle_config(settings, gateway, admin_key, no_promote, config_file, cycle_minutes, recipe=None):
    from train.cycle import CycleConfig
    from train.evaluate import GateConfig

    overrides = json.loads(config_file.read_text()) if config_file else {}
    if cycle_minutes is not None:
        overrides["cycle_minutes"] = cycle_minutes
    if recipe is not None:
        overrides["recipe"] = recipe
    base = {"model_dir": ensure_model(settings), "adapters_dir": settings.adapters_dir,
            "gateway_url": None if no_promote else gateway.rstrip("/"), "admin_key": admin_key,
            "gate": GateConfig(cache_dir=str(settings.cache_dir / "gate"))}
    try:
        cfg = CycleConfig.from_dict(base, overrides)
    except (AttributeError, TypeError, ValueError) as e:
        raise click.ClickException(f"{config_file}: {e}") from e
    rank = max(cfg.sft.lora_r, cfg.ppo.lora_r)  # the policy adapter (SFT's, continued by PPO) is what serves
    if rank > settings.max_lora_rank:
        raise click.ClickException(f"the policy's LoRA rank {rank} is above the server's maximum "
                                   f"{settings.max_lora_rank} (LOOPCHAT_MAX_LORA_RANK); its adapters could not be served")
    return cfg


def _logging() -> None:
    training_process()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


@click.command()
@loop_options
@click.option("--interval", default=300.0, show_default=True, help="Seconds between feedback checks.")
@click.option("--cron", default=None, help="A crontab expression instead of --interval, e.g. '0 3 * * *'.")
@click.option("--min-thumbs", default=50, show_default=True, help="New thumbs that start a cycle (0 = never).")
@click.option("--min-comparisons", default=20, show_default=True, help="New comparison votes that start a cycle.")
@click.option("--min-corrections", default=10, show_default=True, help="New corrections that start a cycle.")
@settings_options
def worker(settings, gateway, admin_key, no_promote, config_file, cycle_minutes, recipe, interval, cron, min_thumbs,
           min_comparisons, min_corrections):
    """Run retrain cycles when enough feedback has arrived (or an operator asks)."""
    from train.worker import Thresholds, Worker

    _logging()
    cfg = cycle_config(settings, gateway, admin_key, no_promote, config_file, cycle_minutes, recipe)
    Worker(open_store(settings), cfg, Thresholds(min_thumbs, min_comparisons, min_corrections)).run_forever(
        interval, cron)


@click.group()
def cycle():
    """Run and inspect retrain cycles."""


@cycle.command()
@loop_options
@click.option("--wait", is_flag=True, help="While another cycle runs, wait for it to end, then run this one.")
@settings_options
def run(settings, gateway, admin_key, no_promote, config_file, cycle_minutes, recipe, wait):
    """Run one cycle now, here, and print how it ended."""
    _logging()
    store = open_store(settings)
    cfg = cycle_config(settings, gateway, admin_key, no_promote, config_file, cycle_minutes, recipe)
    cycle_id = _claim_cycle(store, wait, recipe)
    from train.cycle import run_cycle

    row = run_cycle(store, cycle_id, cfg)
    _show(row)
    if row["state"] in ("failed", "cancelled"):
        raise SystemExit(1)


def _claim_cycle(store, wait: bool, recipe: str | None) -> int:
    """A cycle for this process to run: a new one (with `recipe`), or the queued one that no worker has
    taken yet (with its own recipe, if it has one). While another one runs: an error that says which,
    or with `wait`, a wait until it ends."""
    from feedback import cycles

    waiting_for = None
    while True:
        cycles.fail_orphans(store)
        cycle_id = cycles.queue_cycle(store, trigger="manual", claim=True, recipe=recipe)
        if cycle_id is not None:
            return cycle_id
        active = cycles.active_cycle(store)
        if active is None:  # it ended just now
            continue
        if active["state"] == "queued":
            if cycles.claim(store, active["id"]):
                log.info("%s: it runs here", cycles.describe(active))
                return active["id"]
            continue  # a worker took it first
        if not wait:
            raise click.ClickException(f"{cycles.describe(active)}; `loopchat cycle run --wait` runs yours "
                                       "right after it")
        if (active["id"], active["state"]) != waiting_for:
            log.info("waiting: %s", cycles.describe(active))
            waiting_for = active["id"], active["state"]
        sleep(WAIT_POLL_S)


@cycle.command("list")
@click.option("--limit", default=20, show_default=True)
@settings_options
def list_(settings, limit):
    """The latest cycles, newest first."""
    from feedback import cycles

    rows = cycles.list_cycles(open_store(settings), limit)
    click.echo(f"{'id':>4}  {'state':<13}{'trigger':<10}{'recipe':<7}{'started':<20}{'took':>8}{'budget':>8}  {'pairs':>5} "
               f"{'rm acc':>6} {'reward':>7} {'kl':>6}  {'gate':<5}{'version':<8}")
    for r in rows:
        click.echo(f"{r['id']:>4}  {r['state']:<13}{r['trigger']:<10}{r['recipe'] or '-':<7}"
                   f"{_when(r['started_at'] or r['created_at']):<20}"
                   f"{_num(r['duration_s'], '.0f', 's'):>8}{_num(r['budget_s'], '.0f', 's'):>8}  "
                   f"{_num(r['n_pairs'], 'd'):>5} {_num(r['rm_accuracy'], '.2f'):>6} "
                   f"{_num(r['mean_reward'], '.2f'):>7} {_num(r['kl'], '.2f'):>6}  {r['gate'] or '-':<5}"
                   f"{r['version'] or '-':<8}")


@cycle.command()
@click.argument("cycle_id", type=int)
@settings_options
def show(settings, cycle_id):
    """One cycle with the figures and duration of each step."""
    from feedback import cycles

    row = cycles.get_cycle(open_store(settings), cycle_id)
    if row is None:
        raise click.ClickException(f"no cycle {cycle_id}")
    _show(row)


@cycle.command()
@click.argument("cycle_id", type=int)
@settings_options
def cancel(settings, cycle_id):
    """Stop a cycle: a queued one at once, a running one after its current step."""
    from feedback import cycles

    store = open_store(settings)
    if cycles.get_cycle(store, cycle_id) is None:
        raise click.ClickException(f"no cycle {cycle_id}")
    row = cycles.request_cancel(store, cycle_id)
    click.echo(f"cycle {cycle_id}: {row['state']}" + (" (cancel requested)" if row["cancel_requested"] else ""))


def _show(row: dict) -> None:
    budget = f" (budget {row['budget_s']:g} s)" if row["budget_s"] else ""
    click.echo(f"cycle {row['id']}: {row['state']} ({row['trigger']}), {_num(row['duration_s'], '.1f', ' s')}{budget}")
    for key in ("recipe", "n_sft", "n_pairs", "n_prompts", "rm_accuracy", "mean_reward", "kl", "gate", "version", "error"):
        if row.get(key) is not None:
            click.echo(f"  {key:<12} {row[key]}")
    for step, figures in row["steps"].items():
        rest = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()
                         if k != "duration_s")
        click.echo(f"  {step:<14} {figures.get('duration_s', 0):7.1f} s  {rest}")


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%F %T") if ts else "-"


def _num(value, fmt: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{fmt}}{suffix}"
