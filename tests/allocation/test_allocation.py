"""Pure allocation rules: exactness against plain torch.topk references and SAELens's BatchTopK."""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens.saes.batchtopk_sae import BatchTopK

from sae_allocators.allocation import batch as B
from sae_allocators.allocation.feature_choice import (
    block_lower_bounds,
    capacities,
    column_thresholds,
    column_thresholds_estimated,
    feature_choice_indices,
    feature_choice_reference,
    feature_choice_select,
    usage_rank,
)

# Runs once in CI, at the newest SAELens (tests/run.sh): pure tensor rules (and SAELens's BatchTopK
# activation, the same code throughout 6.x).
pytestmark = pytest.mark.saelens_independent


def gen(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- Mutual Choice ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,k", [((64, 32), 3.0), ((600, 1024), 8.0), ((4, 150, 1024), 16.5), ((513, 1000), 0.7)])
def test_mutual_choice_equals_full_topk_and_saelens_batchtopk(shape, k):
    pre = gen(*shape, seed=len(shape))
    codes, tau = B.mutual_choice_select(pre, k)
    ref = B.batch_topk_reference(pre, k)
    assert torch.equal(codes, ref)
    assert torch.equal(codes, BatchTopK(k)(pre))  # SAELens's own activation: same mask, same values
    n_tokens = math.prod(shape[:-1])
    assert int((codes != 0).sum()) == math.floor(k * n_tokens)
    assert float(tau) == float(codes[codes != 0].min())


def test_large_input_takes_the_estimate_path_and_stays_exact(monkeypatch):
    pre = gen(700, 1024, seed=3)  # 716,800 values > 4 * SAMPLE_SIZE: sample + block filter + kthvalue
    calls = []
    real_topk = torch.topk
    monkeypatch.setattr(torch, "topk", lambda *a, **kw: calls.append(1) or real_topk(*a, **kw))
    tau, cand, idx = B.kth_largest_with_candidates(pre.reshape(-1), 700 * 16, row_len=1024)
    assert not calls  # no full sort
    monkeypatch.setattr(torch, "topk", real_topk)
    assert cand is not None and cand.numel() < 3 * 700 * 16  # a small candidate set
    assert torch.equal(pre.reshape(-1)[idx], cand)
    assert float(tau) == float(real_topk(pre.reshape(-1), 700 * 16).values.min())


def test_estimate_miss_falls_back_to_exact(monkeypatch):
    monkeypatch.setattr(B, "SLACK_SIGMAS", -40.0)  # sample threshold far too high: too few candidates
    pre = gen(700, 1024, seed=4)
    codes, _ = B.mutual_choice_select(pre, 16.0)
    assert torch.equal(codes, B.batch_topk_reference(pre, 16.0))


def test_sample_step_is_coprime_with_feature_count():
    assert math.gcd(B._coprime_step(4096 * 8192, 8192, 65536), 8192) == 1


def test_fewer_positive_than_budget_keeps_all_positive():
    pre = -gen(50, 40).abs()
    pre[0, :3] = torch.tensor([0.5, 1.0, 2.0])
    codes, tau = B.mutual_choice_select(pre, 4.0)
    assert float(tau) == 0.0
    assert torch.equal(codes, pre.relu())
    assert torch.equal(codes, B.batch_topk_reference(pre, 4.0))


def test_ties_at_the_threshold_spend_exactly_the_budget_lowest_index_first():
    pre = torch.tensor([[3.0, 1.0, 1.0, 0.0], [1.0, 2.0, 0.0, 0.0]])
    codes, tau = B.mutual_choice_select(pre, 1.5)  # budget 3; third largest value 1.0 is tied 3 times
    assert float(tau) == 1.0
    assert int((codes != 0).sum()) == 3
    # kept: 3.0, 2.0, and of the tied 1.0s the first in row-major order (token 0, feature 1)
    assert torch.equal(codes, torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]))
    assert torch.equal(codes, B.batch_topk_reference(pre, 1.5))


