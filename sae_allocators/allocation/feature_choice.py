"""Feature Choice allocation: each feature j keeps its top ``m_j`` tokens of the batch.

Two pure pieces:

- :func:`capacities` -- integer capacities ``m_j`` with ``sum_j m_j = floor(k * N)``: uniform, or
  Zipf-shaped over a usage ranking (``m ~ (rank + 1)^-exponent``), water-filled so that no
  capacity exceeds the batch (``m_j <= N``), rounded by largest remainder, plus an optional floor
  ``min_capacity`` per feature (the one constraint a batch can be too small for: then a
  ``ValueError`` says so).
- :func:`feature_choice_indices` / :func:`feature_choice_select` -- exact per-feature top-``m_j``:
  feature j keeps exactly ``min(m_j, #positive entries of column j)`` tokens, its largest
  affinities, ties at its threshold ``tau_j`` broken by lowest token index (a stable sort). The
  affinity matrix is transposed once, features are grouped by capacity into power-of-two
  buckets, and each bucket gets one ``torch.topk`` with the bucket's largest ``m`` for the
  thresholds. Given a per-feature lower-bound estimate (last step's thresholds), only the
  candidates above it are sorted, and the kept entries come straight from that sort. The
  selection is handed over as flat indices (the sparse training step's input); the dense codes
  are scattered from them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from sae_allocators.allocation.batch import budget
from sae_allocators.sparse import keep_flat


def _waterfill(shape: torch.Tensor, total: float, cap: float) -> torch.Tensor:
    """Real capacities ``min(cap, c * shape)`` summing to ``total`` (needs ``total <= cap * F``)."""
    n = shape.numel()
    if total <= 0 or n == 0:
        return torch.zeros_like(shape)
    if total >= cap * n:
        return torch.full_like(shape, cap)
    s, order = torch.sort(shape, descending=True)
    suffix = torch.flip(torch.cumsum(torch.flip(s, [0]), 0), [0])  # sum of s[t:]
    t = torch.arange(n, device=shape.device, dtype=shape.dtype)
    c = (total - t * cap) / suffix.clamp_min(1e-300)
    ok = (c * s <= cap * (1 + 1e-12)) & (c > 0)
    first = int(torch.argmax(ok.to(torch.int8)))  # smallest number of clipped features that works
    out_sorted = torch.minimum(c[first] * s, torch.tensor(cap, dtype=shape.dtype, device=shape.device))
    out_sorted[:first] = cap
    out = torch.empty_like(shape)
    out[order] = out_sorted
    return out


def _round_largest_remainder(real: torch.Tensor, total: int, cap: int) -> torch.Tensor:
    base = torch.floor(real + 1e-9).clamp(0, cap)
    deficit = total - int(base.sum())
    if deficit > 0:
        frac = torch.where(base < cap, real - base, torch.full_like(real, -math.inf))
        order = torch.argsort(-frac, stable=True)[:deficit]
        base[order] += 1
    elif deficit < 0:
        frac = torch.where(base > 0, real - base, torch.full_like(real, math.inf))
        order = torch.argsort(frac, stable=True)[:-deficit]
        base[order] -= 1
    return base.long()


def capacities(
    n_tokens: int,
    k: float,
    d_sae: int,
    *,
    rank: torch.Tensor | None = None,
    exponent: float = 0.0,
    min_capacity: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Integer capacities ``m`` [d_sae] (long) with ``m.sum() == floor(k * n_tokens)``, ``m <= n_tokens``.

    ``rank[j]`` is feature j's usage rank (0 = most used); ``exponent = 0`` (or ``rank=None``)
    gives uniform capacities. Each feature first gets ``min_capacity``; the rest of the budget is
    shared in proportion to ``(rank + 1)^-exponent``, capped at the batch size.
    """
    total = budget(k, n_tokens)
    floor_total = d_sae * min_capacity
    if floor_total > total:
        need = math.ceil(floor_total / k) if k > 0 else math.inf
        raise ValueError(
            f"feature_choice: min_capacity={min_capacity} cannot be met: a batch of {n_tokens} tokens has a "
            f"budget of floor(k * N) = {total} entries, less than d_sae * min_capacity = {floor_total}. "
            f"Use batches of at least {need} tokens, or lower min_capacity (0 disables it)."
        )
    dev = device if device is not None else (rank.device if rank is not None else None)
    if rank is None or exponent == 0:
        shape = torch.ones(d_sae, dtype=torch.double, device=dev)
    else:
        shape = (rank.to(device=dev, dtype=torch.double) + 1).pow(-float(exponent))
    cap = n_tokens - min_capacity
    real = _waterfill(shape, float(total - floor_total), float(cap))
    return _round_largest_remainder(real, total - floor_total, cap) + min_capacity


