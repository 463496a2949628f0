"""top-AFA allocation (Lee et al. 2025, arXiv 2503.24277; reference code SewoongLee/top-afa-sae, MIT).

Per token, with affinities ``a = relu(pre)``, decoder-row norms ``n`` and the
target norm ``t = ||x - b_dec||``:

1. ``s_j = (a_j * n_j)^2``, the squared norm of feature j's contribution to the reconstruction;
2. sort ``s`` in descending order and take the running norm ``c_m = sqrt(s_(1) + ... + s_(m))``;
3. keep the first ``k`` sorted features, ``k = argmin_m |c_m - t|`` (the first such m; m >= 1).

Rows are independent, so the rule is the same at training and inference time.

The full rule sorts all F values per token. :func:`afa_select` sorts only the top
``k_max + 1`` (one ``torch.topk``): ``c_m`` for ``m <= k_max`` depends only on the ``k_max``
largest values, so whenever the full rule's ``k <= k_max`` the result is *exactly* the full
rule's. The extra (``k_max + 1``)-th value certifies it: since ``c`` is non-decreasing,
``|c_m - t|`` falls then rises, and the full rule can only pick ``m > k_max`` when
``|c_(k_max+1) - t| < |c_(k_max) - t|`` -- those tokens are flagged in ``capped``.

Ties: features with equal ``s`` are ordered by feature index (lowest first), in both
:func:`afa_select` and :func:`afa_select_reference`, so "the first k" is always well defined.
(The reference code's ``argsort`` leaves that order unspecified.)

Divergences from the reference code (``TopAFASAE.forward`` in ``training/sae.py``), all
documented in docs/top_afa.md: the reference overwrites the last running norm with ``1e8`` so
that ``k = F`` is never chosen; here ``k`` ranges over ``1..min(F, k_max)`` -- the two agree
unless keeping *every* feature is closest to the target. ``k >= 1`` always, as in the
reference: a token with ``t = 0`` or with all affinities 0 keeps one feature (whose code may be 0).

Everything here is a pure tensor function: no SAELens import, no host sync except one
``bool(any)`` when ties sit exactly at a token's cut-off.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from sae_allocators.sparse import keep_flat


class AFASelection(NamedTuple):
    """Result of :func:`afa_select` (leading dimensions of the input restored)."""

    #: the kept affinities, zeros elsewhere; same shape and dtype as ``acts``; differentiable
    codes: torch.Tensor
    #: per token, how many features the rule kept (long, in ``1..min(F, k_max)``)
    k: torch.Tensor
    #: per token, True where the cap changed the result (the full rule would keep more)
    capped: torch.Tensor


def squared_contributions(acts: torch.Tensor, dec_norm: torch.Tensor | None = None) -> torch.Tensor:
    """``(relu(acts) * dec_norm)^2`` in float32 or wider, detached (the sort key of the rule)."""
    s = acts.detach().clamp_min(0)
    if s.dtype not in (torch.float32, torch.float64):
        s = s.float()
    if dec_norm is not None:
        s = s * dec_norm.detach().to(s.dtype)
    return s.square_()


def _flatten(acts: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = acts.shape[-1]
    a = acts.reshape(-1, f)
    t = target.reshape(-1)
    if t.shape[0] != a.shape[0]:
        raise ValueError(
            f"target has {t.shape[0]} entries but acts has {a.shape[0]} tokens: pass one target norm "
            f"per token (acts {tuple(acts.shape)}, target {tuple(target.shape)})"
        )
    return a, t


def check_k_max(k_max: int | None) -> None:
    if k_max is not None and (isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1):
        raise ValueError(f"k_max={k_max!r} is invalid: use an integer >= 1 (e.g. 64), or None for no cap.")


def afa_select(
    acts: torch.Tensor,
    target: torch.Tensor,
    dec_norm: torch.Tensor | None = None,
    k_max: int | None = None,
) -> AFASelection:
    """The top-AFA selection with an optional cap ``k_max`` (see the module docstring).

    Args:
        acts: affinities ``[..., F]``: pre-activations; negative entries count as 0 (the ReLU is
            applied here, to the kept entries only, which is cheaper than a full ReLU).
        target: ``[...]`` per-token target norm ``||x - b_dec||``.
        dec_norm: ``[F]`` norms of the decoder rows as the decode applies them (``None``: all 1).
        k_max: keep at most this many features per token (``None``: no cap, a full sort).

    Returns:
        :class:`AFASelection` ``(codes, k, capped)``. ``codes`` is differentiable in ``acts``
        (the selection itself is not).
    """
    shape = acts.shape
    a = acts.reshape(-1, shape[-1])
    kept, k, capped = afa_indices(acts, target, dec_norm, k_max)
    flat = a.reshape(-1)
    codes = keep_flat(flat, kept, flat.index_select(0, kept).relu())
    return AFASelection(codes.reshape(shape), k.reshape(shape[:-1]), capped.reshape(shape[:-1]))


def afa_indices(
    acts: torch.Tensor,
    target: torch.Tensor,
    dec_norm: torch.Tensor | None = None,
    k_max: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-AFA selection as ``(flat, k, capped)``: ascending row-major indices (leading
    dimensions flattened into tokens) of the kept entries, and per token (flat ``[N]``) how
    many features the rule kept and whether the cap changed the result. A kept entry may have
    a non-positive affinity (its code is then 0); arguments as :func:`afa_select`."""
    check_k_max(k_max)
    n_feat = acts.shape[-1]
    a, t = _flatten(acts, target)
    n_tok = a.shape[0]
    if n_tok == 0 or n_feat == 0:
        zeros = torch.zeros(n_tok, dtype=torch.long, device=acts.device)
        return zeros[:0], zeros, zeros.bool()
    cap = n_feat if k_max is None else min(k_max, n_feat)
    with torch.no_grad():
        n_sorted = min(cap + 1, n_feat)
        if dec_norm is None:
            # (relu a)^2 is non-decreasing in a: rank a itself and square only the top values (no
            # full pass). Values whose squares round to equal are ties of s, caught below.
            v, idx = a.detach().topk(n_sorted, dim=-1, sorted=True)
            v = squared_contributions(v)
        else:
            v, idx = squared_contributions(a, dec_norm).topk(n_sorted, dim=-1, sorted=True)
        c = v[:, :cap].cumsum(-1).sqrt()
        tt = t.detach().to(c.dtype)[:, None]
        k = (c - tt).abs().argmin(dim=-1) + 1  # [N] in 1..cap (first minimum)
        if n_sorted > cap:  # the (cap+1)-th value tells whether the full rule would go further
            c_next = (c[:, -1].square() + v[:, cap]).sqrt()
            capped = (c_next - tt[:, 0]).abs() < (c[:, -1] - tt[:, 0]).abs()
        else:
            capped = torch.zeros(n_tok, dtype=torch.bool, device=a.device)
        keep = torch.arange(cap, device=a.device)[None, :] < k[:, None]
        # a tie across the cut-off: which of the tied features is kept must not depend on topk's order
        v_k = v.gather(-1, (k - 1)[:, None]).squeeze(-1)
        if n_sorted > cap:
            v_after = v.gather(-1, k[:, None]).squeeze(-1)
        else:
            v_after = torch.where(
                k < n_feat, v.gather(-1, k.clamp(max=n_feat - 1)[:, None]).squeeze(-1), torch.full_like(v_k, -1.0)
            )
        tie = v_after == v_k
        rows = torch.arange(n_tok, device=a.device)[:, None]
        if bool(tie.any()):
            keep &= ~tie[:, None]
            tie_rows = tie.nonzero().squeeze(1)
            s_rows = squared_contributions(a.index_select(0, tie_rows), dec_norm)
            mask = _lowest_index_prefix_mask(s_rows, v_k.index_select(0, tie_rows), k.index_select(0, tie_rows))
            r, col = mask.nonzero(as_tuple=True)
            flat = torch.cat([(rows * n_feat + idx[:, :cap])[keep], tie_rows[r] * n_feat + col])
        else:
            flat = (rows * n_feat + idx[:, :cap])[keep]
    return torch.sort(flat).values, k, capped


