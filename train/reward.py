"""The reward model: the base model + a LoRA adapter + a scalar head, trained on preference pairs.

r(prompt, response) reads the hidden states of prompt + response + EOS (the chat template's
generation prompt, then the reply as the policy would have generated it). `pool` says which:
`last`, a linear head on the last token's final state; `last_mean`, that plus a second linear head
on the mean of the reply's tokens' final states; `last_mean_early` (the default), those plus a third
on the mean of the reply's states a quarter of the way up the model (`early_layer`); one `score`
layer with an output per state read. The last token sums up the answer as the model read it; the
means keep what is spread evenly over the words (their register, their length) that a last-token
head learns slowly from few pairs, and the early layer still holds which words they are, which the
final layer has turned into a prediction of the next one (bench/RESULTS.md, "Reward model at small
data sizes": a taste in word choice was read 0.69 -> 0.73 from 300 pairs). The pairwise (Bradley-Terry) loss on d = r_chosen - r_rejected - margin is

    -(1 - eps) log sigmoid(d) - eps log sigmoid(-d) + center_coef * (r_chosen + r_rejected)^2

with `eps` the label smoothing (a vote is taken to be wrong with probability eps: noisy users)
and the last term keeping rewards near zero so they do not drift between cycles.

Pairs from one ranking of K answers share `meta["group"]` (a record without one is its own
group). As in InstructGPT, a group is one batch element: its pairs are trained in the same step,
each answer is scored once however many pairs it is in, and the loss is averaged within each
group before it is averaged over the groups, so a ranking of K answers weighs as much as one
comparison of two instead of C(K,2) times as much. `batch_size` counts groups.

After training we store the mean and std of the rewards on a bounded sample of distinct training
answers (`stats_answers`, in whole groups: scoring every answer overran the step's time budget);
`RewardModel` returns (r - mean) / std, so a score means the same across cycles and PPO's KL
coefficient keeps its scale. The held-out accuracy comes with its 95% Wilson interval
(`accuracy_ci95`), since it is measured on few pairs.

Before any gradient step the head is fit as a linear probe of the model's states (`fit_probe`,
`probe_l2`): a convex fit over all training pairs at once. LoRA steps (`epochs`, `max_steps`)
then go on from that head; `epochs=0` keeps the probe alone.

`init_from` continues an earlier reward model (its LoRA and head): the pairs it was trained on
(listed in its `trained_pairs.json`) are then only replayed, `replay` old groups per new group,
so a cycle's cost grows with its new data rather than with all of it. The probe is refit on all
pairs when there are new ones, but reads only the new answers' states: a reward model that took
no LoRA step saves the states its probe read (`probe_features.pt`, float32, ~4.6 KB an answer
with `last_mean` on the 135M model) with a fingerprint of what they depend on (the base model,
the LoRA weights, dtype, pool, max_len), and the next one reuses those whose fingerprint it
shares. Without that the probe's forward pass over all pooled answers grew to 189 s of a 600 s
cycle by run G's fifth cycle (bench/RESULTS.md).

Saved as a peft adapter with the head in `modules_to_save=["score"]`, so PPO can initialise
its value head from the reward head (see train.ppo).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import hardware
from train import common, data
from train.budget import FORWARD_SHARE, Pace
from train.sft import lora_config

logger = logging.getLogger("loopchat.reward")
POOLS = {"last": 1, "last_mean": 2, "last_mean_early": 3}  # pool -> outputs of the `score` layer
PROBE_FOLDS = 5
STATES = ("last", "mean", "early_mean")  # what each output of the `score` layer reads (see features)
PROBE_READS = {"last": [[0]], "last_mean": [[0], [1], [0, 1]],  # the subsets of them a probe may read
               "last_mean_early": [[0], [1], [0, 1], [2], [0, 1, 2]]}
STATS_FILE = "reward_stats.json"
TRAINED_FILE = "trained_pairs.json"  # keys of the pairs a reward model has seen, for init_from
FEATURES_FILE = "probe_features.pt"  # the states its probe read, for the next one's (module docstring)


@dataclass
class RewardConfig:
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = common.LORA_TARGETS
    lr: float = 5e-4
    epochs: int = 1
    max_steps: int | None = None
    time_budget_s: float | None = None  # run as many steps as fit (at most the fixed count above); see train.budget
    batch_size: int = 8  # groups (rankings; a lone pair is a group of one) per step
    max_len: int = 1024
    margin: float = 0.0
    # First fit the head as a linear probe (fit_probe) with the L2 weight among these that
    # cross-validates best; None: the head starts from its initialisation.
    probe_l2: tuple[float, ...] | None = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    pool: str = "last_mean_early"  # which hidden states the head may read: one of POOLS (module docstring)
    label_smoothing: float = 0.0  # the share of votes taken to be wrong (0.1 gained nothing at 10% noise)
    center_coef: float = 0.01
    stats_answers: int = 64  # training answers scored for the normalisation stats (and train_accuracy)
    replay: float = 0.0  # with init_from: old groups replayed per new group (bench/reward_model.py --warm)
    eval_fraction: float = 0.1  # held-out share of prompts when no eval set is given
    seed: int = 0
    dtype: str = "auto"

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"reward model pool must be one of {', '.join(POOLS)}, not {self.pool!r}")
        if self.probe_l2 is not None:
            self.probe_l2 = tuple(self.probe_l2) if isinstance(self.probe_l2, (list, tuple)) else (float(self.probe_l2),)
            if not self.probe_l2 or any(v < 0 for v in self.probe_l2):
                raise ValueError(f"probe_l2 must be L2 weights >= 0, not {self.probe_l2!r}")


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (95% for z = 1.96); None without trials."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def split_heldout(pairs: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out), split by a hash of the prompt so a prompt never lands on both sides
    and the split is the same on every run."""

    def key(pair: dict) -> str:
        return hashlib.sha256(json.dumps(pair["prompt"], sort_keys=True).encode()).hexdigest()

    prompts = sorted({key(p) for p in pairs})
    k = min(max(1, round(fraction * len(prompts))), len(prompts) - 1) if fraction > 0 and len(prompts) > 1 else 0
    heldout = set(prompts[:k])
    return [p for p in pairs if key(p) not in heldout], [p for p in pairs if key(p) in heldout]


