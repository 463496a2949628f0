"""The auxiliary-loss fields every training config of this project shares, and their validation.

:class:`AuxLossConfig` -- dataclass fields ``aux_loss`` (a registered loss name),
``aux_loss_coefficient``, ``aux_k`` and the running-density / Zipf parameters, validated in
``__post_init__`` (a bad value is a ``ValueError`` naming the field, before any training step), on top
of :class:`~sae_allocators.config_checks.ConfigChecks` (the checks every config shares, and unknown
``from_dict`` keys).
See :mod:`sae_allocators.losses.base` for how an architecture adopts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from sae_allocators import config_checks
from sae_allocators.losses import registry

#: the built-in losses that regress a bias-free reconstruction onto the residual
RESIDUAL_AUX_LOSSES = ("auxk", "zipf")
#: normalizations under which that residual reconstruction is not possible
UNNORMALIZED_RESIDUAL_NORMALIZATIONS = ("constant_norm_rescale", "layer_norm")


def _field_error(field: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"{field}={value!r} is invalid: {fix}")


@dataclass
class AuxLossConfig(config_checks.ConfigChecks):
    """Auxiliary-loss fields shared by every training config of this project.

    Attributes:
        aux_loss: name of a registered auxiliary loss: ``"auxk"`` (AuxK over dead features,
            exactly SAELens's TopK auxiliary loss), ``"zipf"`` (AuxK over dead *and* under-used
            features, see docs/aux_zipf.md), ``"none"``, or any name a plugin registered.
        aux_loss_coefficient: multiplies the auxiliary loss (SAELens's TopK field, same meaning).
        aux_k: how many candidate latents per token the residual reconstruction uses;
            ``None`` means SAELens's heuristic ``d_in // 2``.
        density_window: running feature densities are a mean over the first ``density_window``
            training steps, then an exponential moving average with rate ``1/density_window``.
        zipf_underused_ratio: a feature is under-used when its running density is below this
            fraction of its Zipf target ``C * rank^-alpha``; in (0, 1).
        zipf_fit_fraction: the Zipf curve is fitted on the densest ``ceil(fraction * d_sae)``
            ranks (the law is observed to fail at the low end, which must not bend the fit).
        zipf_exponent: fix ``alpha`` instead of fitting it (``C`` is still fitted); ``None`` fits.
        zipf_min_steps: before this many steps of running density, the under-used set is the
            dead set only (the ``zipf`` loss is then exactly ``auxk``).
        zipf_weight_by_shortfall: weight each under-used latent's code by its shortfall
            ``1 - density/target`` (in [0, 1]); off by default.
        sparse_step: train on the sparse path (one dense encoder matmul, everything after it on
            the kept entries only; see :mod:`sae_allocators.sparse`); ``False`` runs the dense
            reference computation (same selections, losses and gradients, slower).
    """

    aux_loss: str = "zipf"
    aux_loss_coefficient: float = 1.0
    aux_k: int | None = None
    density_window: int = 1000
    zipf_underused_ratio: float = 0.1
    zipf_fit_fraction: float = 0.5
    zipf_exponent: float | None = None
    zipf_min_steps: int = 100
    zipf_weight_by_shortfall: bool = False
    sparse_step: bool = True

    def __post_init__(self) -> None:
        self.check_shared_fields()  # first for a config without its own __post_init__; pure, so a repeat is harmless
        super().__post_init__()  # type: ignore[misc]
        self.validate_aux_loss_fields()

    def get_inference_sae_cfg_dict(self) -> dict[str, Any]:
        """SAELens's inference cfg dict, with ``metadata.training_architecture`` (and the
        training-only fields) recorded on every SAELens version (6.38 does not record them)."""
        result = super().get_inference_sae_cfg_dict()  # type: ignore[misc]
        meta = result.setdefault("metadata", {})
        meta.setdefault("training_architecture", self.architecture())  # type: ignore[attr-defined]
        if "training_architecture_details" not in meta:
            inference_fields = {f.name for f in fields(self.get_inference_config_class())}  # type: ignore[attr-defined]
            meta["training_architecture_details"] = {
                f.name: getattr(self, f.name)
                for f in fields(self)
                if f.name not in inference_fields and f.name != "metadata"  # type: ignore[arg-type]
            }
        return result

    def validate_aux_loss_fields(self) -> None:
        config_checks.check_field_types(self)  # before any comparison below meets a string
        registry.get(self.aux_loss)  # ValueError naming aux_loss and the registered names
        norm = getattr(self, "normalize_activations", "none")
        if self.aux_loss in RESIDUAL_AUX_LOSSES and norm in UNNORMALIZED_RESIDUAL_NORMALIZATIONS:
            raise ValueError(
                f"aux_loss={self.aux_loss!r} does not support normalize_activations={norm!r}: its residual "
                "reconstruction would be in normalized space while the residual is not, which fails at the "
                "first dead latent. Use normalize_activations='none' or 'expected_average_only_in', or "
                "aux_loss='none'."
            )
        if not (
            isinstance(self.aux_loss_coefficient, (int, float))
            and math.isfinite(self.aux_loss_coefficient)
            and self.aux_loss_coefficient >= 0
        ):
            raise _field_error(
                "aux_loss_coefficient",
                self.aux_loss_coefficient,
                "use a finite number >= 0 (e.g. 1.0; 0 disables the term)",
            )
        d_sae = getattr(self, "d_sae", None)
        if self.aux_k is not None and not (
            isinstance(self.aux_k, int) and self.aux_k >= 1 and (d_sae is None or self.aux_k <= d_sae)
        ):
            raise _field_error("aux_k", self.aux_k, f"use an integer in [1, d_sae={d_sae}], or None for d_in // 2")
        if not (isinstance(self.density_window, int) and self.density_window >= 1):
            raise _field_error("density_window", self.density_window, "use an integer number of steps >= 1 (e.g. 1000)")
        if not (0.0 < self.zipf_underused_ratio < 1.0):
            raise _field_error(
                "zipf_underused_ratio",
                self.zipf_underused_ratio,
                "use a fraction in (0, 1) (e.g. 0.1: ten times below the Zipf curve)",
            )
        if not (0.0 < self.zipf_fit_fraction <= 1.0):
            raise _field_error(
                "zipf_fit_fraction", self.zipf_fit_fraction, "use a fraction in (0, 1] of the ranks (e.g. 0.5)"
            )
        if self.zipf_exponent is not None and not (math.isfinite(self.zipf_exponent) and self.zipf_exponent >= 0):
            raise _field_error("zipf_exponent", self.zipf_exponent, "use a finite exponent >= 0, or None to fit it")
        if not (isinstance(self.zipf_min_steps, int) and self.zipf_min_steps >= 0):
            raise _field_error("zipf_min_steps", self.zipf_min_steps, "use an integer >= 0")
        if not isinstance(self.sparse_step, bool):
            raise _field_error(
                "sparse_step", self.sparse_step, "use True (the sparse training step) or False (the dense reference)"
            )
