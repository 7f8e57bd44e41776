"""One retrain cycle, top to bottom: data -> the recipe's training steps -> gate -> publish -> promote.

The recipe (train.recipes: `rlhf`, SFT + reward model + PPO, by default; `sft`) is the one the cycle
was queued with, else the config's. Each step moves the cycle's row in the store (`feedback.cycles`)
and records its figures and duration, so the dashboard can follow along. With a time budget
(`cycle_minutes`) each step gets its recipe's share of the time left and sizes its own work to it from
the speed it measures (train.budget); what it chose is recorded with its figures. The training steps
leave the gate at least what it took per candidate in the last cycle (judging_seconds), and PPO as
much again once it has a fallback for the gate to judge. Once the gate's capability checks have refused
a candidate in the store, PPO mixes `ptx_data` into its updates (PPO-ptx, `ptx_after_capability_loss`);
once the serving version is near the gate's bound on KL to the base model, PPO also pays for KL to the
base (`kl_base_coef_near_bound`).
The serving policy is touched only by the final call to the gateway's admin API (promote, or start a
canary): a cycle that fails or is killed anywhere before it leaves what users see unchanged."""

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
from train import artifacts, recipes
from train.best_of_n import BestOfNConfig
from train.evaluate import CAPABILITY_CHECKS, GateConfig, evaluate_adapter
from train.ppo import PPOConfig
from train.recipes.steps import Data, Run, chosen, ppo as ppo_step
from train.reward import RewardConfig
from train.sft import SFTConfig

log = logging.getLogger("loopchat.cycle")

SHARES = recipes.rlhf.SHARES  # the default recipe's budget shares
INITS = ("serving", "base")
# The gate's checks of how far a candidate moved from what it replaces and what that cost. A candidate that
# fails only these may have gone too far in a good direction: a shorter step may pass. Failing the reward
# model's accuracy or the reward gain, it has no good direction to offer.
MOVED_TOO_FAR = {"kl", "kl_base", "canaries", "capability_loglik", "capability_pass", "capability_loglik_base",
                 "capability_pass_base"}
