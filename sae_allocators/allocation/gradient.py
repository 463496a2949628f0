"""Gradient TopK (g-SAE, Olmo et al. 2024, arXiv 2411.10397): per-token top-k of a gradient-aware score.

The score of feature ``j`` at a token with codes ``z`` (ReLU'd pre-activations) and loss gradient
``g = dL/dx`` is::

    score_j = z_j + beta * z_j * |g . d_j|

where ``d_j`` is feature ``j``'s decoder direction per unit of code (a row of ``W_dec``; the
unit-normalised row when the SAE treats its decoder as normalised). ``g . d_j`` is ``dL/dz_j``, so
the second term is the first-order change of the loss if the feature were switched off. The k
largest scores are kept and the kept entries take their values from ``z`` (not from the score).
With ``beta = 0`` or no gradient, this is plain TopK.

Pure tensor functions: no SAELens, any device, leading dimensions flattened and restored.
"""

from __future__ import annotations

import warnings

import torch

from sae_allocators import devices
from sae_allocators.allocation.topk import row_topk_by_blocks

GRAD_NORMALIZATIONS = ("none", "batch", "token")


def normalize_grad(grad: torch.Tensor, mode: str, eps: float = 1e-12) -> torch.Tensor:
    """Rescale the gradient before it enters the score.

    - ``"none"``: ``g`` as the model gives it (the literal formula; ``beta`` then has the units of
      1/|g| and must be tuned per model and hook).
    - ``"batch"``: ``g / mean_token ||g||``: one factor for the whole batch, so tokens whose loss
      depends more on ``x`` still get a stronger re-weighting, and ``beta`` is dimensionless.
    - ``"token"``: ``g / ||g||`` per token: only the gradient's direction counts.
    """
    if mode == "none":
        return grad
    norms = grad.norm(dim=-1, keepdim=True)
    if mode == "batch":
        return grad / norms.mean().clamp_min(eps)
    if mode == "token":
        return grad / norms.clamp_min(eps)
    raise ValueError(f"grad_normalization={mode!r} is not one of {GRAD_NORMALIZATIONS}")


