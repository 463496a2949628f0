"""Pure metric functions for adaptive-sparsity SAEs (no SAELens imports).

Every function here counts a feature as *firing* when its code is ``!= 0`` -- never ``> 0`` --
so signed architectures (AbsTopK) are measured the same way as ReLU ones. Inputs may have any
leading dimensions; they are flattened to ``[N, F]``.
"""

from __future__ import annotations

import math

import torch


def firing(acts: torch.Tensor) -> torch.Tensor:
    """Boolean mask of firing entries (``acts != 0``), flattened to ``[N, F]``."""
    return acts.reshape(-1, acts.shape[-1]) != 0


def per_token_l0(acts: torch.Tensor) -> torch.Tensor:
    """Number of firing features per token, ``[N]`` (float)."""
    return firing(acts).sum(dim=-1).float()


def l0_stats(acts: torch.Tensor) -> dict[str, float]:
    """Per-token L0 distribution: mean, median (p50), 99th percentile and the empty-token fraction.

    Percentiles use ``torch.quantile``'s linear interpolation (numpy's default).
    """
    l0 = per_token_l0(acts)
    if l0.numel() == 0:
        return {"l0_mean": 0.0, "l0_p50": 0.0, "l0_p99": 0.0, "empty_token_frac": 0.0}
    q = torch.quantile(l0, torch.tensor([0.5, 0.99], device=l0.device, dtype=l0.dtype))
    return {
        "l0_mean": float(l0.mean()),
        "l0_p50": float(q[0]),
        "l0_p99": float(q[1]),
        "empty_token_frac": float((l0 == 0).float().mean()),
    }


def batch_density(acts: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens on which each feature fires in this batch, ``[F]``."""
    return firing(acts).float().mean(dim=0)


def zipf_fit(
    density: torch.Tensor, fit_fraction: float = 0.5, min_density: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares fit of ``log d_(r) = log C - alpha * log r`` over density ranks.

    ``density`` is per feature; it is sorted in descending order (rank 1 = densest). Only the
    first ``ceil(fit_fraction * F)`` ranks with density ``> min_density`` enter the fit: the
    Zipf law is observed to hold *except at the low end*, which is exactly what the fit must not
    see. Returns ``(alpha, log_C)`` as 0-d tensors (``alpha = 0`` and ``log_C = log(mean)`` when
    fewer than two ranks qualify).
    """
    d = density.detach().double().reshape(-1)
    sorted_d = torch.sort(d, descending=True).values
    n_fit = max(1, math.ceil(fit_fraction * d.numel()))
    head = sorted_d[:n_fit]
    ranks = torch.arange(1, n_fit + 1, device=d.device, dtype=torch.double)
    ok = head > max(min_density, 0.0)
    n_ok = ok.sum()
    logr = torch.where(ok, ranks.log(), torch.zeros_like(ranks))
    logd = torch.where(ok, head.clamp_min(1e-300).log(), torch.zeros_like(head))
    cnt = n_ok.clamp_min(1).double()
    mx = logr.sum() / cnt
    my = logd.sum() / cnt
    dx = torch.where(ok, logr - mx, torch.zeros_like(logr))
    dy = torch.where(ok, logd - my, torch.zeros_like(logd))
    var = (dx * dx).sum()
    slope = torch.where(var > 0, (dx * dy).sum() / var.clamp_min(1e-300), torch.zeros_like(var))
    alpha = -slope
    log_c = my - slope * mx
    fallback = torch.log(d.mean().clamp_min(1e-300))
    enough = n_ok >= 2
    return torch.where(enough, alpha, torch.zeros_like(alpha)), torch.where(enough, log_c, fallback)


def zipf_target(density: torch.Tensor, alpha: torch.Tensor, log_c: torch.Tensor) -> torch.Tensor:
    """Each feature's Zipf target ``C * rank^-alpha`` at its own density rank (same order as ``density``)."""
    d = density.detach().reshape(-1)
    order = torch.argsort(d.double(), descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, d.numel() + 1, device=d.device)
    return torch.exp(log_c - alpha * ranks.double().log()).to(d.dtype)


def underused_mask(
    density: torch.Tensor, ratio: float, fit_fraction: float = 0.5, alpha: float | None = None
) -> torch.Tensor:
    """Features whose density is below ``ratio`` times their Zipf target (``ratio`` in (0, 1)).

    With ``alpha`` given the exponent is fixed and only ``C`` is fitted (least squares in log
    space over the same head ranks); otherwise both are fitted by :func:`zipf_fit`.
    """
    if alpha is None:
        a, log_c = zipf_fit(density, fit_fraction)
    else:
        a, log_c = _fit_fixed_alpha(density, fit_fraction, float(alpha))
    return density.detach().reshape(-1).double() < ratio * zipf_target(density, a, log_c).double()


def _fit_fixed_alpha(density: torch.Tensor, fit_fraction: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    d = density.detach().double().reshape(-1)
    sorted_d = torch.sort(d, descending=True).values
    n_fit = max(1, math.ceil(fit_fraction * d.numel()))
    head = sorted_d[:n_fit]
    ranks = torch.arange(1, n_fit + 1, device=d.device, dtype=torch.double)
    ok = head > 0
    resid = torch.where(ok, head.clamp_min(1e-300).log() + alpha * ranks.log(), torch.zeros_like(head))
    log_c = torch.where(ok.any(), resid.sum() / ok.sum().clamp_min(1), torch.log(d.mean().clamp_min(1e-300)))
    return torch.tensor(alpha, dtype=torch.double, device=d.device), log_c


def dead_fraction(dead_mask: torch.Tensor | None) -> float:
    if dead_mask is None or dead_mask.numel() == 0:
        return 0.0
    return float(dead_mask.float().mean())