ENDS = ("promoted", "canary")
PTX_SETS = ("demonstrations", "skills")


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
    recipe: str = recipes.DEFAULT  # for cycles queued without one (train.recipes)
    # Where the policy starts: `serving` continues the serving adapter, and PPO's KL is to it (the policy
    # it replaces); `base` trains a fresh adapter on all the pooled data each cycle, PPO's KL to the base
    # model. The reward model continues the serving version's either way.
    init: str = "serving"
    # How a cycle that passes the gate ends: `promoted` (it serves everyone) or `canary` (it serves
    # `canary_share` of users beside the serving version, and the canary's rule or an operator decides).
    end_at: str = "promoted"
    canary_share: float = 0.1
    sft: SFTConfig = field(default_factory=lambda: SFTConfig(max_steps=30))
    rm: RewardConfig = field(default_factory=lambda: RewardConfig(epochs=0))  # the linear probe alone (bench/RESULTS.md)
    best_of_n: BestOfNConfig = field(default_factory=lambda: BestOfNConfig(max_new_tokens=48))
    # 4 answers to each of 2 prompts a step, scored against each other, at lr 3e-4: against a frozen reward
    # model one answer per prompt learned nothing at 5e-5 and went past PPO's KL stop at 3e-4 (bench/RESULTS.md,
    # "PPO with 4 answers to each prompt").
    # PPO-ptx (`ppo.ptx_coef`) is off from the start: on plain_words it let the loop promote two cycles in a row, on
    # second_person it held the policy to the skills set's short plain answers and the taste was not learned
    # (bench/RESULTS.md, runs X, Y, N): a style the users did not ask for. It switches on once the capability
    # guard has refused a candidate (`ptx_after_capability_loss`, below).
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(steps=8, batch_size=8, max_new_tokens=48, samples_per_prompt=4, lr=3e-4))
    # What PPO-ptx (`ppo.ptx_coef` > 0) mixes into PPO's updates: `skills`, the shipped general-skills set
    # (train/data/skills.jsonl: facts, arithmetic, short instructions, explanations, none of them the gate's capability
    # items); `demonstrations`, the cycle's own (what users wrote and chose: run Q, at 0.5 they held PPO's
    # reward gain at zero and protected nothing); or the path of a JSONL of demonstrations.
    ptx_data: str = "skills"
    # PPO-ptx's weight once the gate's capability checks have refused a candidate in this store (or the full step
    # of one whose fallback it judged instead): from then on every cycle that runs PPO mixes `ptx_data` into it at
    # least at this weight (0: never). Until then PPO runs with `ppo.ptx_coef`. Why: ptx from the first cycle held a
    # taste its set does not share to the set's style (run Y), but once a taste's next step costs capability
    # items, ptx 0.2 on the skills set let the same cycle pass the guard (bench/RESULTS.md, "PPO-ptx on a shipped
    # skills set") and `plain_words` promote twice in a row (run X). The alignment tax is paid when it shows.
    ptx_after_capability_loss: float = 0.2
    # PPO's price per nat of KL to the base model (`ppo.kl_base_coef`) once the serving version is less than one
    # cycle's trust region (`gate.max_kl`) from the gate's bound on it (`gate.max_kl_base`); 0: never. Why: each
    # promotion adds 4-8 nats to the base, and a candidate past that bound is refused whatever else it gained.
    # From run AF's v7 (33.3 nats), the same cycle without it went to 40.6 and was refused; at 0.02 it passed at 34.9
    # with a reward gain; at 0.05 it fell back to 20.4 and lost the taste (bench/RESULTS.md, "A price on KL to the base").
    # Three more cycles at 0.02: one promoted, two fell back ~10 nats and lost the taste; none was refused for KL.
    # At 0.01 those two cycles, run again from the same states, both passed, and run AF's next eight cycles at 0.01 were
    # all promoted (none refused for KL), though the win rate rose for five and fell for three ("Run AF, cycles 12-16").
    kl_base_coef_near_bound: float = 0.01
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self):
        recipes.get(self.recipe)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, not {self.init!r}")
        if self.end_at not in ENDS:
            raise ValueError(f"end_at must be one of {', '.join(ENDS)}, not {self.end_at!r}")
        if self.ptx_data not in PTX_SETS and not Path(self.ptx_data).is_file():
            raise ValueError(f"ptx_data must be {' or '.join(PTX_SETS)} or a JSONL file, not {self.ptx_data!r}")
        if self.kl_base_coef_near_bound < 0:
            raise ValueError(f"kl_base_coef_near_bound must be 0 or more, not {self.kl_base_coef_near_bound!r}")
        if self.ptx_after_capability_loss < 0:
            raise ValueError(f"ptx_after_capability_loss must be 0 or more, not {self.ptx_after_capability_loss!r}")
        if not 0 < self.canary_share < 1:
            raise ValueError(f"canary_share must be between 0 and 1, not {self.canary_share!r}")

    @classmethod
    def from_dict(cls, base: dict, overrides: dict) -> "CycleConfig":
        """`overrides`: {"sft": {...}, "rm": {...}, "best_of_n": {...}, "ppo": {...}, "gate": {...}, "min_pairs": N, ...}."""
        cfg = cls(**base)
        for key, value in overrides.items():
            current = getattr(cfg, key)
            setattr(cfg, key, dataclasses.replace(current, **value) if dataclasses.is_dataclass(current) else value)
        cfg.__post_init__()
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
    recipe = cycles.get_cycle(store, cycle_id)["recipe"] or cfg.recipe
    cycles.record_recipe(store, cycle_id, recipe)
    beat = _Heartbeat(store, cycle_id)
    beat.start()
    work = Path(tempfile.mkdtemp(prefix=f"cycle-{cycle_id}-"))
    try:
        _steps(store, cycle_id, dataclasses.replace(cfg, recipe=recipe), work, beat)
    except Cancelled:
        cycles.advance(store, cycle_id, "cancelled", error="cancelled by an operator")
    except Exception as e:  # recorded, not raised: the worker goes on to the next cycle
        log.exception("cycle %d failed", cycle_id)
        cycles.advance(store, cycle_id, "failed", error=f"{type(e).__name__}: {e}")
    finally:
        beat.stop()
        shutil.rmtree(work, ignore_errors=True)
    return cycles.get_cycle(store, cycle_id)


