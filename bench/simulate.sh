#!/usr/bin/env bash
# The recorded simulated-users run (bench/RESULTS.md, issue 7): a fresh data dir, the gateway on
# vLLM, a worker that runs only the cycles the simulator asks for, then `loopchat simulate`.
#   bench/simulate.sh OUT_DIR [simulate options...]     e.g. bench/simulate.sh /tmp/sim --cycles 5
#   (any `loopchat simulate` option passes through: --recipe rlhf|sft|bon, --rank-k 2..4, --preference ...)
# CYCLE_CONFIG (default bench/simulate-cycle.json) sets the cycle's step sizes; PORT the gateway's port.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bench/simulate.sh OUT_DIR [loopchat simulate options]}
shift
port=${PORT:-18431}
config=${CYCLE_CONFIG:-bench/simulate-cycle.json}
loopchat=(.venv/bin/python -m loopchat.cli)
mkdir -p "$out"
rm -rf "$out/data"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT

"${loopchat[@]}" serve --engine vllm --port "$port" --engine-port $((port + 1)) --data-dir "$out/data" \
    >"$out/gateway.log" 2>&1 &
pids+=($!)
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 1; done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { echo "gateway not ready; see $out/gateway.log" >&2; exit 1; }

# Thresholds of 0 switch the worker's own trigger off: only the simulator's POST /admin/cycles starts cycles.
"${loopchat[@]}" worker --gateway "http://127.0.0.1:$port" --data-dir "$out/data" --config "$config" \
    --interval 30 --min-thumbs 0 --min-comparisons 0 --min-corrections 0 >"$out/worker.log" 2>&1 &
pids+=($!)

cp "$config" "$out/cycle.json"
"${loopchat[@]}" simulate --gateway "http://127.0.0.1:$port" --out "$out/report" "$@" | tee "$out/table.txt"
