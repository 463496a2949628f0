"""Outlier-norm rows in batch-level rules: the guard, and where the budget went.

A language model's residual stream has a few tokens whose activation norm is many times the
median: the BOS row of every context (SAELens prepends one by default), document separators, and
the model's own *massive activations* (in SmolLM2-135M at layer 6, 1-2 % of ordinary tokens such
as " the" have norms of ~650 against a median of ~97). A rule free to place its budget anywhere in
the batch (Mutual Choice, Feature Choice, BatchTopK) ranks raw affinities, which scale with the
token's norm, so these rows take most of the budget (measured: 98 % for Mutual Choice, 73 % for
Feature Choice on 2.4 % of the tokens; docs/mutual_choice.md).

The guard (our choice, not the paper's): a row whose norm exceeds ``ratio`` times the batch's
median norm is an *outlier row*; the rule ranks its affinities as if the row had the median norm,
i.e. multiplied by ``median / norm``. Every other row is ranked on its raw affinities, so on a
batch without outlier rows the rule is exactly the paper's. The kept *values* are the raw
pre-activations either way (only the ranking changes), and the budget stays exact.

Pure tensor functions, no SAELens imports.
"""

from __future__ import annotations

import math

import torch

#: the guard's default ratio to the batch median (the batch rules' ``outlier_norm_ratio``)
DEFAULT_GUARD_RATIO = 4.0
#: the ratio to the batch median above which a row counts as an outlier in the *reported*
#: shares (fixed, independent of the guard's own ratio, so runs with and without it compare)
REPORT_RATIO = 5.0
#: the fraction of tokens whose budget share is reported as "top 1 %"
TOP_FRACTION = 0.01


def row_norms(sae_in: torch.Tensor) -> torch.Tensor:
    """``[N]`` L2 norms of the rows of ``sae_in`` ``[N, d]`` (float32 or wider)."""
    x = sae_in.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return x.norm(dim=-1)


def median_norm(norms: torch.Tensor) -> torch.Tensor:
    """The batch's median row norm (0-d; the lower median for an even count, as torch does)."""
    return norms.median()


def outlier_mask(norms: torch.Tensor, ratio: float, median: torch.Tensor | None = None) -> torch.Tensor:
    """``[N]`` bool: rows whose norm exceeds ``ratio`` times the median (``median`` defaults to
    this batch's; data-parallel training passes the global batch's). All False if ``ratio <= 0``."""
    if ratio <= 0 or norms.numel() == 0:
        return torch.zeros_like(norms, dtype=torch.bool)
    med = median_norm(norms) if median is None else median
    return norms > ratio * med


def ranking_scale(norms: torch.Tensor, ratio: float, median: torch.Tensor | None = None) -> torch.Tensor | None:
    """``[N]`` factors the rule multiplies each row's affinities by before ranking: ``median / norm``
    on outlier rows, 1 elsewhere; ``None`` when the batch has no outlier row (the rule then runs on
    the raw affinities, unchanged). One host sync (whether any row is an outlier)."""
    if ratio <= 0 or norms.numel() == 0:
        return None
    med = median_norm(norms) if median is None else median
    out = outlier_mask(norms, ratio, med)
    if not bool(out.any()):
        return None
    return torch.where(out, med / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.ones_like(norms))


def guarded_affinity(affinity: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The matrix the rule ranks: ``affinity`` itself when ``scale`` is None, else a copy with the
    outlier rows scaled (``affinity`` is left untouched: the kept values are read from it)."""
    if scale is None:
        return affinity
    return affinity * scale.to(affinity.dtype).unsqueeze(-1)


def budget_shares(rows: torch.Tensor, n_tokens: int, outliers: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where a batch's kept entries went, as 0-d float tensors (no host sync):

    - ``budget_share_top1pct``: the share held by the ``ceil(1 %)`` of tokens with the most entries;
    - ``budget_share_outlier_rows``: the share held by the rows flagged in ``outliers`` ``[N]``;
    - ``outlier_row_frac``: the fraction of rows flagged.

    ``rows`` holds the token index of every kept entry.
    """
    dev = outliers.device
    counts = torch.bincount(rows, minlength=n_tokens).float() if rows.numel() else torch.zeros(n_tokens, device=dev)
    total = counts.sum().clamp_min(1.0)
    top_n = max(1, math.ceil(TOP_FRACTION * n_tokens)) if n_tokens else 0
    top = counts.topk(min(top_n, n_tokens)).values.sum() if n_tokens else counts.sum()
    return {
        "budget_share_top1pct": top / total,
        "budget_share_outlier_rows": (counts * outliers.to(counts.dtype)).sum() / total,
        "outlier_row_frac": outliers.float().mean() if n_tokens else counts.sum() * 0,
    }
