"""AbsTopK trained with this project's auxiliary losses, with signed selection (``aux_zipf``).

SAELens's ``abstopk`` (or, on SAELens < 6.53, this project's port of it, see
:mod:`sae_allocators.architectures.abstopk`) only has AuxK over dead latents. This architecture
is that same SAE -- same activation, same decoder-norm handling, and the saved ``cfg.json`` says
``"architecture": "abstopk"``, so plain SAELens >= 6.53 loads it -- with the auxiliary loss
dispatched through :class:`AuxLossMixin` with ``signed_selection``: candidates are ranked by
``|pre|`` and keep their sign, exactly as AbsTopK's own selection. Densities, dead / under-used
sets and the L0 metrics count a feature as firing when its code is ``!= 0``.

It needs a name of its own because SAELens picks the training class from the architecture name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sae_lens.saes.sae import SAEConfig

from sae_allocators import sparse
from sae_allocators.allocation.signed import abs_topk_indices
from sae_allocators.architectures import kinds
from sae_allocators.architectures._common import check_k, load_alias_config
from sae_allocators.architectures._step import SelectionStepMixin
from sae_allocators.architectures.abstopk import (
    AbsTopKSAE,
    AbsTopKSAEConfig,
    AbsTopKTrainingSAE,
    AbsTopKTrainingSAEConfig,
)
from sae_allocators.hookspecs import hookimpl
from sae_allocators.losses import AuxLossConfig, AuxLossMixin

NAME = "abstopk_zipf"


@dataclass
class AbsTopKZipfTrainingSAEConfig(AuxLossConfig, AbsTopKTrainingSAEConfig):  # type: ignore[misc,valid-type]
    """AbsTopK's training config plus the :class:`AuxLossConfig` fields (default ``aux_loss="zipf"``)."""

    aux_loss: str = "zipf"

    def __post_init__(self) -> None:
        self.check_shared_fields()  # types and d_in / d_sae first: the checks below compare them
        check_k(self.k, self.d_sae)
        if int(self.k) != self.k:
            raise ValueError(
                f"k={self.k!r} is invalid: abstopk keeps exactly k features per token, so k must be an integer."
            )
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return NAME

    def get_inference_config_class(self) -> type[SAEConfig]:
        return AbsTopKSAEConfig


class AbsTopKZipfTrainingSAE(SelectionStepMixin, AuxLossMixin, AbsTopKTrainingSAE):  # type: ignore[misc,valid-type]
    """AbsTopK with the auxiliary loss chosen by ``cfg.aux_loss`` (signed selection); saved as ``abstopk``.

    The training step keeps, per token, the ``k`` entries of largest ``|pre|`` that are non-zero.
    """

    rule_kind = kinds.PER_TOKEN

    signed_selection = True

    def select(self, hidden_pre: torch.Tensor, **context: Any) -> sparse.Selection:
        indices, keep = abs_topk_indices(hidden_pre, int(self.cfg.k))
        return sparse.from_row_indices(indices, hidden_pre.shape[-1], keep)


AbsTopKSAEZipfLoadConfig = load_alias_config(AbsTopKSAEConfig, NAME)


@hookimpl
def register_architectures(register) -> None:
    register(
        NAME,
        inference=(AbsTopKSAE, AbsTopKSAEZipfLoadConfig),
        training=(AbsTopKZipfTrainingSAE, AbsTopKZipfTrainingSAEConfig),
        description="abstopk trained with aux_loss='zipf' (or 'auxk'/'none'), signed selection; saved as abstopk",
    )
