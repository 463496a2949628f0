"""Evaluate a trained SAE as a user would: reload the saved inference model from disk."""

from __future__ import annotations

import statistics
import time
from dataclasses import fields
from typing import Any

import torch

from sae_allocators import devices
from sae_allocators.benchmark.metrics import Accumulator


@torch.no_grad()
def evaluate_saved(source: Any, result: Any) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Figures for the saved model at ``result.path``; also its feature densities and per-token L0."""
    from sae_lens import SAE

    from sae_allocators.benchmark.sources import quiet_saelens

    with quiet_saelens():
        sae = SAE.load_from_disk(str(result.path), device=str(source.device))
    sae.eval()
    acc = Accumulator(sae.cfg.d_sae)
    for x in source.eval_batches():
        codes = sae.encode(x)
        acc.add(x, sae.decode(codes), codes)
    figures: dict[str, Any] = acc.result()
    figures["inference_architecture"] = sae.cfg.architecture()
    figures["d_sae"] = int(sae.cfg.d_sae)
    if source.kind == "synthetic":
        from sae_lens.synthetic import mean_correlation_coefficient

        figures["mcc"] = float(mean_correlation_coefficient(sae.W_dec.detach(), source.ground_truth()))
    else:
        figures.update(source.splice(sae))
    figures.update(training_mode_figures(result.sae, source))
    figures["l0_drift"] = figures["l0_mean"] / max(figures["train_mode_l0_mean"], 1e-12) - 1.0
    figures.update(uncalibrated_figures(sae, source, getattr(result, "calibration", None)))
    if "uncalibrated_l0_mean" in figures:
        figures["l0_drift_uncalibrated"] = figures["uncalibrated_l0_mean"] / max(figures["train_mode_l0_mean"], 1e-12) - 1.0
    dead_mask = acc.density() == 0
    figures["step_seconds"] = step_seconds(result.sae, source, dead_mask)
    figures["train_seconds"] = float(result.seconds)
    figures["train_steps"] = int(result.steps)
    return figures, acc.density(), acc.per_token_l0()


@torch.no_grad()
def l0_nmse_at_threshold(sae: Any, batches: Any, theta: torch.Tensor) -> tuple[float, float]:
    """``(L0, NMSE)`` of a saved jumprelu ``sae`` on ``batches`` with its threshold temporarily set to
    ``theta`` (a scalar or per-feature tensor); the threshold is restored afterwards."""
    saved = sae.threshold.detach().clone()
    total, n, err, norm = 0, 0, 0.0, 0.0
    try:
        sae.threshold.copy_(theta.to(sae.threshold.dtype).expand_as(sae.threshold))
        for x in batches:
            codes = sae.encode(x)
            total += int((codes != 0).sum())
            n += x.shape[0]
            err += float((x.double() - sae.decode(codes).double()).pow(2).sum())
            norm += float(x.double().pow(2).sum())
    finally:
        sae.threshold.copy_(saved)
    return total / max(n, 1), err / max(norm, 1e-30)


def uncalibrated_figures(sae: Any, source: Any, calibration: Any) -> dict[str, Any]:
    """L0 and NMSE of the saved model with the running thresholds of training (before
    calibration, sae_allocators.calibration) on the same evaluation tokens; empty if uncalibrated."""
    if calibration is None or getattr(calibration, "theta_before", None) is None:
        return {}
    l0, nmse = l0_nmse_at_threshold(sae, source.eval_batches(), calibration.theta_before)
    return {
        "calibration_tokens": int(calibration.tokens),
        "calibration_seconds": float(calibration.seconds),
        "uncalibrated_l0_mean": l0,
        "uncalibrated_nmse": nmse,
    }


@torch.no_grad()
def training_mode_figures(training_sae: Any, source: Any) -> dict[str, float]:
    """L0 and NMSE of the *training-time* selection on the evaluation tokens, in batches of the
    training batch size (for batch-level rules this is the selection the papers describe)."""
    was_training = training_sae.training
    training_sae.train()
    total, n, err, norm = 0, 0, 0.0, 0.0
    try:
        x_all = torch.cat(list(source.eval_batches()))
        bs = min(source.train_batch_size, x_all.shape[0])
        for i in range(0, x_all.shape[0] - bs + 1, bs):
            x = x_all[i : i + bs]
            acts, _ = training_sae.encode_with_hidden_pre(x)
            x_hat = training_sae.decode(acts)
            total += int((acts != 0).sum())
            err += float((x.double() - x_hat.double()).pow(2).sum())
            norm += float(x.double().pow(2).sum())
            n += bs
    finally:
        training_sae.train(was_training)
    return {"train_mode_l0_mean": total / max(n, 1), "train_mode_nmse": err / max(norm, 1e-30)}


def _step_input(training_sae: Any, x: torch.Tensor, dead_mask: torch.Tensor):
    from sae_lens.saes.sae import TrainStepInput

    coeffs = {k: float(getattr(v, "value", v)) for k, v in training_sae.get_coefficients().items()}
    values = {
        "sae_in": x,
        "coefficients": coeffs,
        "dead_neuron_mask": dead_mask,
        "n_training_steps": 10_000,
        "is_logging_step": False,
    }
    return TrainStepInput(**{f.name: values[f.name] for f in fields(TrainStepInput) if f.name in values})


def step_seconds(training_sae: Any, source: Any, dead_mask: torch.Tensor, repeats: int = 5) -> float:
    """Median wall time of one training step (forward, aux losses, backward) on a fixed batch.

    The dead mask is the set of latents that never fired on the evaluation tokens, so AuxK-style
    losses do their real work. Data loading and the optimizer are excluded (same for everyone).
    """
    x = torch.cat(list(source.eval_batches()))
    bs = source.train_batch_size
    if x.shape[0] < bs:
        x = x.repeat(-(-bs // x.shape[0]), 1)
    x = x[:bs].contiguous()
    training_sae.train()
    x = x.to(source.device)
    dead_mask = dead_mask.to(source.device)
    times = []
    for i in range(repeats + 2):
        step = _step_input(training_sae, x, dead_mask)
        devices.synchronize(source.device)
        t0 = time.perf_counter()
        with torch.enable_grad():
            out = training_sae.training_forward_pass(step)
            out.loss.backward()
        devices.synchronize(source.device)
        dt = time.perf_counter() - t0
        training_sae.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(dt)
    return statistics.median(times)
