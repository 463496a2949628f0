"""gradient_topk's exact bfloat16 screen (``allocation/gradient.py``, ``screened_topk_indices``)
against its plain float32 reference (``screen=False``), and its two helpers: the block-maxima
top-m (``allocation/topk.py``) and the sampled candidate attribution."""

from __future__ import annotations

import pytest
import torch

from sae_allocators import devices
from sae_allocators.allocation import gradient as G
from sae_allocators.allocation.topk import row_topk_by_blocks


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _kept(pre, idx):
    """Per row the set of selected columns with a positive code (what the step keeps)."""
    keep = pre.gather(-1, idx) > 0
    return [set(i for i, k in zip(r, m) if k) for r, m in zip(idx.tolist(), keep.tolist())]


def _batch(n=96, f=8192, d=32, seed=0):
    """Pre-activations with the rows real activations have: repeated rows (sequence starts), a row
    with no positive code, a row with fewer than k positive codes, and one outsized gradient."""
    pre, grad, dec = _rand(n, f, seed=seed), _rand(n, d, seed=seed + 1), _rand(f, d, seed=seed + 2)
    dec.mul_(torch.rand(f, 1, generator=torch.Generator().manual_seed(seed + 3)) + 0.5)  # row norms 0.5-1.5
    pre[1:5] = pre[0]
    grad[1:5] = grad[0]
    pre[5] = -pre[5].abs()  # nothing positive
    pre[6] = -pre[6].abs()
    pre[6, :3] = torch.tensor([1.0, 2.0, 3.0])  # three positive codes
    grad[7] *= 1e4  # its attribution dwarfs its codes: the bound is loose there, the row takes the reference
    return pre, grad, dec


