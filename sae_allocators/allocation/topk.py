"""Per-token TopK (Gao et al. 2024; SAELens's ``topk``) as a kept-entry rule.

SAELens's TopK keeps the ``k`` largest pre-activations of each token and ReLUs them, so an entry
among the ``k`` that is not positive has code 0. As a selection that is: the ``k`` largest per
token, of which the positive ones are kept. Ties among the ``k``-th values are whatever
``torch.topk`` returns (as in SAELens).
"""

from __future__ import annotations

import torch


def topk_indices(affinity: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices, keep)``, both ``[..., k]``: per row the column indices of the ``k`` largest
    ``affinity`` values and whether each is positive (kept with a non-zero code)."""
    values, indices = torch.topk(affinity, k=k, dim=-1, sorted=False)
    return indices, values > 0


def row_topk_by_blocks(values: torch.Tensor, m: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(values, m, dim=-1, sorted=True)`` of a 2-D tensor through its block maxima:
    the ``m`` largest values per row (the same floats, descending) and their columns.

    The row is cut into blocks of ``block`` columns; the ``m`` blocks with the largest maxima hold
    every entry above the row's ``m``-th largest value and at least ``m`` entries at or above it
    (an entry outside them is at most the maxima of ``m`` other blocks), so a top-``m`` of those
    ``m * block`` entries is the row's. One pass over the row (the maxima) instead of a partial
    sort of all of it: about half of ``torch.topk``'s time for ``m`` ~ 64 of 65,536 columns on a
    CPU. Falls back to ``torch.topk`` when the columns are not whole blocks or there are fewer
    than ``2 m`` blocks. Among tied values the columns are whichever ``torch.topk`` returns."""
    r, f = values.shape
    n_blocks = f // block
    if f % block or n_blocks < 2 * m:
        return torch.topk(values, m, dim=-1, sorted=True)
    maxima = values.view(r, n_blocks, block).amax(dim=-1)
    chosen = torch.topk(maxima, m, dim=-1, sorted=False).indices
    offsets = torch.arange(block, device=values.device)
    cols = (chosen.unsqueeze(-1) * block + offsets).view(r, m * block)
    top, where = torch.topk(values.gather(-1, cols), m, dim=-1, sorted=True)
    return top, cols.gather(-1, where)
