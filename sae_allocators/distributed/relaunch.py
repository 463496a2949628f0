"""Before torchrun: ``sae-allocators train --nproc-per-node N ...`` re-runs the command under torchrun.

The launcher's side of :mod:`sae_allocators.distributed.launch` (which runs each rank): parsing
``--nproc-per-node`` and starting ``torchrun``. It imports nothing of the training workflow, so the
workflow's ``train`` command can use it without an import cycle.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

from sae_allocators import devices

#: written by rank 0 into each checkpoint of a distributed run: {"world_size": N}
DISTRIBUTED_STATE = "distributed.json"


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


def choose_backend(device: str, requested: str | None, local_world: int, gpus: int) -> str:
    """``nccl`` for CUDA devices (one GPU per local rank), ``gloo`` otherwise; errors say the fix."""
    want = (requested or "auto").lower()
    if want not in ("auto", "nccl", "gloo"):
        raise LaunchError(f"SAE_ALLOCATORS_DIST_BACKEND={requested!r} is invalid: use nccl, gloo or auto")
    cuda = devices.is_cuda(device)
    if want == "auto":
        want = "nccl" if cuda else "gloo"
    if want == "nccl":
        if not cuda:
            raise LaunchError(
                f"the NCCL backend needs CUDA, but the config's device is {device!r}: use --device cuda, "
                "or the gloo backend (SAE_ALLOCATORS_DIST_BACKEND=gloo)"
            )
        if gpus < local_world:
            raise LaunchError(
                f"NCCL needs one GPU per rank: {local_world} ranks on this node but {gpus} GPU(s) visible. "
                f"Use --nproc-per-node {max(gpus, 1)} (or fewer), make more GPUs visible (CUDA_VISIBLE_DEVICES), "
                "or train on CPU with --device cpu (gloo)."
            )
    return want


def check_resume(cfg: Any, world: int) -> None:
    """Resuming needs the checkpoint of a run with the same number of ranks."""
    path = getattr(cfg, "resume_from_checkpoint", None)
    if path is None:
        return
    f = Path(path) / DISTRIBUTED_STATE
    if not f.exists():
        raise LaunchError(
            f"cannot resume {path} on {world} ranks: it was not written by a distributed run "
            f"(no {DISTRIBUTED_STATE}); resume it in one process"
        )
    saved = json.loads(f.read_text())["world_size"]
    if saved != world:
        raise LaunchError(
            f"cannot resume {path} on {world} ranks: it was written by {saved} ranks (each holds its own data "
            f"position). Resume with --nproc-per-node {saved}"
        )


def env_int(name: str, default: int | None = None) -> int:
    v = os.environ.get(name)
    if v is None:
        if default is None:
            raise LaunchError(
                f"{name} is not set: sae_allocators.distributed.launch runs under torchrun "
                "(use `sae-allocators train --nproc-per-node N ...` or `torchrun ... -m sae_allocators.distributed.launch ...`)"
            )
        return default
    try:
        return int(v)
    except ValueError:
        raise LaunchError(
            f"{name}={v!r} is invalid: use a whole number (e.g. {name}={default if default is not None else 1})"
        ) from None


def torchrun_command(nproc: int, argv: Sequence[str], python: str | None = None) -> list[str]:
    """The ``torchrun`` command line that ``--nproc-per-node`` runs (one node, a free port)."""
    return [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "sae_allocators.distributed.launch",
        *argv,
    ]


#: torchrun's own report of a failed rank (its log line, then a ChildFailedError traceback and table)
_TORCHRUN_FAILED = re.compile(
    r"torch[./]distributed[./]elastic[./]multiprocessing[./]api.*failed \(exitcode: (?P<code>-?\d+)\) local_rank: (?P<rank>\d+)"
)
_TORCHRUN_LOG = re.compile(r"^[WIE]\d{4} .*torch/distributed/elastic/")


def filter_torchrun_stderr(lines: Iterable[str], out: TextIO, nproc: int) -> str | None:
    """Copy the ranks' stderr ``lines`` to ``out``, leaving out torchrun's own report of a failure
    (its elastic log lines and the ChildFailedError traceback and table that repeat the rank's error);
    return one summary line for that failure (None when no rank failed)."""
    summary = None
    for line in lines:
        if summary is not None:
            continue  # torchrun's traceback and table, after its "failed" line
        m = _TORCHRUN_FAILED.search(line)
        if m:
            code, rank = int(m["code"]), int(m["rank"])
            summary = (
                f"sae-allocators train: rank {rank} of {nproc} failed (exit code {code}); its error is above, "
                f"and torchrun stopped the other ranks."
            )
            continue
        if _TORCHRUN_LOG.match(line):
            continue
        out.write(line)
        out.flush()
    return summary


def relaunch(nproc: int, argv: Sequence[str], timeout: float | None = None) -> int:
    """Run :func:`torchrun_command`; returns torchrun's exit status (non-zero if any rank failed).

    A failed rank is reported once: its own error, then one summary line instead of torchrun's
    traceback and table (:func:`filter_torchrun_stderr`)."""
    proc = subprocess.Popen(torchrun_command(nproc, argv), stderr=subprocess.PIPE, text=True, bufsize=1)
    found: list[str | None] = [None]

    def pump() -> None:
        assert proc.stderr is not None
        found[0] = filter_torchrun_stderr(proc.stderr, sys.stderr, nproc)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except BaseException:  # the timeout (as subprocess.run: the process is killed), ^C
        proc.kill()
        proc.wait()
        raise
    finally:
        reader.join(timeout=10)
    if code != 0 and found[0]:
        print(found[0], file=sys.stderr)
    return code
