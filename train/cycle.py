"""One retrain cycle, top to bottom: data -> SFT -> reward model -> PPO -> gate -> publish -> promote.

Each step moves the cycle's row in the store (`feedback.cycles`) and records its figures and
duration, so the dashboard can follow along. With a time budget (`cycle_minutes`) each step gets
its share of the time left and sizes its own work to it from the speed it measures (train.budget);
what it chose is recorded with its figures. The serving policy is touched only by the final
promote call to the gateway's admin API: a cycle that fails or is killed anywhere before it
leaves what users see unchanged."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from feedback import Store, cycles
from feedback.datasets import build_pairs, build_prompts, build_sft
from train import artifacts
from train.evaluate import GateConfig, evaluate_adapter
from train.ppo import PPOConfig, train_ppo
from train.reward import RewardConfig, RewardModel, train_reward_model
from train.sft import SFTConfig, train_sft

log = logging.getLogger("loopchat.cycle")

# A cycle's time budget is split in the proportions of run D's step durations (bench/RESULTS.md, four
# cycles on the AVX-512 machine: SFT 133 s, reward model 469 s, PPO 453 s, gate 189 s), so a machine as
# fast as that one runs run D's sizes unchanged within 10 minutes and a slower one shrinks every step
# alike. The 5% left pays for building the data sets, publishing and promoting.
SHARES = {"sft": 0.10, "reward_model": 0.35, "ppo": 0.35, "evaluating": 0.15}


@dataclass
class CycleConfig:
    """Everything one cycle needs besides the store. Step configs are the trainers' own."""

    model_dir: Path
    adapters_dir: Path
    gateway_url: str | None = "http://127.0.0.1:8000"  # None: publish only, the operator promotes
    admin_key: str | None = None
    min_pairs: int = 4  # fewer train pairs than this and the cycle fails before training
    cycle_minutes: float = 10.0  # time budget; 0: every step runs its fixed size from the configs below
    max_prompts: int = 256
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(max_steps=30))
    rm: RewardConfig = field(default_factory=lambda: RewardConfig(epochs=2))
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(steps=8, batch_size=8, max_new_tokens=48))
    gate: GateConfig = field(default_factory=GateConfig)

    @classmethod
    def from_dict(cls, base: dict, overrides: dict) -> "CycleConfig":
        """`overrides`: {"sft": {...}, "rm": {...}, "ppo": {...}, "gate": {...}, "min_pairs": N, ...}."""
        cfg = cls(**base)
        for key, value in overrides.items():
            current = getattr(cfg, key)
            setattr(cfg, key, dataclasses.replace(current, **value) if dataclasses.is_dataclass(current) else value)
        return cfg


class Cancelled(Exception):
    pass


class CycleFailed(Exception):
    pass


class _Heartbeat(threading.Thread):
    """Keeps the cycle's heartbeat fresh (so others know this worker lives) and notices cancels."""

    def __init__(self, store: Store, cycle_id: int, every_s: float = 5.0):
        super().__init__(daemon=True)
        self.store, self.cycle_id, self.every_s = store, cycle_id, every_s
        self.cancelled = False
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.cancelled = not cycles.heartbeat(self.store, self.cycle_id)

    def stop(self) -> None:
        self._stop.set()


def run_cycle(store: Store, cycle_id: int, cfg: CycleConfig) -> dict:
    """Run a claimed cycle to its outcome; returns the final cycle row. Never raises for a
    failed step: the failure is recorded on the row."""
    beat = _Heartbeat(store, cycle_id)
    beat.start()
    work = Path(tempfile.mkdtemp(prefix=f"cycle-{cycle_id}-"))
    try:
        _steps(store, cycle_id, cfg, work, beat)
    except Cancelled:
        cycles.advance(store, cycle_id, "cancelled", error="cancelled by an operator")
    except Exception as e:  # recorded, not raised: the worker goes on to the next cycle
        log.exception("cycle %d failed", cycle_id)
        cycles.advance(store, cycle_id, "failed", error=f"{type(e).__name__}: {e}")
    finally:
        beat.stop()
        shutil.rmtree(work, ignore_errors=True)
    return cycles.get_cycle(store, cycle_id)


