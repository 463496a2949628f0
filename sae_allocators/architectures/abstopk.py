"""AbsTopK (Zhu et al. 2025, arXiv 2510.00404): per token, the k largest ``|pre|``, sign kept.

SAELens >= 6.53 ships ``abstopk`` (``sae_lens.saes.abstopk_sae``); older 6.x does not. This
module holds a port of SAELens's implementation -- the same activation, the same config fields,
the same weight names and the same decoder-norm folding on save, so a folder written by either
side loads on the other -- and offers it to the host under ``"abstopk"``:

- on SAELens < 6.53 the host registers the port, so ``architecture="abstopk"`` trains, saves
  and loads exactly as it will on newer SAELens;
- on SAELens >= 6.53 the host keeps SAELens's own classes (the offer is recorded as deferred).

The public names ``AbsTopKSAE``, ``AbsTopKSAEConfig``, ``AbsTopKTrainingSAE`` and
``AbsTopKTrainingSAEConfig`` are SAELens's classes where they exist and the port otherwise;
build on them (``abstopk_zipf`` does) to get SAELens's implementation wherever there is one.

The port follows SAELens 6.54's ``abstopk_sae.py`` (MIT, Copyright 2023 Joseph Bloom), itself
after the paper's MIT reference implementation (github.com/GoXzascc/AbsTopK-SAE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from sae_lens.saes.sae import SAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig, act_times_W_dec
from torch import nn

from sae_allocators.allocation.signed import abs_topk
from sae_allocators.hookspecs import hookimpl

try:  # SAELens >= 6.53
    from sae_lens.saes import abstopk_sae as _saelens_abstopk
except ImportError:  # SAELens 6.38 - 6.52
    _saelens_abstopk = None

NAME = "abstopk"

#: True when the installed SAELens provides ``abstopk`` itself
SAELENS_HAS_ABSTOPK: bool = _saelens_abstopk is not None


class AbsTopK(nn.Module):
    """Activation: keep the ``k`` entries of largest magnitude with their sign (no ReLU)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return abs_topk(x, self.k)


@dataclass
class AbsTopKSAEConfigPort(TopKSAEConfig):
    """The port's inference config: SAELens's ``TopKSAEConfig`` fields (``k``,
    ``rescale_acts_by_decoder_norm``, ...), architecture ``"abstopk"``."""

    @classmethod
    def architecture(cls) -> str:
        return NAME


class AbsTopKSAEPort(TopKSAE):
    """The port's inference SAE: SAELens's TopK SAE with the AbsTopK activation."""

    cfg: AbsTopKSAEConfigPort  # type: ignore[assignment]

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return AbsTopK(self.cfg.k)


@dataclass
class AbsTopKTrainingSAEConfigPort(TopKTrainingSAEConfig):
    """The port's training config: SAELens's ``TopKTrainingSAEConfig`` fields;
    ``use_sparse_activations`` is ignored (the AbsTopK activation is always dense)."""

    @classmethod
    def architecture(cls) -> str:
        return NAME

    def get_inference_config_class(self) -> type[SAEConfig]:
        return AbsTopKSAEConfigPort


class AbsTopKTrainingSAEPort(TopKTrainingSAE):
    """The port's training SAE: TopK training with the AbsTopK activation and SAELens's AbsTopK
    auxiliary loss (AuxK over dead latents, selected by ``|pre|``, signed values kept)."""

    cfg: AbsTopKTrainingSAEConfigPort  # type: ignore[assignment]

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return AbsTopK(self.cfg.k)

    def calculate_aux_loss(
        self, step_input: Any, feature_acts: torch.Tensor, hidden_pre: torch.Tensor, sae_out: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        loss = self.calculate_abstopk_aux_loss(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            hidden_pre=hidden_pre,
            dead_neuron_mask=step_input.dead_neuron_mask,
        )
        return {"auxiliary_reconstruction_loss": loss}

    def calculate_abstopk_aux_loss(
        self,
        sae_in: torch.Tensor,
        sae_out: torch.Tensor,
        hidden_pre: torch.Tensor,
        dead_neuron_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """SAELens's TopK auxiliary loss with dead latents ranked by ``|pre|`` (signed values)."""
        if dead_neuron_mask is None or (num_dead := int(dead_neuron_mask.sum())) == 0:
            return sae_out.new_tensor(0.0)
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            raise ValueError(
                "AbsTopK auxiliary loss does not support activation normalization "
                f"(normalize_activations={self.cfg.normalize_activations!r}). "
                "The aux loss reconstruction would be in normalized space while the "
                "residual is in the original space, producing incorrect gradients."
            )
        residual = (sae_in - sae_out).detach()
        k_aux = sae_in.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        auxk_acts = calculate_abstopk_aux_acts(k_aux=k_aux, hidden_pre=hidden_pre, dead_neuron_mask=dead_neuron_mask)
        recons = act_times_W_dec(auxk_acts, self.W_dec, self.cfg.rescale_acts_by_decoder_norm)
        recons = self.reshape_fn_out(recons, self.d_head)
        auxk_loss = (recons - residual).pow(2).sum(dim=-1).mean()
        return self.cfg.aux_loss_coefficient * scale * auxk_loss


def calculate_abstopk_aux_acts(k_aux: int, hidden_pre: torch.Tensor, dead_neuron_mask: torch.Tensor) -> torch.Tensor:
    """Signed pre-activations of the ``k_aux`` dead latents of largest ``|pre|``, zeros elsewhere."""
    scores = torch.where(dead_neuron_mask[None], hidden_pre.abs(), -torch.inf)
    idx = scores.topk(k_aux, sorted=False).indices
    acts = torch.zeros_like(hidden_pre)
    acts.scatter_(-1, idx, hidden_pre.gather(-1, idx))
    return acts


if _saelens_abstopk is not None:
    AbsTopKSAE: type = _saelens_abstopk.AbsTopKSAE
    AbsTopKSAEConfig: type = _saelens_abstopk.AbsTopKSAEConfig
    AbsTopKTrainingSAE: type = _saelens_abstopk.AbsTopKTrainingSAE
    AbsTopKTrainingSAEConfig: type = _saelens_abstopk.AbsTopKTrainingSAEConfig
else:
    AbsTopKSAE = AbsTopKSAEPort
    AbsTopKSAEConfig = AbsTopKSAEConfigPort
    AbsTopKTrainingSAE = AbsTopKTrainingSAEPort
    AbsTopKTrainingSAEConfig = AbsTopKTrainingSAEConfigPort


@hookimpl
def register_architectures(register) -> None:
    # On SAELens >= 6.53 the host keeps SAELens's own "abstopk" and records this offer as deferred.
    register(
        NAME,
        training=(AbsTopKTrainingSAEPort, AbsTopKTrainingSAEConfigPort),
        inference=(AbsTopKSAEPort, AbsTopKSAEConfigPort),
        description="AbsTopK: per token the k largest |pre|, sign kept (SAELens's own on >= 6.53)",
    )
