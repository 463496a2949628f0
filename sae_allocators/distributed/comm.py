"""Collectives that do nothing without a process group (in the spirit of sparsify's ``maybe_all_reduce``).

Every function takes ``group``: ``None`` means "one process" -- the function returns its input (or the
single-rank answer) without touching :mod:`torch.distributed`, so single-process code paths cost nothing
and need no initialised process group. A ``ProcessGroup`` (``torch.distributed.group.WORLD`` or a
sub-group from ``new_group``) makes them collective: every rank of that group must call them in the same
order with tensors of the same dtype (lengths may differ where stated).

Tensors stay on their device (NCCL needs CUDA tensors, gloo CPU ones; the caller's device decides).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
import torch.distributed as dist

#: ``torch.distributed.ReduceOp`` by name
_OPS = {"sum": "SUM", "min": "MIN", "max": "MAX", "product": "PRODUCT"}

#: per calling function (the first frame outside this module): collective calls, bytes this rank put
#: into them and seconds spent inside them (waiting for slower ranks included); benchmarks/distributed.py
STATS: dict[str, dict[str, float]] = {}


def active(group: Any) -> bool:
    """True when ``group`` is a process group of more than one rank (a collective is needed)."""
    return group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world(group: Any = None) -> int:
    """Number of ranks in ``group`` (1 for ``None``)."""
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def rank(group: Any = None) -> int:
    """This process's rank within ``group`` (0 for ``None``)."""
    return dist.get_rank(group) if group is not None and dist.is_initialized() else 0


def _caller() -> str:
    f = sys._getframe(2)
    while f is not None and f.f_code.co_filename == __file__:
        f = f.f_back
    return f.f_code.co_name if f is not None else "?"


class _Timed:
    """Accounts one collective in :data:`STATS` (cheap: two clock reads and a dict update)."""

    def __init__(self, t: torch.Tensor):
        self.key = _caller()
        self.nbytes = t.numel() * t.element_size()

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        s = STATS.setdefault(self.key, {"calls": 0, "bytes": 0, "seconds": 0.0})
        s["calls"] += 1
        s["bytes"] += self.nbytes
        s["seconds"] += time.perf_counter() - self.t0


def all_reduce(t: torch.Tensor, op: str = "sum", group: Any = None) -> torch.Tensor:
    """``t`` reduced over the ranks of ``group`` (``op`` in sum/min/max/product/mean); a new tensor.

    Without a group the result is ``t`` itself (no copy).
    """
    if not active(group):
        return t
    if op != "mean" and op not in _OPS:
        raise ValueError(f"all_reduce: op={op!r} is not one of {sorted(_OPS) + ['mean']}")
    out = t.detach().clone().contiguous()
    with _Timed(out):
        dist.all_reduce(out, op=getattr(dist.ReduceOp, _OPS.get(op, "SUM")), group=group)
    return out / world(group) if op == "mean" else out


def all_gather_sizes(n: int, group: Any = None, device: torch.device | str | None = None) -> list[int]:
    """Every rank's ``n`` (an int), in rank order."""
    if not active(group):
        return [int(n)]
    mine = torch.tensor([int(n)], dtype=torch.long, device=device)
    out = [torch.empty_like(mine) for _ in range(world(group))]
    with _Timed(mine):
        dist.all_gather(out, mine, group=group)
    return [int(o) for o in out]


def all_gather_variable(t: torch.Tensor, group: Any = None, sizes: list[int] | None = None) -> list[torch.Tensor]:
    """Every rank's ``t`` in rank order; the first dimension may differ between ranks.

    The other dimensions and the dtype must agree. ``sizes`` (every rank's ``t.shape[0]``) saves one
    collective when the caller already knows them. Tensors are padded to the longest and trimmed, so
    the bytes moved are ``world * max(sizes) * row size``.
    """
    if not active(group):
        return [t]
    if sizes is None:
        sizes = all_gather_sizes(t.shape[0], group, t.device)
    longest = max(sizes)
    if longest == 0:
        return [t.new_empty((0, *t.shape[1:])) for _ in sizes]
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t.detach()
    out = [torch.empty_like(padded) for _ in sizes]
    with _Timed(padded):
        dist.all_gather(out, padded.contiguous(), group=group)
    return [o[:s] for o, s in zip(out, sizes)]


def broadcast_(t: torch.Tensor, src: int = 0, group: Any = None) -> torch.Tensor:
    """In place: ``t`` takes rank ``src``'s value (``src`` is a rank within ``group``)."""
    if active(group):
        with _Timed(t):
            dist.broadcast(t, src=dist.get_global_rank(group, src), group=group)
    return t
