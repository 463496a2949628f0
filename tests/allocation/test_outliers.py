"""The outlier guard's pure functions (sae_allocators.allocation.outliers)."""

from __future__ import annotations

import pytest
import torch

from sae_allocators.allocation import outliers
from sae_allocators.allocation.batch import mutual_choice_indices

pytestmark = pytest.mark.saelens_independent


def test_outlier_mask_and_ranking_scale():
    norms = torch.tensor([1.0, 1.0, 2.0, 1.0, 10.0, 1.0, 4.1])
    med = outliers.median_norm(norms)
    assert float(med) == 1.0
    mask = outliers.outlier_mask(norms, 4.0)
    assert mask.tolist() == [False, False, False, False, True, False, True]
    scale = outliers.ranking_scale(norms, 4.0)
    assert torch.allclose(scale, torch.tensor([1, 1, 1, 1, 0.1, 1, 1 / 4.1]))
    assert outliers.ranking_scale(norms, 0.0) is None  # guard off
    assert outliers.ranking_scale(norms, 20.0) is None  # no outlier row: the rule runs unchanged
    assert not outliers.outlier_mask(norms, 0.0).any()
    # a given (global) median is used instead of the batch's
    assert outliers.outlier_mask(norms, 4.0, torch.tensor(2.0)).tolist() == [False] * 4 + [True, False, False]


def test_guarded_affinity_is_a_copy_scaled_on_outlier_rows_only():
    pre = torch.arange(12.0).view(3, 4)
    assert outliers.guarded_affinity(pre, None) is pre
    aff = outliers.guarded_affinity(pre, torch.tensor([1.0, 0.5, 1.0]))
    assert torch.equal(aff[0], pre[0]) and torch.equal(aff[2], pre[2]) and torch.equal(aff[1], pre[1] * 0.5)
    assert torch.equal(pre, torch.arange(12.0).view(3, 4))  # untouched


def test_mutual_choice_on_guarded_affinities_keeps_the_budget_off_outlier_rows():
    g = torch.Generator().manual_seed(0)
    x_norm = torch.ones(256)
    x_norm[:4] = 40.0  # four outlier rows (1.6 % of the tokens)
    pre = torch.randn(256, 64, generator=g).abs() * x_norm[:, None]  # affinities scale with the norm
    k = 4.0
    flat_raw, _ = mutual_choice_indices(pre, k)
    raw_share = float((flat_raw // 64 < 4).float().mean())
    assert raw_share > 0.2  # unguarded: the four rows take a large part of the budget
    aff = outliers.guarded_affinity(pre, outliers.ranking_scale(x_norm, 4.0))
    flat, _ = mutual_choice_indices(aff, k)
    assert flat.numel() == int(k * 256)  # exact budget either way
    share = float((flat // 64 < 4).float().mean())
    assert share < 0.05


def test_budget_shares():
    rows = torch.tensor([0, 0, 0, 0, 1, 2, 3, 3])  # 8 kept entries over 200 tokens
    flagged = torch.zeros(200, dtype=torch.bool)
    flagged[0] = True
    s = outliers.budget_shares(rows, 200, flagged)
    assert float(s["budget_share_outlier_rows"]) == pytest.approx(0.5)
    assert float(s["budget_share_top1pct"]) == pytest.approx(6 / 8)  # ceil(1 % of 200) = 2 tokens: rows 0 and 3
    assert float(s["outlier_row_frac"]) == pytest.approx(1 / 200)
    empty = outliers.budget_shares(torch.zeros(0, dtype=torch.long), 10, torch.zeros(10, dtype=torch.bool))
    assert float(empty["budget_share_top1pct"]) == 0.0 and float(empty["budget_share_outlier_rows"]) == 0.0


def test_row_norms_upcast_half_precision():
    x = torch.full((3, 4), 300.0, dtype=torch.float16)  # 300^2 * 4 overflows float16
    assert torch.allclose(outliers.row_norms(x), torch.full((3,), 600.0))
