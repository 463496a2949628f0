"""Global selection over the union of the ranks' batches, exchanging candidates, never the [N, F] matrix.

The global batch is the concatenation of the ranks' batches in rank order (rank r's tokens come after
rank r-1's), and "lowest flat index" -- the tie rule of every batch allocator of this project -- means
lowest *global* index: ``(rank, local token, feature)`` in lexicographic order.

**Global K-th largest with an exact budget** (:func:`global_budget_select`, Mutual Choice / BatchTopK):

1. each rank takes its share ``K_r = ceil(K * n_r / n)`` of the budget and its local ``K_r``-th largest
   value ``t_r`` (the exact local estimate-and-correct selection of :mod:`~sae_allocators.allocation.batch`);
2. ``L = min_r t_r`` (one all-reduce of a scalar). Since every rank holds at least ``K_r`` values
   ``>= t_r >= L`` and ``sum_r K_r >= K``, at least ``K`` values of the global batch are ``>= L``: the global
   K-th largest is ``>= L``, so every entry that can be kept is ``>= L``;
3. each rank sends only its values ``>= L`` (about ``K_r`` of them: ``~K/R`` each, ``~K`` in all, plus the
   spread of the ``t_r``) -- one variable-length all-gather;
4. every rank computes the same K-th largest ``tau`` of the union, the number of values strictly above it,
   and, from the per-rank counts of values equal to ``tau``, how many ties *it* keeps: ties go to the
   lowest global index first, so rank r keeps ``clamp(need - ties on ranks < r, 0, its ties)``, its lowest
   local indices first.

**Per-feature thresholds** (:func:`global_column_select`, Feature Choice): the same argument per column
with ``K = m_j``: ``L_j = min_r`` (rank r's ``ceil(m_j n_r / n)``-th largest value of column j, or 0+ when
it has fewer positive values than that, so it sends all of them); one all-reduce of ``[F]`` values, then one
all-gather of the candidates ``(value, feature)``; ``tau_j`` is the ``m_j``-th largest candidate of column
j, ties broken by global token index as above.

Both return what a single process would return on the concatenated batch (tested against it in
tests/distributed/test_distributed.py); with ``group=None`` they *are* the single-process rule.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sae_allocators.allocation.batch import kth_largest
from sae_allocators.allocation.feature_choice import column_thresholds, with_one_per_token
from sae_allocators.distributed import comm


def _tiny(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    z = torch.zeros((), dtype=dtype, device=device)
    return torch.nextafter(z, torch.ones_like(z))


def _first_n_of_ties(tie_idx: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` smallest of the (sorted, ascending) indices ``tie_idx``."""
    return tie_idx[: max(0, n)]