def read_pairs(records) -> list[dict]:
    """data.read_pairs, plus each record's `group` from its meta (its own index when it has none)."""
    rows = [value for _, value in data._rows(records)] if isinstance(records, (str, Path)) else list(records)
    pairs = data.read_pairs(rows)
    for i, (pair, row) in enumerate(zip(pairs, rows)):
        group = (row.get("meta") or {}).get("group")
        pair["group"] = f"group:{group}" if group is not None else f"pair:{i}"
    return pairs


def pair_key(pair: dict) -> str:
    return hashlib.sha256(json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], sort_keys=True).encode()).hexdigest()[:20]


def encode_pair(tokenizer, prompt: list[dict], response: str, max_len: int) -> tuple[list[int], int]:
    """(prompt + response + EOS, how many of those ids are the reply's); a too-long prompt loses its
    beginning so the reply is always seen."""
    reply = common.encode_response(tokenizer, response)[-max_len:]
    return (common.encode_prompt(tokenizer, prompt) + reply)[-max_len:], len(reply)


def early_layer(trunk) -> int:
    """The layer whose reply mean `last_mean_early` reads: a quarter of the way up (8 of SmolLM2-135M's 30)."""
    return math.ceil(trunk.config.num_hidden_layers / 4)


def features(model, rows: list[tuple[list[int], int]], pad_id: int, device, pool: str) -> torch.Tensor:
    """[rows, outputs of `score`, hidden] float32: the states each output of the head reads, for
    `encode_pair` rows (STATES, in order: the last token's final state, the reply's mean final state,
    the reply's mean state at `early_layer`), as many as the pool has."""
    trunk = common.backbone_and_head(model)[0]
    ids = common.pad_right([r[0] for r in rows], pad_id).to(device)
    mask = common.pad_right([[1] * len(r[0]) for r in rows], 0).to(device)
    early = pool == "last_mean_early"
    out = common.run_trunk(trunk, ids, mask, every_layer=early)
    hidden = out.last_hidden_state
    lengths = mask.sum(-1)
    last = hidden[torch.arange(len(rows), device=device), lengths - 1].float()
    if pool == "last":
        return last[:, None]
    at = torch.arange(ids.shape[1], device=device)
    starts = lengths - torch.tensor([r[1] for r in rows], device=device)
    reply = ((at >= starts[:, None]) & (at < lengths[:, None])).unsqueeze(-1)

    def reply_mean(states: torch.Tensor) -> torch.Tensor:
        return (states.float() * reply).sum(1) / reply.sum(1)  # summed in float32: bf16 sums lose the 3rd digit

    read = [last, reply_mean(hidden)] + ([reply_mean(out.hidden_states[early_layer(trunk)])] if early else [])
    return torch.stack(read, 1)


