"""top-AFA diagnostics (Lee et al. 2025): per-token k statistics and ε_LBO, for any SAE.

ε_LBO is the paper's measure of how far an SAE is from the "approximate feature activation"
identity ``||z||^2 ≈ ||f̃||^2``. As in the authors' analysis notebook
(``visualization/zf-plot.ipynb`` in SewoongLee/top-afa-sae), per token::

    f̃ = [f ⊙ ||W_dec rows||, ||b_dec||]          (the codes scaled by their decoder norms,
                                                    with the decoder bias as one more "feature")
    ε_LBO = | ||z||^2 - ||f̃||^2 | / ((h - 1) * ||f̃||^2),   h = d_sae

where ``z`` is the SAE's input. Conventions of this module (the notebook has none): a token with
``||f̃|| = 0`` gets ε_LBO = 0 if ``||z|| = 0`` too and ``inf`` otherwise; ``h = d_sae`` must be >= 2.
Decoder norms are the ones the decode applies: all 1 for SAELens TopK-style SAEs with
``rescale_acts_by_decoder_norm=True`` (the codes are already in unit-decoder units).
"""

from __future__ import annotations

from typing import Any

import torch

from sae_allocators.allocation.afa import afa_select


def _quantiles(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    q = torch.quantile(v, torch.tensor([0.5, 0.99], dtype=torch.double, device=v.device))
    return float(q[0]), float(q[1])


def afa_k_stats(k: torch.Tensor, capped: torch.Tensor | None = None, prefix: str = "afa_k") -> dict[str, float]:
    """Mean, median (p50) and 99th percentile of the per-token k (``torch.quantile``'s linear
    interpolation), plus ``afa_capped_frac`` (fraction of tokens where a ``k_max`` cap changed
    the result) when ``capped`` is given."""
    kk = k.reshape(-1)
    if kk.numel() == 0:
        out = {f"{prefix}_mean": 0.0, f"{prefix}_p50": 0.0, f"{prefix}_p99": 0.0}
    else:
        p50, p99 = _quantiles(kk)
        out = {f"{prefix}_mean": float(kk.double().mean()), f"{prefix}_p50": p50, f"{prefix}_p99": p99}
    if capped is not None:
        out["afa_capped_frac"] = float(capped.reshape(-1).double().mean()) if capped.numel() else 0.0
    return out


def epsilon_lbo(
    z: torch.Tensor, feature_acts: torch.Tensor, dec_norm: torch.Tensor | None, b_dec: torch.Tensor
) -> torch.Tensor:
    """Per-token ε_LBO (see the module docstring), shape ``z.shape[:-1]``, float64.

    Args:
        z: the SAE's input ``[..., d_in]``.
        feature_acts: its codes ``[..., d_sae]`` (dense).
        dec_norm: ``[d_sae]`` decoder-row norms as the decode applies them (``None``: all 1).
        b_dec: ``[d_in]`` decoder bias.
    """
    h = feature_acts.shape[-1]
    if h < 2:
        raise ValueError(f"epsilon_lbo needs d_sae >= 2 (it divides by d_sae - 1), got d_sae={h}")
    f = feature_acts.detach().double()
    if dec_norm is not None:
        f = f * dec_norm.detach().double()
    f_sq = f.square().sum(-1) + b_dec.detach().double().square().sum()
    z_sq = z.detach().double().square().sum(-1)
    gap = (z_sq - f_sq).abs()
    eps = gap / ((h - 1) * f_sq)
    zero = f_sq == 0
    return torch.where(zero, torch.where(z_sq == 0, torch.zeros_like(eps), torch.full_like(eps, float("inf"))), eps)


def epsilon_lbo_stats(eps: torch.Tensor) -> dict[str, float]:
    """Mean, median and 99th percentile of per-token ε_LBO values."""
    e = eps.reshape(-1)
    if e.numel() == 0:
        return {"eps_lbo_mean": 0.0, "eps_lbo_p50": 0.0, "eps_lbo_p99": 0.0}
    p50, p99 = _quantiles(e)
    return {"eps_lbo_mean": float(e.mean()), "eps_lbo_p50": p50, "eps_lbo_p99": p99}


def effective_decoder_norms(sae: Any) -> torch.Tensor | None:
    """Norms of the decoder rows as ``sae.decode`` applies them to the codes: ``None`` (all 1)
    when the SAE rescales activations by decoder norm, else ``||W_dec rows||``."""
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        return None
    return sae.W_dec.detach().norm(dim=-1)


def sae_input(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """``x`` as the SAE sees it before the decoder-bias subtraction (dtype, reshape, run-time norm)."""
    return sae.run_time_activation_norm_fn_in(sae.reshape_fn_in(x.to(sae.dtype)))


@torch.no_grad()
def sae_afa_diagnostics(sae: Any, x: torch.Tensor) -> dict[str, float]:
    """Run ``sae.encode(x)`` on any SAELens SAE and report, over the tokens of ``x``:

    - ``l0_mean / l0_p50 / l0_p99 / empty_token_frac``: features with code ``!= 0`` per token;
    - ``afa_k_mean / afa_k_p50 / afa_k_p99``: how many of this SAE's codes the top-AFA rule
      would keep (affinities ``|code|``, target ``||x - b_dec||``, no cap);
    - ``eps_lbo_mean / eps_lbo_p50 / eps_lbo_p99``: ε_LBO of the SAE's codes.
    """
    from sae_allocators import metrics

    z = sae_input(sae, x)
    codes = sae.encode(x)
    if codes.is_sparse:
        codes = codes.to_dense()
    codes = codes.reshape(-1, codes.shape[-1])
    z = z.reshape(-1, z.shape[-1])
    norms = effective_decoder_norms(sae)
    out: dict[str, float] = dict(metrics.l0_stats(codes))
    target = (z - sae.b_dec.detach()).norm(dim=-1)
    out.update(afa_k_stats(afa_select(codes.abs(), target, norms).k))
    out.update(epsilon_lbo_stats(epsilon_lbo(z, codes, norms, sae.b_dec)))
    return out
