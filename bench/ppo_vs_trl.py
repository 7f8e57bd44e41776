"""PPO throughput and peak memory: loopchat's trainer against trl 1.9.2's PPOTrainer, same run, same dtype.

Both sides get the same model, prompts, batch (16), response length (64), 1 PPO epoch and
2 minibatches, sampling at temperature 0.7, compute in `--dtype` (float32 or bfloat16), and run
`--iterations` PPO iterations. TRL gets what its trainer needs: a LoRA policy (the reference is the
policy with the adapter off, as in ours), a separate value model and a separate reward model (both
sequence-classification copies of the base). Ours: one model, a value head on the policy's trunk,
and a reward model that is base + LoRA + head (trained for one step here; its scores do not matter
for throughput). What else differs in the work done: both take the old log-probs from the sampling
pass (ours also its values and entropy; it draws tokens by inverse CDF, train.ppo.Sampler, with the
adapter in the model's dtype, train.ppo.adapters_in_model_dtype); TRL's passes run the LM head at
every position, ours only at response positions.

Each side runs in its own subprocess so its peak RSS (ru_maxrss) is its own; the time counted
is the PPO loop only (model loading excluded on both sides), as wall-clock seconds and as the
process's CPU seconds (all threads): on a machine shared with other work the wall-clock ratio
moves with the neighbours' load, the CPU-time ratio much less. For ours it also prints where each
iteration's time goes (sampling, scoring, reference pass, update). With `--repeats N`
the sides alternate N times and each keeps its best run. TRL is a benchmark-only dependency:
`pip install trl==1.9.2`.

    .venv/bin/python bench/ppo_vs_trl.py [--model DIR] [--iterations 2] [--repeats 1] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import hardware  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Tell me about dogs.", "How do plants grow?", "Why is the sky blue?",
    "Give me a tip for sleeping better.", "What is a computer?", "Describe the sun.", "How do birds fly?",
    "What is music?", "Who was Albert Einstein?", "What is water made of?", "What is a river?",
    "Write a sentence about the sea.", "What is 12 times 12?", "Name three fruits.", "How does rain form?",
]
BATCH, RESPONSE_LEN, EPOCHS, MINIBATCHES, TEMPERATURE, LR = 16, 64, 1, 2, 0.7, 1e-5


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


PHASES = ("generate", "score", "reference", "update")


def cpu_seconds() -> float:
    """This process's CPU time, all threads: the work done, whatever else the machine runs."""
    return time.process_time()


def run_ours(model_dir: Path, iterations: int, work: Path, dtype: str) -> dict:
    from train.ppo import PPOConfig, train_ppo
    from train.reward import RewardConfig, RewardModel, train_reward_model

    pairs = [{"prompt": [{"role": "user", "content": p}], "chosen": "Sure.", "rejected": "No."} for p in PROMPTS[:4]]
    train_reward_model(model_dir, pairs, work / "rm", RewardConfig(max_steps=1, eval_fraction=0), quiet=True)
    rm = RewardModel(work / "rm", model_dir, dtype=dtype)
    cfg = PPOConfig(steps=iterations, batch_size=BATCH, minibatches=MINIBATCHES, ppo_epochs=EPOCHS, max_new_tokens=RESPONSE_LEN,
                    temperature=TEMPERATURE, lr=LR, dtype=dtype)
    train_ppo(model_dir, PROMPTS, work / "ppo", rm, cfg, quiet=True)
    steps = [json.loads(line) for line in (work / "ppo" / "metrics.jsonl").read_text().splitlines()]
    per_step = {f"{kind}_{k}": round(sum(s[f"{kind}_{k}"] for s in steps) / len(steps), 2)
                for kind in ("seconds", "cpu_seconds") for k in PHASES}
    return {"episodes": BATCH * len(steps), "seconds": sum(s["seconds"] for s in steps),
            "cpu_seconds": sum(s["cpu_seconds"] for s in steps), "dtype": dtype, "per_step": per_step}