def usage_rank(usage: torch.Tensor) -> torch.Tensor:
    """Rank of each feature by usage (0 = most used; ties by feature index)."""
    order = torch.argsort(-usage.double(), stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(usage.numel(), device=usage.device)
    return rank


#: features per ``torch.topk`` call of :func:`column_thresholds` (and per block of tie counts in
#: :func:`_kept_with_ties`): a bucket of 44k capacity-1 features at N = 2048 is then at most a 32 MiB
#: block at a time, not a 360 MiB copy (peak memory of the dense path)
_FEATURES_PER_TOPK = 4096


def _bucketed_top(
    rows: torch.Tensor, caps: torch.Tensor, which: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The largest values of each row ``j`` of ``rows`` [F, L] with ``which[j]``, enough to read its
    ``caps[j]``-th largest (``1 <= caps[j] <= L``): yields ``(members, top)``, ``top`` [len(members), kb]
    sorted descending. Rows are bucketed by ``ceil(log2(caps))`` (1, 2, 3-4, 5-8, ...) and each bucket
    takes one ``torch.topk`` with its largest capacity ``kb`` -- at most twice the smallest it serves; a
    full sort of every row costs several times more -- in blocks of :data:`_FEATURES_PER_TOPK` rows (a
    view where a block is a range of rows, else a copy of that block only). The one bucketing of
    :func:`column_thresholds` and :func:`block_lower_bounds`."""
    bucket = torch.ceil(torch.log2(caps.clamp_min(1).double())).long()
    for b in torch.unique(bucket[which]).tolist():
        in_bucket = (which & (bucket == b)).nonzero().squeeze(1)
        kb = int(caps[in_bucket].max())
        for members in in_bucket.split(_FEATURES_PER_TOPK):
            lo, hi = int(members[0]), int(members[-1]) + 1
            sub = rows[lo:hi] if hi - lo == members.numel() else rows.index_select(0, members)
            yield (
                members,
                (sub.amax(dim=1, keepdim=True) if kb == 1 else torch.topk(sub, kb, dim=1, sorted=True).values),
            )


def column_thresholds(affinity: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """``tau_j`` = the smallest *positive* value among the ``caps[j]`` largest of column j (exact).

    That is the ``caps[j]``-th largest value when it is positive; ``+inf`` when ``caps[j] == 0``
    or the column has no positive value. One ``torch.topk`` per capacity bucket (:func:`_bucketed_top`).
    """
    n, f = affinity.shape
    tau = torch.full((f,), math.inf, dtype=affinity.dtype, device=affinity.device)
    if n == 0 or f == 0:
        return tau
    caps = caps.to(affinity.device).clamp(0, n)
    pos = caps > 0
    if not bool(pos.any()):
        return tau
    cols = affinity.detach().t().contiguous()  # [F, N]: topk along a contiguous dimension
    for members, top in _bucketed_top(cols, caps, pos):
        m = caps[members]
        kept = (top > 0) & (torch.arange(top.shape[1], device=top.device)[None, :] < m[:, None])
        count = kept.sum(dim=1)
        smallest = top.gather(1, (count - 1).clamp_min(0)[:, None]).squeeze(1)
        tau[members] = torch.where(count > 0, smallest, torch.full_like(smallest, math.inf))
    return tau


def _group_desc_order(vals: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Order of (col ascending, value descending, position ascending), with one sort when possible.

    Both sorts are stable, so equal values keep their input order (ascending token). For
    positive float32 values the IEEE bit pattern is monotone in the value, so
    ``col * 2^31 + (2^31 - 1 - bits)`` is a single int64 key; otherwise two stable sorts."""
    if vals.dtype == torch.float32:
        bits = vals.view(torch.int32).to(torch.int64)
        return torch.argsort(col * (1 << 31) + ((1 << 31) - 1 - bits), stable=True)
    order = torch.argsort(vals, descending=True, stable=True)
    return order[torch.argsort(col[order], stable=True)]


def column_thresholds_estimated(
    affinity: torch.Tensor, caps: torch.Tensor, t_lo: torch.Tensor, max_candidates: int | None = None
) -> tuple[torch.Tensor, int, int]:
    """Exact :func:`column_thresholds` from a per-feature lower-bound estimate ``t_lo`` [F].

    One broadcast compare finds the candidates ``pre >= max(t_lo_j, 0+)``; a segmented selection
    (sort by value, then stable sort by feature) gives each feature's ``caps[j]``-th largest
    candidate. A feature with fewer than ``caps[j]`` candidates is exact too when its bound was
    already "every positive value"; otherwise (the estimate was too high) that feature alone goes
    through :func:`column_thresholds`. If more than ``max_candidates`` entries pass, the estimate
    is too loose to pay off and everything goes through :func:`column_thresholds`.
    Returns ``(tau, number of features that needed the fallback, number of candidates)``.
    """
    tau, n_fail, n_cand, _ = _estimated_selection(affinity, caps, t_lo, max_candidates)
    return tau, n_fail, n_cand


def _kept_with_ties(pre: torch.Tensor, caps: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Ascending flat indices of the kept entries given exact thresholds ``tau`` [F]: per column,
    every entry ``> tau_j``, then entries ``== tau_j`` by lowest token index up to ``caps[j]``."""
    above = pre > tau
    tied = pre == tau  # tau is +inf (never equal to a finite value) for features keeping nothing
    need = caps.to(pre.device) - torch.count_nonzero(above, dim=0)
    # only columns with more ties than places left drop some: the running count of their ties (int32,
    # in blocks of columns) decides which; every other column keeps all its ties (usually just tau_j)
    partial = (torch.count_nonzero(tied, dim=0) > need).nonzero().squeeze(1)
    for block in partial.split(_FEATURES_PER_TOPK):
        sub = tied.index_select(1, block)
        tied[:, block] = sub & (torch.cumsum(sub, 0, dtype=torch.int32) <= need[block])
    return (above | tied).view(-1).nonzero().squeeze(1)


def _estimated_selection(
    affinity: torch.Tensor, caps: torch.Tensor, t_lo: torch.Tensor, max_candidates: int | None
) -> tuple[torch.Tensor, int, int, torch.Tensor | None]:
    """:func:`column_thresholds_estimated` plus the ascending flat indices (into
    ``affinity.reshape(-1)``, row-major [N, F]) of the kept entries, or ``None`` when the
    estimate was too loose and the dense path was used."""
    n, f = affinity.shape
    pre = affinity.detach()
    caps = caps.to(pre.device).clamp(0, n)
    tiny = torch.nextafter(
        torch.zeros((), dtype=pre.dtype, device=pre.device), torch.ones((), dtype=pre.dtype, device=pre.device)
    )
    lo = torch.where(
        caps > 0, torch.maximum(t_lo.to(pre.dtype), tiny), torch.full_like(t_lo, math.inf, dtype=pre.dtype)
    )
    idx = (pre >= lo).view(-1).nonzero().squeeze(1)  # ascending: token-major
    if max_candidates is not None and idx.numel() > max_candidates:
        n_cand = idx.numel()
        del idx  # up to 8 bytes per entry of the batch: not held while the dense path runs
        return column_thresholds(pre, caps), f, n_cand, None
    vals = pre.reshape(-1)[idx]
    col = idx % f
    counts = torch.bincount(col, minlength=f)
    order = _group_desc_order(vals, col)  # grouped by feature, descending, ties by token (stable)
    sorted_vals = vals[order]
    start = torch.cumsum(counts, 0) - counts
    have = torch.minimum(counts, caps)
    pos = (start + have - 1).clamp(0, max(sorted_vals.numel() - 1, 0))
    inf = torch.full_like(lo, math.inf)
    tau = torch.where(have > 0, sorted_vals[pos] if sorted_vals.numel() else inf, inf)
    fail = (counts < caps) & (lo > tiny)
    n_fail = int(fail.sum())
    sorted_col = col[order]
    rank = torch.arange(order.numel(), device=pre.device) - start[sorted_col]
    kept = idx[order[rank < have[sorted_col]]]  # exact for every feature whose estimate held
    if n_fail:
        cols = fail.nonzero().squeeze(1)
        sub = pre.index_select(1, cols)
        tau_sub = column_thresholds(sub, caps[cols])
        tau[cols] = tau_sub
        sub_kept = _kept_with_ties(sub, caps[cols], tau_sub)
        rows, which = sub_kept // cols.numel(), sub_kept % cols.numel()
        kept = torch.cat([kept[~fail[kept % f]], rows * f + cols[which]])
    return tau, n_fail, idx.numel(), torch.sort(kept).values


#: blocks of tokens for :func:`block_lower_bounds` (about 32 tokens per block at N = 2048)
_BOUND_BLOCKS = 64


def block_lower_bounds(pre: torch.Tensor, caps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bound, covered)`` [F]: for every feature with ``1 <= caps[j] <= B``, a value that is at most the
    ``caps[j]``-th largest of its column (an exact lower bound, never an estimate), ``-inf`` elsewhere.

    The tokens are cut into ``B`` blocks (about :data:`_BOUND_BLOCKS`) and each column's maximum per
    block taken (one reduction over the batch). Those ``B`` maxima are ``B`` distinct entries of the
    column, so their ``m``-th largest is at most the column's ``m``-th largest, for any ``m <= B``; for
    ``m = 1`` it is the column maximum itself, and for small ``m`` it is usually the exact threshold (the
    top ``m`` entries rarely share a block)."""
    n, f = pre.shape
    if n == 0:  # no token: no bound
        return torch.full((f,), -math.inf, dtype=pre.dtype, device=pre.device), torch.zeros_like(caps, dtype=torch.bool)
    size = max(1, n // _BOUND_BLOCKS)
    full = (n // size) * size
    maxima = pre[:full].reshape(n // size, size, f).amax(dim=1)
    if full < n:
        maxima = torch.cat([maxima, pre[full:].amax(dim=0, keepdim=True)])
    b = maxima.shape[0]
    covered = (caps >= 1) & (caps <= b)
    bound = torch.full((f,), -math.inf, dtype=pre.dtype, device=pre.device)
    if not bool(covered.any()):
        return bound, covered
    per_feature = maxima.t().contiguous()  # [F, b]: each feature's block maxima along a contiguous row
    for members, top in _bucketed_top(per_feature, caps, covered):  # the caps[j]-th largest block maximum
        bound[members] = top.gather(1, (caps[members] - 1).long()[:, None]).squeeze(1)
    return bound, covered


def candidate_limit(budget_entries: int) -> int:
    """How many candidates an estimate may let through before :func:`feature_choice_indices` takes
    the dense path instead (the estimate is then too loose to pay off)."""
    return 8 * budget_entries + 1024


def feature_choice_indices(
    affinity: torch.Tensor,
    caps: torch.Tensor,
    *,
    one_per_token: bool = False,
    t_lo: torch.Tensor | None = None,
    stats: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature Choice selection as ``(flat, tau)``: ascending row-major indices of the kept
    entries (leading dimensions of ``affinity`` flattened into tokens) and ``tau`` [F], each
    feature's smallest kept value (``+inf`` for a feature that kept nothing).

    Feature j keeps exactly ``min(caps[j], #positive in its column)`` entries, ties at ``tau_j``
    by lowest token index. With ``one_per_token``, a token no feature chose also keeps its
    largest positive affinity (at most one extra entry per such token; it does not change
    ``tau``). ``t_lo`` (optional, [F]) is a per-feature estimate of a lower bound on ``tau``
    (e.g. last step's thresholds, lowered by their spread) that makes the exact selection cheaper
    (:func:`column_thresholds_estimated`); for features with ``caps[j]`` up to about 64 it is replaced
    by an exact lower bound from per-block column maxima (:func:`block_lower_bounds`, one reduction over
    the batch; for ``caps[j] == 1`` the column's maximum, the exact threshold), so only features with
    larger capacities rely on the estimate. The result does not depend on it. ``stats``, if given,
    receives ``fallback_features`` and ``candidates`` (how well the estimate did).
    """
    pre = affinity.detach().reshape(-1, affinity.shape[-1])
    caps = caps.to(pre.device).clamp(0, pre.shape[0])
    kept = None
    if t_lo is None:
        tau = column_thresholds(pre, caps)
    else:
        kk = int(caps.sum())
        # features with small capacities get an exact lower bound from per-block maxima (one cheap
        # reduction): only features with m_j > ~64 rely on the estimate, which can be too high
        bound, covered = block_lower_bounds(pre, caps)
        t_lo = torch.where(covered, bound.to(t_lo.dtype), t_lo.to(pre.device))
        tau, n_fail, n_cand, kept = _estimated_selection(pre, caps, t_lo, max_candidates=candidate_limit(kk))
        if stats is not None:
            stats.update(fallback_features=n_fail, candidates=n_cand)
    if kept is None:  # reference path: the kept entries from the exact thresholds
        kept = _kept_with_ties(pre, caps, tau)
    if one_per_token:
        kept = with_one_per_token(pre, kept)
    return kept, tau


def with_one_per_token(pre: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``kept`` (ascending flat indices into ``pre`` ``[N, F]``) plus, for every token that kept
    nothing, its largest affinity if that is positive (Feature Choice's ``one_per_token``)."""
    n, f = pre.shape
    rows = (torch.bincount(kept // f, minlength=n) == 0).nonzero().squeeze(1)
    if rows.numel() == 0:
        return kept
    cols = pre.index_select(0, rows).argmax(dim=-1)
    ok = pre[rows, cols] > 0
    return torch.sort(torch.cat([kept, (rows * f + cols)[ok]])).values


def feature_choice_select(
    affinity: torch.Tensor,
    caps: torch.Tensor,
    *,
    one_per_token: bool = False,
    t_lo: torch.Tensor | None = None,
    stats: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature Choice codes; returns ``(codes, tau)`` (see :func:`feature_choice_indices`).

    The codes are scattered from the kept flat indices (like TopK's), so the backward pass
    touches only those entries. Differentiable in ``affinity``.
    """
    kept, tau = feature_choice_indices(affinity, caps, one_per_token=one_per_token, t_lo=t_lo, stats=stats)
    flat = affinity.reshape(-1)
    codes = keep_flat(flat, kept)
    return codes.reshape(affinity.shape), tau


def feature_choice_reference(affinity: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Per-feature stable-sort loop over ``relu(affinity)``: each column keeps its ``caps[j]``
    largest positive entries, ties by lowest token index (slow; tests and benchmarks only)."""
    shape = affinity.shape
    acts = affinity.reshape(-1, shape[-1]).relu()
    out = torch.zeros_like(acts)
    for j in range(acts.shape[1]):
        m = int(caps[j])
        if m > 0:
            order = torch.sort(acts[:, j], descending=True, stable=True).indices[: min(m, acts.shape[0])]
            order = order[acts[order, j] > 0]
            out[order, j] = acts[order, j]
    return out.reshape(shape)
