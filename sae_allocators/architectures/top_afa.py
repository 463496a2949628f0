"""top-AFA SAE (Lee et al. 2025, arXiv 2503.24277; reference code SewoongLee/top-afa-sae, MIT).

Per token, features are ranked by the squared norm of their contribution to the reconstruction
and the prefix whose running norm is closest to ``||x - b_dec||`` is kept (see
:mod:`sae_allocators.allocation.afa`). The rule is per token, so the saved inference model is a
``top_afa`` SAE of its own (loading it needs this package: ``import sae_allocators``, or the
autoload hook of an installed sae-allocators).

Training adds ``afa_coefficient * mean_tokens (||f̃|| - ||x||)^2`` (the AFA loss) to SAELens's
MSE, plus the auxiliary loss chosen by ``aux_loss`` (``auxk``, ``zipf``, ``none``, a plugin's).
The shape follows SAELens's TopK SAE (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``; decoder norms
folded into the encoder on save when ``rescale_acts_by_decoder_norm``). docs/top_afa.md lists
what is the paper's and what is this project's choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from sae_lens.saes.sae import SAEConfig, TrainingSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKTrainingSAE
from torch import nn

from sae_allocators import sparse
from sae_allocators.allocation.afa import AFASelection, afa_indices, afa_loss, afa_loss_sparse, afa_select, check_k_max
from sae_allocators.architectures import kinds
from sae_allocators.architectures._common import RefuseTrainingCheckpointMixin, check_d_sae, input_and_pre_activations
from sae_allocators.architectures._step import SelectionStepMixin, StepState
from sae_allocators.diagnostics.afa import afa_k_stats, epsilon_lbo, epsilon_lbo_stats
from sae_allocators.hookspecs import hookimpl
from sae_allocators.losses import AuxLossConfig, AuxLossMixin

NAME = "top_afa"

#: values of ``afa_loss_target``: which norm the AFA loss pulls ``||f̃||`` towards
AFA_LOSS_TARGETS = ("x", "x_minus_b_dec")


class TopAFA(nn.Module):
    """Activation module: ``forward(hidden_pre, target, dec_norm)`` -> codes (ReLU then top-AFA).

    Unlike SAELens's TopK it needs the per-token target norm, so it cannot be called with the
    pre-activations alone; the SAE classes below call it with all three.
    """

    def __init__(self, k_max: int | None = None):
        super().__init__()
        self.k_max = k_max

    def select(self, hidden_pre: torch.Tensor, target: torch.Tensor, dec_norm: torch.Tensor | None) -> AFASelection:
        return afa_select(hidden_pre, target, dec_norm, self.k_max)  # ReLU applied inside, to kept entries

    def forward(
        self, hidden_pre: torch.Tensor, target: torch.Tensor, dec_norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.select(hidden_pre, target, dec_norm).codes


def _check_k_max_field(k_max: Any, d_sae: int) -> None:
    check_d_sae(d_sae)
    check_k_max(k_max)
    if k_max is not None and k_max > d_sae:
        raise ValueError(
            f"k_max={k_max!r} is invalid: it cannot exceed d_sae={d_sae}; use k_max <= d_sae, or None for no cap."
        )


class _AFAEncodeMixin:
    """The encode shared by the inference and training classes (TopK-shaped weights)."""

    cfg: Any
    activation_fn: TopAFA

    def afa_decoder_norms(self) -> torch.Tensor | None:
        """Decoder-row norms as decode applies them: None (all 1) when rescaling by decoder norm."""
        if self.cfg.rescale_acts_by_decoder_norm:
            return None
        return self.W_dec.norm(dim=-1)  # type: ignore[attr-defined]

    def afa_encode(self, x: torch.Tensor) -> tuple[AFASelection, torch.Tensor]:
        """``(selection, hidden_pre)``; the target norm is ``||x - b_dec||`` in the SAE's units."""
        sae_in, hidden_pre = input_and_pre_activations(self, x)
        centred = sae_in if self.cfg.apply_b_dec_to_input else sae_in - self.b_dec  # type: ignore[attr-defined]
        target = torch.linalg.vector_norm(centred.detach(), dim=-1)
        return self.activation_fn.select(hidden_pre, target, self.afa_decoder_norms()), hidden_pre