def test_repeated_rows_cannot_overspend_the_budget():
    row = gen(1, 256)
    pre = row.repeat(64, 1)  # every value tied 64 times (a sequence-start token in every context)
    for k in (0.5, 3.0, 7.3):
        codes, _ = B.mutual_choice_select(pre, k)
        assert int((codes != 0).sum()) == math.floor(k * 64)
        assert torch.equal(codes, B.batch_topk_reference(pre, k))


def test_mutual_choice_gradient_flows_only_through_kept_entries():
    pre = gen(40, 30).requires_grad_()
    codes, _ = B.mutual_choice_select(pre, 2.0)
    codes.sum().backward()
    assert torch.equal(pre.grad, (codes != 0).float())


def test_mutual_choice_float64():
    pre = gen(200, 64, dtype=torch.float64)
    assert torch.equal(B.mutual_choice_select(pre, 5.0)[0], B.batch_topk_reference(pre, 5.0))


# --- Feature Choice capacities -------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,k,f,exponent",
    [(100, 4.0, 64, 0.0), (4096, 32.0, 8192, 0.5), (128, 3.3, 50, 1.0), (64, 30.0, 100, 2.0), (10, 0.5, 64, 0.0)],
)
def test_capacities_spend_the_budget_and_fit_the_batch(n, k, f, exponent):
    rank = usage_rank(gen(f, seed=1))
    caps = capacities(n, k, f, rank=rank, exponent=exponent)
    assert caps.dtype == torch.long and caps.shape == (f,)
    assert int(caps.sum()) == math.floor(k * n)
    assert int(caps.max()) <= n and int(caps.min()) >= 0
    by_rank = caps[torch.argsort(rank)]
    assert bool((by_rank[:-1] >= by_rank[1:] - 1).all())  # non-increasing in rank (up to rounding)
    if exponent == 0:
        assert int(caps.max()) - int(caps.min()) <= 1


def test_zipf_capacities_follow_the_power_law_and_clip_at_the_batch():
    f, n = 1000, 2000
    rank = torch.arange(f)
    caps = capacities(n, 10.0, f, rank=rank, exponent=0.5).double()
    assert caps[0] / caps[99] == pytest.approx(10.0, rel=0.02)  # (100/1)^0.5
    steep = capacities(n, 10.0, f, rank=rank, exponent=3.0)
    assert int(steep[0]) == n and int(steep.sum()) == 10 * n  # clipped at N, excess water-filled


def test_min_capacity_floor_and_its_error():
    caps = capacities(200, 4.0, 64, min_capacity=2, rank=torch.arange(64), exponent=1.0)
    assert int(caps.min()) >= 2 and int(caps.sum()) == 800
    with pytest.raises(ValueError, match=r"min_capacity=2 cannot be met.*at least 32 tokens"):
        capacities(31, 4.0, 64, min_capacity=2)


# --- Feature Choice selection ---------------------------------------------------------------------


@pytest.mark.parametrize("shape,k,exponent", [((300, 50), 4.0, 0.7), ((2, 100, 64), 6.0, 0.0), ((1000, 256), 8.0, 0.5)])
def test_feature_choice_equals_per_feature_topk(shape, k, exponent):
    pre = gen(*shape, seed=5)
    n, f = math.prod(shape[:-1]), shape[-1]
    caps = capacities(n, k, f, rank=usage_rank(gen(f, seed=2)), exponent=exponent)
    ref = feature_choice_reference(pre, caps)
    codes, tau = feature_choice_select(pre, caps)
    assert torch.equal(codes, ref)
    flat = codes.reshape(-1, f)
    assert torch.equal((flat != 0).sum(0), torch.minimum(caps, (pre.reshape(-1, f) > 0).sum(0)))
    kept_min = torch.where(flat != 0, flat, torch.full_like(flat, math.inf)).amin(0)
    assert torch.equal(tau, kept_min)
    for scale in (0.5, 0.97, 1.0, 1.05, 3.0):  # any estimate: same exact result
        assert torch.equal(feature_choice_select(pre, caps, t_lo=tau * scale)[0], ref)


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_column_thresholds_in_blocks_of_features_equal_a_per_column_topk(monkeypatch, block):
    # the dense path runs each capacity bucket's features in blocks (views for a range of features,
    # copies otherwise): per column, the smallest positive among its caps[j] largest, +inf if none
    import sae_allocators.allocation.feature_choice as fc

    monkeypatch.setattr(fc, "_FEATURES_PER_TOPK", block)
    pre = gen(300, 200, seed=11)
    pre[:, 5] = -1.0  # a column without a positive value
    caps = torch.randint(0, 12, (200,), generator=torch.Generator().manual_seed(12))
    caps[:40] = 3  # a range of features in one bucket: views
    caps[7] = 300  # every token
    ref = torch.full((200,), math.inf)
    for j in range(200):
        if caps[j] > 0:
            top = torch.topk(pre[:, j], int(caps[j])).values
            top = top[top > 0]
            if top.numel():
                ref[j] = top.min()
    assert torch.equal(column_thresholds(pre, caps), ref)


