"""Small helpers shared by this project's architecture shells (not a plugin module)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


def check_k(k: Any, d_sae: int, field: str = "k") -> None:
    """``k`` is the average number of active features per token: a float in (0, d_sae]."""
    check_d_sae(d_sae)  # a bad d_sae is named as such, not blamed on k
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or not 0 < k <= d_sae:
        raise ValueError(
            f"{field}={k!r} is invalid: it is the average number of active features per token, so it "
            f"must be a number with 0 < {field} <= d_sae={d_sae} (e.g. {field}=32)."
        )


def check_d_sae(d_sae: Any) -> None:
    if isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae < 1:
        raise ValueError(f"d_sae={d_sae!r} is invalid: use a positive integer (the number of latents, e.g. 16384).")


def check_rate(value: Any, field: str) -> None:
    if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"{field}={value!r} is invalid: use a rate in (0, 1] (e.g. 0.01).")


def pre_activations(sae: Any, x: torch.Tensor) -> torch.Tensor:
    """TopK-style pre-activations: ``(process(x) @ W_enc + b_enc) * |W_dec rows|`` if rescaling.

    In these units the saved inference model (norms folded into ``W_enc``/``b_enc``) computes
    exactly the same numbers, so thresholds learned on them are the saved JumpReLU thresholds.
    The one inference-side encode of every architecture here (the training step's is
    :func:`sae_allocators.sparse.encoder_pre`).
    """
    return input_and_pre_activations(sae, x)[1]


def input_and_pre_activations(sae: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sae_in, hidden_pre)``: the processed input and :func:`pre_activations` of it."""
    sae_in = sae.process_sae_in(x)
    hidden_pre = sae.hook_sae_acts_pre(sae_in @ sae.W_enc + sae.b_enc)
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        hidden_pre = hidden_pre * sae.W_dec.norm(dim=-1)
    return sae_in, hidden_pre


def warm_ema_(
    buffer: torch.Tensor, target: torch.Tensor, steps: torch.Tensor, rate: float, where: torch.Tensor | None = None
) -> None:
    """In place: running mean for the first ``1/rate`` updates, then an EMA with ``rate``.

    ``steps`` counts the updates (per element when ``where`` is given: only those entries update).
    """
    if where is None:
        steps += 1
        w = (1.0 / steps.double()).clamp_min(rate).to(buffer.dtype)
        buffer.lerp_(target.to(buffer.dtype), w)
        return
    steps += where.to(steps.dtype)
    w = torch.where(
        where,
        (1.0 / steps.double().clamp_min(1)).clamp_min(rate),
        torch.zeros((), dtype=torch.double, device=buffer.device),
    )
    buffer.lerp_(target.to(buffer.dtype), w.to(buffer.dtype))


def load_alias_config(base: type, name: str) -> type:
    """A subclass of the SAELens inference config ``base`` whose ``architecture()`` is ``name``.

    Training an ``*_zipf`` architecture saves its model under SAELens's own name (``topk``,
    ``jumprelu``, ``abstopk``); this alias only lets a hand-made ``cfg.json`` that says ``name``
    load as that same SAELens class.
    """
    alias = type(
        f"{base.__name__}As_{name}",
        (base,),
        {
            "__module__": __name__,
            "__doc__": f"Loads a cfg.json saying {name!r} as SAELens's {base.__name__}.",
            "architecture": classmethod(lambda cls: name),
        },
    )
    return dataclass(alias)


class RefuseTrainingCheckpointMixin:
    """For this project's inference SAE classes: ``SAE.load_from_disk`` on a training checkpoint (whose
    cfg.json names the training architecture, so SAELens builds this class) fails with one line saying
    what the folder is and what to load instead, not with ``load_state_dict``'s "Unexpected key(s)"."""

    def process_state_dict_for_loading(self, state_dict: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())  # type: ignore[attr-defined]
        extra = sorted(set(state_dict) - expected)
        if extra:
            arch = self.cfg.architecture()  # type: ignore[attr-defined]
            raise ValueError(
                f"these weights hold tensors a {arch!r} inference SAE does not have ({', '.join(extra)}): this is a "
                f"training checkpoint (SAELens saves the training model's buffers there). Load the final output folder "
                f"(--output_path) with SAE.load_from_disk, or this checkpoint with TrainingSAE.load_from_disk."
            )
        super().process_state_dict_for_loading(state_dict)  # type: ignore[misc]
