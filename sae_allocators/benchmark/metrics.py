"""Evaluation metrics as small pure functions and one streaming accumulator.

Definitions (used everywhere in the benchmark and stated in every report):

- *explained variance* ``EV = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` (sums over tokens);
- *normalised MSE* ``NMSE = sum ||x - x_hat||^2 / sum ||x||^2``: the error relative to predicting
  zero (Ayonrinde 2024 and Gao et al. 2024 report variants; Gao et al.'s "relative to the mean"
  version is ``1 - EV`` and is in the JSON as ``one_minus_ev``);
- *L0* of a token: the number of non-zero codes (``!= 0``, so signed codes count);
- *dead*: a latent that never fires on the evaluation tokens;
- *under-used*: a live latent whose firing density is below ``UNDERUSED_FACTOR`` (0.1) times its
  uniform share ``mean L0 / d_sae``;
- *Zipf fit*: least squares of ``log density`` on ``log rank`` over the live latents,
  ``density(r) ~ C * r^(-s)``.

These are evaluation definitions, measured once on held-out tokens, and named apart from the
training-time ones in :mod:`sae_allocators.metrics` / :mod:`sae_allocators.losses`, which differ:
there *dead* is SAELens's window mask (no firing for ``dead_feature_window`` steps, the
``dead_frac`` metric), *under-used* is below ``zipf_underused_ratio`` times the feature's Zipf
target (``underused_frac``, the ``zipf`` loss's set), and the Zipf fit uses only the densest ranks.
Here: :func:`never_fired_fraction`, :func:`below_uniform_share_fraction`,
:func:`zipf_loglog_fit`, :func:`l0_summary` (the report's keys ``dead_fraction``,
``underused_fraction``, ``zipf_*`` are unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

UNDERUSED_FACTOR = 0.1


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double().reshape(-1, x.shape[-1]), x_hat.double().reshape(-1, x.shape[-1])
    err = (x - x_hat).pow(2).sum()
    var = (x - x.mean(0)).pow(2).sum()
    return float(1.0 - err / var)


def normalized_mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / x.pow(2).sum())


def token_l0(codes: torch.Tensor) -> torch.Tensor:
    """Per-token L0 (``!= 0``) over the last dimension; leading dimensions are flattened."""
    return (codes != 0).reshape(-1, codes.shape[-1]).sum(-1)


def l0_summary(l0: torch.Tensor) -> dict[str, float]:
    """Mean, median, 99th percentile and fraction of empty tokens of a per-token L0 vector."""
    l0 = l0.double()
    return {
        "l0_mean": float(l0.mean()),
        "l0_p50": float(torch.quantile(l0, 0.5)),
        "l0_p99": float(torch.quantile(l0, 0.99)),
        "frac_empty_tokens": float((l0 == 0).double().mean()),
    }


def never_fired_fraction(density: torch.Tensor) -> float:
    """Fraction of latents with density 0 on the evaluation tokens (the report's ``dead_fraction``)."""
    return float((density == 0).double().mean())


def below_uniform_share_fraction(density: torch.Tensor, l0_mean: float, factor: float = UNDERUSED_FACTOR) -> float:
    """Fraction of all latents that are alive but below ``factor * l0_mean / d_sae`` (the report's
    ``underused_fraction``)."""
    share = l0_mean / density.numel()
    return float(((density > 0) & (density < factor * share)).double().mean())


def zipf_loglog_fit(density: torch.Tensor) -> dict[str, float]:
    """Fit ``log d = log C - s log r`` over live latents ranked by density; returns s, C, R^2."""
    d = density[density > 0].double().sort(descending=True).values
    if d.numel() < 2:
        return {"zipf_exponent": float("nan"), "zipf_scale": float("nan"), "zipf_r2": float("nan")}
    logr = torch.arange(1, d.numel() + 1, dtype=torch.float64).log()
    logd = d.log()
    A = torch.stack([torch.ones_like(logr), logr], dim=1)
    coef = torch.linalg.lstsq(A, logd.unsqueeze(1)).solution.squeeze(1)
    pred = A @ coef
    ss_res = (logd - pred).pow(2).sum()
    ss_tot = (logd - logd.mean()).pow(2).sum()
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else torch.tensor(1.0)
    return {"zipf_exponent": float(-coef[1]), "zipf_scale": float(coef[0].exp()), "zipf_r2": float(r2)}


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """``(CE_zero - CE_sae) / (CE_zero - CE_clean)``: 1 = as good as the clean model, 0 = as zero-ablation."""
    return (ce_zero - ce_sae) / (ce_zero - ce_clean)


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(p || q)`` in nats, p = clean model, q = model with the SAE spliced in."""
    logp = logits_p.double().log_softmax(-1)
    logq = logits_q.double().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


@dataclass
class Accumulator:
    """Streams (x, x_hat, codes) batches and returns every reconstruction/sparsity figure."""

    d_sae: int
    sq_err: float = 0.0
    sq_norm: float = 0.0
    n: int = 0
    sum_x: torch.Tensor | None = None
    sum_sq_x: float = 0.0
    fired: torch.Tensor | None = None
    l0: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        x_hat = x_hat.reshape(-1, x.shape[-1]).double()
        codes = codes.reshape(-1, codes.shape[-1])
        if not (torch.isfinite(x_hat).all() and torch.isfinite(codes).all()):
            raise FloatingPointError("the SAE produced non-finite reconstructions or codes")
        self.sq_err += float((x - x_hat).pow(2).sum())
        self.sq_norm += float(x.pow(2).sum())
        self.sum_sq_x += float(x.pow(2).sum())
        self.sum_x = x.sum(0) if self.sum_x is None else self.sum_x + x.sum(0)
        nz = codes != 0
        counts = nz.sum(0).double()
        self.fired = counts if self.fired is None else self.fired + counts
        self.l0.append(nz.sum(-1))  # on the data's device; moved to the host once, in per_token_l0
        self.n += x.shape[0]

    def density(self) -> torch.Tensor:
        assert self.fired is not None
        return (self.fired / self.n).cpu()

    def per_token_l0(self) -> torch.Tensor:
        return torch.cat(self.l0).cpu()

    def result(self) -> dict[str, float]:
        assert self.sum_x is not None and self.n > 0
        # sum ||x - mean||^2 = sum ||x||^2 - n ||mean||^2
        var = self.sum_sq_x - float(self.sum_x.pow(2).sum()) / self.n
        ev = 1.0 - self.sq_err / var
        density = self.density()
        stats = l0_summary(self.per_token_l0())
        out = {
            "explained_variance": ev,
            "one_minus_ev": 1.0 - ev,
            "nmse": self.sq_err / self.sq_norm,
            "mse_per_token": self.sq_err / self.n,
            **stats,
            "dead_fraction": never_fired_fraction(density),
            "underused_fraction": below_uniform_share_fraction(density, stats["l0_mean"]),
            "n_eval_tokens": float(self.n),
        }
        out.update(zipf_loglog_fit(density))
        return out


def finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# The names these functions had before (scripts may use them): the same objects, not new definitions.
l0_stats = l0_summary
dead_fraction = never_fired_fraction
underused_fraction = below_uniform_share_fraction
zipf_fit = zipf_loglog_fit
