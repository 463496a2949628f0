"""Feature Choice SAE (Ayonrinde 2024, arXiv 2411.02124): each feature picks its top m_j tokens.

Training: capacities ``m_j`` (sum = floor(k*N)) are uniform or Zipf-shaped over the features
ranked by their running *demand* -- how often a feature would fire under Mutual Choice at the
same budget (our choice; see docs/feature_choice.md for why not the feature's own firing rate).
Selection is exact per feature (:mod:`sae_allocators.allocation.feature_choice`).

Inference without the batch: a per-feature threshold theta_j (running mean, then EMA, of the
smallest value feature j kept) with a fallback to the global Mutual-Choice threshold for a
feature that kept nothing for ``threshold_fallback_steps`` steps; saved as a SAELens
``jumprelu`` whose ``threshold`` is that vector, in the saved model's units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig
from sae_lens.saes.sae import SAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

from sae_allocators import sparse
from sae_allocators.allocation.batch import budget, kth_largest_with_candidates
from sae_allocators.allocation.feature_choice import (
    candidate_limit,
    capacities,
    feature_choice_indices,
    feature_choice_select,
    usage_rank,
)
from sae_allocators.architectures import kinds
from sae_allocators.architectures._common import (
    RefuseTrainingCheckpointMixin,
    check_k,
    check_rate,
    pre_activations,
    warm_ema_,
)
from sae_allocators.architectures._step import SelectionStepMixin, StepState
from sae_allocators.distributed import all_reduce, group_of
from sae_allocators.distributed import select as dist_select
from sae_allocators.thresholds import CalibrationConfig, ExportSteering, ThresholdTracker, export_threshold
from sae_allocators.hookspecs import hookimpl
from sae_allocators.losses import AuxLossConfig, AuxLossMixin, check_finite
from sae_allocators.losses.base import BATCH_ENCODE_REASON

NAME = "feature_choice"
#: default Zipf exponent of the capacities (see docs/feature_choice.md, "Choosing the exponent")
DEFAULT_CAPACITY_EXPONENT = 0.5
#: the demand ranking and the global (fallback) threshold are updated every this many steps
DEMAND_EVERY = 4
#: the first margin z of the selection estimate (last thresholds minus z times their spread)
ESTIMATE_MARGIN = 2.0


def _check_capacity_fields(cfg: Any) -> None:
    if cfg.capacity not in ("uniform", "zipf"):
        raise ValueError(
            f"capacity={cfg.capacity!r} is invalid: use 'uniform' (m_j = k*N/d_sae) or 'zipf' (m_j ~ (usage rank)^-capacity_exponent)."
        )
    e = cfg.capacity_exponent
    if isinstance(e, bool) or not isinstance(e, (int, float)) or not math.isfinite(e) or e < 0:
        raise ValueError(
            f"capacity_exponent={e!r} is invalid: use a finite exponent >= 0 (default {DEFAULT_CAPACITY_EXPONENT}; 0 is uniform)."
        )
    if isinstance(cfg.min_capacity, bool) or not isinstance(cfg.min_capacity, int) or cfg.min_capacity < 0:
        raise ValueError(
            f"min_capacity={cfg.min_capacity!r} is invalid: use an integer >= 0 (tokens each feature keeps per batch at least; 0 disables)."
        )


class FeatureChoice(torch.nn.Module):
    """Activation module for batch-mode inference: uniform capacities (no usage ranks needed)."""

    def __init__(self, k: float, one_per_token: bool = False):
        super().__init__()
        self.k, self.one_per_token = k, one_per_token

    def forward(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        check_finite(hidden_pre, f"{NAME} pre-activations", BATCH_ENCODE_REASON)
        n = hidden_pre.numel() // hidden_pre.shape[-1]
        caps = capacities(n, self.k, hidden_pre.shape[-1], device=hidden_pre.device)
        return feature_choice_select(hidden_pre, caps, one_per_token=self.one_per_token)[0]


@dataclass
class FeatureChoiceSAEConfig(TopKSAEConfig):
    """Batch-mode inference config (uniform capacities); training saves ``jumprelu`` instead."""

    k: float = 32  # type: ignore[assignment]
    one_per_token: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_k(self.k, self.d_sae)

    @classmethod
    def architecture(cls) -> str:
        return NAME


class FeatureChoiceSAE(RefuseTrainingCheckpointMixin, TopKSAE):
    """Batch-mode Feature Choice inference with uniform capacities."""

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return FeatureChoice(self.cfg.k, self.cfg.one_per_token)


@dataclass
class FeatureChoiceTrainingSAEConfig(CalibrationConfig, AuxLossConfig, TopKTrainingSAEConfig):
    """Training config.

    Attributes:
        k: average active features per token (float); the batch spends ``floor(k * N)`` entries.
        capacity: ``"zipf"`` (default; ``m_j ~ (rank_j + 1)^-capacity_exponent`` over features
            ranked by running demand) or ``"uniform"`` (``m_j = k N / d_sae``, rounded).
        capacity_exponent: Zipf exponent of the capacities (default 0.5).
        min_capacity: tokens every feature keeps per batch at least (0 = off); a batch whose
            budget is below ``d_sae * min_capacity`` is an error.
        one_per_token: give a token that no feature chose its largest positive affinity.
        threshold_lr: EMA rate of the per-feature and global thresholds (after a running-mean
            warm-up of ``1/threshold_lr`` updates).
        threshold_fallback_steps: a feature that kept nothing for more than this many steps (or
            never) is saved with the global threshold instead of its own.
        aux_loss: ``"zipf"`` (default), ``"auxk"``, ``"none"`` or a plugin's loss.
        calibrate, calibration_tokens: fit the saved theta_j on held-out activations at the end
            of training (:class:`~sae_allocators.thresholds.CalibrationConfig`).
        calibration_rule: ``"scale"`` (default: the running theta_j times one factor giving
            L0 = k) or ``"shares"`` (each feature fires at its training share); see
            :mod:`sae_allocators.calibration`.
    """

    k: float = 32  # type: ignore[assignment]
    capacity: Literal["uniform", "zipf"] = "zipf"
    capacity_exponent: float = DEFAULT_CAPACITY_EXPONENT
    min_capacity: int = 0
    one_per_token: bool = False
    threshold_lr: float = 0.01
    threshold_fallback_steps: int = 1000
    calibration_rule: Literal["scale", "shares"] = "scale"
    aux_loss: str = "zipf"

    def __post_init__(self) -> None:
        self.check_shared_fields()  # types and d_in / d_sae first: the checks below compare them
        check_k(self.k, self.d_sae)
        _check_capacity_fields(self)
        check_rate(self.threshold_lr, "threshold_lr")
        if self.calibration_rule not in ("scale", "shares"):
            raise ValueError(
                f"calibration_rule={self.calibration_rule!r} is invalid: use 'scale' (running theta_j times one "
                "factor) or 'shares' (each feature at its training share)."
            )
        if (
            isinstance(self.threshold_fallback_steps, bool)
            or not isinstance(self.threshold_fallback_steps, int)
            or self.threshold_fallback_steps < 1
        ):
            raise ValueError(
                f"threshold_fallback_steps={self.threshold_fallback_steps!r} is invalid: use an integer number of steps >= 1 (e.g. 1000)."
            )
        super().__post_init__()

    @classmethod
    def architecture(cls) -> str:
        return NAME

    def get_inference_config_class(self) -> type[SAEConfig]:
        return JumpReLUSAEConfig


def _sync_demand_tick(module: Any, incompatible_keys: Any) -> None:  # noqa: ARG001
    module._demand_tick = int(module.demand_tick)  # after load_state_dict (checkpoint resume)


class FeatureChoiceTrainingSAE(SelectionStepMixin, AuxLossMixin, TopKTrainingSAE):
    """Feature Choice training SAE; ``encode`` is the batch rule, ``encode_thresholded`` the saved one."""

    rule_kind = kinds.BATCH_PER_FEATURE

    cfg: FeatureChoiceTrainingSAEConfig  # type: ignore[assignment]
    training_only_buffers = (
        "feature_threshold",
        "feature_threshold_steps",
        "steps_since_selected",
        "global_threshold",
        "global_threshold_steps",
        "feature_usage",
        "usage_steps",
        "demand_tick",
        "threshold_calibrated",
        "threshold_export_scale",
    )

    def __init__(self, cfg: FeatureChoiceTrainingSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        dev, f = self.W_dec.device, cfg.d_sae

        def buf(name: str, value: torch.Tensor) -> None:
            self.register_buffer(name, value)

        #: theta_j (sae_allocators.thresholds): running tau_j; calibrated values replace it at the end
        self.threshold_tracker = ThresholdTracker(
            self,
            value="feature_threshold",
            steps="feature_threshold_steps",
            shape=(f,),
            rate_field="threshold_lr",
            age="steps_since_selected",
            calibrated="threshold_calibrated",
        )
        #: theta: the Mutual-Choice threshold at the same budget (fallback of stale features)
        self.global_threshold_tracker = ThresholdTracker(
            self, value="global_threshold", steps="global_threshold_steps", rate_field="threshold_lr"
        )
        #: c: the uncalibrated export's correction to the training L0 (sae_allocators.thresholds)
        self.export_steering = ExportSteering(self)
        buf("feature_usage", torch.zeros(f, dtype=torch.float32, device=dev))
        buf("usage_steps", torch.zeros((), dtype=torch.long, device=dev))
        # phase of the every-DEMAND_EVERY-steps demand update: saved in checkpoints so a resumed
        # run updates on the same steps; mirrored in _demand_tick so that no step reads it back
        buf("demand_tick", torch.zeros((), dtype=torch.long, device=dev))
        # The selection's speed-up estimate: last step's thresholds (tau_estimate), their running
        # step-to-step change (tau_estimate_spread) and the margin z (float64, ESTIMATE_MARGIN at
        # first). Non-persistent buffers, None until the first step: they follow the SAE across
        # devices but are not saved (nor built by SAELens's meta-device loader), and the selection
        # does not depend on them (it is exact either way): a resumed run's first step is exact too.
        self.register_buffer("tau_estimate", None, persistent=False)
        self.register_buffer("tau_estimate_spread", None, persistent=False)
        self.register_buffer("estimate_margin", None, persistent=False)
        self._demand_tick = 0
        self.register_load_state_dict_post_hook(_sync_demand_tick)

    def get_activation_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return FeatureChoice(self.cfg.k, self.cfg.one_per_token)

    def current_capacities(self, n_tokens: int) -> torch.Tensor:
        """This batch's capacities ``m`` [d_sae] from the running demand ranking."""
        zipf = self.cfg.capacity == "zipf" and self.cfg.capacity_exponent > 0
        return capacities(
            n_tokens,
            self.cfg.k,
            self.cfg.d_sae,
            rank=usage_rank(self.feature_usage) if zipf else None,
            exponent=self.cfg.capacity_exponent if zipf else 0.0,
            min_capacity=self.cfg.min_capacity,
            device=self.W_dec.device,
        )

    def select(self, hidden_pre: torch.Tensor, **context: Any) -> sparse.Selection:
        """Each feature keeps its top ``m_j`` tokens of the batch (exact; ties by token index)."""
        n, f = hidden_pre.shape
        group = group_of(self)
        if group is not None:  # data-parallel: capacities and thresholds over the global batch
            sizes = dist_select.token_sizes(n, group, hidden_pre.device)
            caps = self.current_capacities(sum(sizes))
            flat, tau = dist_select.feature_choice_indices(
                hidden_pre, caps, group, one_per_token=self.cfg.one_per_token, sizes=sizes
            )
            return sparse.from_flat(flat, n, f, tau, is_sorted=True)
        caps = self.current_capacities(n)
        stats: dict = {}
        flat, tau = feature_choice_indices(
            hidden_pre, caps, one_per_token=self.cfg.one_per_token, t_lo=self._estimate_lower_bound(), stats=stats
        )
        self._adapt_margin(stats, int(caps.sum()))
        return sparse.from_flat(flat, n, f, tau, is_sorted=True)

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch rule on ``x``, outlier guard included (SAELens's contract; training steps go
        through :meth:`select`)."""

        def kept(ranked: torch.Tensor) -> torch.Tensor:
            return feature_choice_indices(
                ranked, self.current_capacities(ranked.shape[0]), one_per_token=self.cfg.one_per_token
            )[0]

        return self.batch_rule_encode(x, kept)

    def after_step(self, state: StepState, output: Any) -> None:
        self._update_running_stats(state.ranked(), state.selection.tau)
        self.export_steering.update(state.hidden_pre, self.running_thresholds(), self.cfg.k, group_of(self))

    def _estimate_lower_bound(self) -> torch.Tensor | None:
        """Last step's tau_j lowered by ``z`` times its running step-to-step change: a cheap
        lower-bound estimate for this step's exact selection (None on the first step)."""
        if self.tau_estimate is None:
            return None
        return self.tau_estimate - self.estimate_margin * self.tau_estimate_spread

    def _adapt_margin(self, stats: dict, budget_entries: int) -> None:
        """Keep the estimate tight: widen it when many features needed the exact fallback,
        narrow it when it let through far more candidates than the budget."""
        if "fallback_features" not in stats:
            return
        if stats["candidates"] > candidate_limit(budget_entries):
            # too loose: the whole selection took the dense path (which counts every feature as a
            # fallback); widening here would keep it there for good
            self.estimate_margin.div_(1.25).clamp_(min=0.25)
            return
        fail = stats["fallback_features"] / self.cfg.d_sae
        if fail > 0.05:
            self.estimate_margin.mul_(1.5).clamp_(max=16.0)
        elif stats["candidates"] > 3 * budget_entries:
            self.estimate_margin.div_(1.25).clamp_(min=0.25)

    @torch.no_grad()
    def _update_running_stats(self, hidden_pre: torch.Tensor, tau: torch.Tensor) -> None:
        finite_tau = torch.where(torch.isfinite(tau), tau, torch.zeros_like(tau))
        if self.tau_estimate is None:
            self.tau_estimate_spread = 0.05 * finite_tau.abs()
            self.estimate_margin = torch.tensor(ESTIMATE_MARGIN, dtype=torch.float64, device=finite_tau.device)
        else:
            self.tau_estimate_spread = 0.7 * self.tau_estimate_spread + 0.3 * (finite_tau - self.tau_estimate).abs()
        self.tau_estimate = finite_tau
        self.threshold_tracker.update(tau)  # +inf (kept nothing) entries are skipped
        # demand: where Mutual Choice at the same budget would fire (global k*N-th largest value).
        # It feeds slow averages (density_window steps), so every DEMAND_EVERY-th step suffices.
        self._demand_tick = (self._demand_tick + 1) % DEMAND_EVERY
        self.demand_tick.fill_(self._demand_tick)
        if self._demand_tick != 1 % DEMAND_EVERY:
            return
        flat = hidden_pre.detach().reshape(-1)
        f = hidden_pre.shape[-1]
        group = group_of(self)
        if group is not None:
            self._update_demand_global(flat, f, group)
            return
        kk = min(budget(self.cfg.k, flat.numel() // f), flat.numel())
        if kk < 1:
            return
        tau_g, cand, idx = kth_largest_with_candidates(flat, kk, row_len=f)
        tau_g = tau_g.clamp_min(0)
        self.global_threshold_tracker.update(tau_g)
        if cand is None:
            fired = (hidden_pre.detach().reshape(-1, f) >= tau_g) & (hidden_pre.detach().reshape(-1, f) > 0)
            demand = fired.sum(0).float()
        else:
            keep = (cand >= tau_g) & (cand > 0)
            demand = torch.bincount(idx[keep] % f, minlength=f).float()
        n_tokens = flat.numel() // f
        warm_ema_(self.feature_usage, demand / n_tokens, self.usage_steps, 1.0 / self.cfg.density_window)

    @torch.no_grad()
    def _update_demand_global(self, flat: torch.Tensor, f: int, group: object) -> None:
        """The demand update over the global batch (data-parallel): the same numbers on every rank."""
        sizes = dist_select.token_sizes(flat.numel() // f, group, flat.device)
        kk = budget(self.cfg.k, sum(sizes))
        if kk < 1:
            return
        tau_g, kept, n_kept = dist_select.global_budget_select(flat, kk, group, sizes=[s * f for s in sizes], row_len=f)
        tau_g = tau_g if n_kept >= kk else torch.zeros_like(tau_g)
        self.global_threshold_tracker.update(tau_g)
        demand = all_reduce(torch.bincount(kept % f, minlength=f).float(), "sum", group)
        warm_ema_(self.feature_usage, demand / sum(sizes), self.usage_steps, 1.0 / self.cfg.density_window)

    def running_thresholds(self) -> torch.Tensor:
        """The running theta_j, or the global threshold for a feature stale for > threshold_fallback_steps."""
        stale = (self.steps_since_selected > self.cfg.threshold_fallback_steps) | (self.feature_threshold_steps == 0)
        return torch.where(stale, self.global_threshold.expand_as(self.feature_threshold), self.feature_threshold)

    def inference_thresholds(self) -> torch.Tensor:
        """The calibrated theta_j if calibration ran (:mod:`sae_allocators.calibration`); else
        ``c *`` :meth:`running_thresholds` (the export correction, :class:`ExportSteering`)."""
        if self.threshold_tracker.is_calibrated:
            return self.feature_threshold
        return self.export_steering.apply(self.running_thresholds())

    @torch.no_grad()
    def encode_thresholded(self, x: torch.Tensor) -> torch.Tensor:
        """The batch-free rule the saved ``jumprelu`` applies: ``relu(pre) * (pre > theta_j)``."""
        hidden_pre = pre_activations(self, x)
        return hidden_pre.relu() * (hidden_pre > self.inference_thresholds().to(hidden_pre.dtype))

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        super().fold_activation_norm_scaling_factor(scaling_factor)
        self.threshold_tracker.fold(scaling_factor)
        self.global_threshold_tracker.fold(scaling_factor)

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)
        self.cfg.metadata.thresholds_calibrated = self.threshold_tracker.is_calibrated
        state_dict["threshold"] = export_threshold(
            self.inference_thresholds().detach(), self.b_enc, "feature_choice threshold theta_j"
        )

    def lazy_metrics(self, feature_acts: torch.Tensor, dead_mask: torch.Tensor | None) -> dict[str, Any]:
        out = super().lazy_metrics(feature_acts, dead_mask)
        out["threshold"] = self.global_threshold_tracker.metric()
        return out


@hookimpl
def register_architectures(register) -> None:
    register(
        NAME,
        training=(FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig),
        inference=(FeatureChoiceSAE, FeatureChoiceSAEConfig),
        description="Feature Choice: each feature keeps its top m_j tokens (uniform/Zipf capacities); saved as jumprelu",
    )
