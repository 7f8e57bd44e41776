"""The training steps recipes are made of. Each takes the cycle's `Run`, trains, updates what it
made on the run (the policy adapter the next step continues from, the reward model), and returns
(figures for the cycle row's `steps`, figures for the row's own columns)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from train import artifacts
from train.best_of_n import train_best_of_n
from train.ppo import FALLBACK, train_ppo
from train.reward import RewardModel, train_reward_model
from train.sft import train_sft

SKILLS = Path(__file__).parent.parent / "data" / "skills.jsonl"  # PPO-ptx's shipped set (train.cycle's `ptx_data`)


@dataclass
class Data:
    """The cycle's data sets, built from the store (feedback.datasets), split by conversation."""

    sft: list[dict]
    pairs: list[dict]
    heldout_pairs: list[dict]
    prompts: list[dict]
    heldout_prompts: list[dict]


@dataclass
class Run:
    """What the steps of one cycle share."""

    cfg: Any  # train.cycle.CycleConfig
    work: Path  # the cycle's scratch folder
    data: Data
    serving: dict | None  # the serving version's adapter row (None: the base model serves)
    # The newest published version with a reward model, whatever the gate said of its policy: the reward
    # model continues from it (None: none yet).
    reward_from: dict | None
    budgeted: Callable[[str, Any], Any]  # (state, step config) -> the config with its share of the time left
    policy: Path | None = None  # the adapter the next step continues from; None: a fresh LoRA on the base
    # A shorter step than `policy` (PPO's fallback, train.ppo.FALLBACK), set by the last step only: what the
    # gate tries when `policy` fails it for moving too far.
    fallback: Path | None = None
    reference: Path | None = None  # the policy PPO's KL is measured against; None: the base model
    rm_dir: Path | None = None
    reward_model: RewardModel | None = None
    metrics: dict = field(default_factory=dict)  # each step's full metrics, for the manifest


def chosen(metrics: dict) -> dict:
    """What a step's time budget chose and from which speed (see train.budget), for the cycle row."""
    keys = ("time_budget_s", "planned_steps", "measured_s_per_step", "held_out_prompts", "sampled_batches",
            "measured_s_per_batch")
    return {k: metrics[k] for k in keys if metrics.get(k) is not None}


def sft(run: Run) -> tuple[dict, dict]:
    """SFT on the demonstrations, continuing the run's policy (nothing to do without demonstrations)."""
    metrics = {}
    if run.data.sft:
        metrics = train_sft(run.cfg.model_dir, run.data.sft, run.work / "sft", run.budgeted("sft", run.cfg.sft),
                            init_adapter=run.policy, quiet=True)
        run.policy = run.work / "sft"
    run.metrics["sft"] = metrics
    return {"examples": len(run.data.sft), "steps": metrics.get("steps"), "loss": metrics.get("train_loss"),
            **chosen(metrics)}, {}


def reward_model(run: Run) -> tuple[dict, dict]:
    """The reward model on the pairs (Bradley-Terry), continuing the newest published one (`run.reward_from`);
    accuracy on the held-out pairs."""
    init_from = artifacts.reward_model_dir(run.reward_from["path"]) if run.reward_from else None
    out = run.work / "rm"
    metrics = train_reward_model(run.cfg.model_dir, run.data.pairs, out, run.budgeted("reward_model", run.cfg.rm),
                                 eval_records=run.data.heldout_pairs or None, init_from=init_from, quiet=True)
    run.rm_dir, run.reward_model = out, RewardModel(out, run.cfg.model_dir)
    run.metrics["reward_model"] = metrics
    figures = {k: metrics.get(k) for k in ("accuracy", "accuracy_ci95", "eval_pairs", "train_accuracy", "steps",
                                           "new_pairs", "replayed_pairs", "probe_reads", "probe_l2", "probe_answers",
                                           "probe_answers_read", "probe_s")}
    figures["init_from"] = run.reward_from["version"] if init_from else None
    return {**figures, **chosen(metrics)}, {"rm_accuracy": metrics.get("accuracy")}


def best_of_n(run: Run) -> tuple[dict, dict]:
    """Best-of-n distillation from the run's policy: n answers to each training prompt, the reward
    model's pick of each prompt's answers trained on (train.best_of_n)."""
    out = run.work / "best_of_n"
    metrics = train_best_of_n(run.cfg.model_dir, run.data.prompts or run.data.heldout_prompts, out, run.reward_model.score,
                              run.budgeted("best_of_n", run.cfg.best_of_n), init_adapter=run.policy, quiet=True)
    run.policy = out
    run.metrics["best_of_n"] = metrics
    keys = ("prompts", "answers", "score_all", "score_best", "best_ended", "kl", "stop")
    return {**{k: metrics.get(k) for k in keys}, "steps": metrics["fit_steps"], "loss": metrics["fit_train_loss"],
            **chosen(metrics)}, {}


def ptx_demonstrations(run: Run) -> list[dict] | str | None:
    """What PPO-ptx mixes in (the cycle config's `ptx_data`): the cycle's own demonstrations, the shipped
    general-skills set, or a file."""
    source = run.cfg.ptx_data
    if source == "demonstrations":
        return run.data.sft or None
    return str(SKILLS) if source == "skills" else source


def ppo(run: Run) -> tuple[dict, dict]:
    """PPO against the reward model from the run's policy, its KL penalty against `run.reference`, with
    demonstrations mixed in when `ppo.ptx_coef` > 0 (PPO-ptx; which ones: ptx_demonstrations)."""
    out = run.work / "ppo"
    metrics = train_ppo(run.cfg.model_dir, run.data.prompts or run.data.heldout_prompts, out, run.reward_model.score,
                        run.budgeted("ppo", run.cfg.ppo), init_adapter=run.policy, value_head_from=run.rm_dir,
                        reference_adapter=run.reference, demonstrations=ptx_demonstrations(run), quiet=True)
    run.policy = out
    run.fallback = out / FALLBACK if metrics["fallback_step"] else None
    run.metrics["ppo"] = metrics
    keys = ("steps", "stop", "score_first", "score_last", "kl_last", "kl_base_last", "ptx_loss_last", "fallback_step",
            "fallback_kl")
    reference = run.serving["version"] if run.reference is not None else "base"
    ptx = run.cfg.ptx_data if run.cfg.ppo.ptx_coef > 0 else None
    return {**{k: metrics.get(k) for k in keys}, "reference": reference, "ptx_data": ptx,
            "ptx_coef": run.cfg.ppo.ptx_coef, "kl_base_coef": run.cfg.ppo.kl_base_coef, **chosen(metrics)}, {}
