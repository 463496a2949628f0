"""Property-based tests (Hypothesis) of every allocation rule against plain references.

The references below share no code with ``sae_allocators``: they are written with Python lists,
``sorted()`` with explicit tie keys and float arithmetic, straight from the documented rules
(docs/testing.md, COORD's decided rules):

- batch rules (Mutual Choice / BatchTopK, signed Mutual Choice) keep exactly
  ``min(floor(k * N), #positive)`` entries (signed: ``#non-zero``), the largest first, ties broken by
  the lowest flat index in row-major ``[N, F]`` order (token first, then feature);
- Feature Choice: feature j keeps exactly ``min(m_j, #positive in its column)`` entries, ties broken by
  the lowest token index;
- capacities sum to exactly ``floor(k * N)``, each in ``[min_capacity, N]``, within 1 of the real
  water-filled share;
- per-token rules (AbsTopK, gradient TopK, top-AFA) keep the documented number of entries per token.

Inputs are drawn adversarially: shapes from 1 x 1 up, leading dimensions 1-D or 2-D (3-D
tensors), float32 / bfloat16 / float16, ``k`` with any fractional part of ``k * N``, duplicated rows
and columns, constant batches, zeros, huge (1e30 or the dtype's limit) and tiny values. Each test
is derandomized (the same examples on every run) and bounded, so CI is deterministic.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from sae_allocators.allocation import afa as AFA
from sae_allocators.allocation import batch as B
from sae_allocators.allocation import feature_choice as FC
from sae_allocators.allocation import gradient as G
from sae_allocators.allocation import signed as S
from sae_allocators.allocation import topk as T

# Runs once in CI, at the newest SAELens (tests/run.sh): pure tensor functions: no SAELens code runs.
pytestmark = pytest.mark.saelens_independent

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KINDS = ("normal", "pool", "constant", "zeros", "dup_rows", "dup_cols", "extreme", "sparse")

# derandomized: the same examples on every run; no example database, no "explain" phase (slow)
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink)
#: examples per property (tests/mutation.py lowers it per mutant; CI runs the default)
EXAMPLES = int(os.environ.get("SAE_ALLOCATORS_PROPERTY_EXAMPLES", "120"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=PHASES,
    suppress_health_check=[HealthCheck.too_slow],
)


def huge(dtype: torch.dtype) -> float:
    return min(1e30, torch.finfo(dtype).max / 64)


def tiny(dtype: torch.dtype) -> float:
    return max(1e-30, torch.finfo(dtype).tiny)


def build(
    kind: str,
    lead: tuple[int, ...],
    f: int,
    dtype: torch.dtype,
    seed: int,
    max_abs: float | None = None,
    min_abs: float | None = None,
) -> torch.Tensor:
    """A test matrix of the given structure, made in float64 and cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(lead)
    hi = huge(dtype) if max_abs is None else min(max_abs, huge(dtype))
    lo = tiny(dtype) if min_abs is None else max(min_abs, tiny(dtype))
    if kind == "normal":
        x = torch.randn(n, f, generator=g, dtype=torch.float64)
    elif kind == "pool":  # few distinct values: ties everywhere, across tokens and features
        pool = torch.tensor([0.0, 1.0, -1.0, 0.5, 2.0, -2.0, 3.0, hi, lo, -lo, -hi], dtype=torch.float64)
        x = pool[torch.randint(len(pool), (n, f), generator=g)]
    elif kind == "constant":
        c = [0.0, 1.0, -1.0, 0.25, hi, lo][int(torch.randint(6, (1,), generator=g))]
        x = torch.full((n, f), c, dtype=torch.float64)
    elif kind == "zeros":
        x = torch.zeros(n, f, dtype=torch.float64)
    elif kind == "dup_rows":  # repeated tokens (the real-data bug: a batch of repeated rows)
        base = torch.randn(max(1, n // 3), f, generator=g, dtype=torch.float64)
        x = base[torch.randint(base.shape[0], (n,), generator=g)]
    elif kind == "dup_cols":
        base = torch.randn(n, max(1, f // 3), generator=g, dtype=torch.float64)
        x = base[:, torch.randint(base.shape[1], (f,), generator=g)]
    elif kind == "extreme":  # magnitudes spread over the whole range, huge and tiny included
        e = torch.empty(n, f, dtype=torch.float64).uniform_(math.log10(lo), math.log10(hi), generator=g)
        sign = torch.where(torch.rand(n, f, generator=g) < 0.3, -1.0, 1.0).double()
        x = sign * torch.pow(10.0, e)
    elif kind == "sparse":  # mostly non-positive: fewer positives than the budget
        x = -torch.rand(n, f, generator=g, dtype=torch.float64)
        x[torch.rand(n, f, generator=g) < 0.1] = 1.0
    else:
        raise AssertionError(kind)
    x = x.clamp(-hi, hi)
    return x.to(dtype).reshape(*lead, f)


@st.composite
def matrices(
    draw,
    max_n: int = 24,
    max_f: int = 16,
    dtypes=DTYPES,
    kinds=KINDS,
    max_abs: float | None = None,
    min_abs: float | None = None,
):
    dtype = draw(st.sampled_from(dtypes))
    f = draw(st.integers(1, max_f))
    if draw(st.booleans()):
        lead: tuple[int, ...] = (draw(st.integers(1, 4)), draw(st.integers(1, 6)))
    else:
        lead = (draw(st.integers(1, max_n)),)
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**31 - 1))
    return build(kind, lead, f, dtype, seed, max_abs, min_abs)


@st.composite
def budgets(draw, n_tokens: int, n_feat: int):
    """``k`` such that ``k * N`` has a chosen fractional part (0, <0.5, 0.5, >0.5, just below 1)."""
    whole = draw(st.integers(0, n_tokens * n_feat + 2))
    frac = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.999]))
    return (whole + frac) / n_tokens


def floats(x: torch.Tensor) -> list[float]:
    return x.detach().double().reshape(-1).tolist()  # exact for every float dtype used here