def _lowest_index_prefix_mask(s: torch.Tensor, v_k: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rows of ``s``: keep every entry ``> v_k`` and, of those ``== v_k``, the lowest-index ones
    until ``k`` entries are kept (the descending order with ties broken by index)."""
    above = s > v_k[:, None]
    need = k - above.sum(-1)
    eq = s == v_k[:, None]
    return above | (eq & (eq.cumsum(-1) <= need[:, None]))


def afa_select_reference(
    acts: torch.Tensor, target: torch.Tensor, dec_norm: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute force: a full stable sort per token (ties: lowest index first); returns ``(codes, k)``.

    Slow (O(F log F) per token); for tests and as the definition :func:`afa_select` must match.
    """
    shape = acts.shape
    a, t = _flatten(acts, target)
    s = squared_contributions(a, dec_norm)
    sorted_s, order = torch.sort(s, dim=-1, descending=True, stable=True)
    c = sorted_s.cumsum(-1).sqrt()
    k = (c - t.to(c.dtype)[:, None]).abs().argmin(dim=-1) + 1
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(s.shape[-1], device=s.device).expand_as(order).contiguous())
    mask = rank < k[:, None]
    return (a.relu() * mask.to(a.dtype)).reshape(shape), k.reshape(shape[:-1])


def afa_loss(
    feature_acts: torch.Tensor, target_norm: torch.Tensor, dec_norm: torch.Tensor | None = None
) -> torch.Tensor:
    """``mean_tokens (||f ⊙ dec_norm|| - target_norm)^2`` (the AFA loss before its coefficient).

    ``target_norm`` is ``[...]`` (one per token) and treated as a constant. The gradient is finite
    for all-zero code rows (``torch.linalg.vector_norm`` has a zero subgradient at 0).
    """
    f = feature_acts if dec_norm is None else feature_acts * dec_norm
    return (torch.linalg.vector_norm(f, dim=-1) - target_norm.detach()).square().mean()


def afa_loss_sparse(
    values: torch.Tensor, rows: torch.Tensor, target_norm: torch.Tensor, dec_norm: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`afa_loss` on kept codes only: ``values`` ``[M]`` of tokens ``rows`` (each token's
    code vector is zero elsewhere), ``target_norm`` ``[N]``, ``dec_norm`` ``[M]`` (the kept
    features' decoder norms, or None). Same value and gradients as the dense form, including the
    zero subgradient of an all-zero code row."""
    f = values if dec_norm is None else values * dec_norm
    t = target_norm.detach().reshape(-1)
    sq = torch.zeros(t.shape[0], dtype=f.dtype, device=f.device).index_add_(0, rows, f.square())
    pos = sq > 0
    norm = torch.where(pos, sq, torch.ones_like(sq)).sqrt() * pos
    return (norm - t.to(norm.dtype)).square().mean()
