"""Mutual Choice SAE (Ayonrinde 2024, arXiv 2411.02124): the batch keeps its k*N largest affinities.

The selection is the same as SAELens's ``batchtopk`` (Bussmann et al. 2024); what differs is how
it is computed (exact, without a full sort: :mod:`sae_allocators.allocation.batch`), the default
auxiliary loss (``aux_zipf``), and the threshold: a running global threshold theta (mean of the
batch's smallest kept value over the first ``1/topk_threshold_lr`` steps, then an EMA) that is
saved, in the saved model's units, as a SAELens ``jumprelu``. See docs/mutual_choice.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE

from sae_allocators import sparse
from sae_allocators.allocation.batch import batch_topk, mutual_choice_indices
from sae_allocators.architectures import kinds
from sae_allocators.architectures._common import RefuseTrainingCheckpointMixin, check_k, check_rate, pre_activations
from sae_allocators.architectures._step import SelectionStepMixin, StepState
from sae_allocators.distributed import group_of
from sae_allocators.distributed import select as dist_select
from sae_allocators.hookspecs import hookimpl
from sae_allocators.losses import AuxLossConfig, AuxLossMixin, check_finite
from sae_allocators.losses.base import BATCH_ENCODE_REASON
from sae_allocators.thresholds import CalibrationConfig, ExportSteering, ThresholdTracker, export_threshold

NAME = "mutual_choice"


class MutualChoice(torch.nn.Module):
    """Activation module: batch-level top-(k*N) over all leading dimensions."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        check_finite(hidden_pre, f"{NAME} pre-activations", BATCH_ENCODE_REASON)
        return batch_topk(hidden_pre, self.k)


@dataclass
class MutualChoiceSAEConfig(TopKSAEConfig):
    """Batch-mode inference config (parity checks); ``k`` is the average L0 (a float)."""

    k: float = 32  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        check_k(self.k, self.d_sae)

    @classmethod
    def architecture(cls) -> str:
        return NAME


class MutualChoiceSAE(RefuseTrainingCheckpointMixin, TopKSAE):
    """Batch-mode inference: encodes a whole batch with the training-time selection."""

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return MutualChoice(self.cfg.k)


@dataclass
class MutualChoiceTrainingSAEConfig(CalibrationConfig, AuxLossConfig, BatchTopKTrainingSAEConfig):
    """Training config.

    Attributes:
        k: average active features per token (float); the batch keeps ``floor(k * N)`` entries.
        topk_threshold_lr: EMA rate of the global threshold (after a running-mean warm-up).
        calibrate, calibration_tokens: fit the saved threshold on held-out activations at the
            end of training (:class:`~sae_allocators.thresholds.CalibrationConfig`).
        aux_loss: ``"zipf"`` (default), ``"auxk"``, ``"none"`` or a plugin's loss.
        (plus SAELens's TopK fields and the :class:`AuxLossConfig` fields)
    """

    aux_loss: str = "zipf"

    def __post_init__(self) -> None:
        self.check_shared_fields()  # types and d_in / d_sae first: the checks below compare them
        check_k(self.k, self.d_sae)
        check_rate(self.topk_threshold_lr, "topk_threshold_lr")
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return NAME


class MutualChoiceTrainingSAE(SelectionStepMixin, AuxLossMixin, BatchTopKTrainingSAE):
    """Mutual Choice training SAE; the training step keeps the batch's ``floor(k N)`` largest
    affinities (:meth:`select`), ``encode_thresholded`` is the saved batch-free rule."""

    rule_kind = kinds.BATCH_GLOBAL

    cfg: MutualChoiceTrainingSAEConfig  # type: ignore[assignment]
    training_only_buffers = ("threshold_steps", "threshold_calibrated", "threshold_export_scale")

    def __init__(self, cfg: MutualChoiceTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        #: theta: SAELens BatchTopK's ``topk_threshold`` buffer, warm-started (sae_allocators.thresholds)
        self.threshold_tracker = ThresholdTracker(
            self,
            value="topk_threshold",
            steps="threshold_steps",
            rate_field="topk_threshold_lr",
            calibrated="threshold_calibrated",
        )
        #: c: the uncalibrated export's correction to the training L0 (sae_allocators.thresholds)
        self.export_steering = ExportSteering(self)

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return MutualChoice(self.cfg.k)

    def select(self, hidden_pre: torch.Tensor, **context: Any) -> sparse.Selection:
        group = group_of(self)  # data-parallel: the global batch's k*N largest (docs/distributed.md)
        flat, tau = (
            mutual_choice_indices(hidden_pre, self.cfg.k)
            if group is None
            else dist_select.mutual_choice_indices(hidden_pre, self.cfg.k, group)
        )
        return sparse.from_flat(flat, hidden_pre.shape[0], hidden_pre.shape[1], tau, is_sorted=True)

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch rule on ``x``, outlier guard included (SAELens's contract; training steps go
        through :meth:`select`)."""
        return self.batch_rule_encode(x, lambda ranked: mutual_choice_indices(ranked, self.cfg.k)[0])

    def after_step(self, state: StepState, output: Any) -> None:
        self.update_threshold(state.selection.tau)
        self.export_steering.update(state.hidden_pre, self.topk_threshold, self.cfg.k, group_of(self))
        output.metrics["topk_threshold"] = self.topk_threshold

    @torch.no_grad()
    def update_threshold(self, tau: torch.Tensor) -> None:
        """theta <- running mean (first 1/lr steps), then EMA, of the batch's smallest kept value."""
        self.threshold_tracker.update(tau)

    @torch.no_grad()
    def encode_thresholded(self, x: torch.Tensor) -> torch.Tensor:
        """The batch-free rule the saved ``jumprelu`` applies: ``relu(pre) * (pre > theta)``."""
        hidden_pre = pre_activations(self, x)
        return hidden_pre.relu() * (hidden_pre > self.inference_thresholds().to(hidden_pre.dtype))

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        # Same on every SAELens version (BatchTopK only fixed this in 6.4x, #763).
        TopKTrainingSAE.fold_activation_norm_scaling_factor(self, scaling_factor)
        self.threshold_tracker.fold(scaling_factor)

    def inference_thresholds(self) -> torch.Tensor:
        """The saved JumpReLU threshold for every feature: the calibrated theta if calibration ran,
        else ``c * theta`` (the running theta with the export correction :class:`ExportSteering`)."""
        theta = (
            self.topk_threshold
            if self.threshold_tracker.is_calibrated
            else self.export_steering.apply(self.topk_threshold)
        )
        return theta.expand(self.cfg.d_sae)

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        self.cfg.metadata.thresholds_calibrated = self.threshold_tracker.is_calibrated
        state_dict["threshold"] = export_threshold(
            self.inference_thresholds().detach(), self.b_enc, "mutual_choice threshold theta (topk_threshold)"
        )

    def lazy_metrics(self, feature_acts: torch.Tensor, dead_mask: torch.Tensor | None) -> dict[str, Any]:
        out = super().lazy_metrics(feature_acts, dead_mask)
        out["threshold"] = self.threshold_tracker.metric()
        return out


@hookimpl
def register_architectures(register) -> None:
    register(
        NAME,
        training=(MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig),
        inference=(MutualChoiceSAE, MutualChoiceSAEConfig),
        description="Mutual Choice: batch keeps its k*N largest affinities (exact, fast); saved as jumprelu",
    )