def n_tokens_of(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


# --- references --------------------------------------------------------------------------------


def ref_batch_keep(values: list[float], k: float, n_tokens: int, key=lambda v: v, eligible=lambda v: v > 0) -> set[int]:
    """Flat indices kept by a batch rule: the floor(k*N) largest ``key`` among eligible entries,
    ties by lowest flat index."""
    budget = math.floor(k * n_tokens)
    order = sorted((i for i, v in enumerate(values) if eligible(v)), key=lambda i: (-key(values[i]), i))
    return set(order[: max(budget, 0)])


def ref_feature_keep(values: list[float], n: int, f: int, caps: list[int]) -> set[int]:
    kept: set[int] = set()
    for j in range(f):
        col = [(values[i * f + j], i) for i in range(n) if values[i * f + j] > 0]
        col.sort(key=lambda p: (-p[0], p[1]))
        kept.update(i * f + j for _, i in col[: max(caps[j], 0)])
    return kept


def ref_tau(values: list[float], n: int, f: int, caps: list[int]) -> list[float]:
    out = []
    for j in range(f):
        col = sorted((values[i * f + j] for i in range(n) if values[i * f + j] > 0), reverse=True)
        m = min(max(caps[j], 0), len(col))
        out.append(col[m - 1] if m > 0 else math.inf)
    return out


def mask_of(kept: set[int], like: torch.Tensor) -> torch.Tensor:
    m = torch.zeros(like.numel(), dtype=torch.bool)
    if kept:
        m[torch.tensor(sorted(kept))] = True
    return m.reshape(like.shape)


def kept_set(codes: torch.Tensor) -> set[int]:
    return {i for i, v in enumerate(floats(codes)) if v != 0}


def ref_waterfill(shape: list[float], total: float, cap: float) -> list[float]:
    """Real shares min(cap, c * shape_j) summing to ``total`` (bisection on c, float64)."""
    if total <= 0:
        return [0.0] * len(shape)
    if total >= cap * len(shape):
        return [cap] * len(shape)
    lo, hi = 0.0, 1.0
    while sum(min(cap, hi * s) for s in shape) < total:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if sum(min(cap, mid * s) for s in shape) < total:
            lo = mid
        else:
            hi = mid
    return [min(cap, hi * s) for s in shape]


# --- Mutual Choice / BatchTopK ----------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_mutual_choice_keeps_exactly_the_budget_with_lowest_index_ties(data):
    x = data.draw(matrices())
    n, f = n_tokens_of(x), x.shape[-1]
    k = data.draw(budgets(n, f))
    vals = floats(x)
    kept = ref_batch_keep(vals, k, n)
    codes, tau = B.mutual_choice_select(x, k)
    assert codes.dtype == x.dtype and codes.shape == x.shape
    assert len(kept) == min(math.floor(k * n), sum(v > 0 for v in vals))
    assert kept_set(codes) == kept
    assert torch.equal(codes, torch.where(mask_of(kept, x), x, torch.zeros((), dtype=x.dtype)))
    assert torch.equal(B.batch_topk(x, k), codes)
    flat, tau_i = B.mutual_choice_indices(x, k)  # the sparse step's form: ascending row-major indices
    assert flat.tolist() == sorted(kept) and float(tau_i) == float(tau)
    if kept:
        assert float(tau) <= min(vals[i] for i in kept)
    if len(kept) == math.floor(k * n) and kept:
        assert float(tau) == min(vals[i] for i in kept)


@SETTINGS
@given(data=st.data())
def test_mutual_choice_gradient_is_the_upstream_on_kept_entries(data):
    x = data.draw(matrices(max_n=12, max_f=10, dtypes=(torch.float32,)))
    n, f = n_tokens_of(x), x.shape[-1]
    k = data.draw(budgets(n, f))
    kept = mask_of(ref_batch_keep(floats(x), k, n), x)
    up = build("normal", x.shape[:-1], f, torch.float32, seed=7)
    leaf = x.clone().requires_grad_(True)
    codes, _ = B.mutual_choice_select(leaf, k)
    (codes * up).sum().backward()
    assert torch.equal(leaf.grad, torch.where(kept, up, torch.zeros(())))


@SETTINGS
@given(data=st.data())
def test_kth_largest_equals_sorted_on_both_paths(data):
    x = data.draw(matrices(max_n=40, max_f=16))
    flat = x.reshape(-1)
    kk = data.draw(st.integers(1, flat.numel()))
    expected = sorted(floats(flat), reverse=True)[kk - 1]
    assert float(B.kth_largest(flat, kk, row_len=x.shape[-1])) == expected
    # a small sample size sends any input of > 4 * sample_size values through the estimate path
    sample = data.draw(st.integers(1, 8))
    tau, cand, idx = B.kth_largest_with_candidates(flat, kk, row_len=x.shape[-1], sample_size=sample)
    assert float(tau) == expected
    if cand is not None:
        assert torch.equal(flat[idx], cand)
        assert int((cand >= tau).sum()) == int((flat >= tau).sum())  # every entry >= tau is a candidate


@SETTINGS
@given(data=st.data())
def test_the_packages_own_reference_functions_agree_without_ties(data):
    """batch_topk_reference / signed_mutual_choice_reference / feature_choice_reference (kept for
    tests and benchmarks) on tie-free batches (distinct values: their tie order is torch.topk's)."""
    x = data.draw(matrices(dtypes=(torch.float32, torch.float64), kinds=("normal", "extreme")))
    vals = floats(x)
    nonzero = [abs(v) for v in vals if v != 0]
    if len(set(vals)) != len(vals) or len(set(nonzero)) != len(nonzero):
        return  # a tie slipped in (rounding of "extreme" values): not this test's case
    n, f = n_tokens_of(x), x.shape[-1]
    k = data.draw(budgets(n, f))
    assert kept_set(B.batch_topk_reference(x, k)) == ref_batch_keep(vals, k, n)
    assert kept_set(S.signed_mutual_choice_reference(x, k)) == ref_batch_keep(
        vals, k, n, key=abs, eligible=lambda v: v != 0
    )
    caps = data.draw(st.lists(st.integers(0, n + 2), min_size=f, max_size=f))
    ref = FC.feature_choice_reference(x, torch.tensor(caps))
    assert ref.shape == x.shape and kept_set(ref) == ref_feature_keep(vals, n, f, caps)
    assert torch.equal(ref, torch.where(mask_of(kept_set(ref), x), x, torch.zeros((), dtype=x.dtype)))


def test_kth_largest_refuses_out_of_range():
    for kk in (0, 5):
        with pytest.raises(ValueError, match=r"kk=.* must be in \[1, 4\]"):
            B.kth_largest(torch.ones(4), kk)


@SETTINGS
@given(data=st.data())
def test_keep_at_least_keeps_ties_at_tau_on_every_dtype(data):
    x = data.draw(matrices(max_n=12, max_f=12, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16)))
    vals = floats(x)
    # tau: an entry of x (a tie by construction), its neighbour, zero, or a negative number
    tau = data.draw(st.one_of(st.sampled_from(vals), st.sampled_from([0.0, -1.0, 0.5])))
    expected = (
        torch.tensor([v if (v >= tau and v > 0) else 0.0 for v in vals], dtype=torch.float64)
        .to(x.dtype)
        .reshape(x.shape)
    )
    leaf = x.clone().requires_grad_(True)
    out = B.keep_at_least(leaf, torch.tensor(tau, dtype=torch.float64))
    assert out.dtype == x.dtype and torch.equal(out.detach(), expected)
    out.sum().backward()
    assert torch.equal(leaf.grad, (expected != 0).to(x.dtype))


def test_budget_is_floor_never_round():
    # k * N with a fractional part >= 0.5: 0.5 * 3 = 1.5 -> 1 entry (SAELens's BatchTopK keeps 1)
    x = torch.tensor([[3.0], [2.0], [1.0]])
    codes, tau = B.mutual_choice_select(x, 0.5)
    assert codes.reshape(-1).tolist() == [3.0, 0.0, 0.0] and float(tau) == 3.0
    assert B.budget(0.5, 3) == 1 and B.budget(2.999, 1) == 2 and B.budget(0.75, 4) == 3


# --- signed rules ------------------------------------------------------------------------------


@SETTINGS
@given(data=st.data())
def test_signed_mutual_choice_keeps_the_budget_by_magnitude(data):
    x = data.draw(matrices())
    n, f = n_tokens_of(x), x.shape[-1]
    k = data.draw(budgets(n, f))
    vals = floats(x)
    kept = ref_batch_keep(vals, k, n, key=abs, eligible=lambda v: v != 0)
    leaf = x.clone().requires_grad_(True)
    codes, tau = S.signed_mutual_choice_select(leaf, k)
    assert len(kept) == min(math.floor(k * n), sum(v != 0 for v in vals))
    assert kept_set(codes) == kept
    mask = mask_of(kept, x)
    assert torch.equal(codes.detach(), torch.where(mask, x, torch.zeros((), dtype=x.dtype)))
    if len(kept) == math.floor(k * n) and kept:
        assert float(tau) == min(abs(vals[i]) for i in kept)
    flat, tau_i = S.signed_mutual_choice_indices(x, k)
    assert flat.tolist() == sorted(kept) and float(tau_i) == float(tau)
    codes.sum().backward()
    assert torch.equal(leaf.grad, mask.to(x.dtype))


