"""SAELens's own ``batchtopk`` SAE trained with this project's auxiliary losses (``aux_loss="zipf"``).

Selection and threshold are SAELens's ``BatchTopKTrainingSAE`` unchanged (full ``torch.topk``,
EMA of the smallest positive code); the saved model is SAELens's ``jumprelu``. Only the auxiliary
loss is dispatched through :class:`AuxLossMixin`, and the threshold is rescaled when the
activation-norm scaling factor is folded on every SAELens version (SAELens fixed that in 6.4x).
For the fast exact selection with a warm-started threshold use ``mutual_choice``.
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
from sae_allocators.architectures._common import check_k, check_rate, load_alias_config
from sae_allocators.architectures._step import SelectionStepMixin, StepState
from sae_allocators.distributed import all_reduce, group_of
from sae_allocators.distributed import select as dist_select
from sae_allocators.hookspecs import hookimpl
from sae_allocators.losses import AuxLossConfig, AuxLossMixin

NAME = "batchtopk_zipf"


@dataclass
class BatchTopKZipfTrainingSAEConfig(AuxLossConfig, BatchTopKTrainingSAEConfig):
    """SAELens ``BatchTopKTrainingSAEConfig`` plus the :class:`AuxLossConfig` fields (default ``zipf``)."""

    aux_loss: str = "zipf"

    def __post_init__(self) -> None:
        check_k(self.k, self.d_sae)
        check_rate(self.topk_threshold_lr, "topk_threshold_lr")
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return NAME


class BatchTopKZipfTrainingSAE(AuxLossMixin, SelectionStepMixin, BatchTopKTrainingSAE):
    """SAELens BatchTopK with the auxiliary loss chosen by ``cfg.aux_loss``; saved as ``jumprelu``.

    The training step keeps the batch's ``floor(k N)`` largest positive pre-activations (SAELens's
    BatchTopK selection; ties by lowest row-major index) and updates SAELens's threshold with
    SAELens's own rule (EMA of the smallest positive kept value). Data-parallel
    (docs/distributed.md): both over the global batch, so every rank holds the same threshold.
    """

    def select(self, hidden_pre: torch.Tensor, **context: Any) -> sparse.Selection:
        group = group_of(self)
        flat, tau = mutual_choice_indices(hidden_pre, self.cfg.k) if group is None else dist_select.mutual_choice_indices(hidden_pre, self.cfg.k, group)
        return sparse.from_flat(flat, hidden_pre.shape[0], hidden_pre.shape[1], tau, is_sorted=True)

    def after_step(self, state: StepState, output: Any) -> None:
        self.update_topk_threshold(state.values.detach())
        output.metrics["topk_threshold"] = self.topk_threshold

    @torch.no_grad()
    def update_topk_threshold(self, acts_topk: torch.Tensor) -> None:
        group = group_of(self)
        if group is None:
            return super().update_topk_threshold(acts_topk)
        pos = acts_topk[acts_topk > 0]  # the global smallest positive kept value, then SAELens's EMA
        inf = torch.tensor(float("inf"), dtype=torch.double, device=acts_topk.device)
        smallest = all_reduce((pos.min().double() if pos.numel() else inf).reshape(1), "min", group)[0]
        if torch.isfinite(smallest):
            lr = self.cfg.topk_threshold_lr
            self.topk_threshold = (1 - lr) * self.topk_threshold + lr * smallest.to(self.topk_threshold.dtype)
        return None

    batch_selection = True  # encode refuses non-finite input

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        TopKTrainingSAE.fold_activation_norm_scaling_factor(self, scaling_factor)
        if self.cfg.rescale_acts_by_decoder_norm:
            self.topk_threshold /= scaling_factor


JumpReLUSAEZipfLoadConfig = load_alias_config(JumpReLUSAEConfig, NAME)


@hookimpl
def register_architectures(register) -> None:
    register(
        NAME,
        inference=(JumpReLUSAE, JumpReLUSAEZipfLoadConfig),
        training=(BatchTopKZipfTrainingSAE, BatchTopKZipfTrainingSAEConfig),
        description="SAELens batchtopk trained with aux_loss='zipf' (or 'auxk'/'none'); saved as jumprelu",
    )
