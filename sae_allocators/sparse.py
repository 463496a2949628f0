"""The sparse training hot path: one dense encoder matmul, everything after it sparse.

Every allocation rule of this project ends in the same place: a set of kept ``(token, feature)``
entries of the ``[N, F]`` pre-activation matrix, about ``k * N`` of them. After the encoder
matmul, a training step only needs those entries:

- :class:`Selection` -- the kept entries as two index vectors ``rows`` / ``cols`` (sorted by
  token), what every rule hands over;
- :func:`dense_pre` -- the encoder matmul, computed once, *without* autograd (the floor every SAE
  pays);
- :func:`selected_values` -- the kept pre-activations as a differentiable ``[M]`` vector: an
  autograd Function whose backward touches only the kept entries (gradients of ``W_enc``,
  ``b_enc``, the input -- or only its shift, see :func:`selected_values` -- and the decoder norms
  when ``rescale_acts_by_decoder_norm``);
- :func:`decoder_norms` -- ``W_dec.norm(dim=-1)`` with torch's own gradient, built in one
  ``[F, d]`` buffer instead of two;
- :func:`decode` -- ``sum_j v_j W_dec[j]`` per token as one ``F.embedding_bag`` (variable
  numbers per token through ``offsets``); its autograd gives ``W_dec`` and the values their
  gradients.

The shapes follow EleutherAI sparsify's ``fused_encoder.py`` (the encoder Function) and
``utils.eager_decode`` (the ``embedding_bag`` decoder). Unlike sparsify's, the encoder backward
never materialises a ``[M, d]`` product: the ``W_enc`` gradient is itself an ``embedding_bag``
over the kept entries grouped by feature. Nothing here syncs with the host or names a device.

The plain fallback is the dense path (:func:`dense_codes`, SAELens's ``x @ W_dec`` decode), kept
by every architecture as the reference (``sparse_step=False``) and checked against this one by
the equivalence tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Selection:
    """Kept entries of an ``[N, F]`` matrix: ``rows`` (token index, non-decreasing) and ``cols``.

    ``offsets`` (``[N + 1]``) are the bag boundaries: token n's entries are
    ``offsets[n]:offsets[n + 1]`` (``embedding_bag``'s ``include_last_offset`` form); a token with
    no entry has an empty bag. ``tau`` is whatever threshold(s) the rule determined (``None`` for
    per-token rules): a 0-d tensor (batch rules) or ``[F]`` (Feature Choice). ``info`` holds a
    rule's other by-products (top-AFA's per-token ``k``, for its metrics).
    """

    rows: torch.Tensor
    cols: torch.Tensor
    n_tokens: int
    n_features: int
    offsets: torch.Tensor
    tau: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    @property
    def flat(self) -> torch.Tensor:
        """Indices into the row-major flattened ``[N, F]`` matrix."""
        return self.rows * self.n_features + self.cols

    def __len__(self) -> int:
        return self.rows.numel()

    def to_dense(self, values: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[N, F]`` with ``values`` at the kept entries, zeros elsewhere (one scatter)."""
        out = values.new_zeros(self.n_tokens * self.n_features, dtype=dtype or values.dtype)
        out.index_put_((self.flat,), values.to(out.dtype))
        return out.view(self.n_tokens, self.n_features)

    def to_sparse_coo(self, values: torch.Tensor, lead_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """A sparse COO tensor ``[*lead_shape, F]`` (default ``[N, F]``) with ``values`` at the kept
        entries: the dense matrix of :meth:`to_dense` without its ``N x F`` zeros (``to_dense()`` of
        it equals :meth:`to_dense`)."""
        lead = (self.n_tokens,) if lead_shape is None else tuple(lead_shape)
        if len(lead) == 1:
            index = [self.rows]
        else:
            index = list(torch.unravel_index(self.rows, lead))
        indices = torch.stack([*index, self.cols])
        return torch.sparse_coo_tensor(
            indices, values, (*lead, self.n_features), device=values.device, check_invariants=False
        )

    def tokens_per_row(self) -> torch.Tensor:
        """How many entries each token kept (``[N]``, long)."""
        return torch.bincount(self.rows, minlength=self.n_tokens)


def _offsets_from_rows(rows: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``[n_tokens + 1]`` bag boundaries (``embedding_bag``'s ``include_last_offset`` form)."""
    counts = torch.bincount(rows, minlength=n_tokens)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def from_flat(
    flat: torch.Tensor,
    n_tokens: int,
    n_features: int,
    tau: torch.Tensor | None = None,
    *,
    is_sorted: bool = False,
    info: dict | None = None,
) -> Selection:
    """A :class:`Selection` from flat row-major indices (sorted here unless ``is_sorted``)."""
    if not is_sorted:
        flat = torch.sort(flat).values
    rows = torch.div(flat, n_features, rounding_mode="floor")
    return Selection(
        rows, flat - rows * n_features, n_tokens, n_features, _offsets_from_rows(rows, n_tokens), tau, info or {}
    )


def from_row_indices(
    indices: torch.Tensor, n_features: int, keep: torch.Tensor | None = None, tau: torch.Tensor | None = None
) -> Selection:
    """A :class:`Selection` from per-token column indices ``[N, j]`` (e.g. ``torch.topk``'s), keeping
    only the entries where ``keep`` (``[N, j]`` bool) is True when given."""
    n, j = indices.shape
    rows = torch.arange(n, device=indices.device).repeat_interleave(j)
    cols = indices.reshape(-1)
    if keep is None:
        offsets = torch.arange(0, n * j + 1, j, device=indices.device)
        return Selection(rows, cols, n, n_features, offsets, tau)
    mask = keep.reshape(-1)
    rows, cols = rows[mask], cols[mask]
    return Selection(rows, cols, n, n_features, _offsets_from_rows(rows, n), tau)


def encoder_pre(
    sae_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, dec_norm: torch.Tensor | None
) -> torch.Tensor:
    """``(sae_in @ W_enc + b_enc) [* dec_norm]`` with autograd (the dense reference path): the
    same operations, hence the same numbers, as :func:`dense_pre`. The decoder norms are folded
    into ``W_enc`` and ``b_enc`` before the matmul (``F d`` multiplications instead of ``N F``),
    which is also how the saved inference model computes it (norms folded on save)."""
    if dec_norm is None:
        return torch.addmm(b_enc, sae_in, W_enc)
    return torch.addmm(b_enc * dec_norm, sae_in, W_enc * dec_norm)


def dense_pre(
    sae_in: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, dec_norm: torch.Tensor | None
) -> torch.Tensor:
    """:func:`encoder_pre` without autograd (the sparse path's one dense matmul)."""
    with torch.no_grad():
        return encoder_pre(sae_in, W_enc, b_enc, dec_norm)


def _bag_sum(indices: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[b] = sum_{i in bag b} weights[i] * table[indices[i]]`` (``offsets`` of length bags + 1)."""
    return F.embedding_bag(
        indices, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype), include_last_offset=True
    )


class _SelectedValues(torch.autograd.Function):
    """Forward: ``pre[rows, cols]`` from the precomputed dense pre-activations.
    Backward: only the kept entries contribute (``O(M d)`` work instead of ``O(N F d)``)."""

    @staticmethod
    def forward(ctx, sae_in, W_enc, b_enc, dec_norm, pre, rows, cols, offsets, shift):  # noqa: ANN001
        values = pre.view(-1).index_select(0, rows * pre.shape[1] + cols)
        ctx.save_for_backward(sae_in, W_enc, dec_norm, values, rows, cols, offsets)
        ctx.n_features = pre.shape[1]
        ctx.b_enc_dtype = b_enc.dtype
        ctx.shift_dtype = shift.dtype if shift is not None else None
        return values

    @staticmethod
    def backward(ctx, grad_values):  # noqa: ANN001
        sae_in, W_enc, dec_norm, values, rows, cols, offsets = ctx.saved_tensors
        f = ctx.n_features
        grad_dec_norm = None
        g = grad_values
        if dec_norm is not None:
            norm_sel = dec_norm.index_select(0, cols)
            if ctx.needs_input_grad[3]:
                # d value / d norm_j = raw pre-activation = value / norm_j
                contrib = g * values / norm_sel
                grad_dec_norm = torch.zeros(f, dtype=dec_norm.dtype, device=dec_norm.device).index_add_(
                    0, cols, contrib.to(dec_norm.dtype)
                )
            g = g * norm_sel
        grad_in = grad_W = grad_b = grad_shift = None
        if ctx.needs_input_grad[0]:  # (embedding_bag needs a contiguous table: W_enc^T is copied once)
            grad_in = _bag_sum(cols, W_enc.t().contiguous(), offsets, g).to(sae_in.dtype)
        if ctx.needs_input_grad[1]:
            order = torch.argsort(cols, stable=True)
            grad_W = _bag_sum(
                rows.index_select(0, order),
                sae_in.to(W_enc.dtype).contiguous(),
                _offsets_from_rows(cols.index_select(0, order), f),
                g.index_select(0, order),
            ).t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(f, dtype=ctx.b_enc_dtype, device=g.device).index_add_(0, cols, g.to(ctx.b_enc_dtype))
        if ctx.needs_input_grad[8]:
            # the input is (constant - shift): its gradient summed over tokens, negated,
            # -sum_n sum_{j kept at n} g_nj W_enc[:, j] = -W_enc @ (g summed per feature)
            if grad_b is not None and grad_b.dtype == W_enc.dtype:
                per_feature = grad_b  # the same sum
            else:
                per_feature = torch.zeros(f, dtype=W_enc.dtype, device=g.device).index_add_(0, cols, g.to(W_enc.dtype))
            grad_shift = torch.mv(W_enc, per_feature).neg_().to(ctx.shift_dtype)
        return grad_in, grad_W, grad_b, grad_dec_norm, None, None, None, None, grad_shift


def selected_values(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    dec_norm: torch.Tensor | None,
    pre: torch.Tensor,
    sel: Selection,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """The kept pre-activations ``pre[sel]`` ``[M]``, differentiable in ``sae_in``, ``W_enc``,
    ``b_enc`` and ``dec_norm`` exactly as ``((sae_in @ W_enc + b_enc) * dec_norm)[sel]`` would be.

    ``shift`` (``[d]``, optional): the input is ``u - shift`` with ``u`` carrying no gradient (SAELens's
    ``x - b_dec``); pass ``sae_in`` without autograd and the shift with it. The shift's gradient is
    then ``-W_enc @ (the kept gradients summed per feature)``, one matrix-vector product, instead of the
    ``[N, d]`` input gradient, which needs a transposed copy of ``W_enc`` (the same value; the sum over
    tokens runs in another order)."""
    return _SelectedValues.apply(sae_in, W_enc, b_enc, dec_norm, pre, sel.rows, sel.cols, sel.offsets, shift)


def gather_values(
    sae_in: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    dec_norm: torch.Tensor | None,
    pre: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`selected_values` for arbitrary ``(rows, cols)`` with ``rows`` non-decreasing."""
    return _SelectedValues.apply(
        sae_in, W_enc, b_enc, dec_norm, pre, rows, cols, _offsets_from_rows(rows, pre.shape[0]), shift
    )


class _RowNorms(torch.autograd.Function):
    """``W.norm(dim=-1)``; backward: torch's formula for the 2-norm, ``g * (W / n)`` with rows of zero
    norm set to 0, the same floats (``tests/architectures/test_sparse_step.py``) written in place into
    one ``[F, d]`` buffer, where autograd's formula allocates a second one for the product."""

    @staticmethod
    def forward(ctx, W):  # noqa: ANN001
        norms = W.norm(dim=-1)
        ctx.save_for_backward(W, norms)
        return norms

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        W, norms = ctx.saved_tensors
        n = norms.unsqueeze(-1)
        out = W / n
        out.masked_fill_(n == 0, 0)
        return out.mul_(grad.unsqueeze(-1))


def decoder_norms(W_dec: torch.Tensor) -> torch.Tensor:
    """``[F]`` row norms of ``W_dec``, differentiable: ``W_dec.norm(dim=-1)``, the same values and the same
    gradient (see :class:`_RowNorms`)."""
    return _RowNorms.apply(W_dec)


def decode(values: torch.Tensor, sel: Selection, W_dec: torch.Tensor) -> torch.Tensor:
    """``[N, d]``: per token ``sum_j values_j * W_dec[cols_j]`` (no bias), one ``embedding_bag``.

    The same numbers as ``sel.to_dense(values) @ W_dec`` up to summation order; ``W_dec`` and
    ``values`` get their gradients from ``embedding_bag``'s autograd.
    """
    return _bag_sum(sel.cols, W_dec, sel.offsets, values)


def keep_flat(flat: torch.Tensor, kept: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """Zeros shaped like the 1-D ``flat``, holding ``values`` (default: ``flat``'s own entries) at the
    flat indices ``kept``: one scatter, differentiable in ``flat`` / ``values``. Every rule's dense
    codes are this, from its kept row-major indices."""
    return flat.new_zeros(flat.shape).index_put((kept,), flat.index_select(0, kept) if values is None else values)


def dense_codes(hidden_pre: torch.Tensor, sel: Selection) -> torch.Tensor:
    """The dense reference: ``hidden_pre`` at the kept entries, zeros elsewhere, differentiable in
    ``hidden_pre`` (the plain path every sparse computation here is tested against)."""
    return keep_flat(hidden_pre.reshape(-1), sel.flat).view(sel.n_tokens, sel.n_features)