@SETTINGS
@given(data=st.data())
def test_abs_topk_and_topk_keep_the_k_largest_per_token(data):
    x = data.draw(matrices())
    f = x.shape[-1]
    k = data.draw(st.integers(1, f))
    leaf = x.clone().requires_grad_(True)
    out = S.abs_topk(leaf, k)
    rows_x, rows_o = x.reshape(-1, f), out.detach().reshape(-1, f)
    for r in range(rows_x.shape[0]):
        vals, got = floats(rows_x[r]), floats(rows_o[r])
        ref = sorted(range(f), key=lambda j: (-abs(vals[j]), j))
        nz = [j for j in range(f) if got[j] != 0]
        assert all(got[j] == vals[j] for j in nz)  # the signed value itself
        # the kept magnitudes are the k largest (which of several tied entries is kept: torch.topk's choice)
        threshold = abs(vals[ref[k - 1]])
        assert all(abs(vals[j]) >= threshold for j in nz)
        assert sum(abs(v) > threshold for v in vals) <= len(nz) <= k
        assert sorted((abs(got[j]) for j in range(f)), reverse=True)[:k] == [abs(vals[j]) for j in ref[:k]]
    t_idx, t_keep = T.topk_indices(x, k)  # per-token TopK: the k largest values, positive ones kept
    assert torch.equal(
        x.gather(-1, t_idx).reshape(-1, k).double().sort(-1).values, x.reshape(-1, f).double().sort(-1).values[:, -k:]
    )
    assert torch.equal(t_keep, x.gather(-1, t_idx) > 0)
    idx, keep = S.abs_topk_indices(x, k)
    assert idx.shape == (*x.shape[:-1], k) and torch.equal(keep, x.gather(-1, idx) != 0)
    mags = x.abs().gather(-1, idx).reshape(-1, k).double().sort(-1, descending=True).values
    assert torch.equal(mags, x.abs().reshape(-1, f).double().sort(-1, descending=True).values[:, :k])
    out.sum().backward()
    g = leaf.grad.reshape(-1, f)
    assert bool((g.sum(-1) == k).all())  # exactly k entries pass the gradient per token (kept zeros included)
    assert bool(((rows_o != 0) <= (g == 1)).all())


# --- Feature Choice -------------------------------------------------------------------------------


@st.composite
def feature_case(draw, **kw):
    x = draw(matrices(**kw))
    n, f = n_tokens_of(x), x.shape[-1]
    caps = draw(st.lists(st.integers(0, n + 2), min_size=f, max_size=f))
    return x, caps


@SETTINGS
@given(
    case=feature_case(), est=st.sampled_from([None, 0.0, 0.5, 0.97, 1.0, 1.5, 4.0, "noise"]), seed=st.integers(0, 2**16)
)
def test_feature_choice_keeps_exactly_m_j_per_feature_with_lowest_token_ties(case, est, seed):
    x, caps = case
    n, f = n_tokens_of(x), x.shape[-1]
    vals = floats(x)
    kept = ref_feature_keep(vals, n, f, caps)
    tau_ref = ref_tau(vals, n, f, caps)
    caps_t = torch.tensor(caps)
    t_lo = None
    if est == "noise":
        t_lo = torch.randn(f, generator=torch.Generator().manual_seed(seed)).to(x.dtype)
    elif est is not None:
        t_lo = (torch.tensor(tau_ref, dtype=torch.float64) * est).nan_to_num(posinf=1e300).to(x.dtype)
    codes, tau = FC.feature_choice_select(x, caps_t, t_lo=t_lo)
    flat, tau_i = FC.feature_choice_indices(x, caps_t, t_lo=t_lo)
    assert flat.tolist() == sorted(kept) and floats(tau_i) == tau_ref
    assert codes.shape == x.shape and codes.dtype == x.dtype
    assert floats(tau) == tau_ref
    flat = codes.reshape(-1, f)
    positives = (x.reshape(-1, f) > 0).sum(0)
    assert torch.equal((flat != 0).sum(0), torch.minimum(caps_t, positives))  # exact per-feature budget
    assert kept_set(codes) == kept
    assert torch.equal(codes, torch.where(mask_of(kept, x), x, torch.zeros((), dtype=x.dtype)))


@SETTINGS
@given(case=feature_case(dtypes=(torch.float32,)), use_est=st.booleans())
def test_feature_choice_one_per_token_and_gradients(case, use_est):
    x, caps = case
    n, f = n_tokens_of(x), x.shape[-1]
    vals = floats(x)
    kept = ref_feature_keep(vals, n, f, caps)
    for i in range(n):  # a token no feature chose keeps its largest positive affinity (lowest feature on ties)
        if not any(i * f + j in kept for j in range(f)):
            row = vals[i * f : (i + 1) * f]
            best = max(range(f), key=lambda j: (row[j], -j))
            if row[best] > 0:
                kept.add(i * f + best)
    up = build("normal", x.shape[:-1], f, torch.float32, seed=11)
    leaf = x.clone().requires_grad_(True)
    t_lo = torch.tensor(ref_tau(vals, n, f, caps)).mul(0.9).nan_to_num(posinf=1e30) if use_est else None
    codes, _ = FC.feature_choice_select(leaf, torch.tensor(caps), one_per_token=True, t_lo=t_lo)
    assert kept_set(codes) == kept
    (codes * up).sum().backward()
    assert torch.equal(leaf.grad, torch.where(mask_of(kept, x), up, torch.zeros(())))


@SETTINGS
@given(case=feature_case(max_n=30), scale=st.sampled_from([0.0, 0.3, 0.9, 1.0, 1.1, 10.0]))
def test_column_thresholds_exact_with_any_estimate(case, scale):
    x, caps = case
    n, f = n_tokens_of(x), x.shape[-1]
    pre = x.reshape(n, f)
    tau_ref = ref_tau(floats(pre), n, f, caps)
    caps_t = torch.tensor(caps)
    assert floats(FC.column_thresholds(pre, caps_t)) == tau_ref
    t_lo = (torch.tensor(tau_ref, dtype=torch.float64) * scale).nan_to_num(posinf=1e300).to(x.dtype)
    tau, n_fail, n_cand = FC.column_thresholds_estimated(pre, caps_t, t_lo)
    assert floats(tau) == tau_ref
    assert 0 <= n_fail <= f and n_cand <= n * f
    # a bound at or below every tau_j needs no fallback, except for a column with fewer positive
    # values than its capacity (only a pass over the whole column can tell nothing lies below)
    if scale <= 1.0:
        positives = (pre > 0).sum(0).tolist()
        assert n_fail <= sum(1 for j in range(f) if positives[j] < caps[j] and float(t_lo[j]) > 0)
    # too loose an estimate: dense path for every feature, same result
    tau2, n_fail2, _ = FC.column_thresholds_estimated(pre, caps_t, torch.zeros(f, dtype=x.dtype), max_candidates=0)
    assert floats(tau2) == tau_ref