def step_budget(step: str, left_s: float) -> float:
    """Seconds for `step`: its share of the time left against the shares of the steps still to
    run, so what an earlier step did not use (little data, no demonstrations) goes to later ones."""
    later = list(SHARES)[list(SHARES).index(step):]
    return max(0.0, left_s) * SHARES[step] / (sum(SHARES[s] for s in later) + 1 - sum(SHARES.values()))


def _chosen(metrics: dict) -> dict:
    """What a step's time budget chose and from which speed (see train.budget), for the cycle row."""
    keys = ("time_budget_s", "planned_steps", "measured_s_per_step", "held_out_prompts", "measured_s_per_batch")
    return {k: metrics[k] for k in keys if metrics.get(k) is not None}


def _steps(store: Store, cycle_id: int, cfg: CycleConfig, work: Path, beat: _Heartbeat) -> None:
    clock = [time.monotonic()]
    deadline = clock[0] + cfg.cycle_minutes * 60

    def budgeted(step: str, step_cfg):
        """`step_cfg` with the step's share of the time left as its budget (as it is without a cycle budget)."""
        if not cfg.cycle_minutes:
            return step_cfg
        return dataclasses.replace(step_cfg, time_budget_s=round(step_budget(step, deadline - time.monotonic()), 1))

    def step_done(next_state: str, figures: dict | None = None, **row_figures) -> None:
        if beat.cancelled or not cycles.heartbeat(store, cycle_id):
            raise Cancelled()
        now = time.monotonic()
        cycles.advance(store, cycle_id, next_state, {"duration_s": round(now - clock[0], 2), **(figures or {})},
                       **row_figures)
        clock[0] = now
        log.info("cycle %d: %s", cycle_id, next_state)

    # The budget is on the row from the start: even a cycle that fails before training shows it.
    cycles.advance(store, cycle_id, "building_data", budget_s=cfg.cycle_minutes * 60 or None)
    serving = _serving_adapter(store)

    # 1. Data: every split decided by conversation hash, the same as `loopchat export`.
    sft_rows = build_sft(store, split="train")
    pairs = build_pairs(store, split="train")
    heldout_pairs = build_pairs(store, split="heldout")
    prompts = build_prompts(store, split="train", limit=cfg.max_prompts)
    heldout_prompts = build_prompts(store, split="heldout", limit=cfg.gate.max_prompts)
    if len(pairs) < cfg.min_pairs:
        raise CycleFailed(f"only {len(pairs)} training pairs; need at least {cfg.min_pairs}")
    snapshot = {"sft": _ids(sft_rows), "pairs": _ids(pairs), "heldout_pairs": _ids(heldout_pairs),
                "n_prompts": len(prompts)}
    step_done("sft", {"heldout_pairs": len(heldout_pairs), "heldout_prompts": len(heldout_prompts)},
              n_sft=len(sft_rows), n_pairs=len(pairs), n_prompts=len(prompts))

    # 2. SFT on demonstrations, continuing from the serving adapter.
    policy_init = serving["path"] if serving else None
    sft_metrics = {}
    if sft_rows:
        sft_metrics = train_sft(cfg.model_dir, sft_rows, work / "sft", budgeted("sft", cfg.sft),
                                init_adapter=policy_init, quiet=True)
        policy_init = work / "sft"
    step_done("reward_model", {"examples": len(sft_rows), "steps": sft_metrics.get("steps"),
                               "loss": sft_metrics.get("train_loss"), **_chosen(sft_metrics)})

    # 3. Reward model on pairs (Bradley-Terry), accuracy on the held-out pairs.
    rm_metrics = train_reward_model(cfg.model_dir, pairs, work / "rm", budgeted("reward_model", cfg.rm),
                                    eval_records=heldout_pairs or None, quiet=True)
    step_done("ppo", {"accuracy": rm_metrics.get("accuracy"), "train_accuracy": rm_metrics.get("train_accuracy"),
                      "steps": rm_metrics.get("steps"), **_chosen(rm_metrics)},
              rm_accuracy=rm_metrics.get("accuracy"))

    # 4. PPO against the reward model, starting from the SFT (or serving) policy.
    reward_model = RewardModel(work / "rm", cfg.model_dir)
    ppo_metrics = train_ppo(cfg.model_dir, prompts or heldout_prompts, work / "ppo", reward_model.score,
                            budgeted("ppo", cfg.ppo), init_adapter=policy_init, value_head_from=work / "rm", quiet=True)
    ppo_figures = {k: ppo_metrics.get(k) for k in ("steps", "stop", "score_first", "score_last", "kl_last")}
    step_done("evaluating", {**ppo_figures, **_chosen(ppo_metrics)})

    # 5. The gate.
    verdict = evaluate_adapter(cfg.model_dir, work / "ppo", reward_model=reward_model,
                               prompts=heldout_prompts or prompts[: cfg.gate.max_prompts],
                               baseline_adapter=serving["path"] if serving else None,
                               heldout_pairs=heldout_pairs or None, cfg=budgeted("evaluating", cfg.gate))
    checks = verdict["checks"]
    figures = {"rm_accuracy": checks["rm_accuracy"].get("value"), "kl": checks["kl"].get("value"),
               "mean_reward": verdict["figures"].get("reward_candidate"),
               "baseline_reward": verdict["figures"].get("reward_baseline"),
               "canaries_ok": checks["canaries"].get("value")}
    sizes = _chosen(verdict["figures"])
    gate = "pass" if verdict["passed"] else "fail"

    # 6. Publish atomically as version N.
    version_dir = artifacts.publish(
        work / "ppo", cfg.adapters_dir, base_model=str(cfg.model_dir),
        parent_version=int(serving["version"][1:]) if serving else None, data_snapshot=snapshot,
        hyperparameters={"cycle_minutes": cfg.cycle_minutes,
                         **{k: dataclasses.asdict(getattr(cfg, k)) for k in ("sft", "rm", "ppo", "gate")}},
        metrics={"sft": sft_metrics, "reward_model": rm_metrics, "ppo": ppo_metrics, **figures},
        gate=verdict)
    manifest = artifacts.load_manifest(version_dir)
    version = f"v{manifest['version']}"
    cycles.record_adapter(store, version, str(version_dir), manifest, cycle_id)
    step_done("published", {"gate": gate, **figures, **sizes}, version=version, gate=gate,
              mean_reward=figures["mean_reward"], kl=figures["kl"])

    # 7. Promote through the gateway (or stop at `published` when there is none).
    if gate == "fail":
        failed = ", ".join(k for k, c in checks.items() if c.get("passed") is False)
        cycles.advance(store, cycle_id, "rejected", error=f"gate failed: {failed}")
        return
    if not cfg.gateway_url:
        return
    headers = {"Authorization": f"Bearer {cfg.admin_key}"} if cfg.admin_key else {}
    r = httpx.post(f"{cfg.gateway_url}/admin/adapters/{version}/promote", headers=headers, timeout=300)
    if r.status_code != 200:
        raise CycleFailed(f"promotion of {version} failed: HTTP {r.status_code} {r.text[:300]}")
    cycles.advance(store, cycle_id, "promoted", {"switch_ms": r.json().get("switch_ms")})


def _serving_adapter(store: Store) -> dict | None:
    version, _ = cycles.serving_version(store)
    return cycles.get_adapter(store, version) if version else None


def _ids(records: list[dict]) -> list[str]:
    return sorted({i for r in records for i in r.get("meta", {}).get("ids", [])})

