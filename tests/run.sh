#!/usr/bin/env bash
# The project's test command (README, CI): builds a virtual environment, installs the project and
# the example plugin's build tools, and runs the test suite at the supported SAELens
# floor (6.38.0; without the modules marked saelens_independent) and again, whole, at the newest
# SAELens 6.x (the environment is left at the newest).
#
#   bash tests/run.sh            # both SAELens versions
#   SAELENS_VERSIONS="newest" bash tests/run.sh
#
# Torch: on a machine with no torch in the environment this installs the CPU build torch==2.13.0
# first (a bare `torch` requirement would pull several GB of CUDA wheels). Bring your own by
# setting TORCH_SPEC (e.g. TORCH_SPEC="torch==2.5.1") or by pointing VENV at an environment that
# already has torch.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
VENV=${VENV:-$ROOT/.venvs/test}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
SAELENS_VERSIONS=${SAELENS_VERSIONS:-"6.38.0 newest"}  # the newest last: the environment is left at it
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
# One thread per test worker: two xdist workers, each with torch's default of one OpenMP thread per
# core, oversubscribe a 2-core machine and OpenMP's spinning threads then slow a busy test by up
# to 10x (the suite took 311 s with the default, 172 s with one thread each). The fresh
# interpreters the tests start inherit it.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "== installing $TORCH_SPEC (CPU build where the local index provides it)"
  pip install -q "$TORCH_SPEC"
fi

status=0
# Lint first (seconds): the formatter's layout and the linter's rules (pyproject.toml [tool.ruff]).
pip install -q "ruff==0.17.6"
"$VENV/bin/ruff" format --check --quiet . || { echo "== FAILED: ruff format --check (run: ruff format .)"; exit 1; }
"$VENV/bin/ruff" check --quiet . || { echo "== FAILED: ruff check"; exit 1; }
echo "== lint: ruff format --check and ruff check passed"
for version in $SAELENS_VERSIONS; do
  if [ "$version" = newest ]; then spec="sae-lens>=6.38,<7"; else spec="sae-lens==$version"; fi
  echo "== installing sae-allocators (non-editable) with $spec"
  # --upgrade-strategy only-if-needed keeps the torch installed above.
  # `report` (matplotlib) so the report's plots are tested too.
  pip install -q --upgrade-strategy only-if-needed ".[test,report]" "$spec"
  if [ "$version" = newest ]; then pip install -q --upgrade "sae-lens>=6.38,<7"; fi
  "$VENV/bin/python" -c "import sae_lens, torch; print('== testing with sae-lens', sae_lens.__version__, '/ torch', torch.__version__)"
  # Run from tests/ so the checkout's package folder cannot shadow the installed distribution.
  # Two workers (pytest-xdist, from the `test` extra): most of the time is fresh interpreters.
  # At the floor version, the modules marked saelens_independent (pure tensor rules, collectives,
  # the benchmark harness) are skipped: they ran, or run, at the newest version (CI time budget).
  marker=()
  if [ "$version" != newest ]; then marker=(-m "not saelens_independent"); fi
  (cd tests && "$VENV/bin/python" -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" "${marker[@]}" "$@") || status=$?
  if [ "$status" -ne 0 ]; then echo "== FAILED with $spec (exit $status)"; break; fi
done
exit "$status"