@settings(max_examples=EXAMPLES * 2, deadline=None, derandomize=True, database=None, phases=PHASES)
@given(
    n=st.integers(1, 300),
    f=st.integers(1, 80),
    whole=st.integers(0, 2000),
    frac=st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.999]),
    exponent=st.sampled_from([0.0, 0.3, 1.0, 2.0, 5.0, 20.0]),
    min_capacity=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_capacities_sum_exactly_fit_the_batch_and_follow_the_water_fill(
    n, f, whole, frac, exponent, min_capacity, seed
):
    k = (whole % (n * f + 1) + frac) / n
    total = math.floor(k * n)
    usage = torch.rand(f, generator=torch.Generator().manual_seed(seed))
    rank = FC.usage_rank(usage)
    # usage_rank: 0 = most used, ties by index
    assert rank.tolist() == [sorted(range(f), key=lambda j: (-float(usage[j]), j)).index(j) for j in range(f)]
    if f * min_capacity > total or (min_capacity > n):
        with pytest.raises(ValueError, match=r"min_capacity=\d+ cannot be met"):
            FC.capacities(n, k, f, rank=rank, exponent=exponent, min_capacity=min_capacity)
        return
    caps = FC.capacities(n, k, f, rank=rank, exponent=exponent, min_capacity=min_capacity)
    assert caps.dtype == torch.long and caps.shape == (f,)
    assert int(caps.sum()) == total
    assert int(caps.max()) <= n and int(caps.min()) >= min_capacity
    shape = [(float(rank[j]) + 1) ** -exponent if exponent else 1.0 for j in range(f)]
    real = ref_waterfill(shape, float(total - f * min_capacity), float(n - min_capacity))
    for j in range(f):
        assert abs(int(caps[j]) - min_capacity - real[j]) < 1 + 1e-6, (j, int(caps[j]), real[j])


def test_capacities_clip_at_the_batch_with_min_capacity():
    # a steep Zipf: the most-used features want more than the batch; with min_capacity the cap
    # must still be the batch size N (not N + min_capacity)
    caps = FC.capacities(10, 6.0, 8, rank=torch.arange(8), exponent=20.0, min_capacity=2)
    assert int(caps.sum()) == 60 and int(caps.max()) == 10 and int(caps.min()) >= 2
    assert caps.tolist() == [10, 10, 10, 10, 10, 6, 2, 2]


# --- top-AFA ---------------------------------------------------------------------------------


def ref_afa(acts: list[float], s: list[float], t: float, cap: int) -> tuple[list[float], int, bool, bool]:
    """One token: (per-m distance |c_m - t| for m = 1..F, first argmin over 1..cap (1-based),
    capped (full rule's k > cap), unambiguous)."""
    order = sorted(range(len(s)), key=lambda j: (-s[j], j))
    c, run = [], 0.0
    for j in order:
        run += s[j]
        c.append(math.sqrt(run))
    d = [abs(cm - t) for cm in c]
    k = min(range(cap), key=lambda m: (d[m], m)) + 1
    k_full = min(range(len(d)), key=lambda m: (d[m], m)) + 1
    scale = 1e-4 * (1.0 + t + c[-1])
    others = [d[m] for m in range(cap) if m != k - 1]
    clear = not others or min(others) - d[k - 1] > scale
    clear_cap = cap == len(d) or abs(d[cap] - d[cap - 1]) > scale
    return order, k, k_full > cap, clear and clear_cap


