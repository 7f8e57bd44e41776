#!/usr/bin/env bash
# The GPU path, on a machine with an NVIDIA GPU (bench/RESULTS.md, "On a GPU"). Each part has its own time
# limit and log, so one that fails or hangs leaves the rest.
#   bench/gpu_check.sh OUT_DIR [GGUF]
# PARTS picks what runs (default "train serve"):
#   train  the tests that run the training steps on the GPU, then PPO against TRL in bf16 and float32;
#   serve  with vLLM installed: the real vLLM server's hot swap and LoRA batching tests, then
#          bench/hot_swap.py and bench/serving.py; without vLLM: the transformers engine's hot swap test.
# DEADLINE (a `date +%s` time) cuts each part's limit to what is left and skips a part with under 30 s.
# PYTHON (default: .venv/bin/python, else python3) runs everything. The default 135M checkpoint is
# prepared from GGUF (default: the packaged one) unless it is already there. RANDOM_WEIGHTS=1 writes
# the same architecture with random weights instead, for a machine the weights cannot reach: the
# timings hold (same shapes, fixed response length), the tests that need a trained model are left out.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/gpu_check.sh OUT_DIR [GGUF]}
gguf=${2:-}
mkdir -p "$out"
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
model=.cache/models/SmolLM2-135M-Instruct
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step() {  # step NAME SECONDS CMD...: run with a limit, log to OUT/NAME.log, one status line
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    if [ -n "${DEADLINE:-}" ]; then
        local left=$((DEADLINE - $(date +%s)))
        if [ "$left" -lt 30 ]; then
            echo "$name: skipped, $left s left before DEADLINE" | tee -a "$out/summary.txt"
            return 1
        fi
        [ "$left" -lt "$limit" ] && limit=$left
    fi
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
    return $rc
}
has() { [[ " ${PARTS:-train serve} " == *" $1 "* ]]; }
pytest=("$py" -m pytest -q -p no:cacheprovider -o addopts=)
xdist=()  # the training tests start no server: a file per worker where pytest-xdist is there
"$py" -c "import xdist" 2>/dev/null && xdist=(-n 3 --dist loadfile)

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda,
"transformers", transformers.__version__, "peft", peft.__version__, "device", torch.cuda.get_device_name())'
} 2>&1 | tee "$out/summary.txt"

if [ "${RANDOM_WEIGHTS:-0}" = 1 ]; then
    step weights 300 "$py" - "$model" <<'EOF'
import json, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from loopchat.model import DONE_MARKER
out = Path(sys.argv[1])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out)).to(torch.bfloat16).save_pretrained(out)
(out / DONE_MARKER).write_text(json.dumps({"source": "random weights, same architecture (bench/gpu_check.sh)"}))
EOF
    tests=(tests/test_train_ppo_reference.py tests/test_train_ppo_ptx.py tests/test_train_ppo_passes.py)
else
    step weights 300 "$py" -c "import sys; from pathlib import Path; from loopchat.model import prepare
prepare(Path(sys.argv[1]), Path(sys.argv[2]) if sys.argv[2] else None)" "$model" "$gguf"
    tests=(tests/test_train_real.py tests/test_train_ppo_reference.py tests/test_train_ppo_ptx.py
           tests/test_train_ppo_passes.py tests/test_gate_capabilities.py)
fi

if has train; then
    step tests 300 "${pytest[@]}" "${xdist[@]}" --basetemp "$out/pytest-train" "${tests[@]}"
    step ppo-bf16 240 "$py" bench/ppo_vs_trl.py --model "$model" --dtype bfloat16 --iterations 4 --repeats 2
    step ppo-fp32 150 "$py" bench/ppo_vs_trl.py --model "$model" --dtype float32 --iterations 4
    grep -h -A12 "^device:" "$out"/ppo-*.log >>"$out/summary.txt" 2>/dev/null
fi
if has serve; then
    if "$py" -c "import vllm" 2>/dev/null; then
        # One compile cache for every vLLM start below (each test server and benchmark has its own data dir).
        export VLLM_CACHE_ROOT="$PWD/.cache/vllm" TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor"
        "$py" -c "import vllm; print('vllm', vllm.__version__)" | tee -a "$out/summary.txt"
        # vLLM 0.26's GPU sampler imports flashinfer (a dependency a hand-carried vLLM may lack) unless told not to.
        "$py" -c "import flashinfer" 2>/dev/null || export VLLM_USE_FLASHINFER_SAMPLER=0
        step vllm-tests 300 "${pytest[@]}" --basetemp "$out/pytest-serve" tests/test_loop_hotswap.py tests/test_gateway_lora_batching.py
        step hot-swap 180 "$py" bench/hot_swap.py --model "$model"
        step serving 180 "$py" bench/serving.py --model "$model"
        grep -h -A3 "^rank-\|^throughput ratio\|^p50 TTFT" "$out"/hot-swap.log "$out"/serving.log >>"$out/summary.txt" 2>/dev/null
    else
        step hf-hot-swap 200 "${pytest[@]}" --basetemp "$out/pytest-serve" tests/test_loop_hotswap_hf.py
    fi
fi
# The servers' logs (gateway, vLLM) go into one file beside the step logs, each as its first error lines
# (a crash's cause comes before the restarts that follow it) and its last lines; the rest of pytest's files go.
find "$out"/pytest-* -name '*.log' -size +0 2>/dev/null | while read -r f; do
    printf '\n==== %s: first errors\n' "${f#"$out"/}"; grep -m 30 -E "Error|ERROR|Traceback" "$f"
    printf '==== %s: last lines\n' "${f#"$out"/}"; tail -n 60 "$f"
done >"$out/server-logs.txt"
rm -rf "$out"/pytest-*
