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