@SETTINGS
@given(
    x=matrices(max_n=10, max_f=20, max_abs=1e15, min_abs=1e-15),
    k_max=st.one_of(st.none(), st.integers(1, 24)),
    norms=st.one_of(st.none(), st.lists(st.sampled_from([0.5, 1.0, 2.0, 3.0]), min_size=20, max_size=20)),
    tseed=st.integers(0, 2**16),
)
def test_afa_select_equals_the_sorted_running_norm_rule(x, k_max, norms, tseed):
    n, f = n_tokens_of(x), x.shape[-1]
    dec = None if norms is None else torch.tensor(norms[:f])
    # s_j = (relu(a_j) * n_j)^2, in float32 (the documented key), computed with plain torch ops
    s_all = x.detach().float().clamp_min(0)
    if dec is not None:
        s_all = s_all * dec
    s_all = s_all.square().reshape(n, f)
    full = s_all.double().sum(-1).sqrt()
    t = (full * torch.rand(n, generator=torch.Generator().manual_seed(tseed), dtype=torch.float64) * 1.5).float()
    target = t.reshape(x.shape[:-1])
    leaf = x.clone().requires_grad_(True)
    sel = AFA.afa_select(leaf, target, dec, k_max=k_max)
    cap = f if k_max is None else min(k_max, f)
    codes = sel.codes.detach().reshape(n, f)
    ks = sel.k.reshape(n)
    capped = sel.capped.reshape(n)
    flat_i, k_i, capped_i = AFA.afa_indices(x, target, dec, k_max=k_max)
    assert torch.equal(k_i, sel.k.reshape(-1)) and torch.equal(capped_i, sel.capped.reshape(-1))
    by_row: dict[int, set[int]] = {}
    for v in flat_i.tolist():
        by_row.setdefault(v // f, set()).add(v % f)
    assert flat_i.tolist() == sorted(flat_i.tolist())
    ref_codes, ref_k = AFA.afa_select_reference(x, target, dec)  # the package's brute force (no cap)
    ref_codes, ref_k = ref_codes.reshape(n, f), ref_k.reshape(n)
    kept_all: set[int] = set()
    for i in range(n):
        order, k, capped_ref, clear = ref_afa(floats(x.reshape(n, f)[i]), floats(s_all[i]), float(t[i]), cap)
        assert 1 <= int(ks[i]) <= cap
        if not clear:
            continue  # two running norms within rounding of the target: either is right
        assert int(ks[i]) == k and bool(capped[i]) == capped_ref
        kept = set(order[:k])
        assert by_row.get(i, set()) == kept  # afa_indices keeps the same entries (zeros included)
        row = floats(x.reshape(n, f)[i])
        assert floats(codes[i]) == [max(row[j], 0.0) if j in kept else 0.0 for j in range(f)]
        if not capped_ref:  # the uncapped brute force agrees
            assert int(ref_k[i]) == k and floats(ref_codes[i]) == floats(codes[i])
        kept_all.update(i * f + j for j in kept if row[j] > 0)
    # gradients: the upstream gradient on kept positive entries, zero elsewhere (rows checked above)
    up = build("normal", x.shape[:-1], f, torch.float32, seed=3).to(x.dtype)
    (sel.codes * up).sum().backward()
    grad = leaf.grad.reshape(n * f)
    upf = up.reshape(-1)
    for idx in kept_all:
        assert float(grad[idx]) == float(upf[idx])


# --- gradient TopK -------------------------------------------------------------------------------


@SETTINGS
@given(
    n=st.integers(1, 12),
    f=st.integers(1, 16),
    d=st.integers(1, 6),
    beta=st.sampled_from([0.0, 0.5, 1.0, 4.0]),
    seed=st.integers(0, 2**16),
    with_grad=st.booleans(),
    three_d=st.booleans(),
    data=st.data(),
)
def test_gradient_topk_keeps_the_k_best_scores_per_token(n, f, d, beta, seed, with_grad, three_d, data):
    g = torch.Generator().manual_seed(seed)
    # small integers: every score is exact in float32, so the reference's order is the rule's
    pre = torch.randint(-3, 5, (n, f), generator=g).float()
    grad = torch.randint(-2, 3, (n, d), generator=g).float() if with_grad else None
    dec = torch.randint(-2, 3, (f, d), generator=g).float()
    k = data.draw(st.integers(1, f))
    lead = (1, n) if three_d else (n,)
    leaf = pre.reshape(*lead, f).clone().requires_grad_(True)
    out = G.gradient_topk(leaf, None if grad is None else grad.reshape(*lead, d), dec, k, beta)
    assert out.shape == leaf.shape
    rows = out.detach().reshape(n, f)
    for i in range(n):
        z = [max(v, 0.0) for v in pre[i].tolist()]
        if grad is None or beta == 0:
            score = z
        else:
            attr = [abs(sum(grad[i, c].item() * dec[j, c].item() for c in range(d))) for j in range(f)]
            score = [z[j] + beta * z[j] * attr[j] for j in range(f)]
        order = sorted(range(f), key=lambda j: (-score[j], j))
        threshold = score[order[k - 1]]
        got = rows[i].tolist()
        nz = [j for j in range(f) if got[j] != 0]
        assert all(got[j] == z[j] for j in nz)
        assert all(score[j] >= threshold for j in nz)  # only top-k scores (any of tied ones)
        assert all(got[j] == z[j] for j in range(f) if score[j] > threshold)  # every strictly better one kept
    idx, keep = G.gradient_topk_indices(
        pre.reshape(*lead, f), None if grad is None else grad.reshape(*lead, d), dec, k, beta
    )
    assert idx.shape == (*lead, k) and torch.equal(keep, pre.reshape(*lead, f).gather(-1, idx) > 0)
    chosen = idx.reshape(n, k).tolist()
    for i in range(n):
        z = [max(v, 0.0) for v in pre[i].tolist()]
        attr = (
            [abs(sum(grad[i, c].item() * dec[j, c].item() for c in range(d))) for j in range(f)]
            if grad is not None and beta
            else [0.0] * f
        )
        score = [z[j] + beta * z[j] * attr[j] for j in range(f)]
        assert sorted((score[j] for j in chosen[i]), reverse=True) == sorted(score, reverse=True)[:k]
    up = build("normal", lead, f, torch.float32, seed=5)
    (out * up).sum().backward()
    kept_pos = (leaf.grad != 0) | (out.detach() != 0)
    assert torch.equal(leaf.grad, torch.where(kept_pos & (leaf.detach() > 0), up, torch.zeros(())))
    assert bool(((out.detach() != 0) <= (leaf.grad != 0)).all())


@SETTINGS
@given(
    n=st.integers(1, 10),
    d=st.integers(1, 8),
    seed=st.integers(0, 2**16),
    mode=st.sampled_from(["none", "batch", "token"]),
)
def test_normalize_grad_matches_its_formula(n, d, seed, mode):
    grad = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if seed % 5 == 0:
        grad[0] = 0.0  # a zero row: no division by zero
    rows = grad.tolist()
    norms = [math.sqrt(sum(v * v for v in r)) for r in rows]
    if mode == "none":
        ref = rows
    elif mode == "batch":
        m = max(sum(norms) / n, 1e-12)
        ref = [[v / m for v in r] for r in rows]
    else:
        ref = [[v / max(nr, 1e-12) for v in r] for r, nr in zip(rows, norms)]
    out = G.normalize_grad(grad, mode)
    assert torch.allclose(out, torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="grad_normalization='rms'"):
        G.normalize_grad(grad, "rms")


# --- losses and helpers the architectures call (added for the mutation run: no test covered them) ---


@SETTINGS
@given(
    lead=st.sampled_from([(1,), (5,), (12,), (2, 3), (3, 4)]),
    f=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    with_norms=st.booleans(),
    keep_p=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
)
def test_afa_loss_dense_and_sparse_equal_the_formula_and_each_others_gradients(lead, f, seed, with_norms, keep_p):
    """``afa_loss = mean_tokens (||f * dec_norm|| - t)^2`` (t a constant), and ``afa_loss_sparse`` on
    the kept entries only has the same value and the same gradient, all-zero rows included."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(lead)
    keep = torch.rand(n, f, generator=g) < keep_p
    dense = torch.where(keep, torch.rand(n, f, generator=g) * 3, torch.zeros(()))
    norms = (torch.rand(f, generator=g) * 2 + 0.25) if with_norms else None
    target = torch.rand(n, generator=g) * 4
    rows_l, targets = dense.tolist(), target.tolist()
    nl = norms.tolist() if norms is not None else [1.0] * f
    ref = sum((math.sqrt(sum((v * nl[j]) ** 2 for j, v in enumerate(r))) - t) ** 2 for r, t in zip(rows_l, targets)) / n
    leaf = dense.reshape(*lead, f).clone().requires_grad_(True)
    t_leaf = target.reshape(lead).clone().requires_grad_(True)
    loss = AFA.afa_loss(leaf, t_leaf, norms)
    assert loss.shape == () and math.isclose(loss.item(), ref, rel_tol=1e-5, abs_tol=1e-6)
    loss.backward()
    assert t_leaf.grad is None or not bool(t_leaf.grad.any())  # the target is a constant
    assert bool(leaf.grad.isfinite().all())  # zero subgradient at an all-zero row
    # the sparse form: kept entries only (a kept entry may be zero)
    r, c = keep.nonzero(as_tuple=True)
    values = dense[r, c].clone().requires_grad_(True)
    t2 = target.reshape(lead).clone().requires_grad_(True)
    sparse = AFA.afa_loss_sparse(values, r, t2, None if norms is None else norms[c])
    assert sparse.shape == () and math.isclose(sparse.item(), ref, rel_tol=1e-5, abs_tol=1e-6)
    sparse.backward()
    assert t2.grad is None or not bool(t2.grad.any())
    assert torch.allclose(values.grad, leaf.grad.reshape(n, f)[r, c], rtol=1e-5, atol=1e-6)
    assert bool(values.grad.isfinite().all())


@SETTINGS
@given(n=st.integers(1, 8), f=st.integers(1, 12), seed=st.integers(0, 2**16), three_d=st.booleans(), data=st.data())
def test_topk_by_score_keeps_the_k_best_scores_with_the_codes_values(n, f, seed, three_d, data):
    g = torch.Generator().manual_seed(seed)
    k = data.draw(st.integers(1, f))
    codes = torch.rand(n, f, generator=g) + 0.5  # non-zero: every kept entry shows
    scores = torch.stack([torch.randperm(f, generator=g) for _ in range(n)]).float()  # distinct per row
    lead = (1, n) if three_d else (n,)
    out = G.topk_by_score(codes.reshape(*lead, f), scores.reshape(*lead, f), k)
    assert out.shape == (*lead, f)
    got = out.reshape(n, f).tolist()
    for i in range(n):
        best = set(sorted(range(f), key=lambda j: -float(scores[i, j]))[:k])
        assert got[i] == [float(codes[i, j]) if j in best else 0.0 for j in range(f)]


def test_batch_rules_on_empty_batches():
    """No tokens or no features: nothing kept, no error, ``tau = 0`` (documented shapes kept)."""
    for shape in ((0, 5), (3, 0), (2, 0, 4)):
        x = torch.zeros(shape)
        codes, tau = B.mutual_choice_select(x, 2.0)
        assert codes.shape == x.shape and tau.shape == () and float(tau) == 0.0
        s_codes, s_tau = S.signed_mutual_choice_select(x, 2.0)
        assert s_codes.shape == x.shape and s_tau.shape == () and float(s_tau) == 0.0


def test_keep_at_least_keeps_ties_under_a_float64_default_dtype():
    """Ties at ``tau`` are kept whatever ``torch.get_default_dtype()`` is (a float32 batch while
    the default is float64: the next float below ``tau`` must be taken in float32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        x = torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=torch.float32)
        out = B.keep_at_least(x, torch.tensor(1.0, dtype=torch.float32))
    finally:
        torch.set_default_dtype(old)
    assert out.dtype == torch.float32 and out.tolist() == [1.0, 2.0, 0.0, 1.0]


def test_column_thresholds_estimated_counts_candidates_and_fallbacks():
    """The documented ``(tau, features that needed the fallback, candidates)``: a tight bound
    needs no fallback; more candidates than ``max_candidates`` sends every feature to the dense
    path (all ``F`` counted); ``feature_choice_indices`` reports the same through ``stats`` (there a
    capacity-1 feature's bound is its column's maximum, exact)."""
    pre = torch.tensor([[3.0, 1.0], [2.0, 5.0], [1.0, 4.0]])
    caps = torch.tensor([1, 2])
    tau, n_fail, n_cand = FC.column_thresholds_estimated(pre, caps, torch.tensor([2.5, 3.5]))
    assert tau.tolist() == [3.0, 4.0] and n_fail == 0 and n_cand == 3  # candidates 3 | 5, 4
    tau, n_fail, n_cand = FC.column_thresholds_estimated(pre, caps, torch.zeros(2), max_candidates=0)
    assert tau.tolist() == [3.0, 4.0] and n_fail == 2 and n_cand == 6
    tau, n_fail, n_cand = FC.column_thresholds_estimated(pre, caps, torch.tensor([3.5, 3.5]))
    assert tau.tolist() == [3.0, 4.0] and n_fail == 1 and n_cand == 2  # column 0: bound above its tau
    stats: dict = {}
    flat, tau = FC.feature_choice_indices(pre, caps, t_lo=torch.tensor([3.5, 3.5]), stats=stats)
    assert flat.tolist() == [0, 3, 5] and tau.tolist() == [3.0, 4.0]
    # a capacity-1 feature's bound is its column's maximum (exact): column 0 needs no fallback now
    assert stats == {"fallback_features": 0, "candidates": 3}


def test_gradient_topk_uses_the_gradient_term_at_every_nonzero_beta():
    # z = [2, 1], |g . d_j| = [0, 3]: score = z + beta * z * attr = [2, 1 + 3 beta]
    pre, grad, dec = torch.tensor([[2.0, 1.0]]), torch.tensor([[3.0]]), torch.tensor([[0.0], [1.0]])
    assert G.gradient_topk(pre, grad, dec, 1, beta=0.0).tolist() == [[2.0, 0.0]]  # plain TopK
    assert G.gradient_topk(pre, grad, dec, 1, beta=1.0).tolist() == [[0.0, 1.0]]  # score 4 > 2
    assert G.gradient_topk(pre, grad, dec, 1, beta=0.25).tolist() == [[2.0, 0.0]]  # score 1.75 < 2
    assert G.gradient_topk(pre, None, dec, 1, beta=1.0).tolist() == [[2.0, 0.0]]  # no gradient: plain TopK
    idx, keep = G.gradient_topk_indices(pre, grad, dec, 1, beta=1.0)
    assert idx.tolist() == [[1]] and keep.tolist() == [[True]]


def test_gradient_topk_refuses_a_gradient_of_another_shape_naming_both():
    with pytest.raises(ValueError, match=r"^grad has leading shape \(3,\), codes \(4,\)$"):
        G.gradient_topk_indices(torch.ones(4, 5), torch.ones(3, 2), torch.ones(5, 2), 2, beta=1.0)
    with pytest.raises(ValueError, match=r"^grad has leading shape \(2, 3\), codes \(2, 4\)$"):
        G.gradient_topk(torch.ones(2, 4, 5), torch.ones(2, 3, 2), torch.ones(5, 2), 2, beta=1.0)


def test_one_per_token_adds_only_positive_affinities():
    """A token no feature chose gets its largest affinity only if that is positive: an all-zero
    or all-negative token keeps nothing (no index, no gradient)."""
    x = torch.tensor([[5.0, 1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -0.5], [0.0, 2.0, 3.0]])
    caps = torch.tensor([1, 0, 0])  # feature 0 takes token 0; tokens 1-3 chose nothing
    flat, tau = FC.feature_choice_indices(x, caps, one_per_token=True)
    assert flat.tolist() == [0, 11] and tau.tolist()[0] == 5.0  # token 3's best is feature 2
    leaf = x.clone().requires_grad_(True)
    codes, _ = FC.feature_choice_select(leaf, caps, one_per_token=True)
    codes.sum().backward()
    assert leaf.grad.reshape(-1).nonzero().squeeze(1).tolist() == [0, 11]


def test_reference_functions_break_ties_by_lowest_index_and_keep_the_budget():
    """The package's plain references (``*_reference``, used by tests and benchmarks) follow the
    documented rule on ties too: a stable sort, lowest row-major index (Feature Choice: lowest
    token) first. 200 tied entries: an unstable CPU sort orders them differently."""
    x = torch.ones(10, 20)
    x[3, 5], x[7, 1], x[8, 8] = 2.0, -1.0, 0.0
    vals, k = floats(x), 5.5  # budget floor(5.5 * 10) = 55 of ~200 tied entries
    assert kept_set(B.batch_topk_reference(x, k)) == ref_batch_keep(vals, k, 10)
    assert kept_set(S.signed_mutual_choice_reference(x, k)) == ref_batch_keep(
        vals, k, 10, key=abs, eligible=lambda v: v != 0
    )
    cols = torch.ones(200, 3)
    caps = [150, 1, 0]
    assert kept_set(FC.feature_choice_reference(cols, torch.tensor(caps))) == ref_feature_keep(
        floats(cols), 200, 3, caps
    )
    # budgets of 1, 2, 3 on one token [1, -3, 0]: by magnitude, a zero never kept
    y = torch.tensor([[1.0, -3.0, 0.0]])
    assert [S.signed_mutual_choice_reference(y, k).tolist() for k in (0.0, 1.0, 2.0, 3.0)] == [
        [[0.0, 0.0, 0.0]],
        [[0.0, -3.0, 0.0]],
        [[1.0, -3.0, 0.0]],
        [[1.0, -3.0, 0.0]],
    ]
    z = torch.tensor([[1.0, 3.0, 0.0], [2.0, -1.0, 1.0]])
    assert [kept_set(B.batch_topk_reference(z, k)) for k in (0.0, 0.5, 1.0, 2.0)] == [set(), {1}, {1, 3}, {0, 1, 3, 5}]


def test_gradient_topk_normalizes_the_gradient_as_asked_and_casts_it_to_the_decoder():
    # z = [2, 1], raw |g . d_j| = [0, 3]; beta = 0.5: raw score [2, 2.5] -> feature 1;
    # with g / ||g|| (token or batch normalisation: one token) the attribution is [0, 1]: [2, 1.5] -> feature 0
    pre, grad, dec = torch.tensor([[2.0, 1.0]]), torch.tensor([[3.0]]), torch.tensor([[0.0], [1.0]])
    assert G.gradient_topk(pre, grad, dec, 1, 0.5).tolist() == [[0.0, 1.0]]
    assert G.gradient_topk(pre, grad, dec, 1, 0.5, grad_normalization="none").tolist() == [[0.0, 1.0]]
    for mode in ("token", "batch"):
        assert G.gradient_topk(pre, grad, dec, 1, 0.5, grad_normalization=mode).tolist() == [[2.0, 0.0]]
        idx, _ = G.gradient_topk_indices(pre, grad, dec, 1, 0.5, grad_normalization=mode)
        assert idx.tolist() == [[0]]
    # the model's gradient may come in another dtype than the SAE's decoder
    for dtype in (torch.float64, torch.bfloat16):
        assert G.gradient_topk(pre, grad.to(dtype), dec, 1, 0.5).tolist() == [[0.0, 1.0]]


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
def test_keep_at_least_keeps_the_dtype_of_a_single_value(dtype):
    for v, tau, expected in ((2.0, 1.0, 2.0), (1.0, 1.0, 1.0), (0.5, 1.0, 0.0)):
        out = B.keep_at_least(torch.tensor(v, dtype=dtype), tau)
        assert out.dtype == dtype and out.shape == () and float(out) == expected


def test_afa_refuses_bad_k_max_and_mismatched_targets_with_the_fix():
    acts, target = torch.tensor([[3.0, 4.0, 1.0]]), torch.tensor([4.0])
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(
            ValueError, match=rf"^k_max={bad!r} is invalid: use an integer >= 1 \(e\.g\. 64\), or None for no cap\.$"
        ):
            AFA.afa_select(acts, target, k_max=bad)
        with pytest.raises(ValueError, match=r"k_max=.* is invalid"):
            AFA.afa_indices(acts, target, k_max=bad)
    for good in (None, 1, 2, 5):
        AFA.check_k_max(good)
        assert int(AFA.afa_select(acts, target, k_max=good).k) == 1  # c = [4, 5, 5.1]: 4 is the target
    msg = (
        r"^target has 3 entries but acts has 2 tokens: pass one target norm per token \(acts \(2, 3\), target \(3,\)\)$"
    )
    with pytest.raises(ValueError, match=msg):
        AFA.afa_select(torch.ones(2, 3), torch.ones(3))
    with pytest.raises(
        ValueError, match=r"^target has 4 entries but acts has 6 tokens: .*\(acts \(2, 3, 5\), target \(2, 2\)\)$"
    ):
        AFA.afa_indices(torch.ones(2, 3, 5), torch.ones(2, 2))


def test_afa_on_empty_batches_single_tokens_and_the_inputs_device():
    # no tokens: nothing kept, k and capped per token (none), on the input's device ("meta": no data)
    for device in ("cpu", "meta"):
        flat, k, capped = AFA.afa_indices(torch.empty(0, 5, device=device), torch.empty(0, device=device))
        assert flat.shape == (0,) and k.shape == (0,) and capped.shape == (0,)
        assert flat.dtype == k.dtype == torch.long and capped.dtype == torch.bool
        assert flat.device.type == k.device.type == capped.device.type == device
    sel = AFA.afa_select(torch.empty(2, 0, 5), torch.empty(2, 0))
    assert sel.codes.shape == (2, 0, 5) and sel.k.shape == (2, 0) and sel.k.dtype == torch.long
    # one token given as a 1-D [F] vector: s = [9, 16, 0] -> c = [4, 5, 5]; t = 4.4 -> k = 1
    sel = AFA.afa_select(torch.tensor([3.0, 4.0, -1.0]), torch.tensor(4.4))
    assert sel.codes.tolist() == [0.0, 4.0, 0.0] and sel.k.shape == () and int(sel.k) == 1
    sel = AFA.afa_select(torch.tensor([3.0, 4.0, -1.0]), torch.tensor(4.6), k_max=1)
    assert sel.codes.tolist() == [0.0, 4.0, 0.0] and bool(sel.capped)  # the full rule keeps 2


def test_afa_keys_follow_the_activations_dtype_and_match_the_brute_force_for_float64_targets():
    """``squared_contributions`` is float32 for bf16/fp16/float32 activations and float64 for
    float64 ones, whatever the decoder norms' dtype; the target is compared in that dtype, so
    ``afa_select`` equals ``afa_select_reference`` (the definition it must match) even for a
    float64 target that rounds onto the midpoint of two running norms."""
    for dtype, key in (
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ):
        s = AFA.squared_contributions(
            torch.tensor([[3.0, -1.0]], dtype=dtype), torch.tensor([2.0, 1.0], dtype=torch.float64)
        )
        assert s.dtype == key and s.tolist() == [[36.0, 0.0]]
        assert AFA.squared_contributions(torch.tensor([[3.0, -1.0]], dtype=dtype)).dtype == key
    acts = torch.tensor([[3.0, 4.0], [4.0, 3.0], [1.0, 2.0]])  # running norms [4, 5], [4, 5], [2, sqrt 5]
    target = torch.tensor([4.5 + 1e-9, 4.5 - 1e-9, 2.1], dtype=torch.float64)  # 4.5 +- 1e-9 is 4.5 in float32
    ref_codes, ref_k = AFA.afa_select_reference(acts, target)
    sel = AFA.afa_select(acts, target)
    assert sel.k.tolist() == ref_k.tolist() == [1, 1, 1] and torch.equal(sel.codes, ref_codes)
    flat, k, _ = AFA.afa_indices(acts, target)
    assert flat.tolist() == [1, 2, 5] and k.tolist() == [1, 1, 1]


def test_afa_capped_flag_at_the_cap_and_on_a_tie():
    # s sorted [16, 9, 4, 4, 1]: running norms c = [4, 5, 5.39, 5.74, 5.83]; k_max = 3
    acts = torch.tensor([[4.0, 3.0, 2.0, 2.0, 1.0]])
    for t, k_full in ((5.7, 4), (5.4, 3), (4.4, 1)):
        sel = AFA.afa_select(acts, torch.tensor([t]), k_max=3)
        assert int(sel.k) == min(k_full, 3) and bool(sel.capped) == (k_full > 3), t
        assert sel.capped.dtype == torch.bool
    # c = [4], the next running norm is 5, t = 4.5 between them: the first minimum is the full
    # rule's choice too, so the cap changed nothing
    sel = AFA.afa_select(torch.tensor([[4.0, 3.0]]), torch.tensor([4.5]), k_max=1)
    assert int(sel.k) == 1 and not bool(sel.capped)
    uncapped = AFA.afa_select(acts, torch.tensor([5.7]))
    assert int(uncapped.k) == 4 and uncapped.capped.dtype == torch.bool and not bool(uncapped.capped)


def test_capacities_give_a_single_entry_to_the_most_used_feature():
    # budget floor(0.1 * 10) = 1; Zipf shares (rank + 1)^-2 with feature 2 the most used
    caps = FC.capacities(10, 0.1, 3, rank=torch.tensor([2, 1, 0]), exponent=2.0)
    assert caps.tolist() == [0, 0, 1]
    caps = FC.capacities(10, 0.2, 3, rank=torch.tensor([1, 2, 0]), exponent=1.0)
    assert caps.tolist() == [1, 0, 1]  # shares [0.5, 0.33, 1] * 2 / 1.83: the remainder to feature 0


def test_usage_rank_breaks_ties_by_feature_index_on_large_inputs():
    usage = torch.zeros(300)  # 300 tied features: an unstable sort orders them differently
    assert FC.usage_rank(usage).tolist() == list(range(300))
    usage[150] = 1.0
    assert FC.usage_rank(usage).tolist() == list(range(1, 151)) + [0] + list(range(151, 300))


def test_normalize_grad_norms_over_the_last_dimension_of_3d_gradients():
    g = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])  # [B=1, T=2, d=2]: token norms 5 and 2
    assert torch.allclose(G.normalize_grad(g, "token"), torch.tensor([[[0.6, 0.8], [0.0, 1.0]]]))
    assert torch.allclose(G.normalize_grad(g, "batch"), g / 3.5)


