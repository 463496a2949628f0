#!/usr/bin/env bash
# For whoever first has a CUDA machine: does everything that should run on a GPU run there?
#
#   bash benchmarks/gpu_check.sh                # estimated 10-15 minutes on one GPU (most of it installs), plus the sweep (not yet timed)
#   VENV=/path/to/env bash benchmarks/gpu_check.sh   # an environment with a CUDA torch already
#
# 1. the tests that exercise a device, with SAE_ALLOCATORS_TEST_DEVICE=cuda (tests/test_device.py:
#    the tiny main job on the GPU, gradient_topk on the LM included, every runner config, reload and
#    model checked to be on it);
# 2. benchmarks/step_speed.py --device cuda (one training step per architecture, timed);
# 3. benchmarks/step_speed.py --sweep --device cuda: the wide-dictionary sweep (d_sae 32768-131072,
#    N 2048/4096, d_in 512/768, k 32/64; every architecture, SAELens topk, the floor and sparsify's
#    TopK step when it installs), medians, ratios, peak memory and the GPU's name in
#    reports/gpu-check/sweep/ (sweep.md, sweep.json, sweep.png);
# 4. benchmarks/step_speed.py --breakdown --device cuda at d_sae 65536, N 2048: where each step's time
#    goes, by phase (profiler), and its passes over N x F and F x d (reports/gpu-check/breakdown/);
# 5. benchmarks/trainer_speed.py --device cuda: SAELens's own training loop (SAETrainer.fit, its
#    bookkeeping included) per architecture at d_sae 32768 and 65536 against SAELens topk, and the
#    bare step beside it (reports/gpu-check/trainer-speed/);
# 6. the main job: bash benchmarks/run.sh --quick --device cuda (report in reports/gpu-check-quick);
# then a one-screen summary (logs in reports/gpu-check/). Without a CUDA GPU it says what it skipped
# and exits 0. It exits 1 when a step that ran failed.
#
# The environment: $VENV (default .venvs/gpu) is created when missing, with torch from PyPI
# ($TORCH_SPEC, default torch==2.13.0: PyPI's Linux wheel is the CUDA build) and this checkout with
# the test, report and offline extras.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=${VENV:-$ROOT/.venvs/gpu}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
LOGS=$ROOT/reports/gpu-check
export WANDB_MODE=disabled PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

skip_all() {
  echo "gpu_check: $1"
  echo "gpu_check: skipped: the device tests with SAE_ALLOCATORS_TEST_DEVICE=cuda, step_speed.py --device cuda (and --sweep),"
  echo "           and the main job --quick --device cuda. Nothing failed; run this on a machine with a CUDA GPU."
  exit 0
}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  skip_all "no CUDA GPU here (nvidia-smi is missing or lists no GPU)"
fi

mkdir -p "$LOGS"
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV" || skip_all "could not create $VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "== installing $TORCH_SPEC into $VENV"
  pip install -q "$TORCH_SPEC" >"$LOGS/install.log" 2>&1 || skip_all "could not install $TORCH_SPEC (see $LOGS/install.log)"
fi
echo "== installing sae-allocators[test,report,offline] from this checkout into $VENV"
pip install -q --upgrade-strategy only-if-needed ".[test,report,offline]" >>"$LOGS/install.log" 2>&1 \
  || { echo "gpu_check: installing the package failed (see $LOGS/install.log)"; exit 1; }
# sparsify's TopK step is the sweep's reference column (a benchmark reference, not a dependency):
# without it the sweep still runs, with no "x sparsify" table
pip install -q --no-deps eai-sparsify einops natsort schedulefree >>"$LOGS/install.log" 2>&1 \
  || echo "gpu_check: eai-sparsify did not install (see $LOGS/install.log): the sweep has no sparsify column"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  skip_all "the GPU is there but torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') in $VENV cannot use it (a CPU build? set TORCH_SPEC or VENV)"
fi
gpu=$("$VENV/bin/python" -c "from sae_allocators import devices; print(devices.describe('cuda'))")
echo "== GPU: $gpu"

