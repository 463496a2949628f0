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

import torch

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The g-SAE selection as ``(indices, keep)``, both ``[..., k]``: per token the columns of the
    ``k`` largest scores, and whether each is kept with a non-zero code (``z > 0``). Arguments as
    :func:`gradient_topk`; nothing here is differentiable."""
    with torch.no_grad():
        codes = hidden_pre.detach().relu()
        if grad is None or beta == 0:
            scores = codes
        else:
            if grad.shape[:-1] != hidden_pre.shape[:-1]:
                raise ValueError(
                    f"grad has leading shape {tuple(grad.shape[:-1])}, codes {tuple(hidden_pre.shape[:-1])}"
                )
            g = normalize_grad(grad.to(decoder.dtype), grad_normalization)
            scores = scores_in_place(codes, g, decoder.detach(), beta)
        indices = torch.topk(scores, k=k, dim=-1, sorted=False).indices
        return indices, codes.gather(-1, indices) > 0


def gradient_topk(
    hidden_pre: torch.Tensor,
    grad: torch.Tensor | None,
    decoder: torch.Tensor,
    k: int,
    beta: float,
    grad_normalization: str = "none",
) -> torch.Tensor:
    """g-SAE selection over the last dimension.

    Args:
        hidden_pre: pre-activations ``[..., F]`` (already scaled as the SAE decodes them).
        grad: ``dL/dx`` ``[..., d]`` aligned with ``hidden_pre``'s leading dims, or ``None``.
        decoder: ``[F, d]``, the direction each unit of code adds to the reconstruction.
        k: features kept per token.
        beta: weight of the gradient term (``0`` gives plain TopK).
        grad_normalization: see :func:`normalize_grad`.

    Returns the codes ``[..., F]``: ``relu(hidden_pre)`` on the selected entries, zero elsewhere.
    Gradients flow to ``hidden_pre`` through the kept values only; the selection (and therefore
    ``grad`` and ``decoder``) gets none.
    """
    codes = hidden_pre.relu()
    indices, _ = gradient_topk_indices(hidden_pre, grad, decoder, k, beta, grad_normalization)
    return torch.zeros_like(codes).scatter_(-1, indices, codes.gather(-1, indices))