@pytest.mark.parametrize("unit_rows", [True, False], ids=["unit_rows", "raw_rows"])
@pytest.mark.parametrize("beta", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("k", [8, 32])
def test_the_screen_keeps_what_the_float32_reference_keeps(k, beta, unit_rows):
    pre, grad, dec = _batch()
    g = G.normalize_grad(grad, "batch")
    stats: dict[str, int] = {}
    idx = G.screened_topk_indices(pre, g, dec, k, beta, unit_rows=unit_rows, stats=stats)
    ref, _ = G.gradient_topk_indices(pre, grad, dec, k, beta, "batch", screen=False, unit_rows=unit_rows)
    assert _kept(pre, idx) == _kept(pre, ref)
    assert all(len(set(r)) == k for r in idx.tolist())  # k distinct columns per row
    assert _kept(pre, idx)[5] == set() and _kept(pre, idx)[6] == {0, 1, 2}
    # the screen did the work: only the outsized-gradient row took the reference, and the exact
    # stage looked at a handful of columns per row, not F
    assert stats["misfits"] == 1, stats
    assert k <= stats["width"] <= 2 * k + 32, stats


def test_the_public_entry_point_screens_by_default_where_it_pays_and_agrees_with_the_reference():
    pre, grad, dec = _batch(n=64)
    assert G.screen_applies(pre, grad, dec, 16) == devices.bf16_matmul_is_fast(pre.device)
    assert not G.screen_applies(pre[:, :4096], grad, dec[:4096], 16)  # a small dictionary: the reference
    assert not G.screen_applies(pre.double(), grad.double(), dec.double(), 16)  # the bound is for float32
    for screen in (None, True):
        idx, keep = G.gradient_topk_indices(pre, grad, dec, 16, 1.0, "token", screen=screen, unit_rows=True)
        ref, ref_keep = G.gradient_topk_indices(pre, grad, dec, 16, 1.0, "token", screen=False, unit_rows=True)
        assert _kept(pre, idx) == _kept(pre, ref) and torch.equal(keep.sum(-1), ref_keep.sum(-1))
    # leading dimensions are flattened and restored
    idx3, keep3 = G.gradient_topk_indices(
        pre.view(4, 16, -1), grad.view(4, 16, -1), dec, 16, 1.0, "token", screen=True, unit_rows=True
    )
    assert idx3.shape == keep3.shape == (4, 16, 16) and _kept(pre, idx3.reshape(64, 16)) == _kept(pre, ref)


def test_the_slack_covers_bfloat16_rounding_that_reverses_the_order():
    """``d_0 = 1.0035156`` rounds to 1.0 in bfloat16 (below the midpoint 1 + 2^-8), so the screen sees
    scores [2.0, 2.002] where the true ones are [2.0035, 2.002]: feature 0 wins. Without the slack of
    :func:`screen_slack` the screen would take feature 1, its top score (checked)."""
    pre = torch.tensor([[1.0, 1.001]])
    grad = torch.tensor([[1.0]])
    dec = torch.tensor([[1.0035156], [1.0]])
    assert torch.equal(dec.to(torch.bfloat16).float(), torch.tensor([[1.0], [1.0]]))
    ref, _ = G.gradient_topk_indices(pre, grad, dec, 1, 1.0, screen=False)
    assert ref.tolist() == [[0]]
    stats: dict[str, int] = {}
    assert G.screened_topk_indices(pre, grad, dec, 1, 1.0, stats=stats).tolist() == [[0]]
    assert stats["misfits"] == 1  # two features, one candidate slot: both are candidates, the row takes the reference
    # with a third feature there is room: both candidates reach the exact stage
    pre3, dec3 = torch.tensor([[1.0, 1.001, 0.0]]), torch.tensor([[1.0035156], [1.0], [1.0]])
    assert G.screened_topk_indices(pre3, grad, dec3, 1, 1.0, stats=stats).tolist() == [[0]]
    assert stats == {"width": 2, "misfits": 0}
    # the slack is what makes it exact
    saved = G.screen_slack
    G.screen_slack = lambda grad_norm, *a: torch.zeros_like(grad_norm)
    try:
        assert G.screened_topk_indices(pre3, grad, dec3, 1, 1.0).tolist() == [[1]]
    finally:
        G.screen_slack = saved


def test_screen_slack_is_the_documented_bound():
    u, u32, d = 2.0**-8, 2.0**-24, 512
    gamma = d * u32 / (1 - d * u32)
    norms = torch.tensor([0.5, 1.0, 3.0])
    q = G.screen_slack(norms, 1.0, d, 2.0)
    per_norm = 2 * u + u * u + gamma * (1 + u) ** 2
    expected = u / (1 - u) + 2.0 * (per_norm * norms + 2 * d * 2.0**-126 * (norms + 1.0))
    torch.testing.assert_close(q, expected, rtol=1e-6, atol=0)
    # and it bounds the measured error of the bfloat16 attribution on random data
    g, dec = _rand(256, d), _rand(4096, d, seed=1)
    exact = (g.double() @ dec.double().T).abs()
    approx = (g.to(torch.bfloat16) @ dec.to(torch.bfloat16).T).double().abs()
    slack = G.screen_slack(g.norm(dim=-1), dec.norm(dim=-1).max(), d, 1.0).double()
    err = (exact - approx).abs()
    assert bool((err <= u / (1 - u) * approx + (slack - u / (1 - u)).unsqueeze(-1)).all())


def test_the_screen_refuses_other_dtypes_and_falls_back_below_k_plus_one_features():
    pre, grad, dec = _rand(4, 16), _rand(4, 8, seed=1), _rand(16, 8, seed=2)
    with pytest.raises(ValueError, match=r"float32 .* use screen=False"):
        G.screened_topk_indices(pre.double(), grad.double(), dec.double(), 4, 1.0)
    stats: dict[str, int] = {}
    idx = G.screened_topk_indices(pre, grad, dec, 16, 1.0, stats=stats)  # k = F: nothing to screen
    assert sorted(idx[0].tolist()) == list(range(16)) and stats == {"width": 0, "misfits": 4}


@pytest.mark.parametrize("kind", ["normal", "ties", "relu"])
def test_row_topk_by_blocks_is_torch_topk(kind):
    g = torch.Generator().manual_seed(1)
    if kind == "ties":
        x = torch.randint(0, 6, (40, 8192), generator=g).float()
    else:
        x = torch.randn(40, 8192, generator=g)
        x = x.relu() if kind == "relu" else x
    x[1] = x[0]
    for m in (1, 17, 65):
        vals, idx = row_topk_by_blocks(x, m)
        ref = torch.topk(x, m, dim=-1, sorted=True).values
        assert torch.equal(vals, ref)
        assert torch.equal(x.gather(-1, idx), vals) and all(len(set(r)) == m for r in idx.tolist())
    # the falls-back: columns not in whole blocks, too few blocks
    for shape, m in (((3, 8193), 5), ((3, 256), 3)):
        y = torch.randn(*shape, generator=g)
        vals, idx = row_topk_by_blocks(y, m)
        assert torch.equal(vals, torch.topk(y, m, dim=-1).values) and torch.equal(y.gather(-1, idx), vals)


def test_the_top_blocks_hold_every_top_entry_when_they_share_blocks():
    # the 5 largest entries of the row sit in one block: the 5 blocks with the largest maxima still hold them
    x = torch.zeros(1, 64 * 20)
    x[0, 64:69] = torch.tensor([9.0, 8.0, 7.0, 6.0, 5.0])
    x[0, 200], x[0, 900] = 4.0, 3.0
    vals, idx = row_topk_by_blocks(x, 7)
    assert vals.tolist() == [[9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0]] and idx.tolist() == [[64, 65, 66, 67, 68, 200, 900]]


def test_candidate_attribution_is_its_plain_reference():
    g, dec = _rand(300, 24), _rand(2000, 24, seed=1)
    cols = torch.stack([torch.randperm(2000, generator=torch.Generator().manual_seed(i))[:40] for i in range(300)])
    cols = cols.sort(dim=-1).values
    fast = G.candidate_attribution(g, dec, cols)
    plain = G.candidate_attribution_plain(g, dec, cols)
    dense = (g @ dec.T).abs().gather(-1, cols)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast, dense, rtol=1e-5, atol=1e-5)
    assert G.candidate_attribution(g, dec, cols[:, :0]).shape == (300, 0)


def test_bf16_matmul_is_fast_names_the_devices_with_bfloat16_kernels(monkeypatch):
    assert devices.bf16_matmul_is_fast("meta") is False
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert devices.bf16_matmul_is_fast(torch.device("cpu")) is False  # no oneDNN: the reference
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")
    for avx512_bf16, amx, fast in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert devices.bf16_matmul_is_fast("cpu") is fast  # AVX-512 without bfloat16 dot products: not fast
    monkeypatch.setattr(devices.platform, "machine", lambda: "aarch64")
    assert devices.bf16_matmul_is_fast("cpu") is True  # oneDNN's bfloat16 kernels (ACL) elsewhere
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.bf16_matmul_is_fast("cuda") is False