declare -a names results times
run_step() {  # name, log file, command...
  local name=$1 log=$2; shift 2
  local s=$(date +%s)
  echo "== $name"
  "$@" >"$log" 2>&1
  local rc=$?
  names+=("$name"); times+=("$(($(date +%s) - s)) s")
  if [ $rc -eq 0 ]; then results+=("ok"); else results+=("FAILED (exit $rc, log $log)"); fi
}

run_step "device tests (SAE_ALLOCATORS_TEST_DEVICE=cuda)" "$LOGS/tests.log" \
  bash -c "cd tests && SAE_ALLOCATORS_TEST_DEVICE=cuda '$VENV/bin/python' -m pytest -q -p no:cacheprovider -p no:xdist test_device.py"
run_step "step_speed.py --device cuda" "$LOGS/step_speed.log" \
  "$VENV/bin/python" benchmarks/step_speed.py --device cuda
run_step "step_speed.py --sweep --device cuda" "$LOGS/sweep.log" \
  "$VENV/bin/python" benchmarks/step_speed.py --sweep --device cuda --out "$LOGS/sweep"
run_step "step_speed.py --breakdown --device cuda" "$LOGS/breakdown.log" \
  "$VENV/bin/python" benchmarks/step_speed.py --breakdown --device cuda --d-sae 65536 --n 2048 --out "$LOGS/breakdown"
run_step "trainer_speed.py --device cuda" "$LOGS/trainer_speed.log" \
  "$VENV/bin/python" benchmarks/trainer_speed.py --device cuda --out "$LOGS/trainer-speed"
rm -rf reports/gpu-check-quick  # a fresh folder: an existing one would be resumed (no training)
run_step "main job --quick --device cuda" "$LOGS/main_quick.log" \
  env VENV="$VENV" bash benchmarks/run.sh --quick --device cuda --out reports/gpu-check-quick

echo
echo "================ gpu_check summary ($(($(date +%s) - t0)) s) ================"
echo "GPU: $gpu"
status=0
for i in "${!names[@]}"; do
  printf '  %-48s %-8s %s\n' "${names[$i]}" "${times[$i]}" "${results[$i]}"
  [ "${results[$i]}" = ok ] || status=1
done
echo "-- tests:      $(tail -n 1 "$LOGS/tests.log")"
echo "-- step_speed (last lines):"
tail -n 12 "$LOGS/step_speed.log" | sed 's/^/     /'
if [ -f "$LOGS/sweep/sweep.md" ]; then
  echo "-- sweep:      $LOGS/sweep/sweep.md (+ sweep.json, sweep.png); its ratios to SAELens topk:"
  awk '/^## × SAELens topk/{on=1; next} /^## /{on=0} on && /^\|/' "$LOGS/sweep/sweep.md" | cut -c1-200 | sed 's/^/     /'
fi
if [ -f "$LOGS/breakdown/breakdown.md" ]; then
  echo "-- where the time goes at d_sae 65536: $LOGS/breakdown/breakdown.md"
  grep '^|' "$LOGS/breakdown/breakdown.md" | cut -c1-200 | sed 's/^/     /'
fi
if [ -f "$LOGS/trainer-speed/trainer_speed.md" ]; then
  echo "-- SAELens's training loop per architecture: $LOGS/trainer-speed/trainer_speed.md"
  grep '^|' "$LOGS/trainer-speed/trainer_speed.md" | cut -c1-200 | sed 's/^/     /'
fi
if [ -f reports/gpu-check-quick/report.md ]; then
  echo "-- main job:   $(grep -m1 '^Run on' reports/gpu-check-quick/report.md | cut -c1-150)"
  grep -m1 -A2 'gradient_topk (g-SAE)' reports/gpu-check-quick/report.md | cut -c1-200 | sed 's/^/     /'
  grep -m1 'ms per training token' reports/gpu-check-quick/report.md | cut -c1-200 | sed 's/^/     /'
fi
echo "logs: $LOGS"
exit $status
