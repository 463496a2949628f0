"""What the autoload hook costs a Python process that never imports SAELens.

The installed ``sae_allocators_autoload.pth`` makes every interpreter start import
``sae_allocators_autoload``. This script runs ``python -X importtime -c pass`` repeatedly with the
environment's interpreter and reads the hook module's own import time (self and cumulative, in
microseconds) from the trace, then prints median and max. The budget is 2 ms.

It also times whole ``python -c pass`` runs with the hook active and with it switched off
(``SAE_ALLOCATORS_NO_AUTOLOAD=1``), interleaved, as a sanity check (noisy; the import-time figure is
the one to read).

    python benchmarks/autoload_cost.py [--runs 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

BUDGET_US = 2000.0


def importtime_us(python: str, env: dict[str, str]) -> tuple[int, int] | None:
    proc = subprocess.run([python, "-X", "importtime", "-c", "pass"], capture_output=True, text=True, env=env)
    for line in proc.stderr.splitlines():
        if line.rstrip().endswith("sae_allocators_autoload"):
            # "import time:       123 |        456 | sae_allocators_autoload"
            parts = line.split("|")
            return int(parts[0].split(":")[1]), int(parts[1])
    return None


def wall_ms(python: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([python, "-c", "pass"], env=env, check=True)
    return (time.perf_counter() - t0) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()

    env = {k: v for k, v in os.environ.items() if not k.startswith("SAE_ALLOCATORS_")}
    off = dict(env, SAE_ALLOCATORS_NO_AUTOLOAD="1")
    first = importtime_us(args.python, env)
    if first is None:
        print("sae_allocators_autoload is not imported at start-up: is sae-allocators installed in", args.python, "?")
        return 1
    samples = [first] + [s for s in (importtime_us(args.python, env) for _ in range(args.runs - 1)) if s]
    self_us = [s for s, _ in samples]
    cum_us = [c for _, c in samples]
    on_ms, off_ms = [], []
    for _ in range(args.runs):
        on_ms.append(wall_ms(args.python, env))
        off_ms.append(wall_ms(args.python, off))
    med = statistics.median(cum_us)
    print(f"python: {args.python}  runs: {len(samples)}")
    print(
        f"autoload hook import (cumulative): median {med:.0f} us, max {max(cum_us)} us  (self: median {statistics.median(self_us):.0f} us)"
    )
    print(f"budget {BUDGET_US:.0f} us: {'OK' if med < BUDGET_US else 'OVER BUDGET'}")
    print(
        f"whole `python -c pass` (noisy): hook active median {statistics.median(on_ms):.1f} ms, "
        f"switched off median {statistics.median(off_ms):.1f} ms"
    )
    return 0 if med < BUDGET_US else 2


if __name__ == "__main__":
    raise SystemExit(main())
