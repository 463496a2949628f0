"""Gradient TopK SAE (g-SAE; Olmo et al. 2024, arXiv 2411.10397).

Training selects, per token, the k largest ``z + beta * z * |g @ D.T|`` (values from ``z``), where
``g`` is dL/dx of the language model's next-token CE at the hooked activation, supplied by
:class:`sae_allocators.gradient.GradientActivationsStore` as the second half of each ``[x | g]``
row. A batch without gradients (width ``d_in``: evals, synthetic data) is encoded as plain TopK.
The saved inference model is SAELens's ``topk``, loadable without this package;
:class:`GradientTopKSAE` offers ``encode(x, grad=...)`` to users who have gradients.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.sae import SAEConfig, TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

from sae_allocators import sparse
from sae_allocators.allocation.gradient import GRAD_NORMALIZATIONS, gradient_topk, gradient_topk_indices
from sae_allocators.distributed import global_mean, group_of
from sae_allocators.architectures import kinds
from sae_allocators.architectures._common import RefuseTrainingCheckpointMixin, pre_activations
from sae_allocators.architectures._step import SelectionStepMixin, StepState
from sae_allocators.gradient.store import split_rows
from sae_allocators.hookspecs import hookimpl
from sae_allocators.losses import AuxLossConfig, AuxLossMixin, check_finite

NAME = "gradient_topk"


def _check_fields(cfg: Any) -> None:
    if not isinstance(cfg.beta, (int, float)) or not math.isfinite(cfg.beta) or cfg.beta < 0:
        raise ValueError(f"beta={cfg.beta!r} must be a finite number >= 0 (0 gives plain TopK)")
    if cfg.grad_normalization not in GRAD_NORMALIZATIONS:
        raise ValueError(f"grad_normalization={cfg.grad_normalization!r} must be one of {GRAD_NORMALIZATIONS}")
    if not isinstance(cfg.k, int) or not 1 <= cfg.k <= cfg.d_sae:
        raise ValueError(f"k={cfg.k!r} must be an integer in [1, d_sae={cfg.d_sae}]")


def _encode(sae: Any, x: torch.Tensor, grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK's encode with the g-SAE selection; returns ``(feature_acts, hidden_pre)``."""
    hidden_pre = pre_activations(sae, x)
    if grad is not None:
        grad = sae.reshape_fn_in(grad)  # identity unless hook_z reshaping is on, as for x
    cfg = sae.cfg
    codes = gradient_topk(
        hidden_pre, grad, sae.W_dec, cfg.k, cfg.beta, cfg.grad_normalization, cfg.rescale_acts_by_decoder_norm
    )
    if getattr(sae.cfg, "use_sparse_activations", False):
        codes = codes.to_sparse()
    return sae.hook_sae_acts_post(codes), hidden_pre


@dataclass
class GradientTopKSAEConfig(TopKSAEConfig):
    """Inference config for gradient-aware encoding (``encode(x, grad=...)``)."""

    beta: float = 1.0
    grad_normalization: str = "batch"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fields(self)

    @classmethod
    def architecture(cls) -> str:
        return NAME


class GradientTopKSAE(RefuseTrainingCheckpointMixin, TopKSAE):
    """TopK inference SAE whose ``encode`` also takes the loss gradient at the hooked activation."""

    cfg: GradientTopKSAEConfig  # type: ignore[assignment]

    def encode(self, x: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return _encode(self, x, grad)[0]

    @classmethod
    def from_topk(cls, sae: TopKSAE, beta: float = 1.0, grad_normalization: str = "batch") -> "GradientTopKSAE":
        """Wrap a loaded SAELens ``topk`` SAE (e.g. one trained as gradient_topk) for gradient-aware encoding."""
        fields = {f.name: getattr(sae.cfg, f.name) for f in dataclasses.fields(TopKSAEConfig)}
        new = cls(GradientTopKSAEConfig(**fields, beta=beta, grad_normalization=grad_normalization))
        new.load_state_dict(sae.state_dict())
        return new.to(sae.device)


@dataclass
class GradientTopKTrainingSAEConfig(AuxLossConfig, TopKTrainingSAEConfig):
    """Training config: SAELens's TopK fields, the project's aux-loss fields, and

    Args:
        beta: weight of the gradient term in ``z + beta * z * |g @ D.T|`` (0: plain TopK).
        grad_normalization: ``"batch"`` (default; ``g`` divided by the batch's mean per-token
            gradient norm), ``"token"`` (unit norm per token) or ``"none"`` (raw ``g``).
        aux_loss: ``"auxk"`` (default: exactly SAELens's TopK AuxK), ``"zipf"``, ``"none"``, ...
        normalize_activations: ``"none"``, or ``"expected_average_only_in"`` with ``grad_normalization``
            ``"batch"`` or ``"token"``: SAELens's scaler multiplies the packed ``[x | g]`` row by one
            factor ``c``, which is right for ``x`` and leaves the selection unchanged, since those
            normalisations divide ``g`` by its own norm (``"none"`` would need ``g / c``).
    """

    aux_loss: str = "auxk"
    beta: float = 1.0
    grad_normalization: str = "batch"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fields(self)
        if self.normalize_activations not in ("none", "expected_average_only_in"):
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} is not supported by gradient_topk: "
                "SAELens's scaler would scale x and g together. Use 'none' or 'expected_average_only_in'."
            )
        if self.normalize_activations != "none" and self.grad_normalization == "none":
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} with grad_normalization='none': SAELens's "
                "scaler multiplies x and g by the same factor c, but raw g would need g/c. Use "
                "grad_normalization='batch' or 'token' (they divide g by its own norm), or normalize_activations='none'."
            )

    @classmethod
    def architecture(cls) -> str:
        return NAME

    def get_inference_config_class(self) -> type[SAEConfig]:
        # The saved model is a plain SAELens topk SAE.
        return TopKSAEConfig

    @classmethod
    def activations_store_class(cls) -> type:
        """Read by :mod:`sae_allocators.gradient.dispatch`: SAELens's runner builds this store."""
        from sae_allocators.gradient.store import GradientActivationsStore

        return GradientActivationsStore