def run_trl(model_dir: Path, iterations: int, work: Path, dtype: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from train.common import load_tokenizer

    torch_dtype = getattr(torch, dtype)
    tok = load_tokenizer(model_dir)  # the same pad-token rule as ours: a checkpoint may have none
    tok.padding_side = "left"
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False) for p in PROMPTS]
    dataset = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch_dtype)
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch_dtype)
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    args = PPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1, num_mini_batches=MINIBATCHES,
        num_ppo_epochs=EPOCHS, response_length=RESPONSE_LEN, total_episodes=BATCH * iterations, stop_token="eos",
        temperature=TEMPERATURE, learning_rate=LR, missing_eos_penalty=1.0, num_sample_generations=0, report_to="none",
        save_strategy="no", logging_steps=1, local_rollout_forward_batch_size=BATCH, bf16=dtype == "bfloat16", seed=0,
        use_cpu=not torch.cuda.is_available(),
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM")
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward, train_dataset=dataset,
                         value_model=value, peft_config=lora)
    started, started_cpu = time.monotonic(), cpu_seconds()
    trainer.train()
    return {"episodes": BATCH * iterations, "seconds": time.monotonic() - started, "cpu_seconds": cpu_seconds() - started_cpu,
            "dtype": dtype}


def worker(args) -> None:
    with tempfile.TemporaryDirectory() as work:
        if args.worker == "ours":
            result = run_ours(args.model, args.iterations, Path(work), args.dtype)
        else:
            result = run_trl(args.model, args.iterations, Path(work), args.dtype)
    result.update(samples_per_s=result["episodes"] / result["seconds"], samples_per_cpu_s=result["episodes"] / result["cpu_seconds"],
                  peak_rss_mb=peak_rss_mb())
    print("RESULT " + json.dumps(result), flush=True)


def run_side(side: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--model", str(args.model), "--iterations", str(args.iterations), "--dtype", args.dtype]
    # Passive OpenMP waiting: on a box shared with other busy processes, spinning threads slow
    # torch down ~3x; both sides get the same setting.
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{side} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="HF checkpoint (default: the prepared SmolLM2-135M-Instruct)")
    p.add_argument("--iterations", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="alternate the sides this many times; keep each side's best")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both sides compute in this dtype")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model is None:
        from loopchat.model import prepare

        args.model = prepare(REPO / ".cache" / "models" / "SmolLM2-135M-Instruct")
    if args.worker:
        return worker(args)

    import torch

    runs = {"trl": [], "ours": []}
    for _ in range(args.repeats):
        for side in runs:
            runs[side].append(run_side(side, args))
            print(f"{side}: {runs[side][-1]} (load average {os.getloadavg()[0]:.1f})", flush=True)
    best = {side: max(runs[side], key=lambda r: r["samples_per_s"]) for side in runs}
    best_cpu = {side: max(runs[side], key=lambda r: r["samples_per_cpu_s"]) for side in runs}
    peak = {side: max(r["peak_rss_mb"] for r in runs[side]) for side in runs}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"device: {device}; machine: {json.dumps(hardware.describe())}")
    print(f"batch {BATCH}, response length {RESPONSE_LEN}, {EPOCHS} PPO epoch, {MINIBATCHES} minibatches, {args.iterations} iterations, "
          f"best of {args.repeats}")
    print(f"{'':<10} {'samples/s':>10} {'seconds':>9} {'samples/CPU-s':>14} {'CPU seconds':>12} {'peak RSS MB':>12}  dtype")
    for name, side in (("loopchat", "ours"), ("trl 1.9.2", "trl")):
        r, c = best[side], best_cpu[side]
        print(f"{name:<10} {r['samples_per_s']:>10.3f} {r['seconds']:>9.1f} {c['samples_per_cpu_s']:>14.3f} {c['cpu_seconds']:>12.1f} "
              f"{peak[side]:>12.0f}  {r['dtype']}")
    for kind in ("seconds", "cpu_seconds"):
        print(f"loopchat {kind} per PPO iteration: " + ", ".join(f"{k} {best_cpu['ours']['per_step'][f'{kind}_{k}']:.2f}" for k in PHASES))
    print(f"throughput ratio (loopchat / trl): {best['ours']['samples_per_s'] / best['trl']['samples_per_s']:.2f}x wall-clock, "
          f"{best_cpu['ours']['samples_per_cpu_s'] / best_cpu['trl']['samples_per_cpu_s']:.2f}x per CPU-second")
    print(f"peak memory ratio (loopchat / trl): {peak['ours'] / peak['trl']:.2f}x")

if __name__ == "__main__":
    main()
