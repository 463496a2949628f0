"""Before torchrun: ``sae-allocators train --nproc-per-node N ...`` re-runs the command under torchrun.

The launcher's side of :mod:`sae_allocators.distributed.launch` (which runs each rank): parsing
``--nproc-per-node`` and starting ``torchrun``. It imports nothing of the training workflow, so the
workflow's ``train`` command can use it without an import cycle.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Sequence


class LaunchError(RuntimeError):
    """A distributed launch that cannot work as configured (the message says how to fix it)."""


def split_nproc(argv: Sequence[str]) -> tuple[int | None, list[str]]:
    """``(N, rest)`` from ``--nproc-per-node N`` / ``--nproc-per-node=N`` (``None`` if absent)."""
    rest: list[str] = []
    n = None
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--nproc-per-node", "--nproc_per_node"):
            if i + 1 >= len(args):
                raise LaunchError("--nproc-per-node needs a number of processes (e.g. --nproc-per-node 2)")
            n, i = args[i + 1], i + 2
            continue
        if a.startswith(("--nproc-per-node=", "--nproc_per_node=")):
            n, i = a.split("=", 1)[1], i + 1
            continue
        rest.append(a)
        i += 1
    if n is None:
        return None, rest
    if not str(n).isdigit() or int(n) < 1:
        raise LaunchError(f"--nproc-per-node {n!r} is invalid: use a whole number of processes >= 1 (e.g. 2)")
    return int(n), rest


def torchrun_command(nproc: int, argv: Sequence[str], python: str | None = None) -> list[str]:
    """The ``torchrun`` command line that ``--nproc-per-node`` runs (one node, a free port)."""
    return [python or sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "sae_allocators.distributed.launch", *argv]


def relaunch(nproc: int, argv: Sequence[str], timeout: float | None = None) -> int:
    """Run :func:`torchrun_command`; returns torchrun's exit status (non-zero if any rank failed)."""
    return subprocess.run(torchrun_command(nproc, argv), timeout=timeout).returncode