def test_kth_largest_estimate_keeps_every_tie_and_falls_back_when_the_sample_misses():
    """The estimate path (a strided sample, here of one value, ``sample_size=1``): with ties at
    the sampled bound every entry ``>= tau`` is still a candidate (blocks, and the tail past the
    last whole block of 32); a sample above the kk-th value triggers the exact fallback, whose
    candidates again include every entry tied with ``tau``."""
    flat = torch.ones(200)  # 6 blocks of 32 + a tail of 8; the one sampled value is flat[100] = 1
    flat[torch.tensor([3, 50, 90, 120, 150])] = 2.0
    tau, cand, idx = B.kth_largest_with_candidates(flat, 10, sample_size=1)
    assert float(tau) == 1.0 and idx.tolist() == list(range(200)) and torch.equal(cand, flat)
    assert float(B.kth_largest(flat, 10, sample_size=1)) == 1.0 and float(B.kth_largest(flat, 5, sample_size=1)) == 2.0
    # the sampled value (flat[100] = 100) is above the 3rd largest: fallback to a full topk
    spiky = torch.zeros(200)
    spiky[100], spiky[torch.tensor([3, 7, 150, 199])] = 100.0, 5.0
    tau, cand, idx = B.kth_largest_with_candidates(spiky, 2, sample_size=1)
    assert float(tau) == 5.0 and idx.tolist() == [3, 7, 100, 150, 199] and cand.tolist() == [5.0, 5.0, 100.0, 5.0, 5.0]
    tau, cand, idx = B.kth_largest_with_candidates(spiky, 6, sample_size=1)  # tau = 0: every entry
    assert float(tau) == 0.0 and idx.tolist() == list(range(200)) and torch.equal(cand, spiky)
    flat, tau_mc = B.mutual_choice_indices(spiky.reshape(20, 10), 0.1)  # budget 2 of 5 tied at 5: lowest index
    assert flat.tolist() == [3, 100] and float(tau_mc) == 5.0


