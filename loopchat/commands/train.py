"""`loopchat train sft|rm|ppo` and `loopchat eval`: each training step on its own, from files.

Every step writes its adapter, `metrics.jsonl` and `train_config.json` to --out (default:
DATA_DIR/runs/<step>-<time>); `--publish` on sft/ppo also publishes the adapter as the next
version in DATA_DIR/adapters. Torch and the trainers are imported inside the commands so that
`loopchat --help` stays fast.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import click

from loopchat.options import ensure_model, settings_options, training_process

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
DIR = click.Path(exists=True, file_okay=False, path_type=Path)


@contextmanager
def one_line_errors():
    """Bad input (malformed data, a folder that is not an adapter...) ends as one line, no traceback."""
    from train.artifacts import ArtifactError
    from train.data import DataError

    try:
        yield
    except (DataError, ArtifactError, FileNotFoundError) as e:
        raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None


def out_dir(settings, out: Path | None, step: str) -> Path:
    return out or settings.data_dir / "runs" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"


def echo_metrics(metrics: dict, out: Path) -> None:
    for k, v in metrics.items():
        click.echo(f"  {k:<16} {v:.4g}" if isinstance(v, float) else f"  {k:<16} {v}")
    click.echo(f"saved to {out}")


def maybe_publish(settings, adapter: Path, model: Path, step: str, init_adapter: Path | None, cfg, metrics: dict, data_file: Path) -> None:
    from dataclasses import asdict

    from feedback import Store, cycles
    from train.artifacts import load_manifest, publish

    parent = load_manifest(init_adapter)["version"] if init_adapter and (init_adapter / "manifest.json").is_file() else None
    version = publish(
        adapter,
        settings.adapters_dir,
        base_model=str(model),
        parent_version=parent,
        data_snapshot={"file": str(data_file)},
        hyperparameters={"step": step, **asdict(cfg)},
        metrics=metrics,
    )
    manifest = load_manifest(version)  # recorded in the store, so the gateway can promote it or put it on canary
    cycles.record_adapter(Store(settings.db_path), f"v{manifest['version']}", str(version), manifest)
    click.echo(f"published {version}")


def common_options(func):
    func = click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output folder (default: DATA_DIR/runs/<step>-<time>).")(func)
    func = click.option("--seed", type=int, default=0, show_default=True)(func)
    func = click.option("--lr", type=float, help="Learning rate (default: the step's own).")(func)
    func = click.option("--steps", type=int, help="Stop after this many optimizer steps.")(func)
    func = click.option("-q", "--quiet", is_flag=True, help="No progress bar.")(func)
    return settings_options(func)


@click.group("train")
def train():
    """Run one training step on its own: SFT, reward model or PPO."""
    training_process()


@train.command("sft")
@click.option("--data", required=True, type=FILE, help="Demonstrations, JSONL (sft or unpaired format).")
@click.option("--eval-data", type=FILE, help="Held-out demonstrations for an eval loss.")
@click.option("--init-adapter", type=DIR, help="Continue from this adapter instead of a fresh one.")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--publish", is_flag=True, help="Publish the adapter as the next version.")
@common_options
def sft_command(settings, data, eval_data, init_adapter, epochs, batch_size, publish, out, seed, lr, steps, quiet):
    """Supervised fine-tuning of the policy adapter on demonstrations."""
    from train.sft import SFTConfig, train_sft

    from train.artifacts import check_adapter

    model = ensure_model(settings)
    if init_adapter:
        with one_line_errors():
            check_adapter(init_adapter)
    cfg = SFTConfig(epochs=epochs, batch_size=batch_size, max_steps=steps, seed=seed, **({"lr": lr} if lr else {}))
    out = out_dir(settings, out, "sft")
    with one_line_errors():
        metrics = train_sft(model, data, out, cfg, init_adapter=init_adapter, eval_records=eval_data, quiet=quiet)
        echo_metrics(metrics, out)
        if publish:
            maybe_publish(settings, out, model, "sft", init_adapter, cfg, metrics, data)


@train.command("rm")
@click.option("--data", required=True, type=FILE, help="Preference pairs, JSONL.")
@click.option("--eval-data", type=FILE, help="Held-out pairs (default: hold out 10% of the prompts).")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--batch-size", type=int, default=8, show_default=True, help="Pairs per step.")
@click.option("--margin", type=float, default=0.0, show_default=True)
@common_options
def rm_command(settings, data, eval_data, epochs, batch_size, margin, out, seed, lr, steps, quiet):
    """Train the reward model on preference pairs."""
    from train.reward import RewardConfig, train_reward_model

    model = ensure_model(settings)
    cfg = RewardConfig(epochs=epochs, batch_size=batch_size, margin=margin, max_steps=steps, seed=seed, **({"lr": lr} if lr else {}))
    out = out_dir(settings, out, "rm")
    with one_line_errors():
        metrics = train_reward_model(model, data, out, cfg, eval_records=eval_data, quiet=quiet)
        echo_metrics(metrics, out)


@train.command("ppo")
@click.option("--reward-model", required=True, type=DIR, help="A reward model folder (from `loopchat train rm`).")
@click.option("--prompts", required=True, type=FILE, help="Prompts, JSONL ({\"prompt\": [...]} or a string per line).")
@click.option("--init-adapter", type=DIR, help="Start from this adapter (e.g. the SFT output or the serving version).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Responses per rollout.")
@click.option("--samples-per-prompt", type=click.IntRange(min=1), default=1, show_default=True,
              help="Answers to each prompt of a rollout, each scored against the others (a cycle's PPO uses 4).")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--temperature", type=float, default=0.7, show_default=True)
@click.option("--kl-coef", type=float, default=0.05, show_default=True)
@click.option("--target-kl", type=float, help="Adapt the KL coefficient towards this KL (nats per response).")
@click.option("--publish", is_flag=True, help="Publish the adapter as the next version.")
@common_options
def ppo_command(settings, reward_model, prompts, init_adapter, batch_size, samples_per_prompt, max_new_tokens, temperature, kl_coef,
                target_kl, publish, out, seed, lr, steps, quiet):
    """PPO on the policy adapter against a reward model."""
    from train.ppo import PPOConfig, train_ppo
    from train.reward import RewardModel

    from train.artifacts import check_adapter

    try:
        cfg = PPOConfig(
            batch_size=batch_size,
            samples_per_prompt=samples_per_prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            kl_coef=kl_coef,
            target_kl=target_kl,
            seed=seed,
            **({"lr": lr} if lr else {}),
            **({"steps": steps} if steps else {}),
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    model = ensure_model(settings)
    if init_adapter:
        with one_line_errors():
            check_adapter(init_adapter)
    out = out_dir(settings, out, "ppo")
    with one_line_errors():
        rm = RewardModel(reward_model, model)
        metrics = train_ppo(model, prompts, out, rm, cfg, init_adapter=init_adapter, quiet=quiet)
        echo_metrics(metrics, out)
        if publish:
            maybe_publish(settings, out, model, "ppo", init_adapter, cfg, metrics, prompts)


@click.command("eval")
@click.option("--adapter", required=True, type=DIR, help="The adapter to judge.")
@click.option("--reward-model", type=DIR, help="Reward model folder: enables the accuracy and reward-gain checks.")
@click.option("--prompts", type=FILE, help="Held-out prompts, JSONL.")
@click.option("--baseline", type=DIR, help="The serving adapter to beat (default: the base model).")
@click.option("--pairs", type=FILE, help="Held-out pairs to measure the reward model's accuracy on.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="Per answer, held-out prompts and canaries alike.")
@click.option("--capabilities", type=FILE, help="Capability set, JSONL of {prompt, reference, contains_any} "
              "(default: the shipped train/data/capabilities.jsonl).")
@click.option("--max-kl", type=float, help="Bound on the KL to the baseline, nats per answer (default: the gate's).")
@click.option("--max-kl-base", type=float, help="Bound on the KL to the base model (default: the gate's).")
@click.option("--json", "as_json", is_flag=True, help="Print the whole verdict as JSON.")
@settings_options
def eval_command(settings, adapter, reward_model, prompts, baseline, pairs, max_new_tokens, capabilities, max_kl,
                 max_kl_base, as_json):
    """Run the promotion gate on an adapter and print its figures; exit 1 if it fails."""
    training_process()
    from train.evaluate import GateConfig, evaluate_adapter

    from train.artifacts import check_adapter

    model = ensure_model(settings)
    with one_line_errors():
        check_adapter(adapter, max_rank=settings.max_lora_rank)
        given = {"capabilities": capabilities and str(capabilities), "max_kl": max_kl, "max_kl_base": max_kl_base}
        cfg = GateConfig(max_new_tokens=max_new_tokens, canary_max_new_tokens=max_new_tokens,
                         **{k: v for k, v in given.items() if v is not None})
        verdict = evaluate_adapter(model, adapter, reward_model=reward_model, prompts=prompts, baseline_adapter=baseline, heldout_pairs=pairs, cfg=cfg)
    if as_json:
        click.echo(json.dumps(verdict, indent=2, default=str))
    else:
        click.echo(f"{'check':<24} {'value':>10} {'threshold':>10}  result")
        for name, c in verdict["checks"].items():
            value = "-" if c["value"] is None else f"{c['value']:.4g}"
            threshold = "-" if c["threshold"] is None else f"{c['threshold']:.4g}"
            result = f"skipped ({c['skipped']})" if c["passed"] is None else ("pass" if c["passed"] else "FAIL")
            kinds = c.get("kinds", {})  # by kind of capability item, listed when there are several
            kinds = kinds if len(kinds) > 1 else {}
            click.echo(f"{name:<24} {value:>10} {threshold:>10}  {result}" + (f" (weakest: {c['kind']})" if kinds else ""))
            for kind, k in kinds.items():
                click.echo(f"  {kind:<22} {k['value']:>10.4g} {k['threshold']:>10.4g}  {'pass' if k['passed'] else 'FAIL'}")
        for k, v in verdict["figures"].items():
            click.echo(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}")
        for lost in verdict["capability_lost"]:
            click.echo(f"lost ({lost['kind']}): {lost['prompt']!r} -> {lost['answer']!r}: right in {lost['pass_rate']:.0%} of answers "
                       f"(baseline {lost['baseline_pass_rate']:.0%}: {lost['baseline_answer']!r})")
        click.echo("gate: " + ("PASSED" if verdict["passed"] else "FAILED"))
    if not verdict["passed"]:
        raise SystemExit(1)