@pytest.mark.parametrize("block", [3, 4096])
def test_dense_feature_choice_with_many_ties_keeps_the_lowest_tokens_in_blocks(monkeypatch, block):
    # quantized affinities: most columns have more entries at tau_j than places left; the running
    # count of ties (in blocks of columns) keeps the lowest token indices, as the reference does
    import sae_allocators.allocation.feature_choice as fc

    monkeypatch.setattr(fc, "_FEATURES_PER_TOPK", block)
    pre = torch.floor(torch.rand(257, 40, generator=torch.Generator().manual_seed(13)) * 4) - 1
    caps = capacities(257, 3.0, 40, rank=usage_rank(gen(40, seed=14)), exponent=0.5)
    codes, _ = feature_choice_select(pre, caps)
    assert torch.equal(codes, feature_choice_reference(pre, caps))


def test_estimated_thresholds_use_the_fallback_only_where_the_estimate_missed():
    pre = gen(1000, 128, seed=6)
    caps = capacities(1000, 8.0, 128)
    tau = column_thresholds(pre, caps)
    est = tau * 0.9
    est[:5] = tau[:5] * 1.5  # five features overestimated
    tau2, n_fail, _ = column_thresholds_estimated(pre, caps, est)
    assert n_fail == 5 and torch.equal(tau2, tau)


@pytest.mark.parametrize("one_per_token", [False, True])
def test_feature_choice_with_estimate_matches_dense_path_values_and_gradients(one_per_token):
    # the estimate path builds codes from kept indices (a scatter); it must equal the dense
    # compare-and-select path in values and in the gradient it passes back, including the
    # features whose estimate was too high (exact per-feature fallback; capacities above the
    # block bound's reach, which would otherwise replace the estimate by an exact bound)
    pre = gen(600, 96, seed=8)
    caps = capacities(600, 16.0, 96, rank=usage_rank(gen(96, seed=3)), exponent=0.5)
    _, covered = block_lower_bounds(pre, caps)
    _, tau = feature_choice_select(pre, caps)
    est = tau * 0.95
    est[::7] = tau[::7] * 1.3  # every 7th feature overestimated: its own exact fallback
    upstream = gen(600, 96, seed=9)
    results = []
    for t_lo in (None, est):
        x = pre.clone().requires_grad_(True)
        stats: dict = {}
        codes, tau_out = feature_choice_select(x, caps, one_per_token=one_per_token, t_lo=t_lo, stats=stats)
        (codes * upstream).sum().backward()
        results.append((codes.detach(), tau_out, x.grad, stats))
    (dense, tau_d, grad_d, _), (sparse, tau_s, grad_s, stats) = results
    # the fallback takes every overestimated feature, and every feature with fewer positive values than
    # its capacity (its estimate cannot tell "all of them" from "too few passed")
    short = (pre > 0).sum(0) < caps
    assert stats["fallback_features"] == int((~covered & ((torch.arange(96) % 7 == 0) | short)).sum())
    assert int((~covered[::7]).sum()) > 0
    assert torch.equal(sparse, dense) and torch.equal(tau_s, tau_d) and torch.equal(grad_s, grad_d)
    assert torch.equal(grad_d, torch.where(dense != 0, upstream, torch.zeros(())))


