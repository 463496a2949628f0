"""SAELens's own ``batchtopk`` SAE trained with this project's auxiliary losses (``aux_loss="zipf"``).

Selection is SAELens's BatchTopK rule (the batch's ``floor(k N)`` largest positive
pre-activations, ties by lowest row-major index), computed exactly on the sparse step by
``mutual_choice_indices`` with the batch rules' outlier guard; the saved model is SAELens's
``jumprelu``. The auxiliary loss is dispatched through :class:`AuxLossMixin`. The
threshold is this project's :class:`~sae_allocators.thresholds.ThresholdTracker` on SAELens's
``topk_threshold`` buffer: the same quantity (the batch's smallest positive code), but a running
mean over the first ``1/topk_threshold_lr`` steps before the EMA (SAELens's EMA starts at 0), a
refusal of batches with a zero budget, rescaling when the activation-norm scaling factor is
folded (on every SAELens version; SAELens fixed that in 6.4x), and calibration on held-out data
at the end of training (:mod:`sae_allocators.calibration`).
``threshold_rule="saelens"`` takes SAELens's own rule instead (the EMA from 0, no export correction);
with ``calibrate=False``, ``outlier_norm_ratio=0`` and ``aux_loss="auxk"`` this is the exact sparse twin
of SAELens's ``batchtopk`` (benchmark/configs.SPARSE_TWINS; tests/benchmark/test_sparse_baselines.py).
Since both run the same selection, guard and threshold rule, ``batchtopk_zipf`` and ``mutual_choice``
(with the same ``aux_loss``) train bit-identically (tests/architectures/test_sparse_step.py, every
parameter, buffer and the calibrated saved model; the earlier large preset's 7 pairs of records agree in
every figure), so the large preset trains them once (``Settings.same_runs``); ``mutual_choice`` is the
name the docs use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE

from sae_allocators import sparse
from sae_allocators.allocation.batch import mutual_choice_indices
from sae_allocators.architectures import kinds
from sae_allocators.architectures._common import check_k, check_rate, load_alias_config
from sae_allocators.architectures._step import SelectionStepMixin, StepState
from sae_allocators.distributed import all_reduce, group_of
from sae_allocators.distributed import select as dist_select
from sae_allocators.hookspecs import hookimpl
from sae_allocators.losses import AuxLossConfig, AuxLossMixin
from sae_allocators.thresholds import CalibrationConfig, ExportSteering, ThresholdTracker, export_threshold

NAME = "batchtopk_zipf"
#: the values of ``threshold_rule`` (:class:`BatchTopKZipfTrainingSAEConfig`)
THRESHOLD_RULES = ("tracked", "saelens")


@dataclass
class BatchTopKZipfTrainingSAEConfig(CalibrationConfig, AuxLossConfig, BatchTopKTrainingSAEConfig):
    """SAELens ``BatchTopKTrainingSAEConfig`` plus the :class:`AuxLossConfig` fields (default ``zipf``).

    Attributes:
        threshold_rule: how ``topk_threshold`` (the saved JumpReLU threshold) follows the batches'
            smallest kept code: ``"tracked"`` (default) the project's running mean, then EMA, with the
            export correction until calibration (:mod:`sae_allocators.thresholds`); ``"saelens"``
            SAELens BatchTopK's EMA from 0 (``theta <- (1 - lr) theta + lr tau``), saved as it is.
    """

    aux_loss: str = "zipf"
    threshold_rule: str = "tracked"

    def __post_init__(self) -> None:
        self.check_shared_fields()  # types and d_in / d_sae first: the checks below compare them
        check_k(self.k, self.d_sae)
        check_rate(self.topk_threshold_lr, "topk_threshold_lr")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(
                f"threshold_rule={self.threshold_rule!r} is invalid: use one of {', '.join(map(repr, THRESHOLD_RULES))} "
                '("tracked": a running mean, then an EMA, steered to the training L0 until calibration; '
                '"saelens": SAELens BatchTopK\'s EMA from 0).'
            )
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return NAME


class BatchTopKZipfTrainingSAE(SelectionStepMixin, AuxLossMixin, BatchTopKTrainingSAE):
    """SAELens BatchTopK with the auxiliary loss chosen by ``cfg.aux_loss``; saved as ``jumprelu``.

    The training step keeps the batch's ``floor(k N)`` largest positive pre-activations (SAELens's
    BatchTopK selection; ties by lowest row-major index) and updates SAELens's threshold with
    SAELens's own rule (EMA of the smallest positive kept value). Data-parallel
    (docs/distributed.md): both over the global batch, so every rank holds the same threshold.
    """

    rule_kind = kinds.BATCH_GLOBAL

    def select(self, hidden_pre: torch.Tensor, **context: Any) -> sparse.Selection:
        group = group_of(self)
        flat, tau = (
            mutual_choice_indices(hidden_pre, self.cfg.k)
            if group is None
            else dist_select.mutual_choice_indices(hidden_pre, self.cfg.k, group)
        )
        return sparse.from_flat(flat, hidden_pre.shape[0], hidden_pre.shape[1], tau, is_sorted=True)

    def after_step(self, state: StepState, output: Any) -> None:
        self.update_topk_threshold(state.values.detach())
        if self.steers_export:
            self.export_steering.update(state.hidden_pre, self.topk_threshold, self.cfg.k, group_of(self))
        output.metrics["topk_threshold"] = self.topk_threshold

    training_only_buffers = ("threshold_steps", "threshold_calibrated", "threshold_export_scale")

    def __init__(self, cfg: BatchTopKZipfTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self.threshold_tracker = ThresholdTracker(
            self,
            value="topk_threshold",
            steps="threshold_steps",
            rate_field="topk_threshold_lr",
            calibrated="threshold_calibrated",
            warm_start=cfg.threshold_rule == "tracked",
        )
        self.export_steering = ExportSteering(self)

    @property
    def steers_export(self) -> bool:
        """The export correction runs (``threshold_rule="tracked"``); SAELens's rule saves theta as it is."""
        return self.cfg.threshold_rule == "tracked"

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch rule on ``x``, outlier guard included, as in a training step."""
        return self.batch_rule_encode(x, lambda ranked: mutual_choice_indices(ranked, self.cfg.k)[0])

    @torch.no_grad()
    def update_topk_threshold(self, acts_topk: torch.Tensor) -> None:
        """theta <- running mean, then EMA, of the batch's smallest positive code (SAELens's tau;
        over the global batch when data-parallel, so every rank holds the same theta)."""
        acts = acts_topk.detach()
        tau = torch.where(acts > 0, acts, torch.full((), torch.inf, dtype=acts.dtype, device=acts.device)).amin()
        group = group_of(self)
        if group is not None:  # data-parallel: the global batch's smallest positive kept value
            tau = all_reduce(tau.double().reshape(1), "min", group)[0]
        self.threshold_tracker.update(tau)

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        TopKTrainingSAE.fold_activation_norm_scaling_factor(self, scaling_factor)
        self.threshold_tracker.fold(scaling_factor)

    def inference_thresholds(self) -> torch.Tensor:
        """The saved JumpReLU threshold for every feature: the calibrated theta if calibration ran,
        else ``c * theta`` (the export correction, :class:`~sae_allocators.thresholds.ExportSteering`;
        theta itself under ``threshold_rule="saelens"``)."""
        theta = (
            self.topk_threshold
            if self.threshold_tracker.is_calibrated or not self.steers_export
            else self.export_steering.apply(self.topk_threshold)
        )
        return theta.expand(self.cfg.d_sae)

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        self.cfg.metadata.thresholds_calibrated = self.threshold_tracker.is_calibrated
        state_dict["threshold"] = export_threshold(
            self.inference_thresholds().detach(), self.b_enc, "batchtopk_zipf threshold theta (topk_threshold)"
        )

    def lazy_metrics(self, feature_acts: torch.Tensor, dead_mask: torch.Tensor | None) -> dict[str, Any]:
        out = super().lazy_metrics(feature_acts, dead_mask)
        out["threshold"] = self.threshold_tracker.metric()
        return out


JumpReLUSAEZipfLoadConfig = load_alias_config(JumpReLUSAEConfig, NAME)


@hookimpl
def register_architectures(register) -> None:
    register(
        NAME,
        inference=(JumpReLUSAE, JumpReLUSAEZipfLoadConfig),
        training=(BatchTopKZipfTrainingSAE, BatchTopKZipfTrainingSAEConfig),
        description="SAELens batchtopk trained with aux_loss='zipf' (or 'auxk'/'none'); saved as jumprelu",
    )
