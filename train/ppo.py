"""PPO on the policy's LoRA adapter against a pluggable reward function (InstructGPT step 3).

One step:
  1. rollout: sample `batch_size` responses at `temperature` (responses stop at EOS or at
     `max_new_tokens`);
  2. score: reward_fn(prompts, responses) (the reward model, or any rule), minus
     `missing_eos_penalty` for responses that never ended; with `samples_per_prompt` answers to each
     prompt, minus the mean score of the prompt's other answers (grouped_scores);
  3. the policy's log-probs at the same temperature, values and entropy are taken from the sampling
     pass itself (see Sampler); one no-grad pass of the reference and, when the reference is not the
     base model, one of the base model;
  4. per-token reward = -kl_coef * (logp - logp_ref) - kl_base_coef * (logp - logp_base), plus the
     score at the last token;
     GAE with gamma=1, lambda=0.95; advantages whitened over the batch;
  5. `ppo_epochs` passes over `minibatches` minibatches of the clipped policy loss plus the
     clipped value loss, plus, with `ptx_coef` > 0, `ptx_coef` times the SFT loss on a batch of
     demonstrations (InstructGPT's PPO-ptx: it keeps what SFT taught while PPO chases the reward),
     and, with `stop_floor` > 0, `stop_floor` times stop_kl (the policy kept from becoming less ready
     to end its answers than the reference; one pass of the reference in step 3 gives both).

The reference: by default the base model (the adapter switched off). A cycle that continues from
the serving adapter passes that adapter as `reference_adapter`: PPO's KL is then the KL to the policy
being replaced, so it no longer accumulates across cycles; the KL to the base model is still measured
and reported (`kl_base`). Both live on one base model in memory: the reference is a second, frozen
peft adapter, the base is the model with adapters disabled.
If the KL to the reference (nats per response) ever rises more than `kl_stop` above where the
starting adapter was, the adapter is put back to its last state under that bound and training
stops (an adapter continued from earlier cycles may start with some KL of its own). A run that goes
more than `fallback_kl` above that start also saves the last policy within it (`fallback/`): a
shorter step in the same direction, which a cycle offers the gate when the full step cost too much
(train.cycle).

The value head is a linear layer on the policy's own final hidden states (a shared trunk,
as in the original InstructGPT-era TRL), initialised from the reward model's head rescaled
to its normalised score. Why: a separate value model would double memory and compute (it is
what makes TRL's PPO ~2x heavier), and a reward head already knows how to read this base
model's hidden states, so the first value estimates are in the right range and scale (with
several answers to each prompt the scores are taken against each other and average 0 whatever the
prompt, so there the head starts at 0). It is saved next to the adapter as
`value_head.safetensors`, never inside the adapter that vLLM serves.

Where the time goes (bench/ppo_vs_trl.py prints it per phase): sampling, then the update, then the
no-grad passes. What keeps them cheap: no pass of the policy besides sampling (its log-probs, entropy
and the hidden states for the values are kept while sampling; in bf16 they differ from a separate
full-sequence pass by ~0.04 nats a token of rounding, the noise TRL's PPO also takes, well inside the
clip range), tokens drawn by inverse CDF (Sampler), adapters in bf16 while sampling
(adapters_in_model_dtype); the LM head runs only at response positions, on contiguous hidden states (see
response_hidden), and only the taken tokens' log-probs are formed (token_logprobs); a minibatch drops
the padding columns all its rows share (tight). Not done: sampling with the adapter merged into the
weights saved ~8% of sampling's CPU time, but in bf16 the merged weights' rounding moves the sampled
distribution by ~0.04 nats per token, and on the real model it learned less in 2 of 3 seeds
(tests/test_train_real.py's PPO test failed with it).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from train import common, data
from train.budget import Pace
from train.sft import batches, lm_loss, lora_config, make_examples

RewardFn = Callable[[list[list[dict]], list[str]], torch.Tensor]
VALUE_HEAD_FILE = "value_head.safetensors"
FALLBACK = "fallback"  # the subfolder of PPO's output with its fallback policy (PPOConfig.fallback_kl)
POLICY, REFERENCE = "default", "reference"  # peft adapter names: the trained one, the frozen one KL is measured to


@dataclass
class PPOConfig:
    steps: int = 20  # rollout + update iterations
    # Run as many steps as fit, at most `steps`: more PPO per cycle mostly buys KL (bench/RESULTS.md run D:
    # two cycles of 12 steps reached the gate's KL bound). See train.budget.
    time_budget_s: float | None = None
    batch_size: int = 16  # responses per rollout
    # Answers sampled to each prompt of a rollout (batch_size // samples_per_prompt prompts). With 2 or more,
    # each answer's score is taken against the mean of the other answers to its prompt (RLOO's leave-one-out
    # baseline): what PPO then learns from is how an answer compares with what the policy writes to the same
    # prompt, not how easy the prompt is. See grouped_scores.
    samples_per_prompt: int = 1
    minibatches: int = 2
    ppo_epochs: int = 2
    max_new_tokens: int = 64
    max_prompt_len: int = 512  # longer prompts keep their end
    temperature: float = 0.7
    lr: float = 5e-5
    kl_coef: float = 0.05
    target_kl: float | None = None  # nats per response; set it for an adaptive coefficient
    kl_horizon: int = 10_000
    kl_stop: float = 8.0  # nats per response above the starting adapter's KL: beyond it training stops
    # A second per-token penalty, on the KL to the base model (0: off; with the base as the reference it adds to
    # kl_coef). The cycle sets it for a serving version near the gate's bound on KL to the base (train.cycle):
    # PPO then gives back drift that earns no reward while it chases the reward, rather than step past that bound.
    kl_base_coef: float = 0.0
    # Nats per response above the starting KL: when the run goes further, the last policy within it is also
    # saved, in `out_dir/fallback`: a shorter step the cycle can offer the gate when the full one moved too far
    # (see train.cycle). None: no fallback.
    fallback_kl: float | None = 4.0
    # Seconds kept at the end of the time budget while the run is past its fallback, for the gate to judge
    # it as well (the cycle sets it from what its last gate took per candidate, train.cycle.judging_seconds).
    fallback_reserve_s: float = 0.0
    missing_eos_penalty: float = 1.0
    # Weight of a loss that keeps the policy from ending its answers later than the reference policy would: at
    # every position of PPO's answers where the policy is less likely to end than the reference, the KL of the
    # reference's end-or-go-on decision from the policy's, summed over the answer (0 = off; see stop_kl). What the
    # missing-EOS penalty guards (answers that end) without paying the policy to end sooner than it did.
    stop_floor: float = 0.0
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    # PPO-ptx: weight of the SFT loss on demonstrations added to every minibatch's loss (0 = off; needs
    # `demonstrations`), and how many demonstrations each minibatch gets.
    ptx_coef: float = 0.0
    ptx_batch_size: int = 4
    max_demo_len: int = 512  # tokens per demonstration; longer ones are cut at the end
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = common.LORA_TARGETS
    seed: int = 0
    dtype: str = "auto"

    def __post_init__(self):
        if self.samples_per_prompt < 1 or self.batch_size % self.samples_per_prompt:
            raise ValueError(f"samples_per_prompt must divide batch_size ({self.batch_size}), not {self.samples_per_prompt!r}")
        if not self.temperature > 0:
            raise ValueError(f"PPO samples its rollouts: temperature must be positive, not {self.temperature!r}")
        if self.stop_floor < 0:
            raise ValueError(f"stop_floor must be 0 or more, not {self.stop_floor!r}")
        if self.kl_base_coef < 0:
            raise ValueError(f"kl_base_coef must be 0 or more, not {self.kl_base_coef!r}")
        if self.fallback_kl is not None and not self.fallback_kl > 0:
            raise ValueError(f"fallback_kl must be positive or None, not {self.fallback_kl!r}")


# ---------------------------------------------------------------- the maths, on plain tensors


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns) over [batch, tokens]; positions where mask == 0 are past the end."""
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        adv[:, t] = running
    return adv * mask, (adv + values) * mask


