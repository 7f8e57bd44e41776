"""The promotion gate: is a freshly trained adapter good enough to serve?

Nine checks, each with its figure and threshold (a check without its inputs is skipped):
  rm_accuracy  the reward model's held-out pair accuracy is above `min_rm_accuracy`
               (a reward model that cannot rank held-out pairs must not steer a policy);
               judged only on at least `min_heldout_pairs` pairs (those given, else those the
               RM held out itself when it was trained): on 7 pairs an RM that is right 70% of
               the time fails a 0.6 threshold about a third of the time;
  reward_gain  on held-out prompts, the candidate's mean normalised RM score, paired prompt by
               prompt with the serving policy's (or the base model's), gains at least
               `min_reward_gain` plus `gain_margin_se` standard errors of the paired difference.
               At +1 (the default) a candidate must be measurably better to replace what serves; at
               -1 (the rule before) it fails only when measurably worse: run AF's cycles 12-19
               (bench/RESULTS.md) promoted under it five candidates within a standard error of the
               serving version, after which the win rate against the base held or fell (0.783 ->
               0.708 over the last three), while it held or rose after the three that cleared +1;
  kl           the candidate's KL to the policy it replaces (the serving adapter; the base model
               when none serves), nats per response on its own samples, is under `max_kl`: how far
               one cycle moves what users get (a guard against reward hacking within a cycle);
  kl_base      its KL to the base model is under `max_kl_base`, a much wider bound: KL to the base
               grows with every cycle that continues the last one (bench/RESULTS.md run D hit a
               10-nat wall after two), so it is a backstop against runaway drift, and what drift
               costs is judged by the capability checks instead;
  canaries     on canary prompts, the share of sampled answers that are non-empty and end with
               EOS is at most `canary_tolerance` below the baseline's. Sampled and relative, not
               greedy and absolute: the base model's own first token for "What is the capital of
               France?" is "The" at p=0.155 against "L" at 0.140, so any adapter may flip the greedy
               answer into "L'Étoile, la femme, ..." without changing what users get, and the base
               itself does not finish "Say thank you in one short sentence." within 64 tokens;
  capability_loglik, capability_pass
               the alignment tax: on a fixed set of facts, arithmetic, short instructions and
               explanations (`capabilities`, train/data/capabilities.jsonl: a kind, a prompt, a
               reference answer and strings a right answer contains), (a) the mean per-token
               log-likelihood of the reference answers (one forward pass per item) and (b) each
               item's pass rate, the share of `capability_samples` answers sampled at the gate's
               temperature that contain one of its strings at a word start (see `passes`), for the candidate and
               the baseline.
               Each is paired item by item within each kind of item, and the candidate fails when,
               in any kind, it is below the baseline by more than `max_loglik_drop` (nats per token)
               or `max_pass_drop` (share) plus `capability_tolerance_se` standard errors of the
               paired difference: measurably worse, not a near-tie flipping one item. Per kind, not
               pooled: run AI's `concise` v3 (bench/RESULTS.md) answered "Why do onions make people
               cry?" with "People cry." and lost explanations 0.56 -> 0.22 while PPO-ptx raised its
               facts, and the pooled mean rose. The check's figure and threshold are its weakest
               kind's (named in `kind`; every kind's in `kinds`).
               Sampled, not greedy: the shipped facts, sums and instructions are ones the base model
               answers greedily, and 13 of those 42 it answers right at most half the time when it
               samples (bench/RESULTS.md), so against a greedy 42/42 any change of the model counts
               as a loss (its 16 explanations it passes about half the time, sampled: 0.55 of 8 answers each);
  capability_loglik_base, capability_pass_base
               the same two against the base model, when an adapter serves: each cycle's loss
               against the version it replaces may be too small to call, but such losses compound
               (bench/RESULTS.md run G: 1.00 -> 0.73 of the items over five cycles, no cycle
               rejected), so the candidate must also stay within the same allowance of the base.
One base model is loaded; the candidate, the baseline adapter and the base itself are
switched with peft's adapter controls. With a time budget the held-out prompts are taken batch by
batch, as many batches as fit (see train.budget), never fewer than `min_prompts`; the canaries and
the capability set are a fixed amount of work done first. A version's capability answers are sampled
once: with `cache_dir` they are kept there (the cycle keeps them in the data dir's cache), so the next
cycle judges its candidate against the version promoted now, and the same base model, by sampling the
candidate's answers alone, whichever process runs it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import hardware
from train import artifacts, common, data
from train.budget import Pace
from train.ppo import exact_kl, generate, response_logprobs

CAPABILITIES = Path(__file__).parent / "data" / "capabilities.jsonl"
DEFAULT_KIND = "general"  # the kind of a capability item that names none
CAPABILITY_CHECKS = ("capability_loglik", "capability_pass", "capability_loglik_base", "capability_pass_base")
# Capability answers are sampled this many to a batch: on 2 cores 168 answers took 32 s at 42 to 168 a batch,
# 50 s at 16.
CAPABILITY_BATCH = 48
# An item is listed as lost (`capability_lost`) when its pass rate fell by this much or more.
LOST_BY = 0.5


@dataclass
class GateConfig:
    min_rm_accuracy: float = 0.6
    min_heldout_pairs: int = 20  # fewer and rm_accuracy is reported, not judged
    min_reward_gain: float = 0.0  # normalised RM units (std of training rewards)
    gain_margin_se: float = 1.0  # standard errors the gain must clear min_reward_gain by (negative: may fall short)
    # Nats per response (64 tokens) to the policy being replaced: run D's cycles moved 0.4-6.6 nats each.
    max_kl: float = 10.0
    # Nats per response to the base model: a backstop that lets KL accumulate over ~10 cycles like run D's.
    max_kl_base: float = 40.0
    max_prompts: int = 64  # held-out prompts used for reward and KL
    # With a budget, at least this many (when there are): the reward gain's standard error needs them.
    min_prompts: int = 16
    time_budget_s: float | None = None  # as many held-out prompts as fit, from min_prompts to max_prompts
    batch_size: int = 16
    max_new_tokens: int = 64
    temperature: float = 0.7
    canaries: tuple[str, ...] = ("Hello! Who are you?", "What is the capital of France?", "Say thank you in one short sentence.")
    canary_samples: int = 4  # answers per canary prompt, for the candidate and the baseline alike
    canary_max_new_tokens: int = 128
    canary_tolerance: float = 0.25
    # The capability set (JSONL: prompt, reference, contains_any); None: no capability checks.
    capabilities: str | None = str(CAPABILITIES)
    # The shipped facts name their answer within ~20 tokens, the explanations their mechanism in the first sentence.
    capability_max_new_tokens: int = 32
    capability_samples: int = 4  # answers sampled per capability item: its pass rate
    max_loglik_drop: float = 0.1  # nats per reference token the candidate may lose against the baseline
    max_pass_drop: float = 0.1  # pass rate (share of sampled answers) the candidate may lose against the baseline
    capability_tolerance_se: float = 1.0
    seed: int = 0
    # Where the capability answers of the versions judged are kept (see the module docstring); None: not kept.
    cache_dir: str | None = None
    # Full precision: in bf16 a left-padded batch shifts logits by ~0.7 against the same prompt alone.
    dtype: str = "float32"


def _check(value, threshold, passed) -> dict:
    return {"value": value, "threshold": threshold, "passed": passed}


def _skipped(why: str) -> dict:
    return {"value": None, "threshold": None, "passed": None, "skipped": why}


def _flat(batches: list[dict], key: str) -> list:
    return [x for b in batches for x in b[key]]


def _active(model, adapter: str | None):
    """A context in which `adapter` computes (None: the base model, every adapter off)."""
    if adapter is None:
        return model.disable_adapter()
    model.set_adapter(adapter)
    return nullcontext()


def _samples(model, tokenizer, prompts, cfg: GateConfig, adapter: str | None, max_new_tokens: int, seed: int) -> list[dict]:
    """Sample at the gate's temperature with one adapter active (None = the base model), batch by batch, from `seed`."""
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(prompts), cfg.batch_size):
        with _active(model, adapter):
            out.append(generate(model, tokenizer, prompts[i : i + cfg.batch_size], max_new_tokens, cfg.temperature))
    return out