def rewards(model, rows: list[tuple[list[int], int]], pad_id: int, device, pool: str) -> torch.Tensor:
    """Raw scalar rewards (float32) of `encode_pair` rows: each output of the head on its states, summed."""
    out = common.backbone_and_head(model)[1](features(model, rows, pad_id, device, pool))
    return out.diagonal(dim1=1, dim2=2).sum(-1)


def fit_probe(model, batches: "GroupBatches", cfg: "RewardConfig", pad_id: int, device, known: dict[str, torch.Tensor]) -> dict:
    """Set the head to the best linear probe of the model's states as they are (no gradient
    through the model): the training loop's loss (weighted pairs, centring) plus l2 |w|^2 on
    standardised features, minimised by L-BFGS over all training pairs at once. A convex fit, so
    it reaches its optimum in seconds where a few dozen LoRA steps on a few hundred noisy pairs do
    not (bench/RESULTS.md, "Reward model at small data sizes").

    With more features than pairs any labels can be fit, so what the probe reads is chosen by
    cross-validation over whole groups (held-out log-loss): which of the pool's states (PROBE_READS:
    the last token's, a reply mean, or several; a taste spread over the words is read best from a
    mean, one in the answer's shape from the last token) and the L2 weight
    among `probe_l2`. The head is then refit on everything with that choice; the states it does
    not read get zero weight.

    `known`: answer key -> its states, from an earlier reward model with the same fingerprint; the
    answers not in it are read by the model and added to it."""
    every = batches.step(batches.groups)  # each distinct answer once; pair weights as in one big step
    group = torch.tensor([g for g, members in enumerate(batches.groups) for _ in members])
    keys = [hashlib.sha256(key.encode()).hexdigest()[:20] for key in every["keys"]]  # what `known` is keyed by
    missing = [i for i, key in enumerate(keys) if key not in known]
    model.eval()
    with torch.no_grad():
        for start in range(0, len(missing), cfg.batch_size * 2):
            chunk = missing[start : start + cfg.batch_size * 2]
            for i, states in zip(chunk, features(model, [every["rows"][i] for i in chunk], pad_id, device, cfg.pool).cpu()):
                known[keys[i]] = states
    feats = torch.stack([known[key] for key in keys])
    chosen, rejected = feats[every["chosen"]], feats[every["rejected"]]  # [pairs, outputs, hidden]: r = <., W>
    scale = (chosen - rejected).std(0) + 1e-6 if len(chosen) > 1 else torch.ones(chosen.shape[1:])
    chosen, rejected, weight = chosen / scale, rejected / scale, every["weight"]

    def fit(rows: torch.Tensor, reads: list[int], l2: float) -> torch.Tensor:
        """The training loop's loss (centring term included), on the states `reads`, + l2 |w|^2."""
        x_c, x_r = chosen[rows][:, reads].flatten(1), rejected[rows][:, reads].flatten(1)
        w = torch.zeros(x_c.shape[1], requires_grad=True)
        opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")
        share = weight[rows] / weight[rows].sum()

        def loss() -> torch.Tensor:
            opt.zero_grad()
            value = pairwise_loss(x_c @ w, x_r @ w, 0.0, share, cfg.label_smoothing, cfg.center_coef) + l2 * w.pow(2).sum()
            value.backward()
            return value

        opt.step(loss)
        return w.detach().reshape(len(reads), -1)

    def margins(rows, reads: list[int], w: torch.Tensor) -> torch.Tensor:
        return ((chosen[rows][:, reads] - rejected[rows][:, reads]) * w).sum((1, 2))

    def held_out_loss(reads: list[int], l2: float, fold: torch.Tensor) -> float:
        losses = []
        for k in range(int(fold.max()) + 1):
            out = fold == k
            w = fit(torch.nonzero(~out).squeeze(1), reads, l2)
            losses.append(float((weight[out] * F.softplus(-margins(out, reads, w))).sum() / weight[out].sum()))
        return sum(losses) / len(losses)

    choices = [(reads, l2) for reads in PROBE_READS[cfg.pool] for l2 in cfg.probe_l2]
    folds = min(PROBE_FOLDS, len(batches.groups))
    cv = {}
    if folds > 1 and len(choices) > 1:
        fold = torch.randperm(len(batches.groups), generator=torch.Generator().manual_seed(cfg.seed))[group] % folds
        cv = {(tuple(reads), l2): held_out_loss(reads, l2, fold) for reads, l2 in choices}
    reads, l2 = min(cv, key=cv.get) if cv else (tuple(PROBE_READS[cfg.pool][-1]), cfg.probe_l2[0])
    everything = torch.arange(len(chosen))
    w = fit(everything, list(reads), l2)
    head_w = torch.zeros(chosen.shape[1:])
    head_w[list(reads)] = w / scale[list(reads)]
    (head,) = [p for n, p in model.named_parameters() if "score" in n and p.requires_grad]
    with torch.no_grad():
        head.copy_(head_w.reshape(head.shape))
    margin = margins(everything, list(reads), w)
    return {"probe_reads": "+".join(STATES[i] for i in reads), "probe_l2": l2, "probe_cv_loss": cv.get((reads, l2)),
            "probe_train_accuracy": float((weight * (margin > 0)).sum()), "probe_answers": len(every["rows"]),
            "probe_answers_read": len(missing)}