def grouped_scores(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Each score minus the mean of the other `group - 1` scores of its group (consecutive rows share a
    prompt): RLOO's leave-one-out baseline (Ahmadian et al. 2024), k/(k-1) times the score minus its
    group's mean. A reward model's scores differ far more between prompts than between two answers to
    one prompt; against a batch of 8 different prompts that difference is noise PPO must average out
    (run K, bench/RESULTS.md), against the same prompt's other answers it is gone."""
    if group == 1:
        return scores
    rows = scores.reshape(-1, group)
    return ((rows - rows.mean(1, keepdim=True)) * group / (group - 1)).reshape(-1)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """-kl_coef * KL at every token, plus the sequence's score at its last token."""
    rewards = -kl_coef * kl * mask
    last = mask.sum(1).long() - 1
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards


def truncate_at_eos(responses: torch.Tensor, eos_id: int, pad_id: int):
    """(responses with everything after the first EOS set to pad, mask of kept tokens, ended)."""
    is_eos = responses == eos_id
    after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    return responses.masked_fill(after, pad_id), (~after).float(), is_eos.any(1)


class AdaptiveKL:
    """Ziegler et al. 2019: move the KL coefficient so the KL per response tracks a target."""

    def __init__(self, coef: float, target: float | None, horizon: int):
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is not None:
            error = max(-0.2, min(0.2, kl / self.target - 1))
            self.coef *= 1 + error * n / self.horizon


# ---------------------------------------------------------------- model passes


class ValueHead(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def response_hidden(model, seq, attn, prompt_len: int):
    """(the final hidden states at the positions that predict the response tokens, the LM head).

    Contiguous on purpose: torch's CPU linear layer on a strided 3-D slice expands the weight to
    one copy per batch row (SmolLM2's head on a [16, 64, 576] slice: 1.5 s of CPU in bf16 against
    0.17 s on the same values made contiguous; on a [16, 1, 576] slice, 1.4 s against 5 ms)."""
    trunk, head = common.backbone_and_head(model)
    return common.last_hidden(trunk, seq, attn)[:, prompt_len - 1 : -1].contiguous(), head


def response_logprobs(model, seq, attn, prompt_len: int, temperature: float):
    """(log-softmax over the vocabulary at `temperature` for every response position, the
    hidden states those come from). Only response positions go through the LM head."""
    hidden, head = response_hidden(model, seq, attn, prompt_len)
    return torch.log_softmax(head(hidden).float() / temperature, -1), hidden


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-prob of `tokens` under softmax(logits / temperature), in float32; `tokens` is one id per position,
    or several (a last dimension of its own) that share one normalisation.

    log p(t) = logit_t / T - logsumexp(logits / T): only the taken tokens' log-probs are formed,
    never the vocabulary-wide log-softmax (49k floats per position, and as many again for its gradient)."""
    scaled = logits.float() / temperature
    norm = torch.logsumexp(scaled, -1, keepdim=True)
    return (scaled.gather(-1, tokens.reshape(*scaled.shape[:-1], -1)) - norm).reshape(tokens.shape)


def forward(model, value_head, seq, attn, prompt_len: int, responses, temperature: float, stop_id: int | None = None):
    """Per response token: (log-prob at `temperature`, value of the state before it or None when value_head
    is None, log-prob of ending there (`stop_id`) or None without it). One trunk pass; the LM head runs only
    at response positions."""
    hidden, head = response_hidden(model, seq, attn, prompt_len)
    values = value_head(hidden) if value_head is not None else None
    if stop_id is None:
        return token_logprobs(head(hidden), responses, temperature), values, None
    both = token_logprobs(head(hidden), torch.stack([responses, torch.full_like(responses, stop_id)], -1), temperature)
    return both[..., 0], values, both[..., 1]


def stop_kl(stop: torch.Tensor, ref_stop: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per answer, KL(reference || policy) of the decision to end or go on, summed over the positions where
    the policy is less likely to end than the reference (log-probs of ending: `stop`, `ref_stop`). One-sided:
    ending sooner costs nothing, so a taste for short answers is still the reward model's to teach."""
    p_ref = ref_stop.exp().clamp(max=1 - 1e-6)
    p = stop.exp().clamp(max=1 - 1e-6)
    kl = p_ref * (ref_stop - stop) + (1 - p_ref) * (torch.log1p(-p_ref) - torch.log1p(-p))
    return (kl * (stop < ref_stop) * mask).sum(1)


def tight(batch: dict, rows: torch.Tensor) -> tuple:
    """(seq, attn, prompt_len, responses, width) of `rows` without the padding columns all of them share.

    Prompts are left-padded and responses right-padded to the longest in the whole batch; a minibatch
    drops the leading columns where none of its prompts has begun and the trailing ones after its
    longest response. Exact: padding is masked from attention and skipped by the positions, and
    nothing after a response's end reaches its tokens. `width` is the kept response length."""
    attn = batch["attn"][rows]
    lead = int(attn.argmax(1).min())
    width = int(batch["mask"][rows].sum(1).max())
    end = batch["prompt_len"] + width
    return batch["seq"][rows, lead:end], attn[:, lead:end], batch["prompt_len"] - lead, batch["responses"][rows, :width], width


@contextmanager
def reference_model(model):
    """The policy PPO's KL is measured against: the frozen `reference` adapter when one was
    loaded (see train_ppo's `reference_adapter`), else the base model."""
    if REFERENCE not in model.peft_config:
        with model.disable_adapter():
            yield
        return
    model.set_adapter(REFERENCE, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(POLICY)  # trainable again, the reference frozen


class Sampler:
    """A logits processor that draws each next token at `temperature` itself, by inverse CDF (one uniform
    number a row), and leaves that token the only one standing, so that generate() runs greedy.

    Why not transformers' sampling: torch.multinomial draws an exponential variate for every one of the
    49k vocabulary entries of every row at every step, ~16 ms a step at batch 16 in bf16, 8% of sampling
    (bench/RESULTS.md). Same distribution. On the way it keeps each drawn token's log-prob and the
    entropy of the distribution it came from, in float32: the policy figures PPO's rollout needs, so
    that no second pass of the policy has to compute them again."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.logprobs: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores.float() / self.temperature, -1)
        probs = logp.exp()
        cdf = probs.cumsum(-1)
        # The first entry whose cumulative probability exceeds the draw: never a zero-probability token.
        tokens = torch.searchsorted(cdf, torch.rand(len(cdf), 1, device=cdf.device) * cdf[:, -1:], right=True)
        tokens = tokens.clamp(max=scores.shape[-1] - 1)
        self.logprobs.append(logp.gather(-1, tokens).squeeze(-1))
        self.entropy.append(-(probs * logp).nan_to_num().sum(-1))  # 0 * log 0 is 0
        return torch.full_like(scores, float("-inf")).scatter_(-1, tokens, 0.0)


@contextmanager
def adapters_in_model_dtype(model):
    """Adapter weights in the base weights' dtype while inside, put back exactly after.

    peft keeps LoRA weights in float32 on a bf16 model (what the optimiser needs); every LoRA layer then
    casts its input up and its result back, ~15% of a bf16 decode step at batch 16 (bench/RESULTS.md).
    Sampling does not need it: vLLM serves the same adapter in bf16. (Merging the adapter into the
    weights is faster still, but rounds every weight the adapter touches: ~0.04 nats a token, see the
    module docstring.)"""
    dtype = model.get_base_model().dtype
    lora = [p for name, p in model.named_parameters() if "lora_" in name and p.dtype != dtype]
    kept = [p.data for p in lora]
    for p in lora:
        p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, data in zip(lora, kept):
            p.data = data


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, temperature: float, max_prompt_len: int = 512) -> dict:
    """Sample one response per prompt (temperature 0 = greedy). Responses are cut after their
    first EOS; `seq`/`attn` are the left-padded prompts followed by the responses.

    Also what the sampling pass itself knows about each response token: the final hidden states that
    predicted it (`hidden`, for a value head) and, when sampled, its log-prob at `temperature`
    (`logprobs`) and the entropy of the distribution it was drawn from (`entropy`)."""
    model.eval()
    rows = [common.encode_prompt(tokenizer, p)[-max_prompt_len:] for p in prompts]
    ids = common.pad_left(rows, tokenizer.pad_token_id).to(model.device)
    attn = common.pad_left([[1] * len(r) for r in rows], 0).to(model.device)
    sampler = Sampler(temperature) if temperature > 0 else None
    hidden = []

    def keep_contiguous(module, args):
        # The LM head sees the position that predicts the next token ([B, 1, H]); made contiguous, as
        # the first step's is a strided slice (see response_hidden).
        states = args[0][:, -1:].contiguous()
        hidden.append(states)
        return (states, *args[1:])

    _, head = common.backbone_and_head(model)
    hook = head.register_forward_pre_hook(keep_contiguous)
    try:
        with adapters_in_model_dtype(model):
            out = model.generate(
                input_ids=ids,
                attention_mask=attn,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                logits_processor=[sampler] if sampler else None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
    finally:
        hook.remove()
    P = ids.shape[1]
    responses, mask, ended = truncate_at_eos(out[:, P:], tokenizer.eos_token_id, tokenizer.pad_token_id)
    batch = {
        "seq": torch.cat([ids, responses], 1),
        "attn": torch.cat([attn, torch.ones_like(responses)], 1),
        "prompt_len": P,
        "responses": responses,
        "mask": mask,
        "ended": ended,
        "texts": tokenizer.batch_decode(responses, skip_special_tokens=True),
        "hidden": torch.cat(hidden, 1),
    }
    if sampler:
        batch.update(logprobs=torch.stack(sampler.logprobs, 1) * mask, entropy=torch.stack(sampler.entropy, 1))
    return batch


class Clock:
    """Seconds spent in each named phase of a step (`with clock("generate"): ...`), wall-clock and
    this process's CPU time (all threads): on a machine shared with other work the CPU time is the
    steadier measure of the work itself."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        wall, cpu = time.monotonic(), time.process_time()
        try:
            yield
        finally:
            self.wall[phase] = self.wall.get(phase, 0.0) + time.monotonic() - wall
            self.cpu[phase] = self.cpu.get(phase, 0.0) + time.process_time() - cpu

    def figures(self) -> dict[str, float]:
        return {**{f"seconds_{k}": round(v, 3) for k, v in self.wall.items()},
                **{f"cpu_seconds_{k}": round(v, 3) for k, v in self.cpu.items()}}


@torch.no_grad()
def rollout(model, value_head, tokenizer, prompts: list[list[dict]], reward_fn: RewardFn, cfg: PPOConfig, kl_coef: float,
            clock: Clock) -> dict:
    """Sample, score and evaluate one batch; everything PPO's update needs."""
    with clock("generate"):
        batch = generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.temperature, cfg.max_prompt_len)
    seq, attn, P, responses, mask, ended = (batch[k] for k in ("seq", "attn", "prompt_len", "responses", "mask", "ended"))
    with clock("score"):
        raw_scores = torch.as_tensor(reward_fn(prompts, batch["texts"]), dtype=torch.float32).reshape(-1).to(seq.device)
    scores = grouped_scores(raw_scores - cfg.missing_eos_penalty * (~ended).float(), cfg.samples_per_prompt)

    # The policy's own figures come from the sampling pass (see Sampler); only the reference needs a pass.
    logprobs, values, entropy = batch["logprobs"], value_head(batch["hidden"]), batch["entropy"]
    args = (seq, attn, P, responses, cfg.temperature)
    stop_id = tokenizer.eos_token_id if cfg.stop_floor > 0 else None
    with clock("reference"), reference_model(model):
        ref_logprobs, _, ref_stop = forward(model, None, *args, stop_id)
    kl = (logprobs - ref_logprobs) * mask
    if REFERENCE in model.peft_config:
        with clock("base"), model.disable_adapter():
            base_logprobs, _, _ = forward(model, None, *args)
        kl_base = (logprobs - base_logprobs) * mask
    else:
        kl_base = kl
    rewards = token_rewards(scores, kl, mask, kl_coef) - cfg.kl_base_coef * kl_base
    adv, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    return {
        **batch,
        "values": values * mask,
        "advantages": whiten(adv, mask),
        "returns": returns,
        "stop_id": stop_id,
        "ref_stop": ref_stop,
        "stats": {
            "score": float(raw_scores.mean()),
            "kl": float(kl.sum(1).mean()),
            "kl_base": float(kl_base.sum(1).mean()),
            "entropy": float(masked_mean(entropy, mask)),
            "eos_rate": float(ended.float().mean()),
            "response_len": float(mask.sum(1).mean()),
        },
    }


def demonstration_batches(tokenizer, records, cfg: PPOConfig, device):
    """Endless (ids, labels, attention mask) batches of `ptx_batch_size` demonstrations, reshuffled
    each pass with their own generator (PPO's prompt and minibatch order stay what they are without them)."""
    examples = make_examples(tokenizer, data.read_sft(records), cfg.max_demo_len)
    if not examples:
        raise data.DataError("no demonstrations to mix into PPO (ptx_coef > 0)")
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    while True:
        for ids, labels, attn in batches(examples, cfg.ptx_batch_size, tokenizer.pad_token_id, generator):
            yield ids.to(device), labels.to(device), attn.to(device)


def update(model, value_head, opt, params, batch: dict, cfg: PPOConfig, generator: torch.Generator, demonstrations=None) -> dict:
    """`ppo_epochs` passes of clipped policy + value loss over shuffled minibatches; with
    `demonstrations` (from demonstration_batches) and `ptx_coef` > 0, plus ptx_coef times the SFT
    loss on one batch of them per minibatch; with `stop_floor` > 0, plus stop_floor times stop_kl."""
    model.train()
    n = batch["seq"].shape[0]
    size = max(1, n // cfg.minibatches)
    mix_ptx = demonstrations is not None and cfg.ptx_coef > 0
    sums: dict[str, float] = {}
    count = 0
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, size):
            i = order[start : start + size].to(batch["seq"].device)
            seq, attn, prompt_len, responses, width = tight(batch, i)
            mask, adv, old_logp, old_v, ret = (batch[k][i, :width] for k in ("mask", "advantages", "logprobs", "values", "returns"))
            logp, v, stop = forward(model, value_head, seq, attn, prompt_len, responses, cfg.temperature,
                                    batch["stop_id"] if cfg.stop_floor > 0 else None)
            logratio = (logp - old_logp) * mask
            ratio = logratio.exp()
            pg_loss = masked_mean(torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange)), mask)
            v_clipped = old_v + (v - old_v).clamp(-cfg.cliprange_value, cfg.cliprange_value)
            vf_loss = 0.5 * masked_mean(torch.max((v - ret) ** 2, (v_clipped - ret) ** 2), mask)
            loss = pg_loss + cfg.vf_coef * vf_loss
            step_stats = {}
            if stop is not None:
                stop_loss = stop_kl(stop, batch["ref_stop"][i, :width], mask).mean()
                loss = loss + cfg.stop_floor * stop_loss
                step_stats["stop_kl"] = stop_loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if mix_ptx:
                # A separate backward accumulates into the same gradients: the two graphs are never held at once.
                ptx_loss = lm_loss(model, *next(demonstrations))
                (cfg.ptx_coef * ptx_loss).backward()
                step_stats["ptx_loss"] = ptx_loss.item()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                step_stats.update({
                    "pg_loss": pg_loss.item(),
                    "vf_loss": vf_loss.item(),
                    "clipfrac": float(masked_mean(((ratio - 1).abs() > cfg.cliprange).float(), mask)),
                    "approx_kl": float(0.5 * masked_mean(logratio**2, mask)),
                })
            for k, val in step_stats.items():
                sums[k] = sums.get(k, 0.0) + val
            count += 1
    return {k: val / count for k, val in sums.items()}