def test_largest_remainder_rounding_sums_to_the_total_in_both_directions():
    """``capacities``' rounding step: integers in ``[0, cap]`` summing to ``total``, each within 1
    of its real share; the largest remainders get the +1s, the smallest give the -1s (ties:
    lowest feature first)."""
    rnd = FC._round_largest_remainder
    assert rnd(torch.tensor([0.5, 1.7, 0.8], dtype=torch.double), 3, 5).tolist() == [0, 2, 1]  # +1 to 0.8
    assert rnd(torch.tensor([0.5, 0.5, 2.0], dtype=torch.double), 3, 5).tolist() == [1, 0, 2]  # tie: lowest index
    assert rnd(torch.tensor([2.0, 2.0, 1.3], dtype=torch.double), 4, 5).tolist() == [
        1,
        2,
        1,
    ]  # -1 from the smallest remainders
    assert rnd(torch.tensor([3.0, 3.0, 0.0], dtype=torch.double), 4, 3).tolist() == [
        2,
        2,
        0,
    ]  # -1s skip an empty feature
    assert rnd(torch.tensor([5.0, 0.6, 0.4], dtype=torch.double), 5, 4).tolist() == [4, 1, 0]  # clipped at cap first
    out = rnd(torch.tensor([2.9999999995, 1.0000000005], dtype=torch.double), 4, 5)
    assert out.dtype == torch.long and out.tolist() == [3, 1]  # within 1e-9 of an integer counts as it


