"""Mutual Choice SAE (Ayonrinde 2024, arXiv 2411.02124): the batch keeps its k*N largest affinities.

The selection is the same as SAELens's ``batchtopk`` (Bussmann et al. 2024). Training keeps an
EMA of the smallest selected activation as a global threshold; the saved inference model is a
SAELens ``jumprelu`` with that threshold, so it loads anywhere without this package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

from sae_allocators.allocation import batch_topk
from sae_allocators.hookspecs import hookimpl

NAME = "mutual_choice"


class MutualChoice(torch.nn.Module):
    """Activation module: batch-level top-(k*N) over all leading dimensions."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        return batch_topk(hidden_pre, self.k)


@dataclass
class MutualChoiceSAEConfig(TopKSAEConfig):
    """Inference config for batch-mode encoding (parity checks); ``k`` is the average L0."""

    k: float = 32  # type: ignore[assignment]

    @classmethod
    def architecture(cls) -> str:
        return NAME


class MutualChoiceSAE(TopKSAE):
    """Batch-mode inference: encodes a whole batch with the training-time selection."""

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return MutualChoice(self.cfg.k)


@dataclass
class MutualChoiceTrainingSAEConfig(BatchTopKTrainingSAEConfig):
    """Training config: ``k`` = average active features per token (float)."""

    @classmethod
    def architecture(cls) -> str:
        return NAME


class MutualChoiceTrainingSAE(BatchTopKTrainingSAE):
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return MutualChoice(self.cfg.k)


@hookimpl
def register_architectures(register) -> None:
    register(
        NAME,
        training=(MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig),
        inference=(MutualChoiceSAE, MutualChoiceSAEConfig),
        description="Mutual Choice: batch keeps its k*N largest affinities; saved as jumprelu",
    )