def gradient_attribution(grad: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
    """``|g @ decoder.T|``: ``[..., d] x [F, d] -> [..., F]``, how much the loss moves per unit of each code."""
    return (grad @ decoder.T).abs()


def decoder_directions(decoder: torch.Tensor, unit_rows: bool) -> torch.Tensor:
    """What one unit of each code adds to the reconstruction: the rows of ``decoder`` ``[F, d]``,
    divided by their norms when ``unit_rows`` (the SAE rescales its codes by the decoder norms)."""
    return decoder / decoder.norm(dim=-1, keepdim=True).clamp_min(1e-8) if unit_rows else decoder


def gradient_scores(codes: torch.Tensor, attribution: torch.Tensor, beta: float) -> torch.Tensor:
    """``z + beta * z * attribution`` (``codes`` are the non-negative ``z``)."""
    return codes + beta * codes * attribution


def scores_in_place(codes: torch.Tensor, grad: torch.Tensor, decoder: torch.Tensor, beta: float) -> torch.Tensor:
    """``gradient_scores(codes, gradient_attribution(grad, decoder), beta)``, the same floats, built in the
    attribution's buffer (one ``[..., F]`` matrix fewer at the training step's peak): IEEE ``+`` and ``*``
    commute, so ``(beta z) a = a (beta z)`` and ``z + x = x + z``. Out of place when the codes' dtype would
    widen the attribution's."""
    attribution = (grad @ decoder.T).abs_()
    if attribution.dtype != torch.promote_types(attribution.dtype, codes.dtype):
        return gradient_scores(codes, attribution, beta)
    return attribution.mul_(codes * beta).add_(codes)


def topk_by_score(codes: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep, per row, the ``k`` entries with the largest ``scores``; their values come from ``codes``."""
    idx = torch.topk(scores, k=k, dim=-1, sorted=False).indices
    out = torch.zeros_like(codes)
    return out.scatter_(-1, idx, codes.gather(-1, idx))


def gradient_topk_indices(
    hidden_pre: torch.Tensor,
    grad: torch.Tensor | None,
    decoder: torch.Tensor,
    k: int,
    beta: float,
    grad_normalization: str = "none",
    screen: bool | None = None,
    unit_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The g-SAE selection as ``(indices, keep)``, both ``[..., k]``: per token the columns of the
    ``k`` largest scores, and whether each is kept with a non-zero code (``z > 0``). Arguments as
    :func:`gradient_topk`; nothing here is differentiable.

    ``screen`` picks how the attribution ``|g @ decoder.T|`` is computed: ``False`` is the plain
    reference (one float32 matmul over every feature), ``True`` the exact bfloat16 screen
    (:func:`screened_topk_indices`: the same kept entries, at about 40 % of the matmul's cost on a
    CPU with bfloat16 dot products), ``None`` (default) the screen where it pays
    (:func:`screen_applies`) and the reference elsewhere."""
    with torch.no_grad():
        if grad is None or beta == 0:
            codes = hidden_pre.detach().relu()
            indices = torch.topk(codes, k=k, dim=-1, sorted=False).indices
            return indices, codes.gather(-1, indices) > 0
        if grad.shape[:-1] != hidden_pre.shape[:-1]:
            raise ValueError(f"grad has leading shape {tuple(grad.shape[:-1])}, codes {tuple(hidden_pre.shape[:-1])}")
        g = normalize_grad(grad.to(decoder.dtype), grad_normalization)
        pre, dec = hidden_pre.detach(), decoder.detach()
        if screen is None:
            screen = screen_applies(pre, g, dec, k)
        if screen:
            lead, f = pre.shape[:-1], pre.shape[-1]
            indices = screened_topk_indices(
                pre.reshape(-1, f), g.reshape(-1, g.shape[-1]), dec, k, beta, unit_rows=unit_rows
            ).reshape(*lead, k)
        else:
            indices = _reference_indices(pre, g, dec, k, beta, unit_rows)
        return indices, pre.gather(-1, indices) > 0


def _reference_indices(
    hidden_pre: torch.Tensor, grad: torch.Tensor, decoder: torch.Tensor, k: int, beta: float, unit_rows: bool
) -> torch.Tensor:
    """The plain float32 selection: the ``k`` largest scores per row from the full attribution matmul."""
    scores = scores_in_place(hidden_pre.relu(), grad, decoder_directions(decoder, unit_rows), beta)
    return torch.topk(scores, k=k, dim=-1, sorted=False).indices


# --- the exact bfloat16 screen ---------------------------------------------------------------------

#: unit roundoff of bfloat16 (8 significant bits) and of float32 (24)
BF16_UNIT = 2.0**-8
F32_UNIT = 2.0**-24
#: the screen is used by default from this many features (below it the float32 matmul is cheap)
SCREEN_MIN_FEATURES = 8192
#: rows the screen's matmul and scores are made for at a time (bounded temporaries, reused buffers)
SCREEN_ROWS = 256


def screen_applies(hidden_pre: torch.Tensor, grad: torch.Tensor, decoder: torch.Tensor, k: int) -> bool:
    """The default of :func:`gradient_topk_indices`' ``screen``: float32 scores (the screen's bound is
    written for them), a dictionary of at least :data:`SCREEN_MIN_FEATURES` features, and a device
    where a bfloat16 matmul is fast (:func:`sae_allocators.devices.bf16_matmul_is_fast`)."""
    f = hidden_pre.shape[-1]
    return (
        hidden_pre.dtype == grad.dtype == decoder.dtype == torch.float32
        and f >= max(SCREEN_MIN_FEATURES, 2 * k + 1)
        and devices.bf16_matmul_is_fast(decoder.device)
    )


def _bf16_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of bfloat16 operands with float32 accumulation, into ``out``. oneDNN on the CPU
    accumulates in float32 and rounds the result to bfloat16 (``out`` is bfloat16 there). On CUDA
    ``out`` is float32: ``out_dtype`` makes cuBLAS reduce in float32; a torch without it gets a
    bfloat16 product with reduced-precision reductions switched off for the call (the bound of
    :func:`screen_slack` covers the bfloat16 rounding of the result)."""
    if out.dtype == torch.bfloat16:
        return torch.mm(a, b, out=out)
    try:
        return out.copy_(torch.mm(a, b, out_dtype=torch.float32))
    except (TypeError, RuntimeError):
        flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        try:
            return out.copy_(torch.mm(a, b))
        finally:
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag


def screen_slack(grad_norm: torch.Tensor, decoder_max_norm: torch.Tensor | float, d: int, beta: float) -> torch.Tensor:
    """``q_t`` of :func:`screened_topk_indices`, per row: every true score ``s_j = z_j (1 + beta |a_j|)``
    lies within ``w_j [1 - q_t, 1 + q_t]`` of ``w_j = z_j (1 + beta |a~_j|)``, where ``a~`` is the
    bfloat16 matmul's attribution.

    The matmul rounds ``g`` and each decoder row to bfloat16 (relative error ``u = 2^-8`` per
    element, so ``2u + u^2`` per product), sums the exact products in float32 (at most
    ``gamma_d = d u32 / (1 - d u32)`` of the sum of their magnitudes, in any order) and rounds the
    sum to bfloat16 (``u / (1 - u)`` of the result). With ``sum_i |g_i d_ji| <= ||g|| ||d_j||``
    (Cauchy-Schwarz) that is ``|a~_j - a_j| <= u' |a~_j| + e_t`` with ``u' = u / (1 - u)`` and
    ``e_t = ((2u + u^2) + gamma_d (1 + u)^2) ||g_t|| max_j ||d_j||`` (plus the products of inputs
    below float32's normal range, which the CPU kernels flush to zero: ``2 d 2^-126 (||g_t|| +
    max ||d_j||)``). Since ``z_j <= w_j``, ``q_t = u' + beta e_t`` bounds the relative error."""
    u, u32 = BF16_UNIT, F32_UNIT
    gamma = d * u32 / (1 - d * u32)
    per_norm = (2 * u + u * u) + gamma * (1 + u) ** 2
    e = per_norm * grad_norm * decoder_max_norm + 2 * d * 2.0**-126 * (grad_norm + decoder_max_norm)
    return u / (1 - u) + beta * e


def candidate_attribution(grad: torch.Tensor, decoder: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``|grad_t . decoder_c|`` for the columns ``c`` of each row ``t``: ``[N, d]``, ``[F, d]`` and
    ``[N, w]`` (ascending, distinct per row) -> ``[N, w]`` float32, without the ``[N, F]`` product.

    One sampled matmul (``torch.sparse.sampled_addmm`` on the CSR pattern of ``columns``: 14 ms for
    2048 x 50 entries at d = 512 on the 2-core CPU), or, where the device lacks it, the plain
    reference :func:`candidate_attribution_plain` (a gather of the decoder rows and a batched
    matmul, 4x slower there). Both add each dot product in their own order: the floats may differ
    in the last bits from the reference's and from each other's."""
    n, w = columns.shape
    if w == 0:
        return torch.zeros(n, 0, dtype=grad.dtype, device=grad.device)
    crow = torch.arange(0, n * w + 1, w, device=columns.device)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # CSR's "beta state" notice
            pattern = torch.sparse_csr_tensor(
                crow,
                columns.reshape(-1),
                torch.zeros(n * w, dtype=grad.dtype, device=grad.device),
                size=(n, decoder.shape[0]),
            )
            out = torch.sparse.sampled_addmm(pattern, grad, decoder.T, beta=0.0).values()
    except (RuntimeError, NotImplementedError):  # a device or build without sampled_addmm
        return candidate_attribution_plain(grad, decoder, columns)
    return out.view(n, w).abs_()


def candidate_attribution_plain(grad: torch.Tensor, decoder: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """:func:`candidate_attribution` by gathering the ``N w`` decoder rows (:data:`SCREEN_ROWS` rows
    of ``grad`` at a time) and a batched matmul: the plain reference of the sampled matmul."""
    n, w = columns.shape
    out = torch.empty(n, w, dtype=grad.dtype, device=grad.device)
    for i in range(0, n, SCREEN_ROWS):
        c = columns[i : i + SCREEN_ROWS]
        rows = decoder.index_select(0, c.reshape(-1)).view(c.shape[0], w, -1)
        out[i : i + SCREEN_ROWS] = torch.bmm(rows, grad[i : i + SCREEN_ROWS].unsqueeze(-1)).squeeze(-1)
    return out.abs_()


def screened_topk_indices(
    hidden_pre: torch.Tensor,
    grad: torch.Tensor,
    decoder: torch.Tensor,
    k: int,
    beta: float,
    spare: int | None = None,
    unit_rows: bool = False,
    stats: dict[str, int] | None = None,
) -> torch.Tensor:
    """Per row the columns of the ``k`` largest ``z_j + beta z_j |g . d_j|`` (``z = relu(hidden_pre)``),
    exactly as the float32 reference ranks them, for about 40 % of its matmul.

    ``hidden_pre`` ``[N, F]`` and ``grad`` ``[N, d]`` (already normalised) and ``decoder`` ``[F, d]``,
    all float32; ``d_j`` is row ``j`` of :func:`decoder_directions` ``(decoder, unit_rows)`` (with
    ``unit_rows`` the screen divides its attribution by the row norms ``n_j`` instead of building the
    unit rows). Three stages, rows :data:`SCREEN_ROWS` at a time:

    1. **screen**: ``a~ = bf16(g) @ bf16(decoder).T`` (float32 accumulation, divided by ``n_j`` in float32
       with ``unit_rows``) and the approximate scores ``s~_j = pre_j (1 + beta |a~_j|)`` in float32
       (``z_j (1 + beta |a~_j|)`` where ``pre_j > 0``, negative where not); the
       ``M + 1 = k + spare + 1`` largest per row (:func:`~sae_allocators.allocation.topk.row_topk_by_blocks`).
    2. **bound**: every true score lies within a relative ``q_t`` of ``w_j = z_j (1 + beta |a~_j|)``
       (:func:`screen_slack`, with ``max_j ||decoder_j|| / n_j`` for the rows' largest norm: 1 up to the
       float32 rounding of the norms), and ``s~_j`` within ``rho = 12 u32`` of ``w_j``. The ``k`` entries with the largest
       ``s~`` all score at least ``s~_(k) (1 - q_t) / (1 + rho)``, so the true ``k``-th score does
       too; an entry with ``s~_j < lo_t = s~_(k) (1 - q_t)(1 - rho) / ((1 + q_t)(1 + rho))`` scores strictly
       below it and can never be selected. A row whose ``(M + 1)``-th ``s~`` is below ``lo_t`` has
       all its candidates among its top ``M``.
    3. **exact**: the float32 attribution ``|g_t . d_j|`` for those candidates only
       (:func:`candidate_attribution`, a sampled matmul), and the ``k`` best of their float32 scores. Rows whose candidates do not fit
       in ``M`` take the reference (a float32 matmul for those rows only).

    A row with fewer than ``k`` positive codes keeps all of them (its ``s~_(k)`` is not positive). The result
    is the reference's selection up to float32 rounding of the scores themselves (the reference's
    matmul and the exact stage's dot products add in different orders): entries whose scores differ
    by less than about ``1e-6`` relative may be ordered either way, as ties are.

    ``spare`` (default ``max(k, 32)``) sets ``M``; ``stats``, when a dict, receives ``width`` (the
    widest candidate set, the exact stage's columns per row) and ``misfits`` (rows sent to the
    reference).
    """
    if not hidden_pre.dtype == grad.dtype == decoder.dtype == torch.float32:
        raise ValueError(
            "screened_topk_indices: the screen's bound is written for float32 pre-activations, gradients and "
            f"decoder (got {hidden_pre.dtype}, {grad.dtype}, {decoder.dtype}); use screen=False (the reference)"
        )
    n, f = hidden_pre.shape
    d = grad.shape[-1]
    spare = max(k, 32) if spare is None else spare
    m_top = min(k + spare, f - 1)
    if m_top < k:  # too few features to screen: the reference
        if stats is not None:
            stats.update(width=0, misfits=n)
        return _reference_indices(hidden_pre, grad, decoder, k, beta, unit_rows)
    device = hidden_pre.device
    g16, dec16 = grad.to(torch.bfloat16), decoder.to(torch.bfloat16).T
    if unit_rows:  # d_j = decoder_j / n_j: the attribution's columns get beta / n_j, exact rows divide by n_j
        norms = decoder.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        column_scale = beta / norms.squeeze(-1)
        max_norm: torch.Tensor | float = 1 + 4 * (d + 2) * F32_UNIT  # ||decoder_j|| / n_j, n_j rounded
    else:
        norms, column_scale = None, None
        max_norm = decoder.norm(dim=-1).max() * (1 + 4 * (d + 2) * F32_UNIT)
    rows = min(SCREEN_ROWS, n)
    out_dtype = torch.float32 if devices.is_cuda(device) else torch.bfloat16
    approx = torch.empty(rows, f, dtype=out_dtype, device=device)
    scores = approx if out_dtype == torch.float32 else torch.empty(rows, f, device=device)
    top_vals = torch.empty(n, m_top + 1, device=device)
    top_idx = torch.empty(n, m_top + 1, dtype=torch.long, device=device)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        a, s, pre = approx[: j - i], scores[: j - i], hidden_pre[i:j]
        _bf16_mm(g16[i:j], dec16, out=a).abs_()
        if s is not a:
            s.copy_(a)
        if column_scale is not None:
            s.mul_(column_scale)
        elif beta != 1:
            s.mul_(beta)
        # pre (1 + beta |a~|): z (1 + beta |a~|) where pre > 0, and negative (below every positive code's
        # score, like the 0 of z) where it is not: no clamp needed for the top M + 1 and the bound
        torch.addcmul(pre, pre, s, out=s)
        top_vals[i:j], top_idx[i:j] = row_topk_by_blocks(s, m_top + 1)
    del approx, scores
    q = screen_slack(grad.norm(dim=-1), max_norm, d, beta)
    rho = 12 * F32_UNIT
    kth = top_vals[:, k - 1]
    lo = kth * ((1 - q) * (1 - rho) / ((1 + q) * (1 + rho)) * (1 - 4 * F32_UNIT))
    few_positive = kth <= 0  # fewer than k positive codes: all of them are in the top k
    fits = (top_vals[:, m_top] < lo) | few_positive
    count = torch.where(few_positive, k, (top_vals[:, :m_top] >= lo.unsqueeze(-1)).sum(-1))
    width = max(int(torch.where(fits, count, k).max()), k)  # the one host sync: the widest candidate set
    cand = top_idx[:, :width].sort(dim=-1).values  # ascending columns per row (a CSR pattern)
    attribution = candidate_attribution(grad, decoder, cand)
    if norms is not None:  # |g . decoder_j| / n_j
        attribution.div_(norms.squeeze(-1)[cand])
    z = hidden_pre.gather(-1, cand).clamp_min_(0)
    exact = attribution.mul_(z * beta).add_(z)  # scores_in_place's expression for these entries
    out = cand.gather(-1, torch.topk(exact, k, dim=-1, sorted=False).indices)
    misfits = (~fits).nonzero().squeeze(-1)
    if misfits.numel():
        out[misfits] = _reference_indices(hidden_pre[misfits], grad[misfits], decoder, k, beta, unit_rows)
    if stats is not None:
        stats.update(width=width, misfits=int(misfits.numel()))
    return out


def gradient_topk(
    hidden_pre: torch.Tensor,
    grad: torch.Tensor | None,
    decoder: torch.Tensor,
    k: int,
    beta: float,
    grad_normalization: str = "none",
    unit_rows: bool = False,
) -> torch.Tensor:
    """g-SAE selection over the last dimension.

    Args:
        hidden_pre: pre-activations ``[..., F]`` (already scaled as the SAE decodes them).
        grad: ``dL/dx`` ``[..., d]`` aligned with ``hidden_pre``'s leading dims, or ``None``.
        decoder: ``[F, d]``, the direction each unit of code adds to the reconstruction (divided by
            its row norms first when ``unit_rows``: :func:`decoder_directions`).
        k: features kept per token.
        beta: weight of the gradient term (``0`` gives plain TopK).
        grad_normalization: see :func:`normalize_grad`.

    Returns the codes ``[..., F]``: ``relu(hidden_pre)`` on the selected entries, zero elsewhere.
    Gradients flow to ``hidden_pre`` through the kept values only; the selection (and therefore
    ``grad`` and ``decoder``) gets none.
    """
    codes = hidden_pre.relu()
    indices, _ = gradient_topk_indices(hidden_pre, grad, decoder, k, beta, grad_normalization, unit_rows=unit_rows)
    return torch.zeros_like(codes).scatter_(-1, indices, codes.gather(-1, indices))
