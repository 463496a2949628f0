"""Training-step inputs for calling an SAE's ``training_forward_pass`` directly."""

from __future__ import annotations

import torch


def step_input(x: torch.Tensor, dead: torch.Tensor | None = None, step: int = 0, logging: bool = False):
    """SAELens's ``TrainStepInput`` for activations ``x`` (no coefficients), as its trainer builds it."""
    from sae_lens.saes.sae import TrainStepInput

    return TrainStepInput(
        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=step, is_logging_step=logging
    )


def codes(out) -> torch.Tensor:
    """A training step's ``feature_acts`` as a dense tensor (the sparse step returns them as a sparse
    COO tensor, SAELens's trainer's other accepted form)."""
    acts = out.feature_acts
    return acts.to_dense() if acts.is_sparse else acts