class GradientTopKTrainingSAE(SelectionStepMixin, AuxLossMixin, TopKTrainingSAE):
    """TopK training SAE with the g-SAE selection; accepts ``[x | g]`` rows or plain ``x`` rows."""

    rule_kind = kinds.PER_TOKEN

    cfg: GradientTopKTrainingSAEConfig  # type: ignore[assignment]

    def __init__(self, cfg: GradientTopKTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        self._warned_no_grad = False
        #: this SAE has trained on ``[x | g]`` rows: its data comes from the gradient store
        self._trained_on_gradients = False

    def encode_with_hidden_pre(
        self, x: torch.Tensor, grad: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return _encode(self, x, grad)

    def encode(self, x: torch.Tensor, grad: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return self.encode_with_hidden_pre(x, grad)[0]

    def select(self, hidden_pre: torch.Tensor, grad: torch.Tensor | None = None, **context: Any) -> sparse.Selection:
        mode = self.cfg.grad_normalization
        if grad is not None:
            grad = self.reshape_fn_in(grad).reshape(
                -1, self.cfg.d_in
            )  # identity unless hook_z reshaping is on, as for x
            group = group_of(self)
            if group is not None and mode == "batch":  # data-parallel: the global batch's mean gradient norm
                grad, mode = grad / global_mean(grad.norm(dim=-1), group).clamp_min(1e-12), "none"
        indices, keep = gradient_topk_indices(
            hidden_pre,
            grad,
            self.W_dec,
            self.cfg.k,
            self.cfg.beta,
            mode,
            unit_rows=self.cfg.rescale_acts_by_decoder_norm,
        )
        return sparse.from_row_indices(indices, hidden_pre.shape[-1], keep)

    def step_context(self, step_input: TrainStepInput) -> tuple[TrainStepInput, dict[str, Any]]:
        """Split ``[x | g]`` rows: the step trains on ``x``; ``g`` goes to :meth:`select`."""
        x, grad = split_rows(step_input.sae_in, self.cfg.d_in)
        check_finite(step_input.sae_in, "gradient_topk training rows ([activation | gradient])")
        training = self.training and torch.is_grad_enabled()
        if grad is not None and training:
            self._trained_on_gradients = True
        # Warn about training without the gradient store, not about evaluating on plain batches: a
        # step in eval mode or without autograd, or a plain batch after the SAE trained on gradient
        # rows (the benchmark times a step on plain evaluation batches after training), is not it.
        if (
            grad is None
            and self.cfg.beta > 0
            and training
            and not self._trained_on_gradients
            and not self._warned_no_grad
        ):
            self._warned_no_grad = True
            warnings.warn(
                "gradient_topk is training on batches without gradients (width d_in), so it selects as plain "
                "TopK. Train with GradientActivationsStore (SAELens's runner picks it when sae_allocators is "
                "imported) to use the loss gradient.",
                stacklevel=2,
            )
        return dataclasses.replace(step_input, sae_in=x), {"grad": grad}

    def after_step(self, state: StepState, output: TrainStepOutput) -> None:
        if state.info.get("grad") is None:
            return
        hidden_pre, sel = state.hidden_pre.detach(), state.selection

        def changed() -> torch.Tensor:
            # fraction of this batch's selections that plain TopK would not have made
            plain = torch.topk(hidden_pre, self.cfg.k, dim=-1).indices
            plain_mask = torch.zeros_like(hidden_pre, dtype=torch.bool).scatter_(-1, plain, True)
            chosen = plain_mask.view(-1).index_select(0, sel.flat)
            return (~chosen).sum() / max(len(sel), 1)

        output.metrics["gradient_selection_changed"] = changed


@hookimpl
def register_architectures(register) -> None:
    # the runner builds GradientActivationsStore through sae_allocators.gradient.dispatch, which the host installs
    register(
        NAME,
        training=(GradientTopKTrainingSAE, GradientTopKTrainingSAEConfig),
        inference=(GradientTopKSAE, GradientTopKSAEConfig),
        description="g-SAE: per-token top-k of z + beta*z*|g @ W_dec.T| with LM-loss gradients; saved as topk",
    )
