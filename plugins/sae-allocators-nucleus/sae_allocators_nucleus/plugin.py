"""The nucleus (top-p) SAE: per token, keep the fewest features holding a share p of its activation.

Rule (per token, ``a = relu(pre)``): sort the ``k_max`` largest entries of ``a`` in descending
order, take the shortest prefix whose sum is at least ``top_p * sum(a)``, zero the rest. Tokens
with concentrated activations use few features, diffuse ones use more (up to ``k_max``).

Three parts, as in SAELens: a pure allocation function, config dataclasses, and thin SAE classes
(here reusing SAELens's TopK shells, so AuxK and decoder-norm handling come for free). The only
line that talks to sae-allocators is ``@hookimpl register_architectures``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

from sae_allocators import hookimpl

NAME = "nucleus"


def nucleus_select(pre: torch.Tensor, top_p: float, k_max: int) -> torch.Tensor:
    """Pure allocation rule; any leading dimensions. Returns codes with unselected entries zero."""
    acts = pre.relu()
    k_max = min(k_max, acts.shape[-1])
    values, indices = torch.topk(acts, k_max, dim=-1, sorted=True)
    total = acts.sum(dim=-1, keepdim=True)
    before = values.cumsum(dim=-1) - values  # mass strictly before each entry
    keep = (before < top_p * total) & (values > 0)
    return torch.zeros_like(acts).scatter_(-1, indices, values * keep)


class Nucleus(torch.nn.Module):
    def __init__(self, top_p: float, k_max: int):
        super().__init__()
        self.top_p, self.k_max = top_p, k_max

    def forward(self, pre: torch.Tensor) -> torch.Tensor:
        return nucleus_select(pre, self.top_p, self.k_max)


def _check(top_p: float, k_max: int, d_sae: int) -> None:
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"nucleus: top_p={top_p} must be in (0, 1]; e.g. top_p=0.5")
    if not 1 <= k_max <= d_sae:
        raise ValueError(f"nucleus: k_max={k_max} must be between 1 and d_sae={d_sae}")


@dataclass
class NucleusSAEConfig(TopKSAEConfig):
    top_p: float = 0.5
    k_max: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.top_p, self.k_max, self.d_sae)

    @classmethod
    def architecture(cls) -> str:
        return NAME


class NucleusSAE(TopKSAE):
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return Nucleus(self.cfg.top_p, self.cfg.k_max)


@dataclass
class NucleusTrainingSAEConfig(TopKTrainingSAEConfig):
    top_p: float = 0.5
    k_max: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.top_p, self.k_max, self.d_sae)

    @classmethod
    def architecture(cls) -> str:
        return NAME


class NucleusTrainingSAE(TopKTrainingSAE):
    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return Nucleus(self.cfg.top_p, self.cfg.k_max)


@hookimpl
def register_architectures(register) -> None:
    register(
        NAME,
        training=(NucleusTrainingSAE, NucleusTrainingSAEConfig),
        inference=(NucleusSAE, NucleusSAEConfig),
        description="example plugin: per-token top-p share of activation mass, capped at k_max",
    )
