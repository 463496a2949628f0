"""The auxiliary-loss contract every training architecture of this project shares.

Two pieces, both mixins so that an architecture adopts them with one base class each:

- :class:`AuxLossConfig` -- dataclass fields ``aux_loss`` (a registered loss name),
  ``aux_loss_coefficient``, ``aux_k`` and the running-density / Zipf parameters, validated in
  ``__post_init__`` (a bad value is a ``ValueError`` naming the field, before any training step).
- :class:`AuxLossMixin` -- for ``TrainingSAE`` subclasses: keeps running feature densities as
  persistent buffers (they survive checkpoint and resume, and are dropped from the saved
  inference model), checks the input is finite, dispatches ``calculate_aux_loss`` to the loss
  registered under ``cfg.aux_loss``, and adds lazy metrics (dead / under-used fractions, fitted
  Zipf exponent, per-token L0 mean / p50 / p99, empty-token fraction).

Usage (the whole integration for a TopK-like architecture)::

    @dataclass
    class MyTrainingSAEConfig(AuxLossConfig, TopKTrainingSAEConfig):
        aux_loss: str = "zipf"          # the default for this architecture
        ...

    class MyTrainingSAE(AuxLossMixin, TopKTrainingSAE):
        signed_selection = True         # only for rules that keep negative codes (AbsTopK)

Put the mixins *first* in the bases so their ``__post_init__`` / ``calculate_aux_loss`` /
``training_forward_pass`` wrap SAELens's. Override :meth:`AuxLossMixin.aux_scores` or
:meth:`AuxLossMixin.aux_decode` only if ranking or bias-free decoding differ from TopK's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

import torch

from sae_allocators import config_checks
from sae_allocators import metrics as M
from sae_allocators.distributed.comm import all_reduce
from sae_allocators.distributed.data_parallel import group_of
from sae_allocators.distributed.select import strided_token_sample
from sae_allocators.losses import registry

#: the built-in losses that regress a bias-free reconstruction onto the residual
RESIDUAL_AUX_LOSSES = ("auxk", "zipf")
#: normalizations under which that residual reconstruction is not possible
UNNORMALIZED_RESIDUAL_NORMALIZATIONS = ("constant_norm_rescale", "layer_norm")


@dataclass
class AuxLossInput:
    """What an auxiliary loss sees of one training step (the ``step`` argument of a loss)."""

    sae_in: torch.Tensor
    sae_out: torch.Tensor
    feature_acts: torch.Tensor
    hidden_pre: torch.Tensor
    #: the trainer's dead mask (no firing for ``dead_feature_window`` steps); may be None
    dead_mask: torch.Tensor | None
    #: the SAELens ``TrainStepInput`` (coefficients, step count, ...)
    step_input: Any = None
    #: the step's :class:`~sae_allocators.architectures._step.StepState` when the architecture
    #: runs the shared selection step (None when called through SAELens's ``calculate_aux_loss``);
    #: on the sparse path ``hidden_pre`` is detached and aux values come from ``state.gather``
    state: Any = None

    @property
    def residual(self) -> torch.Tensor:
        """``(sae_in - sae_out).detach()``: the target of AuxK-style losses."""
        return (self.sae_in - self.sae_out).detach()


def _field_error(field: str, value: Any, fix: str) -> ValueError:
    return ValueError(f"{field}={value!r} is invalid: {fix}")


@dataclass
class AuxLossConfig:
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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Each subclass's own __post_init__ is wrapped so that the checks every config shares
        # (unknown from_dict keys, field types, d_in / d_sae) run first -- before an
        # architecture's own checks could trip over a string or blame k for d_sae=0.
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")
        if own is None or getattr(own, "_runs_shared_checks", False):
            return

        @functools.wraps(own)
        def __post_init__(self: Any, *args: Any) -> None:
            self._shared_checks_if_outermost(cls)
            own(self, *args)

        __post_init__._runs_shared_checks = True  # type: ignore[attr-defined]
        cls.__post_init__ = __post_init__  # type: ignore[method-assign]

    def _shared_checks_if_outermost(self, owner: type) -> None:
        outermost = next(k for k in type(self).__mro__ if "__post_init__" in k.__dict__)
        if outermost is owner:
            config_checks.warn_unknown_keys(self)
            config_checks.check_field_types(self)
            config_checks.check_dimensions(self)

    def __post_init__(self) -> None:
        self._shared_checks_if_outermost(AuxLossConfig)
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
                f.name: getattr(self, f.name) for f in fields(self) if f.name not in inference_fields and f.name != "metadata"  # type: ignore[arg-type]
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
        if not (isinstance(self.aux_loss_coefficient, (int, float)) and math.isfinite(self.aux_loss_coefficient) and self.aux_loss_coefficient >= 0):
            raise _field_error("aux_loss_coefficient", self.aux_loss_coefficient, "use a finite number >= 0 (e.g. 1.0; 0 disables the term)")
        d_sae = getattr(self, "d_sae", None)
        if self.aux_k is not None and not (isinstance(self.aux_k, int) and self.aux_k >= 1 and (d_sae is None or self.aux_k <= d_sae)):
            raise _field_error("aux_k", self.aux_k, f"use an integer in [1, d_sae={d_sae}], or None for d_in // 2")
        if not (isinstance(self.density_window, int) and self.density_window >= 1):
            raise _field_error("density_window", self.density_window, "use an integer number of steps >= 1 (e.g. 1000)")
        if not (0.0 < self.zipf_underused_ratio < 1.0):
            raise _field_error("zipf_underused_ratio", self.zipf_underused_ratio, "use a fraction in (0, 1) (e.g. 0.1: ten times below the Zipf curve)")
        if not (0.0 < self.zipf_fit_fraction <= 1.0):
            raise _field_error("zipf_fit_fraction", self.zipf_fit_fraction, "use a fraction in (0, 1] of the ranks (e.g. 0.5)")
        if self.zipf_exponent is not None and not (math.isfinite(self.zipf_exponent) and self.zipf_exponent >= 0):
            raise _field_error("zipf_exponent", self.zipf_exponent, "use a finite exponent >= 0, or None to fit it")
        if not (isinstance(self.zipf_min_steps, int) and self.zipf_min_steps >= 0):
            raise _field_error("zipf_min_steps", self.zipf_min_steps, "use an integer >= 0")
        if not isinstance(self.sparse_step, bool):
            raise _field_error("sparse_step", self.sparse_step, "use True (the sparse training step) or False (the dense reference)")


#: why a batch rule refuses non-finite input in ``encode`` (see :func:`check_finite`)
BATCH_ENCODE_REASON = (
    "the selection is over the whole batch, so a non-finite token would take other tokens' share of the "
    "budget; the SAE refuses to encode them"
)


def check_finite(x: torch.Tensor, what: str = "input activations", reason: str | None = None) -> None:
    """Raise a ValueError if ``x`` holds NaN or inf (one reduction; a sync on GPU).

    ``reason`` says why they are refused (default: training would write NaN into the weights).
    """
    if not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        why = reason or "the SAE refuses to train on them rather than write NaN into its weights"
        raise ValueError(
            f"{what} contain {n_nan} NaN and {n_inf} inf values (shape {tuple(x.shape)}): {why}. Fix the "
            "activation source (e.g. the model's dtype overflowing: try dtype='float32', or filter the batch)."
        )


class AuxLossMixin:
    """Mixin for SAELens ``TrainingSAE`` subclasses: running densities, aux-loss dispatch, metrics.

    Buffers (persistent, float32/long, on the SAE's device):
        ``feature_density`` [d_sae] -- running firing density per feature (``!= 0``).
        ``density_steps`` [] -- how many steps fed ``feature_density``.
    """

    cfg: Any
    #: True for rules keeping negative codes: aux selection ranks by |pre|, values keep their sign
    signed_selection: ClassVar[bool] = False
    #: buffer names this class family adds and the saved inference model must not contain
    training_only_buffers: ClassVar[tuple[str, ...]] = ("feature_density", "density_steps")
    #: tokens per step (at least; strided) on which running densities are measured
    density_sample_tokens: ClassVar[int] = 512
    #: True for rules selecting over the whole batch: ``encode`` then refuses non-finite input
    #: (one NaN token would change every other token's codes); the training step always does
    batch_selection: ClassVar[bool] = False

    def __init__(self, cfg: Any, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)  # type: ignore[call-arg]
        device = self.W_dec.device  # type: ignore[attr-defined]
        self.register_buffer("feature_density", torch.zeros(cfg.d_sae, dtype=torch.float32, device=device))  # type: ignore[attr-defined]
        self.register_buffer("density_steps", torch.zeros((), dtype=torch.long, device=device))  # type: ignore[attr-defined]
        self._aux_entry = None

    # --- hooks an architecture may override ------------------------------------------------

    def aux_scores(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """How candidate latents are ranked for the residual reconstruction (|pre| if signed)."""
        return hidden_pre.abs() if self.signed_selection else hidden_pre

    def aux_decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Bias-free decode of auxiliary codes (TopK's: optional decoder-norm rescale, no b_dec)."""
        W_dec = self.W_dec  # type: ignore[attr-defined]
        if getattr(self.cfg, "rescale_acts_by_decoder_norm", False):
            acts = acts * (1 / W_dec.norm(dim=-1))
        recons = acts @ W_dec
        return self.reshape_fn_out(recons, self.d_head)  # type: ignore[attr-defined]

    def aux_k_value(self) -> int:
        return int(self.cfg.aux_k) if self.cfg.aux_k is not None else self.cfg.d_in // 2

    def aux_check_normalization(self) -> None:
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            raise ValueError(
                f"aux_loss={self.cfg.aux_loss!r} does not support normalize_activations="
                f"{self.cfg.normalize_activations!r}: the residual reconstruction would be in normalized "
                "space while the residual is not. Use normalize_activations='none' or "
                "'expected_average_only_in', or aux_loss='none'."
            )

    # --- running densities and the under-used set --------------------------------------------

    @torch.no_grad()
    def update_feature_density(self, feature_acts: torch.Tensor) -> None:
        """Fold this batch's firing rates into ``feature_density``; measured on every
        ``N // density_sample_tokens``-th token (a strided subsample: counting over the whole
        ``[N, d_sae]`` batch would cost a pass as slow as the selection itself)."""
        flat = feature_acts.detach().reshape(-1, feature_acts.shape[-1])
        if flat.is_sparse:
            flat = flat.to_dense()
        group = group_of(self)
        if group is None:
            stride = max(1, flat.shape[0] // self.density_sample_tokens)
            frac = M.batch_density(flat[::stride]).to(self.feature_density.dtype)
        else:  # data-parallel: the same strided sample of the global batch, counts summed over ranks
            rows, n_sample = strided_token_sample(flat.shape[0], self.density_sample_tokens, group, flat.device)
            fired = all_reduce(M.firing(flat.index_select(0, rows)).float().sum(0), "sum", group)
            frac = (fired / max(n_sample, 1)).to(self.feature_density.dtype)
        self.density_steps += 1
        rate = (1.0 / self.density_steps.double()).clamp_min(1.0 / self.cfg.density_window).to(frac.dtype)
        self.feature_density.lerp_(frac, rate)

    def zipf_fit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, log_C)`` of the Zipf curve over the running densities (see metrics.zipf_fit)."""
        if self.cfg.zipf_exponent is not None:
            return M._fit_fixed_alpha(self.feature_density, self.cfg.zipf_fit_fraction, self.cfg.zipf_exponent)
        return M.zipf_fit(self.feature_density, self.cfg.zipf_fit_fraction)

    @torch.no_grad()
    def zipf_shortfall(self) -> torch.Tensor:
        """Per feature ``1 - density / target`` clamped to [0, 1] (0: on or above the curve)."""
        alpha, log_c = self.zipf_fit()
        target = M.zipf_target(self.feature_density, alpha, log_c).double()
        return (1 - self.feature_density.double() / target.clamp_min(1e-300)).clamp(0, 1).to(self.feature_density.dtype)

    @torch.no_grad()
    def underused_mask(self, dead_mask: torch.Tensor | None) -> torch.Tensor:
        """The set U of the zipf loss: dead features, plus -- once ``zipf_min_steps`` steps of
        density exist -- those below ``zipf_underused_ratio`` times their Zipf target."""
        dead = dead_mask.bool() if dead_mask is not None else torch.zeros_like(self.feature_density, dtype=torch.bool)
        if int(self.density_steps) < self.cfg.zipf_min_steps:
            return dead
        return dead | (self.zipf_shortfall() > 1 - self.cfg.zipf_underused_ratio)

    # --- SAELens overrides --------------------------------------------------------------------

    def _aux_loss_entry(self):
        entry = self._aux_entry
        if entry is None or entry.name != self.cfg.aux_loss:
            entry = self._aux_entry = registry.get(self.cfg.aux_loss)
        return entry

    def calculate_aux_loss(self, step_input: Any, feature_acts: torch.Tensor, hidden_pre: torch.Tensor, sae_out: torch.Tensor, state: Any = None) -> dict[str, torch.Tensor]:
        step = AuxLossInput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            dead_mask=step_input.dead_neuron_mask,
            step_input=step_input,
            state=state,
        )
        out = self._aux_loss_entry().loss(self, step)
        if isinstance(out, dict):
            return out
        return {"auxiliary_reconstruction_loss": out}

    def step_aux_losses(self, step_input: Any, state: Any, feature_acts: torch.Tensor, sae_out: torch.Tensor) -> dict[str, torch.Tensor]:
        """The configured auxiliary loss for the shared selection step (its state included)."""
        return self.calculate_aux_loss(step_input, feature_acts, state.hidden_pre.view(*state.lead_shape, -1), sae_out, state=state)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_selection:
            check_finite(x, f"{self.cfg.architecture()} encode input", BATCH_ENCODE_REASON)
        return super().encode(x)  # type: ignore[misc]

    def training_forward_pass(self, step_input: Any) -> Any:
        check_finite(step_input.sae_in)
        output = super().training_forward_pass(step_input)  # type: ignore[misc]
        self.update_feature_density(output.feature_acts)
        output.metrics.update(self.lazy_metrics(output.feature_acts, step_input.dead_neuron_mask))
        return output

    def lazy_metrics(self, feature_acts: torch.Tensor, dead_mask: torch.Tensor | None) -> dict[str, Callable[[], float]]:
        """Zero-argument callables, evaluated only on logging steps (no sync otherwise)."""
        acts = feature_acts.detach()
        density = self.feature_density.detach().clone()
        dead = dead_mask.detach().clone() if dead_mask is not None else None
        steps = self.density_steps.detach().clone()
        cache: dict[str, Any] = {}

        def stats() -> dict[str, float]:
            if "l0" not in cache:
                cache["l0"] = M.l0_stats(acts.to_dense() if acts.is_sparse else acts)
            return cache["l0"]

        def fit() -> tuple[torch.Tensor, torch.Tensor]:
            if "fit" not in cache:
                cache["fit"] = (
                    M._fit_fixed_alpha(density, self.cfg.zipf_fit_fraction, self.cfg.zipf_exponent)
                    if self.cfg.zipf_exponent is not None
                    else M.zipf_fit(density, self.cfg.zipf_fit_fraction)
                )
            return cache["fit"]

        def underused_frac() -> float:
            alpha, log_c = fit()
            below = density.double() < self.cfg.zipf_underused_ratio * M.zipf_target(density, alpha, log_c).double()
            if int(steps) < self.cfg.zipf_min_steps:
                below = torch.zeros_like(below)
            if dead is not None:
                below = below | dead.bool()
            return float(below.float().mean())

        return {
            "dead_frac": lambda: M.dead_fraction(dead),
            "underused_frac": underused_frac,
            "zipf_exponent": lambda: float(fit()[0]),
            "l0_mean": lambda: stats()["l0_mean"],
            "l0_p50": lambda: stats()["l0_p50"],
            "l0_p99": lambda: stats()["l0_p99"],
            "empty_token_frac": lambda: stats()["empty_token_frac"],
        }

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)  # type: ignore[misc]
        for name in self._all_training_only_buffers():
            state_dict.pop(name, None)

    @classmethod
    def _all_training_only_buffers(cls) -> set[str]:
        names: set[str] = set()
        for klass in cls.__mro__:
            names.update(klass.__dict__.get("training_only_buffers", ()))
        return names