def step_budget(step: str, left_s: float, shares: dict[str, float] = SHARES, gate_s: float | None = None) -> float:
    """Seconds for `step`: its share of the time left against the shares of the steps still to
    run, so what an earlier step did not use (little data, no demonstrations) goes to later ones.
    `gate_s`: what the gate is measured to need (judging_seconds); when that is more than the gate's
    share, a training step shares the time left after it instead."""
    later = list(shares)[list(shares).index(step):]
    weight = sum(shares[s] for s in later) + 1 - sum(shares.values())
    if gate_s is not None and step != "evaluating" and gate_s > left_s * shares["evaluating"] / weight:
        left_s, weight = left_s - gate_s, weight - shares["evaluating"]
    return max(0.0, left_s) * shares[step] / weight


def judging_seconds(store: Store) -> float | None:
    """How long the gate took to judge one candidate in the newest cycle that reached it (its
    `evaluating` step, halved when it judged PPO's fallback too); None before any cycle has. The gate's
    canaries and capability set are a fixed amount of work per candidate (80-100 s on 2 cores) that its
    share of a 10-minute budget does not hold, so the training steps leave it what it was seen to take."""
    for row in cycles.list_cycles(store, limit=20):
        judged = row["steps"].get("evaluating")
        if judged and judged.get("duration_s"):
            return judged["duration_s"] / (2 if judged.get("fell_back") else 1)
    return None


def capability_refused(store: Store) -> int | None:
    """The newest cycle whose candidate, or the full step of one whose fallback was judged instead, failed
    one of the gate's capability checks; None when none has."""
    for row in cycles.list_cycles(store, limit=-1):  # -1: SQLite's "no limit", every cycle newest first
        gate = row["steps"].get("evaluating") or {}
        failed = set(gate.get("failed", [])) | set((gate.get("fell_back") or {}).get("failed", []))
        if failed & set(CAPABILITY_CHECKS):
            return row["id"]
    return None