@torch.no_grad()
def _kl(model, batches, temperature: float, references: tuple[str | None, ...]) -> dict[str | None, torch.Tensor]:
    """KL(candidate || reference) in nats per response on the candidate's own samples, per reference
    (an adapter name; None = the base model), exact per token (train.ppo.exact_kl)."""
    per_seq = {r: [] for r in references}
    for b in batches:
        args = (b["seq"], b["attn"], b["prompt_len"], temperature)
        with _active(model, "candidate"):
            logp, _ = response_logprobs(model, *args)
        for r in references:
            with _active(model, r):
                ref, _ = response_logprobs(model, *args)
            per_seq[r].append(exact_kl(logp, ref, b["mask"]))
    return {r: torch.cat(v) for r, v in per_seq.items()}


def read_capabilities(source) -> list[dict]:
    """Capability items: {"prompt": str, "reference": str, "contains_any": [str, ...]} per JSONL line, and
    optionally "kind": str (the gate compares versions kind by kind; items without one are DEFAULT_KIND)."""
    path = Path(source)
    if not path.is_file():
        raise data.DataError(f"{path}: no such file")
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise data.DataError(f"{path}:{i}: invalid JSON ({e.msg} at column {e.colno})") from None
        kind = item.get("kind", DEFAULT_KIND) if isinstance(item, dict) else None
        if not (isinstance(item, dict) and isinstance(item.get("prompt"), str) and isinstance(item.get("reference"), str)
                and isinstance(item.get("contains_any"), list) and item["contains_any"]
                and all(isinstance(x, str) and x for x in item["contains_any"]) and isinstance(kind, str) and kind):
            raise data.DataError(f"{path}:{i}: expected {{'prompt': str, 'reference': str, 'contains_any': [str, ...]}} "
                                 "and optionally 'kind': str")
        items.append({**item, "kind": kind})
    return items