@torch.no_grad()
def score_all(model, tokenizer, prompts, responses, max_len: int, batch_size: int, device, pool: str) -> torch.Tensor:
    model.eval()
    rows = [encode_pair(tokenizer, p, r, max_len) for p, r in zip(prompts, responses)]
    out = [rewards(model, rows[i : i + batch_size], tokenizer.pad_token_id, device, pool) for i in range(0, len(rows), batch_size)]
    return torch.cat(out).cpu() if out else torch.zeros(0)


def score_pairs(score, pairs: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen, rejected, every distinct answer's) rewards of `pairs` with `score(prompts, responses)`,
    each distinct answer scored once."""
    answers = {}
    for p in pairs:
        for text in (p["chosen"], p["rejected"]):
            answers.setdefault(_answer_key(p["prompt"], text), (p["prompt"], text))
    keys = list(answers)
    values = score([answers[k][0] for k in keys], [answers[k][1] for k in keys]) if keys else torch.zeros(0)
    at = dict(zip(keys, values.tolist()))
    chosen = torch.tensor([at[_answer_key(p["prompt"], p["chosen"])] for p in pairs])
    rejected = torch.tensor([at[_answer_key(p["prompt"], p["rejected"])] for p in pairs])
    return chosen, rejected, values


def _answer_key(prompt: list[dict], text: str) -> str:
    return json.dumps([prompt, text], sort_keys=True)


def _distinct_answers(pairs: list[dict]) -> set[str]:
    return {_answer_key(p["prompt"], t) for p in pairs for t in (p["chosen"], p["rejected"])}


def accuracy_figures(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """`accuracy` (a tie counts as wrong), `accuracy_ci95` and `eval_pairs` of scored pairs."""
    n, right = len(chosen), int((chosen > rejected).sum())
    ci = wilson_interval(right, n)
    return {"accuracy": right / n if n else None, "accuracy_ci95": [round(ci[0], 4), round(ci[1], 4)] if ci else None,
            "eval_pairs": n}


def pairwise_loss(r_chosen, r_rejected, margin, weight, label_smoothing: float, center_coef: float) -> torch.Tensor:
    """The weighted Bradley-Terry loss of the module docstring; `weight` sums to 1."""
    d = r_chosen - r_rejected - margin
    bt = -(1 - label_smoothing) * F.logsigmoid(d) - label_smoothing * F.logsigmoid(-d)
    return (weight * (bt + center_coef * (r_chosen + r_rejected) ** 2)).sum()


class GroupBatches:
    """Training pairs as groups: each step takes `batch_size` whole groups, and every pair is
    weighted 1 / (groups in the step x pairs in its group)."""

    def __init__(self, pairs: list[dict], encode, batch_size: int):
        by_group: dict[str, list[int]] = {}
        for i, p in enumerate(pairs):
            by_group.setdefault(p["group"], []).append(i)
        self.groups = list(by_group.values())
        self.pairs, self.encode, self.batch_size = pairs, encode, batch_size

    @property
    def per_epoch(self) -> int:
        return math.ceil(len(self.groups) / self.batch_size)

    def answers_per_step(self) -> float:
        return len(_distinct_answers(self.pairs)) / max(1, self.per_epoch)

    def epoch(self, generator: torch.Generator, groups: list[list[int]] | None = None):
        """Steps of one pass over `groups` (default: all) in a random order."""
        groups = self.groups if groups is None else groups
        order = torch.randperm(len(groups), generator=generator).tolist()
        for i in range(0, len(order), self.batch_size):
            yield self.step([groups[j] for j in order[i : i + self.batch_size]])

    def step(self, groups: list[list[int]]) -> dict:
        """Distinct answers' token rows and their `keys`, and per pair (`pairs`: their indices):
        chosen/rejected row index, weight."""
        rows, index = [], {}

        def row(prompt, text) -> int:
            key = _answer_key(prompt, text)
            if key not in index:
                index[key] = len(rows)
                rows.append(self.encode(prompt, text))
            return index[key]

        chosen, rejected, weights = [], [], []
        for group in groups:
            for i in group:
                p = self.pairs[i]
                chosen.append(row(p["prompt"], p["chosen"]))
                rejected.append(row(p["prompt"], p["rejected"]))
                weights.append(1.0 / (len(groups) * len(group)))
        return {"rows": rows, "keys": list(index), "pairs": [i for group in groups for i in group], "chosen": torch.tensor(chosen),
                "rejected": torch.tensor(rejected), "weight": torch.tensor(weights)}


def _stats_sample(batches: GroupBatches, n_answers: int, seed: int) -> list[dict]:
    """Whole groups in a seeded random order until they hold `n_answers` distinct answers."""
    order = list(range(len(batches.groups)))
    random.Random(seed).shuffle(order)
    pairs = []
    for g in order:
        if len(_distinct_answers(pairs)) >= n_answers:
            break
        pairs += [batches.pairs[i] for i in batches.groups[g]]
    return pairs


def train_reward_model(
    model_dir: str | Path,
    records,
    out_dir: str | Path,
    cfg: RewardConfig | None = None,
    *,
    eval_records=None,
    init_from: str | Path | None = None,
    quiet: bool = False,
) -> dict:
    """Train a reward model on preference pairs and save it in `out_dir`.

    `records`/`eval_records`: a JSONL path or in-memory rows in the pairs format (with an optional
    `meta.group`). Without `eval_records`, `cfg.eval_fraction` of the prompts
    are held out. `init_from`: an earlier reward model directory to continue from (see the module
    docstring). Returns metrics with `accuracy` (held-out, None if nothing was held out),
    `accuracy_ci95`, `eval_pairs`, `train_accuracy` (on the stats sample), `reward_mean/std`, what
    the time budget chose (`planned_steps`, `measured_s_per_step`) and, with `init_from`,
    `new_pairs` and `replayed_pairs`."""
    cfg = cfg or RewardConfig()
    pace = Pace(cfg.time_budget_s)
    out_dir = Path(out_dir)
    device, dtype, tokenizer = common.setup(model_dir, cfg)
    pairs = read_pairs(records)
    if eval_records is not None:
        train_pairs, eval_pairs = pairs, data.read_pairs(eval_records)
    else:
        train_pairs, eval_pairs = split_heldout(pairs, cfg.eval_fraction)
    if not train_pairs:
        raise data.DataError("no preference pairs to train on")

    earlier = pool_of(load_stats(init_from)) if init_from is not None else cfg.pool
    if earlier != cfg.pool:
        logger.warning("reward model: %s reads `%s`, this one `%s`: training from scratch", init_from, earlier, cfg.pool)
        init_from = None
    if init_from is not None:
        model = common.load_lora_model(model_dir, device=device, dtype=dtype, init_adapter=init_from, heads=POOLS[cfg.pool])
        listed = Path(init_from) / TRAINED_FILE  # absent from reward models trained before warm starts: all pairs are new
        seen = set(json.loads(listed.read_text())) if listed.is_file() else set()
    else:
        lora = lora_config(cfg, task_type="SEQ_CLS", modules_to_save=["score"])
        model = common.load_lora_model(model_dir, device=device, dtype=dtype, lora=lora, heads=POOLS[cfg.pool])
        seen = set()
    batches = GroupBatches(train_pairs, lambda prompt, text: encode_pair(tokenizer, prompt, text, cfg.max_len), cfg.batch_size)
    keys = [pair_key(p) for p in train_pairs]
    new = [g for g in batches.groups if any(keys[i] not in seen for i in g)]
    old = [g for g in batches.groups if all(keys[i] in seen for i in g)]
    replayed = random.Random(cfg.seed).sample(old, min(len(old), round(cfg.replay * len(new))))
    trained = new + replayed
    fingerprint = _fingerprint(model, cfg, dtype)
    known = _load_features(init_from, fingerprint) if init_from is not None else {}
    probe_started = time.monotonic()
    probe = fit_probe(model, batches, cfg, tokenizer.pad_token_id, device, known) if cfg.probe_l2 is not None and new else {}
    probe["probe_s"] = round(time.monotonic() - probe_started, 2)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    per_epoch = math.ceil(len(trained) / cfg.batch_size)
    fixed = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    # After the loop a sample of training answers and every held-out answer are scored once (no grad).
    stats_pairs = _stats_sample(batches, cfg.stats_answers, cfg.seed)
    tail_answers = len(_distinct_answers(stats_pairs)) + len(_distinct_answers(eval_pairs))
    total = pace.start(fixed, tail_steps=FORWARD_SHARE * tail_answers / batches.answers_per_step())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(1, pace.total))
    gen = torch.Generator().manual_seed(cfg.seed)

    log = common.RunLog(out_dir, total, "reward model", quiet)
    step, started = 0, time.monotonic()
    while step < total:
        for batch in batches.epoch(gen, trained):
            model.train()
            r = rewards(model, batch["rows"], tokenizer.pad_token_id, device, cfg.pool)
            r_c, r_r = r[batch["chosen"]], r[batch["rejected"]]
            weight = batch["weight"].to(device)
            loss = pairwise_loss(r_c, r_r, cfg.margin, weight, cfg.label_smoothing, cfg.center_coef)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            total = pace.step_done(step)
            log.replan(total)
            sched.step()
            d = (r_c - r_r).detach()
            log.step(step, loss=loss.item(), accuracy=float((weight * (d > 0)).sum()), margin=float((weight * d).sum()),
                     answers=len(batch["rows"]))
            if step >= total:
                break
    log.close()
    trained_s = time.monotonic() - started

    # Normalisation stats on a sample of training answers, with the final weights; then the held-out accuracy.
    def score(prompts, responses):
        return score_all(model, tokenizer, prompts, responses, cfg.max_len, cfg.batch_size * 2, device, cfg.pool)

    s_chosen, s_rejected, raw = score_pairs(score, stats_pairs)
    held = accuracy_figures(*score_pairs(score, eval_pairs)[:2])
    metrics = {
        **held,
        "train_accuracy": float((s_chosen > s_rejected).float().mean()),
        "train_pairs": len(train_pairs),
        "train_groups": len(batches.groups),
        "stats_pairs": len(stats_pairs),
        "reward_mean": float(raw.mean()),
        "reward_std": float(raw.std()) if len(raw) > 1 else 1.0,
        "steps": step,
        **probe,
        "seconds": round(time.monotonic() - started, 2),
        "scoring_s": round(time.monotonic() - started - trained_s, 2),
        **pace.figures(),
    }
    if init_from is not None:
        metrics.update(init_from=str(init_from), new_pairs=sum(len(g) for g in new), replayed_pairs=sum(len(g) for g in replayed))
    model.save_pretrained(str(out_dir))
    stats = {"base_model": str(Path(model_dir).resolve()), "pool": cfg.pool, "mean": metrics["reward_mean"],
             "std": max(metrics["reward_std"], 1e-6)}
    common.write_json(out_dir / STATS_FILE, {**stats, "metrics": metrics})
    (out_dir / TRAINED_FILE).write_text(json.dumps(sorted(seen | set(keys))))
    if step == 0 and known:  # LoRA steps change the states: then the next reward model reads them anew
        torch.save({"fingerprint": fingerprint, "keys": list(known), "features": torch.stack(list(known.values()))},
                   out_dir / FEATURES_FILE)
    common.write_json(out_dir / "train_config.json", {"step": "reward", "model": str(model_dir), **asdict(cfg)})
    return metrics


def _fingerprint(model, cfg: RewardConfig, dtype) -> str:
    """What an answer's states depend on besides its text: the weights below the `score` head (base
    and LoRA), the dtype, the pool and the truncation. Not where the model lies, so a data dir that
    was moved or copied keeps its states (hashing the 135M model's weights takes a fraction of a second)."""
    h = hashlib.sha256(json.dumps([str(dtype), cfg.pool, cfg.max_len]).encode())
    for name, p in model.named_parameters():
        if "score" not in name:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()[:24]


def _load_features(rm_dir: str | Path, fingerprint: str) -> dict[str, torch.Tensor]:
    """The states an earlier reward model's probe read, when they are what this model would read."""
    path = Path(rm_dir) / FEATURES_FILE
    if not path.is_file():
        return {}
    saved = torch.load(path, weights_only=True)
    if saved["fingerprint"] != fingerprint:
        logger.info("reward model: %s's probe states were read by another model; reading them anew", rm_dir)
        return {}
    return dict(zip(saved["keys"], saved["features"]))


def load_stats(rm_dir: str | Path) -> dict:
    path = Path(rm_dir) / STATS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{rm_dir} is not a reward model directory (no {STATS_FILE})")
    return json.loads(path.read_text())


def pool_of(stats: dict) -> str:
    """The pool of a reward model from its stats; those from before `pool` read the last token."""
    return stats.get("pool", "last")


def value_head_init(rm_dir: str | Path) -> tuple[torch.Tensor, float]:
    """(weight, bias) of a linear head that outputs the reward model's *normalised* score:
    (w.h - mean) / std, with w its last-token head (a `last_mean` model's mean head has no
    per-token counterpart). PPO starts its value head from it."""
    from safetensors.torch import load_file

    stats = load_stats(rm_dir)
    weights = load_file(str(Path(rm_dir) / "adapter_model.safetensors"))
    (w,) = [v for k, v in weights.items() if k.endswith("score.weight")]
    return w[0].float() / stats["std"], -stats["mean"] / stats["std"]


class RewardModel:
    """A trained reward model as a PPO/gate reward function: `rm(prompts, responses)` -> tensor."""

    def __init__(self, rm_dir: str | Path, model_dir: str | Path | None = None, *, batch_size: int = 16, max_len: int = 1024, dtype: str = "auto"):
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        self.path = Path(rm_dir)
        self.stats = load_stats(rm_dir)
        model_dir = model_dir or self.stats["base_model"]
        self.device = common.pick_device()
        common.quiet_transformers()
        self.pool = pool_of(self.stats)
        base = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=POOLS[self.pool],
                                                                  dtype=hardware.choose(dtype, self.device.type).torch_dtype)
        base.score.float()
        if base.config.pad_token_id is None:
            base.config.pad_token_id = base.config.eos_token_id
        self.model = PeftModel.from_pretrained(base, str(rm_dir)).to(self.device).eval()
        self.tokenizer = common.load_tokenizer(model_dir)
        self.batch_size, self.max_len = batch_size, max_len

    @property
    def accuracy(self) -> float | None:
        """Held-out pair accuracy measured when it was trained."""
        return self.stats.get("metrics", {}).get("accuracy")

    @property
    def accuracy_pairs(self) -> int:
        """How many held-out pairs `accuracy` was measured on."""
        return self.stats.get("metrics", {}).get("eval_pairs", 0)

    def raw(self, prompts: list[list[dict]], responses: list[str]) -> torch.Tensor:
        return score_all(self.model, self.tokenizer, prompts, responses, self.max_len, self.batch_size, self.device, self.pool)

    def score(self, prompts: list[list[dict]], responses: list[str]) -> torch.Tensor:
        """Normalised rewards, float32 on the CPU, one per (prompt, response)."""
        return (self.raw(prompts, responses) - self.stats["mean"]) / self.stats["std"]

    __call__ = score

    def accuracy_on(self, pairs) -> float | None:
        """Pair accuracy on `pairs` (a JSONL path or rows in the pairs format)."""
        pairs = data.read_pairs(pairs)
        return accuracy_figures(*score_pairs(self.raw, pairs)[:2])["accuracy"] if pairs else None