def _steps(store: Store, cycle_id: int, cfg: CycleConfig, work: Path, beat: _Heartbeat) -> None:
    recipe = recipes.get(cfg.recipe)
    clock = [time.monotonic()]
    deadline = clock[0] + cfg.cycle_minutes * 60
    # The training steps leave the gate what it took to judge one candidate last cycle; PPO keeps as much
    # again while it is past its fallback, which the gate would then have to judge too.
    judging_s = judging_seconds(store)

    def budgeted(step: str, step_cfg, share: float = 1.0):
        """`step_cfg` with the step's share of the time left as its budget (as it is without a cycle budget);
        `share`: the part of that a step run more than once (the gate) takes this time."""
        if not cfg.cycle_minutes:
            return step_cfg
        seconds = step_budget(step, deadline - time.monotonic(), recipe.SHARES, judging_s) * share
        if step == "ppo" and judging_s:
            step_cfg = dataclasses.replace(step_cfg, fallback_reserve_s=round(judging_s, 1))
        return dataclasses.replace(step_cfg, time_budget_s=round(seconds, 1))

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

    # 1. Data: every split decided by conversation hash, the same as `loopchat export`; all of it, every cycle.
    data = Data(sft=build_sft(store, split="train"), pairs=build_pairs(store, split="train"),
                heldout_pairs=build_pairs(store, split="heldout"),
                prompts=build_prompts(store, split="train", limit=cfg.max_prompts),
                heldout_prompts=build_prompts(store, split="heldout", limit=cfg.gate.max_prompts))
    if len(data.pairs) < cfg.min_pairs:
        raise CycleFailed(f"only {len(data.pairs)} training pairs; need at least {cfg.min_pairs}")
    snapshot = {"sft": _ids(data.sft), "pairs": _ids(data.pairs), "heldout_pairs": _ids(data.heldout_pairs),
                "n_prompts": len(data.prompts)}
    figures = {"heldout_pairs": len(data.heldout_pairs), "heldout_prompts": len(data.heldout_prompts),
               "recipe": cfg.recipe, "init": cfg.init}
    runs_ppo = ppo_step in recipe.STEPS
    refused = capability_refused(store) if runs_ppo else None
    if refused is not None and cfg.ptx_after_capability_loss > cfg.ppo.ptx_coef:
        cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, ptx_coef=cfg.ptx_after_capability_loss))
        figures["ptx_since_cycle"] = refused  # PPO-ptx on: that cycle's candidate lost capability
    row_figures = dict(n_sft=len(data.sft), n_pairs=len(data.pairs), n_prompts=len(data.prompts))

    # 2. The recipe's training steps, from the serving adapter (init: serving) or a fresh one (init: base).
    continued = serving["path"] if serving and cfg.init == "serving" else None
    kl_base = continued and serving["manifest"].get("metrics", {}).get("kl_base")  # as the gate measured it
    near_bound = kl_base is not None and cfg.gate.max_kl_base - kl_base < cfg.gate.max_kl
    if near_bound and runs_ppo and cfg.kl_base_coef_near_bound > cfg.ppo.kl_base_coef:
        cfg = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, kl_base_coef=cfg.kl_base_coef_near_bound))
        figures["serving_kl_base"] = kl_base  # PPO pulls toward the base: the serving version is near its bound
    run = Run(cfg=cfg, work=work, data=data, serving=serving, reward_from=_newest_reward_model(store),
              budgeted=budgeted, policy=continued, reference=continued)
    for step in recipe.STEPS:
        step_done(step.__name__, figures, **row_figures)
        figures, row_figures = step(run)
    if run.policy is None or run.policy == continued:
        raise CycleFailed(f"the {cfg.recipe} recipe trained no policy: no demonstrations")

    # 3. The gate: the candidate against the policy it would replace. One that fails it only for how far it
    # moved (MOVED_TOO_FAR) has its shorter step, PPO's fallback, judged instead (a backtracking line search).
    def judge(policy: Path, share: float) -> dict:
        return evaluate_adapter(cfg.model_dir, policy, reward_model=run.reward_model,
                                prompts=data.heldout_prompts or data.prompts[: cfg.gate.max_prompts],
                                baseline_adapter=serving["path"] if serving else None,
                                heldout_pairs=data.heldout_pairs or None, cfg=budgeted("evaluating", cfg.gate, share))

    step_done("evaluating", figures, **row_figures)
    verdict, fell_back = judge(run.policy, 0.5 if run.fallback is not None else 1.0), None
    failed = _failed(verdict)
    if failed and run.fallback is not None and set(failed) <= MOVED_TOO_FAR:
        log.info("cycle %d: the candidate failed %s; judging PPO's fallback", cycle_id, ", ".join(failed))
        fell_back = {"failed": failed, "kl": verdict["checks"]["kl"]["value"],
                     "capability_pass": verdict["figures"].get("capability_pass_candidate")}
        run.policy, verdict = run.fallback, judge(run.fallback, 1.0)
    checks, found = verdict["checks"], verdict["figures"]
    figures = {"rm_accuracy": checks["rm_accuracy"].get("value"), "kl": checks["kl"].get("value"),
               "kl_base": checks["kl_base"].get("value"), "mean_reward": found.get("reward_candidate"),
               "baseline_reward": found.get("reward_baseline"), "canaries_ok": checks["canaries"].get("value"),
               "capability_loglik": found.get("capability_loglik_candidate"),
               "capability_loglik_baseline": found.get("capability_loglik_baseline"),
               "capability_pass": found.get("capability_pass_candidate"),
               "capability_pass_baseline": found.get("capability_pass_baseline"),
               "capability_pass_base_model": found.get("capability_pass_base_model"),
               "capability_pass_kinds": _kind_shares(checks["capability_pass"])}
    if fell_back:
        figures["fell_back"] = fell_back  # what the full candidate failed; the figures above are the fallback's
    figures["failed"] = _failed(verdict)
    gate = "pass" if verdict["passed"] else "fail"

    # 4. Publish atomically as version N, with the reward model the next cycle continues from.
    version_dir = artifacts.publish(
        run.policy, cfg.adapters_dir, base_model=str(cfg.model_dir),
        parent_version=int(serving["version"][1:]) if serving else None, data_snapshot=snapshot,
        hyperparameters={"cycle_minutes": cfg.cycle_minutes, "recipe": cfg.recipe, "init": cfg.init,
                         "ptx_data": cfg.ptx_data,
                         **{k: dataclasses.asdict(getattr(cfg, k)) for k in ("sft", "rm", "best_of_n", "ppo", "gate")}},
        metrics={**run.metrics, **figures}, gate=verdict, reward_model=run.rm_dir)
    manifest = artifacts.load_manifest(version_dir)
    version = f"v{manifest['version']}"
    cycles.record_adapter(store, version, str(version_dir), manifest, cycle_id)
    step_done("published", {"gate": gate, **figures, **chosen(found)}, version=version, gate=gate,
              mean_reward=figures["mean_reward"], kl=figures["kl"])

    # 5. Promote, or start a canary, through the gateway (or stop at `published` when there is none).
    if gate == "fail":
        why = f"gate failed: {', '.join(figures['failed'])}"
        if fell_back:
            why += f" (PPO's fallback; the full candidate failed {', '.join(fell_back['failed'])})"
        cycles.advance(store, cycle_id, "rejected", error=why)
        return
    if not cfg.gateway_url:
        return
    headers = {"Authorization": f"Bearer {cfg.admin_key}"} if cfg.admin_key else {}
    if cfg.end_at == "canary":
        r = httpx.post(f"{cfg.gateway_url}/admin/adapters/{version}/canary", json={"share": cfg.canary_share},
                       headers=headers, timeout=300)
        if r.status_code != 201:
            raise CycleFailed(f"canary of {version} failed: HTTP {r.status_code} {r.text[:300]}")
        # `published` is terminal: the next cycle may start while the canary's rule gathers evidence.
        cycles.advance(store, cycle_id, "published", {"canary": cfg.canary_share, "canary_id": r.json().get("id")})
        return
    r = httpx.post(f"{cfg.gateway_url}/admin/adapters/{version}/promote", headers=headers, timeout=300)
    if r.status_code != 200:
        raise CycleFailed(f"promotion of {version} failed: HTTP {r.status_code} {r.text[:300]}")
    cycles.advance(store, cycle_id, "promoted", {"switch_ms": r.json().get("switch_ms")})