# ---------------------------------------------------------------- the run


def load_policy(model_dir, cfg: PPOConfig, *, device, dtype, init_adapter=None, reference_adapter=None):
    """The base model with the trainable policy adapter (`init_adapter`, or a fresh one) and, when
    given, `reference_adapter` beside it as a second, frozen adapter: one base model in memory."""
    model = common.load_lora_model(model_dir, device=device, dtype=dtype, lora=lora_config(cfg), init_adapter=init_adapter)
    if reference_adapter is not None:
        model.load_adapter(str(reference_adapter), adapter_name=REFERENCE, is_trainable=False)
    return model


def lora_state(model) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def restore_lora(model, state: dict[str, torch.Tensor]) -> None:
    """Put back the trainable weights `lora_state` saved: undo the steps since."""
    for k, p in model.named_parameters():
        if k in state:
            p.copy_(state[k])


def exact_kl(logp: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sequence, KL(p || ref) in nats from two `response_logprobs`: the exact KL between the two
    next-token distributions at each response position, summed over the response's tokens (never
    negative, far less noisy than averaging log-ratios of the sampled tokens)."""
    return ((logp.exp() * (logp - ref)).sum(-1) * mask).sum(1)


def train_ppo(
    model_dir: str | Path,
    prompts,
    out_dir: str | Path,
    reward_fn: RewardFn,
    cfg: PPOConfig | None = None,
    *,
    init_adapter: str | Path | None = None,
    value_head_from: str | Path | None = None,
    reference_adapter: str | Path | None = None,
    demonstrations=None,
    quiet: bool = False,
) -> dict:
    """Optimise a LoRA policy with PPO and save the adapter (peft format) in `out_dir`.

    `prompts`: a JSONL path or in-memory rows (see train.data.read_prompts).
    `reward_fn(prompts, responses) -> tensor`: e.g. a train.reward.RewardModel.
    `init_adapter`: start from this adapter (e.g. the serving one or the SFT output).
    `value_head_from`: a reward model dir to initialise the value head from (defaults to the
    reward function's own directory when it is a RewardModel; else, and whenever scores are taken
    against their prompt's other answers (`samples_per_prompt` > 1), the head starts at zero).
    `reference_adapter`: the adapter PPO's KL penalty, KL controller and `kl*` figures are measured
    against (the serving version's, the policy being replaced); None = the base model. The KL to the
    base model is reported as `kl_base*` either way.
    `demonstrations`: SFT records ({"messages": [...]}, a JSONL path or rows) for PPO-ptx, mixed in
    when `cfg.ptx_coef` > 0 (none given, or an empty list: plain PPO).
    Returns metrics (first/last step figures, stop reason, what the time budget chose:
    `planned_steps`, `measured_s_per_step`); per-step lines in metrics.jsonl, with the seconds
    each phase took (`seconds_generate`, `seconds_score`, `seconds_reference`,
    `seconds_base`, `seconds_update`, and the same as `cpu_seconds_*`)."""
    from safetensors.torch import save_file

    from train.reward import value_head_init

    cfg = cfg or PPOConfig()
    pace = Pace(cfg.time_budget_s)
    out_dir = Path(out_dir)
    all_prompts = data.read_prompts(prompts)
    if not all_prompts:
        raise data.DataError("no prompts to train on")
    device, dtype, tokenizer = common.setup(model_dir, cfg)
    demos = demonstration_batches(tokenizer, demonstrations, cfg, device) if demonstrations and cfg.ptx_coef > 0 else None
    model = load_policy(model_dir, cfg, device=device, dtype=dtype, init_adapter=init_adapter, reference_adapter=reference_adapter)
    value_head = ValueHead(model.get_base_model().config.hidden_size).to(device)
    value_head_from = value_head_from or getattr(reward_fn, "path", None)
    # Scores against their group's mean are 0 on average whatever the prompt: the value head starts at 0.
    if value_head_from is not None and cfg.samples_per_prompt == 1:
        weight, bias = value_head_init(value_head_from)
        value_head.linear.weight.data.copy_(weight.reshape(1, -1))
        value_head.linear.bias.data.fill_(bias)
    params = [p for p in model.parameters() if p.requires_grad] + list(value_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    kl_ctl = AdaptiveKL(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
    gen = torch.Generator().manual_seed(cfg.seed)

    def prompt_stream():
        while True:
            for i in torch.randperm(len(all_prompts), generator=gen).tolist():
                yield all_prompts[i]

    stream = prompt_stream()
    total = pace.start(cfg.steps)
    log = common.RunLog(out_dir, total, "ppo", quiet)
    history, stop = [], "steps done"
    safe, kl_start, fallback, holding = lora_state(model), None, None, False
    step = 0
    while step < total:
        step += 1
        started, started_cpu = time.monotonic(), time.process_time()
        clock = Clock()
        distinct = [next(stream) for _ in range(cfg.batch_size // cfg.samples_per_prompt)]
        prompts_now = [p for p in distinct for _ in range(cfg.samples_per_prompt)]
        batch = rollout(model, value_head, tokenizer, prompts_now, reward_fn, cfg, kl_ctl.coef, clock)
        stats = batch["stats"]
        if kl_start is None:
            kl_start = stats["kl"]
        if stats["kl"] > kl_start + cfg.kl_stop:
            restore_lora(model, safe)  # the last update went too far from the reference: undo it and stop
            stop = f"KL {stats['kl']:.2f} > bound {kl_start + cfg.kl_stop:.2f} at step {step}: reverted to the previous step"
            log.step(step, **stats, kl_coef=kl_ctl.coef, stopped=True)
            break
        safe = lora_state(model)
        within = cfg.fallback_kl is not None and stats["kl"] <= kl_start + cfg.fallback_kl
        if within:
            fallback = (step, stats["kl"], safe)  # the policy that rolled out this step, before its update
        if fallback is not None and holding == within:  # two candidates to judge while past it, one when back
            holding = not within
            total = pace.hold(cfg.fallback_reserve_s if holding else 0.0, step)
        with clock("update"):
            stats.update(update(model, value_head, opt, params, batch, cfg, gen, demos))
        stats["kl_coef"] = kl_ctl.coef
        kl_ctl.update(stats["kl"], cfg.batch_size)
        seconds = time.monotonic() - started
        stats.update(seconds=round(seconds, 3), cpu_seconds=round(time.process_time() - started_cpu, 3),
                     samples_per_s=round(cfg.batch_size / seconds, 3), **clock.figures())
        history.append(stats)
        total = pace.step_done(step)
        log.replan(total)
        log.step(step, **stats)
    log.close()

    # A fallback only when the run went past it: else the policy itself is as short a step.
    if fallback is not None and fallback[0] < len(history):
        trained = lora_state(model)
        restore_lora(model, fallback[2])
        model.save_pretrained(str(out_dir / FALLBACK), selected_adapters=[POLICY])
        restore_lora(model, trained)
    else:
        fallback = None
    model.save_pretrained(str(out_dir), selected_adapters=[POLICY])
    save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}, str(out_dir / VALUE_HEAD_FILE))
    common.write_json(out_dir / "train_config.json", {"step": "ppo", "model": str(model_dir), "init_adapter": init_adapter,
                                                      "reference_adapter": reference_adapter, **asdict(cfg)})
    first, last = (history[0], history[-1]) if history else ({}, {})
    return {
        "steps": len(history),
        "stop": stop,
        "score_first": first.get("score"),
        "score_last": last.get("score"),
        "kl_first": first.get("kl"),
        "kl_last": last.get("kl"),
        "kl_bound": None if kl_start is None else kl_start + cfg.kl_stop,
        "kl_base_first": first.get("kl_base"),
        "kl_base_last": last.get("kl_base"),
        "reference": str(reference_adapter) if reference_adapter is not None else "base",
        "ptx_loss_last": last.get("ptx_loss"),
        # the fallback policy: the one that rolled out step `fallback_step` (after fallback_step - 1 updates)
        "fallback_step": fallback and fallback[0],
        "fallback_kl": fallback and fallback[1],
        "samples_per_s": sum(h["samples_per_s"] for h in history) / len(history) if history else None,
        **pace.figures(),
    }