@dataclass
class TopAFASAEConfig(SAEConfig):
    """Inference config of a ``top_afa`` SAE.

    Args:
        k_max: keep at most this many features per token (``None``: no cap). The rule is exact
            for every token whose uncapped k is <= ``k_max``.
        rescale_acts_by_decoder_norm: as SAELens's TopK: pre-activations are multiplied by the
            decoder-row norms (saved models have unit-norm rows, so it is then a no-op).
    """

    k_max: int | None = None
    rescale_acts_by_decoder_norm: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_k_max_field(self.k_max, self.d_sae)

    @classmethod
    def architecture(cls) -> str:
        return NAME


class TopAFASAE(RefuseTrainingCheckpointMixin, _AFAEncodeMixin, TopKSAE):
    """Inference: encodes each token with the top-AFA rule; decode, folding and weights are
    SAELens TopK's.

    A token whose input holds NaN gets NaN codes and output (other tokens are unaffected, the
    rule is per token); the training class refuses non-finite input instead.
    """

    cfg: TopAFASAEConfig  # type: ignore[assignment]

    def get_activation_fn(self) -> Callable[..., torch.Tensor]:
        return TopAFA(self.cfg.k_max)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        selection, _ = self.afa_encode(x)
        return self.hook_sae_acts_post(selection.codes)

    def encode_with_k(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, k)``: the codes and how many features each token kept."""
        selection, _ = self.afa_encode(x)
        return self.hook_sae_acts_post(selection.codes), selection.k


@dataclass
class TopAFATrainingSAEConfig(AuxLossConfig, TrainingSAEConfig):
    """Training config of a ``top_afa`` SAE.

    Args:
        k_max: cap on features per token (``None``: no cap, a full sort per token; 64 or so
            makes a step about as fast as SAELens TopK, see benchmarks/afa_speed.py). Tokens
            where the cap changed the result are counted in the ``afa_capped_frac`` metric.
        afa_coefficient: λ of the AFA loss ``λ * mean (||f̃|| - ||x||)^2``. The paper sweeps
            λ in {1/128, 1/64, 1/32, 1/16}; the reference code's default is 0. Ours: 1/32.
        afa_loss_target: ``"x"`` (the reference code: the SAE's input norm) or
            ``"x_minus_b_dec"`` (the norm the selection aims at).
        rescale_acts_by_decoder_norm: as SAELens's TopK (default True: unit-norm decoder in
            effect, which is the reference code's regime).
        aux_loss: ``"auxk"`` by default (the reference code's AuxK); ``"zipf"``, ``"none"`` or a
            plugin's also work (see :class:`AuxLossConfig` for the other aux fields).
    """

    k_max: int | None = None
    afa_coefficient: float = 1 / 32
    afa_loss_target: str = "x"
    rescale_acts_by_decoder_norm: bool = True
    aux_loss: str = "auxk"

    def __post_init__(self) -> None:
        self.check_shared_fields()  # types and d_in / d_sae first: the checks below compare them
        _check_k_max_field(self.k_max, self.d_sae)
        c = self.afa_coefficient
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
            raise ValueError(
                f"afa_coefficient={c!r} is invalid: use a finite number >= 0 (the paper sweeps 1/128 to 1/16; "
                "0 turns the AFA loss off)."
            )
        if self.afa_loss_target not in AFA_LOSS_TARGETS:
            raise ValueError(f"afa_loss_target={self.afa_loss_target!r} is invalid: use one of {AFA_LOSS_TARGETS}.")
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return NAME

    def get_inference_config_class(self) -> type[SAEConfig]:
        return TopAFASAEConfig


class TopAFATrainingSAE(SelectionStepMixin, AuxLossMixin, _AFAEncodeMixin, TopKTrainingSAE):
    """Training: top-AFA codes, MSE + AFA loss + the configured auxiliary loss.

    Logged (lazily) besides the mixin's metrics: ``afa_k_mean / afa_k_p50 / afa_k_p99``,
    ``afa_capped_frac`` and ``eps_lbo_mean / eps_lbo_p50 / eps_lbo_p99``.
    """

    rule_kind = kinds.PER_TOKEN

    cfg: TopAFATrainingSAEConfig  # type: ignore[assignment]

    def get_activation_fn(self) -> Callable[..., torch.Tensor]:
        return TopAFA(self.cfg.k_max)

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        selection, hidden_pre = self.afa_encode(x)
        return self.hook_sae_acts_post(selection.codes), hidden_pre

    def select(self, hidden_pre: torch.Tensor, sae_in: torch.Tensor, **context: Any) -> sparse.Selection:  # type: ignore[override]
        """Per token, the prefix whose norm best matches ``||x - b_dec||`` (entries with code 0
        -- a non-positive affinity kept by the rule -- are left out: they change nothing)."""
        centred = sae_in if self.cfg.apply_b_dec_to_input else sae_in - self.b_dec
        target = torch.linalg.vector_norm(centred.detach(), dim=-1)
        kept, k, capped = afa_indices(hidden_pre, target, self.afa_decoder_norms(), self.cfg.k_max)
        kept = kept[hidden_pre.reshape(-1).index_select(0, kept) > 0]
        return sparse.from_flat(
            kept, hidden_pre.shape[0], hidden_pre.shape[1], is_sorted=True, info={"k": k, "capped": capped}
        )

    def afa_loss_target_norm(self, sae_in: torch.Tensor) -> torch.Tensor:
        """Per-token norm the AFA loss aims at (see ``afa_loss_target``), a constant."""
        x = self.run_time_activation_norm_fn_in(self.reshape_fn_in(sae_in.to(self.dtype)))
        if self.cfg.afa_loss_target == "x_minus_b_dec":
            x = x - self.b_dec
        return torch.linalg.vector_norm(x.detach(), dim=-1)

    def extra_losses(self, step_input: Any, state: StepState) -> dict[str, torch.Tensor]:
        if self.cfg.afa_coefficient <= 0:
            return {}
        target = self.afa_loss_target_norm(step_input.sae_in).reshape(-1)
        norms = self.afa_decoder_norms()
        sel = state.selection
        if state.sparse:
            loss = afa_loss_sparse(
                state.values, sel.rows, target, None if norms is None else norms.index_select(0, sel.cols)
            )
        else:
            loss = afa_loss(sparse.dense_codes(state.hidden_pre, sel), target, norms)
        return {"afa_loss": self.cfg.afa_coefficient * loss}

    def after_step(self, state: StepState, output: Any) -> None:
        info = state.selection.info
        output.metrics.update(
            self.afa_lazy_metrics(
                state.x,
                output.feature_acts,
                info["k"].reshape(state.lead_shape),
                info["capped"].reshape(state.lead_shape),
            )
        )

    def afa_lazy_metrics(
        self, sae_in: torch.Tensor, feature_acts: torch.Tensor, k: torch.Tensor, capped: torch.Tensor
    ) -> dict[str, Callable[[], float]]:
        """Zero-argument callables (evaluated only on logging steps, so no sync otherwise)."""
        with torch.no_grad():
            z = self.run_time_activation_norm_fn_in(self.reshape_fn_in(sae_in.detach().to(self.dtype)))
            norms = self.afa_decoder_norms()
            norms = None if norms is None else norms.detach().clone()
            b_dec = self.b_dec.detach().clone()  # the optimizer steps before the metrics are read
        acts = feature_acts.detach()
        cache: dict[str, dict[str, float]] = {}

        def k_stats() -> dict[str, float]:
            if "k" not in cache:
                cache["k"] = afa_k_stats(k, capped)
            return cache["k"]

        def eps_stats() -> dict[str, float]:
            if "eps" not in cache:
                dense = acts.to_dense() if acts.is_sparse else acts
                cache["eps"] = epsilon_lbo_stats(epsilon_lbo(z, dense, norms, b_dec))
            return cache["eps"]

        out: dict[str, Callable[[], float]] = {}
        for key in ("afa_k_mean", "afa_k_p50", "afa_k_p99", "afa_capped_frac"):
            out[key] = lambda key=key: k_stats()[key]
        for key in ("eps_lbo_mean", "eps_lbo_p50", "eps_lbo_p99"):
            out[key] = lambda key=key: eps_stats()[key]
        return out


@hookimpl
def register_architectures(register) -> None:
    register(
        NAME,
        training=(TopAFATrainingSAE, TopAFATrainingSAEConfig),
        inference=(TopAFASAE, TopAFASAEConfig),
        description="top-AFA: per token, keep the prefix of features whose norm best matches ||x - b_dec||",
    )