def global_budget_select(
    values: torch.Tensor,
    budget: int,
    group: Any = None,
    *,
    positive_only: bool = True,
    sizes: list[int] | None = None,
    row_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Keep the ``budget`` largest entries of the union of the ranks' 1-D ``values``; returns ``(tau, kept, n_kept)``.

    ``kept`` are this rank's flat indices (ascending) of the kept entries; ``tau`` (0-d, same dtype, the
    same on every rank) is the smallest kept value (``+inf`` when nothing is kept); ``n_kept`` the number
    kept over all ranks. Exactly
    ``min(budget, #candidates)`` entries are kept over all ranks, where candidates are the positive
    entries when ``positive_only`` (Mutual Choice: ReLU'd affinities) or all entries otherwise (pass
    ``|a|`` with ``positive_only`` for the signed rule, whose candidates are the non-zero entries).
    Ties at ``tau`` go to the lowest global index. ``budget`` is the *global* budget (``floor(k * n)``
    with ``n`` the global token count). ``sizes``: every rank's ``values.numel()``, if known;
    ``row_len``: F when ``values`` is a flattened ``[N, F]`` matrix (keeps the local estimate's strided
    sample from aliasing with the features; the result does not depend on it).
    """
    v = values.detach().reshape(-1)
    dev, dtype = v.device, v.dtype
    inf = torch.full((), math.inf, dtype=dtype, device=dev)
    if sizes is None:
        sizes = comm.all_gather_sizes(v.numel(), group, dev)
    me, total = comm.rank(group), sum(sizes)
    kk = min(int(budget), total)
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    if kk <= 0:
        return inf, empty, 0
    # 1-2: a bound L <= the global kk-th largest
    share = min(v.numel(), math.ceil(kk * v.numel() / total)) if v.numel() else 0
    t_r = kth_largest(v, share, row_len=row_len) if share > 0 else inf
    low = comm.all_reduce(t_r.reshape(1), "min", group)[0]
    if positive_only:
        low = torch.maximum(low, _tiny(dtype, dev))
    # 3: the candidates, gathered
    mask = v >= low
    cand = v[mask]
    parts = comm.all_gather_variable(cand, group)
    union = torch.cat(parts) if len(parts) > 1 else cand
    c = union.numel()
    if c == 0:
        return inf, empty, 0
    have = min(kk, c)
    tau = union.kthvalue(c - have + 1).values
    # 4: exact budget, ties to the lowest global index
    need = have - int((union > tau).sum())
    ties_before = sum(int((p == tau).sum()) for p in parts[:me])
    idx = mask.nonzero().squeeze(1)
    above = idx[cand > tau]
    ties = idx[cand == tau]
    allow = min(max(need - ties_before, 0), ties.numel())
    kept = torch.cat([above, _first_n_of_ties(ties, allow)]).sort().values
    return tau, kept, have


def _local_column_bounds(pre: torch.Tensor, quota: torch.Tensor) -> torch.Tensor:
    """Per column: the ``quota[j]``-th largest value when the column has that many positive values,
    else the smallest positive float (then every positive value is a candidate); ``+inf`` for quota 0."""
    n, f = pre.shape
    tiny = _tiny(pre.dtype, pre.device)
    if n == 0:
        return torch.full((f,), math.inf, dtype=pre.dtype, device=pre.device)
    t = column_thresholds(pre, quota)  # smallest positive among the quota largest (inf if none)
    n_pos = (pre > 0).sum(0)
    t = torch.where(n_pos >= quota, t, tiny)
    return torch.where(quota > 0, t, torch.full_like(t, math.inf))


def _rank_in_column(cols: torch.Tensor, f: int) -> torch.Tensor:
    """For entries listed in token order, each entry's position among the entries of its column."""
    if cols.numel() == 0:
        return cols
    order = torch.argsort(cols, stable=True)
    sorted_cols = cols[order]
    counts = torch.bincount(sorted_cols, minlength=f)
    start = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(cols.numel(), device=cols.device) - start[sorted_cols]
    pos = torch.empty_like(pos_sorted)
    pos[order] = pos_sorted
    return pos


def global_column_select(
    pre: torch.Tensor, caps: torch.Tensor, group: Any = None, *, sizes: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature Choice over the global batch; returns ``(tau [F], kept)``.

    ``pre`` is this rank's ``[n_r, F]`` affinities, ``caps`` the *global* capacities ``m`` [F] (identical on
    every rank). Feature j keeps, over all ranks, exactly ``min(m_j, #positive in its global column)``
    entries: its largest positive values, ties at ``tau_j`` to the lowest global token index. ``tau_j``
    (the same on every rank) is its smallest kept value, ``+inf`` if it kept nothing. ``kept`` are this
    rank's flat indices into ``pre.reshape(-1)`` (row-major), ascending. ``sizes``: every rank's ``n_r``.
    """
    p = pre.detach()
    n, f = p.shape
    dev, dtype = p.device, p.dtype
    if sizes is None:
        sizes = comm.all_gather_sizes(n, group, dev)
    me, total = comm.rank(group), sum(sizes)
    caps = caps.to(dev).long().clamp(0, total)
    tiny = _tiny(dtype, dev)
    # a per-column bound L_j <= the global m_j-th largest (or 0+): see the module docstring
    quota = torch.minimum(torch.full_like(caps, n), (caps * n + total - 1) // max(total, 1)) if total else caps * 0
    low = comm.all_reduce(_local_column_bounds(p, quota), "min", group)
    low = torch.maximum(low, tiny)
    idx = (p >= low).reshape(-1).nonzero().squeeze(1)
    vals = p.reshape(-1)[idx]
    cols = idx % f
    packed = torch.stack([vals.double(), cols.double()], dim=1)  # exact for float32/16/bf16/64 values and cols < 2^53
    parts = comm.all_gather_variable(packed, group)
    union = torch.cat(parts) if len(parts) > 1 else packed
    u_val, u_col = union[:, 0], union[:, 1].long()
    counts = torch.bincount(u_col, minlength=f)
    have = torch.minimum(counts, caps)
    inf = torch.full((f,), math.inf, dtype=torch.double, device=dev)
    if u_val.numel():
        order = torch.argsort(u_val, descending=True, stable=True)
        order = order[torch.argsort(u_col[order], stable=True)]  # by column, descending within
        start = torch.cumsum(counts, 0) - counts
        pos = (start + have - 1).clamp_min(0)
        tau64 = torch.where(have > 0, u_val[order][pos.clamp_max(u_val.numel() - 1)], inf)
    else:
        tau64 = inf
    above = torch.bincount(u_col[u_val > tau64[u_col]], minlength=f)
    need = have - above
    ties_before = torch.zeros(f, dtype=torch.long, device=dev)
    for part in parts[:me]:
        pc = part[:, 1].long()
        ties_before += torch.bincount(pc[part[:, 0] == tau64[pc]], minlength=f)
    allow = (need - ties_before).clamp_min(0)
    v64 = vals.double()
    is_above = v64 > tau64[cols]
    is_tie = v64 == tau64[cols]
    tie_idx, tie_cols = idx[is_tie], cols[is_tie]
    keep_tie = _rank_in_column(tie_cols, f) < allow[tie_cols]
    kept = torch.cat([idx[is_above], tie_idx[keep_tie]]).sort().values
    return tau64.to(dtype), kept


def global_mean(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Mean of ``x`` over all its elements on all ranks (sum and count all-reduced together)."""
    if not comm.active(group):
        return x.mean()
    both = torch.stack([x.detach().double().sum(), torch.tensor(float(x.numel()), dtype=torch.double, device=x.device)])
    both = comm.all_reduce(both, "sum", group)
    return (both[0] / both[1]).to(x.dtype)


def token_sizes(n_tokens: int, group: Any, device: Any) -> list[int]:
    """Every rank's token count (one tiny all-gather; ``[n_tokens]`` without a group)."""
    return comm.all_gather_sizes(n_tokens, group, device)


def mutual_choice_indices(
    affinity: torch.Tensor, k: float, group: Any = None, *, sizes: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mutual Choice over the global batch: ``(flat, tau)`` as
    :func:`sae_allocators.allocation.batch.mutual_choice_indices` returns them on the concatenated batch
    (this rank's ascending row-major indices; ``tau`` the same everywhere: the smallest kept value, 0 when
    fewer than ``floor(k N)`` entries are positive, ``+inf`` when the budget is 0). ``sizes``: every
    rank's token count, if known."""
    from sae_allocators.allocation.batch import budget

    f = affinity.shape[-1]
    n = affinity.numel() // max(f, 1)
    if sizes is None:
        sizes = token_sizes(n, group, affinity.device)
    kk = budget(k, sum(sizes))
    tau, kept, n_kept = global_budget_select(affinity.reshape(-1), kk, group, sizes=[s * f for s in sizes], row_len=f)
    if 0 < kk and n_kept < kk:  # fewer positive entries than the budget: every one kept, tau = 0 (as in one process)
        tau = torch.zeros_like(tau)
    return kept, tau


def feature_choice_indices(
    affinity: torch.Tensor,
    caps: torch.Tensor,
    group: Any = None,
    *,
    one_per_token: bool = False,
    sizes: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature Choice over the global batch (``caps`` global): ``(flat, tau)`` as
    :func:`sae_allocators.allocation.feature_choice.feature_choice_indices` returns them on the
    concatenated batch. ``one_per_token`` is per token, so it needs no communication. ``sizes``: every
    rank's token count, if known."""
    pre = affinity.detach().reshape(-1, affinity.shape[-1])
    tau, kept = global_column_select(pre, caps, group, sizes=sizes)
    if one_per_token:
        kept = with_one_per_token(pre, kept)
    return kept, tau


def strided_token_sample(n_local: int, stride_tokens: int, group: Any, device: Any) -> tuple[torch.Tensor, int]:
    """Local row indices of the global tokens ``0, s, 2s, ...`` (``s = max(1, N_global // stride_tokens)``)
    and the global sample size: the same strided subsample a single process takes of the whole batch."""
    sizes = token_sizes(n_local, group, device)
    total = sum(sizes)
    s = max(1, total // stride_tokens)
    offset = sum(sizes[: comm.rank(group)])
    first = (-offset) % s
    rows = torch.arange(first, n_local, s, device=device)
    return rows, len(range(0, total, s))
