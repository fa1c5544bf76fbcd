#!/usr/bin/env bash
# One call on a lent accelerator: the kernel tests, the MoE-layer, train-step
# and every-method benchmarks at accelerator sizes, and real steps of a paper
# config, each under its own time limit (under 8 minutes together), each
# writing its table to $OUT for benchmarks/RESULTS.md.
#
#   OUT=/tmp/device-check bash benchmarks/device_check.sh             # accelerator
#   OUT=/tmp/device-check bash benchmarks/device_check.sh --cpu-smoke # here, tiny
#
# With the device tool: run(command="bash benchmarks/device_check.sh",
# timeout_s=540); its $OUT comes back (8 files at most: this writes 7, 8 with wheels).
# The machine has jax, flax, optax, orbax, chex and sentencepiece but not the
# rest of setup.py and no network, so nothing is installed: the checkout is
# imported from PYTHONPATH, and wheels carried in `.device_wheels/` (made here
# with `pip download --no-deps -d .device_wheels ml-collections pytest pluggy
# iniconfig`, a folder .git/info/exclude ignores, named in `carry`) are
# installed from disk first. pytest runs without the ini's addopts (no xdist).
# `--cpu-smoke` runs every step at tiny sizes on the CPU, to check the script
# end to end without an accelerator (tests/test_device_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/device_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=3
SMOKE=0
[[ "${1:-}" == "--cpu-smoke" ]] && SMOKE=1
PY="${PYTHON:-python3}"

if [[ -d .device_wheels ]]; then
  "$PY" -m pip install -q --no-index --find-links .device_wheels \
    .device_wheels/*.whl >"$OUT/install.txt" 2>&1 || true
fi

SUMMARY="$OUT/summary.md"
{
  echo "# device check ($(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
  echo
  if (( SMOKE )); then echo "mode: --cpu-smoke (tiny sizes on the CPU; no figure here is a result)"; fi
  "$PY" -c 'import jax, flax, optax, platform; d = jax.devices()[0]; print(f"device: {d.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)); python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}")' 2>&1 | tail -1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo
  echo "| step | rc | seconds | output |"
  echo "|---|---|---|---|"
} >"$SUMMARY"

FAILED=0
# step NAME LIMIT_S OUTFILE COMMAND...: runs COMMAND under `timeout`, its
# stdout and stderr to $OUT/OUTFILE, and a row of the summary.
step() {
  local name="$1" limit="$2" file="$3"; shift 3
  local start=$SECONDS rc
  echo "== $name (limit ${limit} s) -> $OUT/$file"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$file" 2>&1
  rc=$?
  local took=$((SECONDS - start))
  local note="$file"
  (( rc == 124 || rc == 137 )) && note="$file (timed out)"
  (( rc != 0 )) && FAILED=$((FAILED + 1))
  echo "| $name | $rc | $took | $note |" >>"$SUMMARY"
  echo "   rc=$rc in ${took} s"
}

PAPER=configs/paper/stablemoe_lm_base.py
if (( SMOKE )); then
  # Every step's code path at sizes of seconds (the suite runs tests/kernels
  # in full; one file here shows the step works).
  export JAX_PLATFORMS=cpu
  step kernels 120 kernels.txt "$PY" -m pytest -o addopts= -p no:cacheprovider \
    tests/kernels/test_selection.py
  step moe_layer 120 moe_layer.md "$PY" benchmarks/moe_layer.py --tokens 128 \
    --d-model 16 --d-ff 32 --experts 4 --top-k 1 --dtype float32 --matmul xla --iters 1
  step train_step 150 train_step.md "$PY" benchmarks/train_step.py --layers 2 \
    --d-model 16 --heads 2 --d-ff 32 --vocab 128 --seq-len 16 --batch 2 \
    --experts 4 --top-k 1 --dtype float32 --matmul xla --iters 1
  step routers 240 routers.md "$PY" benchmarks/routers.py --methods switch \
    --iters 1 --rounds 1 --batch 4 --seq-len 16 --vocab 128 --num-layers 2 \
    --d-model 16 --num-heads 2 --d-ff 32 --num-experts 4
  step paper_step 150 paper_step.md "$PY" benchmarks/scale.py --config "$PAPER" \
    --set model.size=tiny --set data.vocab_size=128 --set mesh.expert=1 \
    --devices 1 --seqs-per-device 2 --seq-len 16 --steps 1 --variants baseline \
    --json "$OUT/paper_step.json"
else
  # The kernels compiled for the chip: conftest leaves the platform to JAX.
  step kernels 60 kernels.txt env MOEJAX_TEST_ACCELERATOR=1 \
    "$PY" -m pytest -o addopts= -p no:cacheprovider tests/kernels
  step moe_layer 75 moe_layer.md "$PY" benchmarks/moe_layer.py --iters 10
  step train_step 90 train_step.md "$PY" benchmarks/train_step.py --iters 5
  step routers 170 routers.md "$PY" benchmarks/routers.py --full --iters 4 --rounds 2
  # StableMoE Table 2 base (988M params, 32 experts) on one chip at the
  # paper's per-chip batch, 5 real steps after the compile.
  step paper_step 75 paper_step.md "$PY" benchmarks/scale.py --config "$PAPER" \
    --set mesh.expert=1 --set mesh.data=1 --platform gpu --devices 1 \
    --seqs-per-device 8 --seq-len 1024 --steps 5 --variants baseline \
    --json "$OUT/paper_step.json"
fi
echo >>"$SUMMARY"
echo "failed steps: $FAILED" >>"$SUMMARY"
cat "$SUMMARY"
exit $(( FAILED > 0 ))