def _kind_shares(check: dict) -> dict | None:
    """A capability pass check's share per kind of item: {kind: {"candidate": .., "baseline": ..}}."""
    return {kind: {"candidate": c["value"], "baseline": c["baseline"]} for kind, c in check["kinds"].items()} \
        if "kinds" in check else None


def _failed(verdict: dict) -> list[str]:
    return [k for k, c in verdict["checks"].items() if c.get("passed") is False]


def _serving_adapter(store: Store) -> dict | None:
    version, _ = cycles.serving_version(store)
    return cycles.get_adapter(store, version) if version else None


def _newest_reward_model(store: Store) -> dict | None:
    """The newest published version that kept a reward model, promoted or not. A reward model is trained on
    the pooled pairs, not on the policy the gate judged: continuing the newest one reads only the answers it
    has not read. Continuing the serving version's instead made every cycle after a rejected one read all
    pooled answers again (bench/RESULTS.md: 4,083-4,690 answers, 270-330 s of a 600 s cycle, so PPO got
    5-17 steps instead of ~24)."""
    for row in reversed(cycles.list_adapters(store)):
        if artifacts.reward_model_dir(row["path"]) is not None:
            return row
    return None


def _ids(records: list[dict]) -> list[str]:
    return sorted({i for r in records for i in r.get("meta", {}).get("ids", [])})