def test_one_per_token_gives_every_token_a_feature():
    pre = gen(400, 32, seed=7)
    caps = capacities(400, 1.0, 32)
    plain, _ = feature_choice_select(pre, caps)
    empty = (plain != 0).sum(-1) == 0
    assert bool(empty.any())
    codes, _ = feature_choice_select(pre, caps, one_per_token=True)
    has_pos = (pre > 0).any(-1)
    assert bool(((codes != 0).sum(-1) >= 1)[has_pos].all())
    assert torch.equal(codes[~empty], plain[~empty])  # other tokens unchanged
    best = pre.argmax(-1)
    rows = empty.nonzero().squeeze(1)
    assert torch.equal(codes[rows, best[rows]], pre[rows, best[rows]])


@pytest.mark.parametrize("n", [7, 64, 1000, 2048, 4100])
def test_block_lower_bounds_never_exceed_the_capacity_th_largest(n):
    """The per-block bound is an exact lower bound of each covered column's m-th largest value (ties,
    repeated rows, negative columns, N not a multiple of the block count), the column maximum at m = 1,
    and -inf where it does not apply (m = 0 or m above the number of blocks)."""
    f = 40
    pre = gen(n, f, seed=n)
    pre[1:5] = pre[0]  # repeated rows: ties in every column
    pre[:, 3] = -pre[:, 3].abs()  # a column with no positive value
    pre[:, 4] = 1.0  # a constant column
    caps = torch.tensor([0, 1, 2, 3, 5, 8, 16, 33, 64, 65, 200] * 4)[:f].clamp(max=n)
    bound, covered = block_lower_bounds(pre, caps)
    ordered = torch.sort(pre, dim=0, descending=True).values
    for j in range(f):
        m = int(caps[j])
        if not bool(covered[j]):
            assert float(bound[j]) == -math.inf
            continue
        assert 1 <= m <= 65
        assert float(bound[j]) <= float(ordered[m - 1, j])
        if m == 1:
            assert float(bound[j]) == float(ordered[0, j])
    assert bool(covered[caps == 1].all()) and not bool(covered[caps == 0].any())
    empty_bound, empty_covered = block_lower_bounds(pre[:0], caps.clamp(max=0))
    assert not bool(empty_covered.any()) and bool((empty_bound == -math.inf).all())


def test_block_lower_bounds_make_the_estimate_path_exact_without_fallbacks():
    """Capacities up to 64 never need the per-feature fallback (their bound is exact), and the kept
    entries equal the dense path's, whatever estimate came in for them."""
    pre = gen(2048, 256, seed=11)
    caps = capacities(2048, 4.0, 256)  # uniform: 32 per feature
    stats: dict = {}
    flat, tau = feature_choice_indices(pre, caps, t_lo=torch.full((256,), 1e9), stats=stats)
    ref_flat, ref_tau = feature_choice_indices(pre, caps)
    assert torch.equal(flat, ref_flat) and torch.equal(tau, ref_tau)
    assert stats["fallback_features"] == 0
    assert stats["candidates"] < 2 * int(caps.sum())


@pytest.mark.parametrize("shape", [(37, 50), (4, 9, 50)])
def test_abs_topk_indices_in_blocks_equal_one_call(monkeypatch, shape):
    """|affinity| is made a block of rows at a time: the indices equal one torch.topk over the whole
    affinity.abs() (blocks that do not divide the rows, 3-D input, ties and zero rows included)."""
    from sae_allocators.allocation import signed

    x = gen(*shape, seed=5)
    x[..., 3, :] = 0.0  # a zero row: every magnitude ties
    x[..., 7, 10:20] = -x[..., 7, 0:10]  # equal magnitudes of opposite sign
    ref = torch.topk(x.abs(), k=6, dim=-1, sorted=False).indices
    monkeypatch.setattr(signed, "_ABS_BLOCK_ELEMENTS", 50 * 8)  # 8 rows per block
    idx, keep = signed.abs_topk_indices(x, 6)
    assert torch.equal(idx, ref)
    assert torch.equal(keep, x.gather(-1, ref) != 0)
