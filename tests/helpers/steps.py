"""Training-step inputs for calling an SAE's ``training_forward_pass`` directly."""

from __future__ import annotations

import torch


def step_input(x: torch.Tensor, dead: torch.Tensor | None = None, step: int = 0, logging: bool = False):
    """SAELens's ``TrainStepInput`` for activations ``x`` (no coefficients), as its trainer builds it."""
    from sae_lens.saes.sae import TrainStepInput

    return TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=step, is_logging_step=logging
    )
