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
        figures["l0_drift_uncalibrated"] = (
            figures["uncalibrated_l0_mean"] / max(figures["train_mode_l0_mean"], 1e-12) - 1.0
        )
    stream = getattr(source, "stream_eval", None)
    if stream is not None:
        figures.update(stream_figures(sae, result.sae, stream(), source.train_batch_size))
    dead_mask = acc.density() == 0
    figures["step_seconds"] = step_seconds(result.sae, source, dead_mask)
    figures["train_seconds"] = float(result.seconds)
    figures["train_steps"] = int(result.steps)
    return figures, acc.density(), acc.per_token_l0()


#: norm bins (multiples of the median token norm) of the report's L0-against-norm plot
NORM_BINS = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, float("inf"))


#: position labels of a token stream: 0 BOS / special token, 1 first token of a document, 2 the rest
POSITIONS = (("bos", 0), ("doc_first", 1), ("rest", 2))


def median_token_fvu(x: torch.Tensor, x_hat: torch.Tensor, position: torch.Tensor) -> float:
    """Median over ordinary tokens (``position != 0``, norm at most 5x the median norm) of the
    per-token FVU ``||x - x_hat||^2 / ||x - mean||^2``, ``mean`` over those tokens."""
    from sae_allocators.allocation.outliers import REPORT_RATIO

    norms = x.norm(dim=-1)
    ordinary = (position != 0) & (norms <= REPORT_RATIO * norms.median())
    mean = x[ordinary].mean(0)
    fvu = (x - x_hat).pow(2).sum(-1) / (x - mean).pow(2).sum(-1).clamp_min(1e-12)
    return float(fvu[ordinary].median())


@torch.no_grad()
def stream_figures(saved: Any, training_sae: Any, stream: dict[str, torch.Tensor], batch_size: int) -> dict[str, Any]:
    """Figures on the held-out token stream with every token kept (docs/mutual_choice.md, "Real
    token streams"): the saved model's L0 at BOS / special tokens, at the first token of a document
    and elsewhere; the training rule's L0 at the same positions (batches of the training size, in
    order); the median per-token FVU ``||x - x_hat||^2 / ||x - mean||^2`` over ordinary tokens (not
    special, norm at most 5x the median: NMSE is dominated by the few outlier rows, this is not);
    and the saved model's mean L0 per norm bin (multiples of the median norm) for the plot."""
    from sae_allocators.allocation.outliers import REPORT_RATIO

    x, pos = stream["x"], stream["position"]
    codes = torch.cat([saved.encode(x[i : i + 2048]) for i in range(0, x.shape[0], 2048)])
    x_hat = torch.cat([saved.decode(codes[i : i + 2048]) for i in range(0, x.shape[0], 2048)])
    l0 = (codes != 0).sum(-1).float()
    norms = x.norm(dim=-1)
    med = norms.median()
    out: dict[str, Any] = {"median_token_fvu": median_token_fvu(x, x_hat, pos)}
    for name, p in POSITIONS:
        if bool((pos == p).any()):
            out[f"l0_{name}"] = float(l0[pos == p].mean())
    if bool((norms > REPORT_RATIO * med).any()):
        out["l0_outlier_rows"] = float(l0[norms > REPORT_RATIO * med].mean())
    rel = norms / med
    out["l0_by_norm"] = [
        [lo, float(l0[(rel >= lo) & (rel < hi)].mean()), int(((rel >= lo) & (rel < hi)).sum())]
        for lo, hi in zip(NORM_BINS[:-1], NORM_BINS[1:])
        if bool(((rel >= lo) & (rel < hi)).any())
    ]
    # the training-time rule on the same stream, positions kept (batch rules: the guard applies)
    was_training = training_sae.training
    training_sae.train()
    try:
        bs = min(batch_size, x.shape[0])
        l0s = [
            (training_sae.encode_with_hidden_pre(x[i : i + bs])[0] != 0).sum(-1).float()
            for i in range(0, x.shape[0] - bs + 1, bs)
        ]
    finally:
        training_sae.train(was_training)
    if l0s:
        tl0 = torch.cat(l0s)
        tpos = pos[: tl0.numel()]
        for name, p in POSITIONS:
            if bool((tpos == p).any()):
                out[f"train_mode_l0_{name}"] = float(tl0[tpos == p].mean())
    meta = getattr(saved.cfg, "metadata", None)
    shares = meta["budget_shares"] if meta is not None else None
    if isinstance(shares, dict):
        out["budget_share_outlier_rows"] = shares.get("budget_share_outlier_rows")
        out["budget_share_top1pct"] = shares.get("budget_share_top1pct")
    return out


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
