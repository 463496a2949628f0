"""SAELens's own ``topk`` SAE trained with this project's auxiliary losses (``aux_loss="zipf"``).

The selection, decoder-norm handling and the saved model are SAELens's ``TopKTrainingSAE``
unchanged (the saved ``cfg.json`` says ``"architecture": "topk"``, loadable by plain SAELens);
only the auxiliary loss is dispatched through :class:`AuxLossMixin`. It needs a name of its own
because SAELens picks the training class from the architecture name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sae_lens.saes.sae import SAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

from sae_allocators import sparse
from sae_allocators.allocation.topk import topk_indices
from sae_allocators.architectures import kinds
from sae_allocators.architectures._common import check_k, load_alias_config
from sae_allocators.architectures._step import SelectionStepMixin
from sae_allocators.hookspecs import hookimpl
from sae_allocators.losses import AuxLossConfig, AuxLossMixin

NAME = "topk_zipf"


@dataclass
class TopKZipfTrainingSAEConfig(AuxLossConfig, TopKTrainingSAEConfig):
    """SAELens ``TopKTrainingSAEConfig`` plus the :class:`AuxLossConfig` fields (default ``zipf``)."""

    aux_loss: str = "zipf"

    def __post_init__(self) -> None:
        self.check_shared_fields()  # types and d_in / d_sae first: the checks below compare them
        check_k(self.k, self.d_sae)
        if int(self.k) != self.k:
            raise ValueError(
                f"k={self.k!r} is invalid: topk keeps exactly k features per token, so k must be an integer."
            )
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return NAME

    def get_inference_config_class(self) -> type[SAEConfig]:
        return TopKSAEConfig


class TopKZipfTrainingSAE(SelectionStepMixin, AuxLossMixin, TopKTrainingSAE):
    """SAELens TopK with the auxiliary loss chosen by ``cfg.aux_loss``; saved as ``topk``.

    The training step keeps, per token, the ``k`` largest pre-activations that are positive
    (SAELens's TopK codes: the others it keeps are ReLU'd to 0).
    """

    rule_kind = kinds.PER_TOKEN

    def select(self, hidden_pre: torch.Tensor, **context: Any) -> sparse.Selection:
        indices, keep = topk_indices(hidden_pre, int(self.cfg.k))
        return sparse.from_row_indices(indices, hidden_pre.shape[-1], keep)


TopKSAEZipfLoadConfig = load_alias_config(TopKSAEConfig, NAME)


@hookimpl
def register_architectures(register) -> None:
    register(
        NAME,
        inference=(TopKSAE, TopKSAEZipfLoadConfig),
        training=(TopKZipfTrainingSAE, TopKZipfTrainingSAEConfig),
        description="SAELens topk trained with aux_loss='zipf' (or 'auxk'/'none'); saved as topk",
    )