def passes(answer: str, contains_any: list[str]) -> bool:
    """A capability item's check: the answer contains one of its strings (case-insensitive) at the start of a
    word, and not as part of a longer number. Prefixes stay prefixes ("dens" takes "dense" and "density"), but
    "dens" is not in "condensed", "hot" not in "shot", "5" not in "15" or "50", "100" not in "1000"."""
    return any(re.search(rf"(?<![^\W_]){re.escape(x)}(?!(?<=\d)\d)", answer, re.IGNORECASE) for x in contains_any)


@torch.no_grad()
def _reference_loglik(model, tokenizer, items, adapter: str | None, batch_size: int) -> torch.Tensor:
    """Mean per-token log-likelihood (temperature 1) of each item's reference answer and its EOS after
    its prompt: one forward pass per item, laid out as generate() lays out a prompt and its answer."""
    out = []
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        prompts = [common.encode_prompt(tokenizer, [{"role": "user", "content": it["prompt"]}]) for it in chunk]
        answers = [common.encode_response(tokenizer, it["reference"]) for it in chunk]
        ids = torch.cat([common.pad_left(prompts, tokenizer.pad_token_id), common.pad_right(answers, tokenizer.pad_token_id)], 1)
        mask = common.pad_right([[1] * len(a) for a in answers], 0).float()
        attn = torch.cat([common.pad_left([[1] * len(p) for p in prompts], 0), mask.long()], 1)
        prompt_len = ids.shape[1] - mask.shape[1]
        with _active(model, adapter):
            logp, _ = response_logprobs(model, ids.to(model.device), attn.to(model.device), prompt_len, 1.0)
        tokens = logp.gather(-1, ids[:, prompt_len:].to(model.device).unsqueeze(-1)).squeeze(-1).cpu()
        out.append((tokens * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def _paired(new: torch.Tensor, old: torch.Tensor, max_drop: float, tolerance_se: float) -> dict:
    """The candidate's mean against the baseline's less `max_drop` and `tolerance_se` standard errors
    of their item-by-item difference: the check, with that standard error and the baseline's mean."""
    diff = new - old
    se = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else 0.0
    threshold = float(old.mean()) - max_drop - tolerance_se * se
    return {**_check(float(new.mean()), threshold, float(new.mean()) >= threshold), "se": se, "baseline": float(old.mean())}


def _paired_by_kind(new: torch.Tensor, old: torch.Tensor, kinds: list[str], max_drop: float, tolerance_se: float) -> dict:
    """`_paired` within each kind of item; it passes when every kind passes. Its figures are those of the
    kind with the least margin over its threshold (`kind`), each kind's are under `kinds`."""
    by_kind = {}
    for kind in dict.fromkeys(kinds):
        mine = torch.tensor([k == kind for k in kinds])
        by_kind[kind] = _paired(new[mine], old[mine], max_drop, tolerance_se)
    weakest = min(by_kind, key=lambda k: by_kind[k]["value"] - by_kind[k]["threshold"])
    return {**by_kind[weakest], "kind": weakest, "kinds": by_kind}


KEEP_PASS_RATES = 16  # files of capability answers kept in `cache_dir`, the newest


def _weights_digest(weights_dir: Path | None) -> tuple[str, ...] | None:
    """What a model's or adapter's answers depend on in its directory, not where the directory is."""
    if weights_dir is None:
        return None
    return tuple(artifacts.sha256(f) for f in sorted(Path(weights_dir).iterdir()) if f.suffix in (".safetensors", ".bin"))


def _pass_rates(model, tokenizer, items, cfg: GateConfig, name: str | None, key: tuple) -> tuple[torch.Tensor, list[list[str]]]:
    """Each item's share of `capability_samples` answers (sampled with adapter `name` active) that pass,
    and those answers; kept in `cfg.cache_dir` under a digest of `key` (model, adapter weights, set-up)."""
    kept = None
    if cfg.cache_dir is not None:
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]
        kept = Path(cfg.cache_dir) / f"capabilities-{digest}.json"
        if kept.is_file():
            kept.touch()  # in use: the last to be dropped
            saved = json.loads(kept.read_text(encoding="utf-8"))
            return torch.tensor(saved["rates"]), saved["answers"]
    k = cfg.capability_samples
    asked = [[{"role": "user", "content": it["prompt"]}] for it in items for _ in range(k)]
    texts = _flat(_samples(model, tokenizer, asked, replace(cfg, batch_size=CAPABILITY_BATCH), name,
                           cfg.capability_max_new_tokens, cfg.seed), "texts")
    answers = [texts[i * k : (i + 1) * k] for i in range(len(items))]
    rates = torch.tensor([sum(passes(a, it["contains_any"]) for a in ans) / k for ans, it in zip(answers, items)])
    if kept is not None:
        kept.parent.mkdir(parents=True, exist_ok=True)
        partial = kept.with_suffix(f".{os.getpid()}.partial")
        common.write_json(partial, {"rates": rates.tolist(), "answers": answers})
        os.replace(partial, kept)  # whole or not at all, for a gate in another process
        for old in sorted(kept.parent.glob("capabilities-*.json"), key=lambda f: f.stat().st_mtime)[:-KEEP_PASS_RATES]:
            old.unlink(missing_ok=True)
    return rates, answers


def _capabilities(model, tokenizer, cfg: GateConfig, model_dir, adapter_dirs: dict) -> tuple[dict, dict, list[dict]]:
    """(checks, figures, the items whose pass rate fell by LOST_BY or more against the baseline or the base
    model). `adapter_dirs`: {"candidate": path, baseline: path} (baseline None: the base model). With an
    adapter as the baseline the candidate is also held to the base model (`*_base` checks)."""
    baseline = next(name for name in adapter_dirs if name != "candidate")
    names = ("candidate", baseline) + ((None,) if baseline is not None else ())
    items = read_capabilities(cfg.capabilities)
    if not items:
        why = f"no items in {cfg.capabilities}"
        return {k: _skipped(why) for k in CAPABILITY_CHECKS}, {}, []
    loglik = {name: _reference_loglik(model, tokenizer, items, name, cfg.batch_size) for name in names}
    setup = (_weights_digest(model_dir), json.dumps(items), cfg.capability_samples, cfg.temperature, cfg.capability_max_new_tokens,
             cfg.seed, cfg.dtype, str(model.device))
    rates, answers = {}, {}
    for name in names:
        rates[name], answers[name] = _pass_rates(model, tokenizer, items, cfg, name,
                                                 (_weights_digest(adapter_dirs.get(name)), *setup))
    checks, figures = {}, {"capability_items": len(items)}
    comparisons = [("", baseline)]
    if baseline is None:
        checks.update({f"capability_{k}_base": _skipped("the base model is the baseline") for k in ("loglik", "pass")})
    else:
        comparisons.append(("_base", None))
    kinds = [it["kind"] for it in items]
    for suffix, against in comparisons:
        checks[f"capability_loglik{suffix}"] = _paired_by_kind(loglik["candidate"], loglik[against], kinds,
                                                               cfg.max_loglik_drop, cfg.capability_tolerance_se)
        checks[f"capability_pass{suffix}"] = _paired_by_kind(rates["candidate"], rates[against], kinds,
                                                             cfg.max_pass_drop, cfg.capability_tolerance_se)
    for measure, values in (("loglik", loglik), ("pass", rates)):  # over all items
        figures.update({f"capability_{measure}_candidate": float(values["candidate"].mean()),
                        f"capability_{measure}_baseline": float(values[baseline].mean()),
                        f"capability_{measure}_base_model": float(values[None].mean())})

    def shown(name, i, passing):  # one of the answers: the first that passes (or fails), else the first
        return next((a for a in answers[name][i] if passes(a, items[i]["contains_any"]) == passing), answers[name][i][0])

    lost = []
    for i, it in enumerate(items):
        if rates["candidate"][i] <= max(rates[name][i] for name in names[1:]) - LOST_BY:
            lost.append({"prompt": it["prompt"], "kind": kinds[i], "pass_rate": float(rates["candidate"][i]),
                         "baseline_pass_rate": float(rates[baseline][i]), "base_model_pass_rate": float(rates[None][i]),
                         "answer": shown("candidate", i, False), "baseline_answer": shown(baseline, i, True),
                         "base_model_answer": shown(None, i, True)})
    return checks, figures, lost


def _rm_accuracy(reward_model, heldout_pairs, cfg: GateConfig) -> dict:
    """Measured on `heldout_pairs` when given, else the figure the reward model recorded when it
    was trained (on the pairs it held out itself); judged only on `min_heldout_pairs` or more."""
    if reward_model is None:
        return _skipped("no reward model")
    if heldout_pairs is not None:
        pairs = data.read_pairs(heldout_pairs)
        acc, n = reward_model.accuracy_on(pairs), len(pairs)
    else:
        acc, n = reward_model.accuracy, reward_model.accuracy_pairs
    if n < cfg.min_heldout_pairs:
        return {**_skipped(f"{n} held-out pairs; judged from {cfg.min_heldout_pairs}"), "value": acc}
    return _check(acc, cfg.min_rm_accuracy, acc > cfg.min_rm_accuracy)


def evaluate_adapter(
    model_dir: str | Path,
    adapter_dir: str | Path,
    *,
    reward_model=None,
    prompts=None,
    baseline_adapter: str | Path | None = None,
    heldout_pairs=None,
    cfg: GateConfig | None = None,
) -> dict:
    """Run the gate on `adapter_dir` and return the verdict:

        {"passed": bool, "checks": {name: {"value", "threshold", "passed"[, "skipped"]}},
         "figures": {...}, "canary_answers": [...], "capability_lost": [...], "config": {...}}

    `reward_model`: a train.reward.RewardModel or its directory (needed for rm_accuracy and
    reward_gain). `prompts`: held-out prompts (JSONL path or rows); without them the canaries
    stand in for the KL checks. `baseline_adapter`: the serving adapter, the policy the candidate
    replaces (None = the base model): what reward_gain, kl, canaries and the capabilities compare
    against. `heldout_pairs`: pairs to measure the RM's accuracy on, instead of the figure it recorded.
    `capability_lost`: the capability items the candidate answers right far less often than the baseline
    or the base model (by LOST_BY of its sampled answers or more)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.reward import RewardModel

    cfg = cfg or GateConfig()
    pace = Pace(cfg.time_budget_s)
    device = common.pick_device()
    common.quiet_transformers()
    tokenizer = common.load_tokenizer(model_dir)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=hardware.choose(cfg.dtype, device.type).torch_dtype)
    model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name="candidate").to(device).eval()
    if baseline_adapter is not None:
        model.load_adapter(str(baseline_adapter), adapter_name="baseline")
    if reward_model is not None and not isinstance(reward_model, RewardModel):
        reward_model = RewardModel(reward_model, model_dir)
    held_out = data.read_prompts(prompts)[: cfg.max_prompts] if prompts is not None else []
    canaries = [[{"role": "user", "content": c}] for c in cfg.canaries]
    baseline_name = "baseline" if baseline_adapter is not None else None  # None: the base model
    # KL to the policy replaced and to the base model: one and the same when the base serves.
    references = ("baseline", None) if baseline_adapter is not None else (None,)
    checks, figures = {}, {"baseline": "serving adapter" if baseline_adapter else "base model"}

    checks["rm_accuracy"] = _rm_accuracy(reward_model, heldout_pairs, cfg)

    # Canaries and capabilities first: a fixed amount of work, done before the held-out prompts are
    # sized to the time left.
    canary_answers = []
    if canaries:
        asked = [c for c in canaries for _ in range(cfg.canary_samples)]
        good = {}
        for name in ("candidate", baseline_name):
            batches = _samples(model, tokenizer, asked, cfg, name, cfg.canary_max_new_tokens, cfg.seed)
            texts, ended = _flat(batches, "texts"), [bool(e) for e in _flat(batches, "ended")]
            good[name] = sum(bool(t.strip()) and e for t, e in zip(texts, ended)) / len(asked)
            if name == "candidate":
                canary_answers = [{"prompt": p[-1]["content"], "answer": t, "ended": e}
                                  for p, t, e in zip(asked, texts, ended)]
        figures.update(canaries_baseline=good[baseline_name])
        threshold = good[baseline_name] - cfg.canary_tolerance
        checks["canaries"] = _check(good["candidate"], threshold, good["candidate"] >= threshold)
    else:
        checks["canaries"] = _skipped("no canary prompts")

    capability_lost = []
    if cfg.capabilities:
        capability_checks, capability_figures, capability_lost = _capabilities(
            model, tokenizer, cfg, model_dir, {"candidate": adapter_dir, baseline_name: baseline_adapter})
        checks.update(capability_checks)
        figures.update(capability_figures)
    else:
        checks.update({k: _skipped("no capability set") for k in CAPABILITY_CHECKS})

    # Held-out prompts, one batch at a time, as many batches as the budget holds: the candidate's
    # samples and their KLs, then the baseline's from the same seed, both scored by the reward model.
    total = pace.start(math.ceil(len(held_out) / cfg.batch_size), floor=math.ceil(cfg.min_prompts / cfg.batch_size))
    kls, new, old = {r: [] for r in references}, [], []
    done = 0
    while done < total:
        batch = held_out[done * cfg.batch_size : (done + 1) * cfg.batch_size]
        candidate = _samples(model, tokenizer, batch, cfg, "candidate", cfg.max_new_tokens, cfg.seed + done)
        for r, v in _kl(model, candidate, cfg.temperature, references).items():
            kls[r].append(v)
        if reward_model is not None:
            baseline = _samples(model, tokenizer, batch, cfg, baseline_name, cfg.max_new_tokens, cfg.seed + done)
            new.append(reward_model(batch, _flat(candidate, "texts")).float())
            old.append(reward_model(batch, _flat(baseline, "texts")).float())
        done += 1
        total = pace.step_done(done)
    held_out = held_out[: done * cfg.batch_size]
    if held_out:
        kl = {r: float(torch.cat(v).mean()) for r, v in kls.items()}
    else:  # the canaries stand in for the KL checks
        on_canaries = _samples(model, tokenizer, canaries, cfg, "candidate", cfg.max_new_tokens, cfg.seed)
        kl = {r: float(v.mean()) for r, v in _kl(model, on_canaries, cfg.temperature, references).items()}
    checks["kl"] = _check(kl[references[0]], cfg.max_kl, kl[references[0]] < cfg.max_kl)
    checks["kl_base"] = _check(kl[None], cfg.max_kl_base, kl[None] < cfg.max_kl_base)

    if reward_model is None or not held_out:
        checks["reward_gain"] = _skipped("no reward model" if reward_model is None else "no held-out prompts")
    else:
        new, old = torch.cat(new), torch.cat(old)
        diff = new - old
        gain = float(diff.mean())
        se = float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else 0.0
        figures.update(reward_candidate=float(new.mean()), reward_baseline=float(old.mean()), reward_gain_se=se)
        threshold = cfg.min_reward_gain + cfg.gain_margin_se * se
        checks["reward_gain"] = _check(gain, threshold, gain >= threshold)

    chosen = pace.figures()  # its steps are batches of `batch_size` held-out prompts
    figures.update(held_out_prompts=len(held_out), kl_on="held-out prompts" if held_out else "canaries",
                   time_budget_s=chosen["time_budget_s"], measured_s_per_batch=chosen["measured_s_per_step"])
    passed = all(c["passed"] for c in checks.values() if c["passed"] is not None)
    return {"passed": passed, "checks": checks, "figures": figures, "canary_answers": canary_answers,
            "capability_lost": capability_lost, "config": asdict(cfg)}
