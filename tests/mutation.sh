#!/usr/bin/env bash
# Mutation testing (mutmut) of the core modules; not part of CI (slow). Prints the mutation score per module.
#
#   bash tests/mutation.sh                # allocation/ (the default target)
#   bash tests/mutation.sh losses io      # other targets: allocation losses autoload io thresholds, or all
#   bash tests/mutation.sh --report-only allocation   # the scores of the last run
#
# Uses the test environment of tests/run.sh (.venvs/test; build it first) and installs mutmut into
# it when missing. Each target runs in a scratch copy under .cache/mutation/<target>/ with one
# process and one thread. See docs/testing.md for the scores and the equivalent mutants.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-$PWD/.venvs/test}
[ -x "$VENV/bin/python" ] || { echo "no $VENV: run 'bash tests/run.sh' once first" >&2; exit 2; }
"$VENV/bin/python" -c "import mutmut" 2>/dev/null || "$VENV/bin/python" -m pip install -q "mutmut>=3.8,<4"
"$VENV/bin/python" -c "import hypothesis" 2>/dev/null || "$VENV/bin/python" -m pip install -q "hypothesis>=6.100"
exec "$VENV/bin/python" tests/mutation.py --python "$VENV/bin/python" "$@"