def test_afa_loss_sparse_in_float64_with_kept_zeros_and_on_the_inputs_device():
    # token 0 keeps a zero code (its norm is 0: zero subgradient, no NaN), token 1 keeps [3, 4], token 2 nothing
    values = torch.tensor([0.0, 3.0, 4.0], dtype=torch.float64, requires_grad=True)
    rows, target = torch.tensor([0, 1, 1]), torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64)
    loss = AFA.afa_loss_sparse(values, rows, target)
    assert loss.dtype == torch.float64 and math.isclose(loss.item(), (1.0 + 1.0 + 4.0) / 3, rel_tol=1e-12)
    loss.backward()
    assert torch.allclose(
        values.grad,
        torch.tensor([0.0, 2 * (5 - 4) * 3 / 5 / 3, 2 * (5 - 4) * 4 / 5 / 3], dtype=torch.float64),
        rtol=1e-12,
        atol=0,
    )
    dense = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    assert math.isclose(AFA.afa_loss(dense, target).item(), loss.item(), rel_tol=1e-12)
    meta = AFA.afa_loss_sparse(
        torch.ones(3, device="meta"), torch.zeros(3, dtype=torch.long, device="meta"), torch.ones(2, device="meta")
    )
    assert meta.device.type == "meta" and meta.shape == ()


def test_mutual_choice_on_a_single_value_and_a_single_token():
    flat, tau = B.mutual_choice_indices(torch.tensor(2.0), 1.0)  # a 0-d affinity: one token, one feature
    assert flat.tolist() == [0] and float(tau) == 2.0
    codes, tau = B.mutual_choice_select(torch.tensor([3.0, 1.0, 2.0]), 2.0)  # 1-D: one token of 3 features
    assert codes.tolist() == [3.0, 0.0, 2.0] and float(tau) == 2.0


def test_estimated_selection_statistics_follow_the_documented_counts():
    pre = torch.tensor([[3.0, 1.0, 9.0], [2.0, 5.0, 8.0], [1.0, 4.0, 7.0]])
    # feature 2 has capacity 0: its column is never a candidate; a capacity above N is N
    tau, n_fail, n_cand = FC.column_thresholds_estimated(pre, torch.tensor([1, 5, 0]), torch.tensor([2.5, 0.5, 0.5]))
    assert tau.tolist() == [3.0, 1.0, math.inf] and n_fail == 0 and n_cand == 4  # 3 | 1, 5, 4
    # a float64 bound is taken in the affinities' dtype (3.0000000001 is 3.0 in float32)
    t64 = torch.tensor([3.0000000001, 4.0 - 1e-10, 0.0], dtype=torch.float64)
    tau, n_fail, n_cand = FC.column_thresholds_estimated(pre, torch.tensor([1, 2, 0]), t64)
    assert tau.tolist() == [3.0, 4.0, math.inf] and n_fail == 0 and n_cand == 3
    # exactly max_candidates candidates is not "more than": no dense fallback
    tau, n_fail, n_cand = FC.column_thresholds_estimated(
        pre, torch.tensor([1, 2, 0]), torch.tensor([2.5, 3.5, 0.0]), max_candidates=3
    )
    assert tau.tolist() == [3.0, 4.0, math.inf] and n_fail == 0 and n_cand == 3
    # feature_choice_select passes t_lo and stats through; a bound far too loose goes dense
    stats: dict = {}
    codes, tau = FC.feature_choice_select(pre, torch.tensor([1, 2, 0]), t_lo=torch.tensor([3.5, 3.5, 0.0]), stats=stats)
    assert stats == {"fallback_features": 0, "candidates": 3} and codes.reshape(-1).nonzero().squeeze(1).tolist() == [
        0,
        4,
        7,
    ]
    stats = {}
    flat, _ = FC.feature_choice_indices(torch.ones(5000, 1), torch.tensor([1]), t_lo=torch.zeros(1), stats=stats)
    assert flat.tolist() == [0] and stats == {"fallback_features": 1, "candidates": 5000}


def test_capacities_errors_name_the_batch_size_needed_and_uniform_without_a_rank():
    with pytest.raises(
        ValueError,
        match=r"budget of floor\(k \* N\) = 5 entries, less than d_sae \* min_capacity = 8\. Use batches of at least 16 tokens",
    ):
        FC.capacities(10, 0.5, 4, min_capacity=2)
    with pytest.raises(ValueError, match=r"Use batches of at least inf tokens"):
        FC.capacities(10, 0.0, 4, min_capacity=1)
    assert FC.capacities(10, 1.0, 4, exponent=2.0).tolist() == [
        3,
        3,
        2,
        2,
    ]  # no rank: uniform, remainder to the lowest index
    assert FC.capacities(10, 1.0, 4, rank=torch.tensor([3, 2, 1, 0])).tolist() == [
        3,
        3,
        2,
        2,
    ]  # exponent 0 by default: uniform
    caps = FC.capacities(10, 10.0, 200)  # 100 entries for 200 features: 0.5 each, all tied
    assert caps.tolist() == [1] * 100 + [0] * 100


def test_largest_remainder_rounding_down_skips_empty_features_and_breaks_ties_by_index():
    rnd = FC._round_largest_remainder
    assert rnd(torch.tensor([2.5, 2.5, 0.0], dtype=torch.double), 3, 5).tolist() == [1, 2, 0]
    assert rnd(torch.tensor([1.0, 2.4], dtype=torch.double), 2, 5).tolist() == [0, 2]
    assert rnd(torch.ones(200, dtype=torch.double), 100, 5).tolist() == [0] * 100 + [1] * 100
