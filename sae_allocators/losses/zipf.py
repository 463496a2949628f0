"""The Zipf curve of running feature densities and the under-used set of the ``zipf`` loss.

``fit`` gives ``(alpha, log_C)`` of ``density ~ C * rank^-alpha`` (fitted on the densest ranks, or
with ``alpha`` fixed by ``zipf_exponent``); a feature is under-used when its density is below
``zipf_underused_ratio`` times its target on that curve (docs/aux_zipf.md). ``cfg`` is an
:class:`~sae_allocators.losses.AuxLossConfig`.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_allocators import metrics as M


def fit(density: torch.Tensor, cfg: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, log_C)`` of the Zipf curve over ``density`` (see :func:`sae_allocators.metrics.zipf_fit`)."""
    if cfg.zipf_exponent is not None:
        return M._fit_fixed_alpha(density, cfg.zipf_fit_fraction, cfg.zipf_exponent)
    return M.zipf_fit(density, cfg.zipf_fit_fraction)


@torch.no_grad()
def shortfall(density: torch.Tensor, alpha: torch.Tensor, log_c: torch.Tensor) -> torch.Tensor:
    """Per feature ``1 - density / target`` clamped to [0, 1] (0: on or above the curve)."""
    target = M.zipf_target(density, alpha, log_c).double()
    return (1 - density.double() / target.clamp_min(1e-300)).clamp(0, 1).to(density.dtype)


@torch.no_grad()
def underused_fraction(
    density: torch.Tensor, steps: int, dead: torch.Tensor | None, fitted: tuple[torch.Tensor, torch.Tensor], cfg: Any
) -> float:
    """The ``underused_frac`` training metric: the share of features that are dead or (after
    ``zipf_min_steps`` steps) below ``zipf_underused_ratio`` times their target."""
    alpha, log_c = fitted
    below = density.double() < cfg.zipf_underused_ratio * M.zipf_target(density, alpha, log_c).double()
    if steps < cfg.zipf_min_steps:
        below = torch.zeros_like(below)
    if dead is not None:
        below = below | dead.bool()
    return float(below.float().mean())
