"""SAELens's trainer statistics made global over the ranks (:func:`~sae_allocators.distributed.sync_trainer`).

SAELens's ``SAETrainer`` counts dead features and firing frequencies inside its ``_train_step`` and
estimates the activation-norm scaling factor on its own rank's data, with no hook after either. So
:func:`~sae_allocators.distributed.sync_trainer` makes the trainer a :class:`GlobalTrainerStats` and
its scaler a :class:`GlobalNormEstimate` (module-level subclasses of SAELens's classes;
:func:`sae_allocators.mixin.mix_in`, 9 in the table of :mod:`sae_allocators.patches`).
"""

from __future__ import annotations

from typing import Any

import torch
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.sae_trainer import SAETrainer

from sae_allocators.distributed import comm


class GlobalTrainerStats(SAETrainer):
    """Mixed into a SAELens ``SAETrainer`` by :func:`sync_trainer`: after each step's own bookkeeping,
    the dead-feature counters become the minimum over ranks and the firing counts the sum."""

    dp_group: Any = None

    def _train_step(self, sae: Any, sae_in: torch.Tensor) -> Any:
        freq0 = self.act_freq_scores.clone()
        n0 = self.n_frac_active_samples
        out = super()._train_step(sae=sae, sae_in=sae_in)
        group = self.dp_group
        with torch.no_grad():
            self.n_forward_passes_since_fired = comm.all_reduce(self.n_forward_passes_since_fired, "min", group)
            delta = torch.cat(
                [
                    (self.act_freq_scores - freq0).double(),
                    torch.tensor([float(self.n_frac_active_samples - n0)], dtype=torch.double, device=freq0.device),
                ]
            )
            delta = comm.all_reduce(delta, "sum", group)
            self.act_freq_scores = freq0 + delta[:-1].to(freq0.dtype)
            self.n_frac_active_samples = n0 + int(round(float(delta[-1])))
        return out


class GlobalNormEstimate(ActivationScaler):
    """Mixed into the trainer's ``ActivationScaler`` by :func:`sync_trainer`: the norm scaling factor
    is estimated on every rank's data and averaged (``sqrt(d_in) / mean norm``: the mean norms are
    averaged, equal batch counts per rank)."""

    dp_group: Any = None
    dp_device: Any = None

    def estimate_scaling_factor(self, *args: Any, **kwargs: Any) -> Any:
        out = super().estimate_scaling_factor(*args, **kwargs)
        if self.scaling_factor is not None:
            inv = torch.tensor([1.0 / self.scaling_factor], dtype=torch.double, device=self.dp_device)
            inv = comm.all_reduce(inv, "mean", self.dp_group)
            self.scaling_factor = float(1.0 / inv[0])
        return out
