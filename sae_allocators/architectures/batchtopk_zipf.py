"""SAELens's own ``batchtopk`` SAE trained with this project's auxiliary losses (``aux_loss="zipf"``).

Selection and threshold are SAELens's ``BatchTopKTrainingSAE`` unchanged (full ``torch.topk``,
EMA of the smallest positive code); the saved model is SAELens's ``jumprelu``. Only the auxiliary
loss is dispatched through :class:`AuxLossMixin`, and the threshold is rescaled when the
activation-norm scaling factor is folded on every SAELens version (SAELens fixed that in 6.4x).
For the fast exact selection with a warm-started threshold use ``mutual_choice``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE

from sae_allocators.architectures._common import check_k, check_rate, load_alias_config
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


class BatchTopKZipfTrainingSAE(AuxLossMixin, BatchTopKTrainingSAE):
    """SAELens BatchTopK with the auxiliary loss chosen by ``cfg.aux_loss``; saved as ``jumprelu``."""

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
