"""The auxiliary-loss contract every training architecture of this project shares.

Two pieces, both mixins so that an architecture adopts them with one base class each (the jobs
behind them live in their own modules: :mod:`.config` validates the fields, :mod:`.density` keeps
the running densities, :mod:`.zipf` fits the Zipf curve and finds the under-used set):

- :class:`~sae_allocators.losses.config.AuxLossConfig` (in :mod:`.config`) -- dataclass fields ``aux_loss`` (a registered loss name),
  ``aux_loss_coefficient``, ``aux_k`` and the running-density / Zipf parameters, validated in
  ``__post_init__`` (a bad value is a ``ValueError`` naming the field, before any training step).
- :class:`AuxLossMixin` -- for ``TrainingSAE`` subclasses: keeps running feature densities as
  persistent buffers (they survive checkpoint and resume, and are dropped from the saved
  inference model), checks the input is finite, dispatches ``calculate_aux_loss`` to the loss
  registered under ``cfg.aux_loss``, and adds lazy metrics (dead / under-used fractions, fitted
  Zipf exponent, per-token L0 mean / p50 / p99, empty-token fraction).

Usage (the whole integration for a TopK-like architecture that keeps SAELens's own step)::

    @dataclass
    class MyTrainingSAEConfig(AuxLossConfig, TopKTrainingSAEConfig):
        aux_loss: str = "zipf"          # the default for this architecture
        ...

    class MyTrainingSAE(AuxLossMixin, TopKTrainingSAE):
        signed_selection = True         # only for rules that keep negative codes (AbsTopK)

Put the mixin *first* in the bases so its ``__post_init__`` / ``calculate_aux_loss`` /
``training_forward_pass`` wrap SAELens's. This project's architectures put
:class:`~sae_allocators.architectures._step.SelectionStepMixin` before it: its
``training_forward_pass`` is then the whole step (and calls ``calculate_aux_loss``,
``update_feature_density`` and ``lazy_metrics`` itself). Override :meth:`AuxLossMixin.aux_scores`
or :meth:`AuxLossMixin.aux_decode` only if ranking or bias-free decoding differ from TopK's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from sae_lens.saes.topk_sae import act_times_W_dec

from sae_allocators import metrics as M
from sae_allocators.distributed.data_parallel import group_of
from sae_allocators.losses import density, registry, zipf


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
    #: (one NaN token would change every other token's codes); the training step always does.
    #: Classes on the shared step derive it from their ``rule_kind`` (SelectionStepMixin).
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
        """Bias-free decode of dense auxiliary codes: SAELens TopK's ``act_times_W_dec`` (optional
        decoder-norm rescale, no b_dec), heads restored."""
        recons = act_times_W_dec(acts, self.W_dec, bool(getattr(self.cfg, "rescale_acts_by_decoder_norm", False)))  # type: ignore[attr-defined]
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
        """Fold this batch's firing rates into ``feature_density`` (see
        :func:`sae_allocators.losses.density.update_running_density`)."""
        density.update_running_density(
            self.feature_density,
            self.density_steps,
            feature_acts,
            self.cfg.density_window,
            self.density_sample_tokens,
            group_of(self),
        )

    def zipf_fit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, log_C)`` of the Zipf curve over the running densities (see metrics.zipf_fit)."""
        return zipf.fit(self.feature_density, self.cfg)

    @torch.no_grad()
    def zipf_shortfall(self) -> torch.Tensor:
        """Per feature ``1 - density / target`` clamped to [0, 1] (0: on or above the curve)."""
        alpha, log_c = self.zipf_fit()
        return zipf.shortfall(self.feature_density, alpha, log_c)

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

    def calculate_aux_loss(
        self,
        step_input: Any,
        feature_acts: torch.Tensor,
        hidden_pre: torch.Tensor,
        sae_out: torch.Tensor,
        state: Any = None,
    ) -> dict[str, torch.Tensor]:
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

    def lazy_metrics(
        self, feature_acts: torch.Tensor, dead_mask: torch.Tensor | None
    ) -> dict[str, Callable[[], float]]:
        """Zero-argument callables, evaluated only on logging steps (no sync otherwise)."""
        acts = feature_acts.detach()
        density_now = self.feature_density.detach().clone()
        dead = dead_mask.detach().clone() if dead_mask is not None else None
        steps = self.density_steps.detach().clone()
        cache: dict[str, Any] = {}

        def stats() -> dict[str, float]:
            if "l0" not in cache:
                cache["l0"] = M.l0_stats(acts.to_dense() if acts.is_sparse else acts)
            return cache["l0"]

        def fit() -> tuple[torch.Tensor, torch.Tensor]:
            if "fit" not in cache:
                cache["fit"] = zipf.fit(density_now, self.cfg)
            return cache["fit"]

        def underused_frac() -> float:
            return zipf.underused_fraction(density_now, int(steps), dead, fit(), self.cfg)

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
