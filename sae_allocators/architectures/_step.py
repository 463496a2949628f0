"""The training step every architecture of this project shares: encode, select, decode, losses.

An architecture supplies its allocation rule as ``select(hidden_pre, **context) -> Selection``
(:mod:`sae_allocators.sparse`) and declares the rule's kind once (``rule_kind``,
:mod:`sae_allocators.architectures.kinds`). :meth:`SelectionStepMixin.training_forward_pass` is the
whole step, top to bottom, in this file: checks -> encode -> guard -> select -> kept values ->
decode -> MSE -> auxiliary loss (a registered plain function of the step's :class:`StepState`,
:mod:`sae_allocators.losses.builtin`) -> the architecture's extra losses -> ``after_step``
(running thresholds) -> running densities, metrics and budget shares. Nothing of a step is kept on
the module between calls.

Two interchangeable paths, chosen by the config field ``sparse_step`` (default True):

- **sparse** -- the encoder matmul once without autograd, the rule on it, then only the kept
  entries: differentiable values from :func:`sae_allocators.sparse.selected_values`, decode by
  ``embedding_bag``, auxiliary losses on their own sparse selections;
- **dense** (the reference) -- SAELens's computation: ``hidden_pre`` with autograd, dense codes
  scattered from the same selection, ``codes @ W_dec``.

Both give the same selections, losses and gradients (to float tolerance; tests check it), the
same ``TrainStepOutput`` -- but for the form of ``feature_acts``: detached either way, a sparse COO
tensor on the sparse path (SAELens's trainer counts firing on COO tensors, so its per-step
bookkeeping costs O(k N), not O(N F)), dense on the reference path -- and the same logged losses.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import act_times_W_dec

from sae_allocators import sparse
from sae_allocators.allocation import outliers
from sae_allocators.architectures import kinds
from sae_allocators.losses.base import check_finite
from sae_allocators.sparse import Selection
from sae_allocators.thresholds import require_budget, tokens_in

#: the budget shares every step logs (``metrics/<name>`` in W&B), in this order
BUDGET_SHARE_KEYS = ("budget_share_top1pct", "budget_share_outlier_rows", "outlier_row_frac")
#: shares that warn above :data:`WARN_SHARE`, with their wording
WARNED_SHARES = {
    "budget_share_top1pct": "the top 1 % of tokens",
    "budget_share_outlier_rows": f"tokens with norms above {outliers.REPORT_RATIO:g}x the batch median",
}
WARN_SHARE = 0.25


def phase(name: str) -> torch.profiler.record_function:
    """A named phase of the step in ``torch.profiler`` traces (``step.encode``, ``step.select``, ...:
    ``benchmarks/step_speed.py --breakdown`` reads them); costs nothing measurable when no profiler runs."""
    return torch.profiler.record_function(f"step.{name}")


@dataclass
class StepState:
    """One training step's encode, as the losses and the running statistics need it."""

    #: the step's raw input (``TrainStepInput.sae_in``, after :meth:`SelectionStepMixin.step_context`)
    x: torch.Tensor
    #: processed input ``[N, d]`` (leading dimensions flattened; on the sparse path without autograd
    #: when its gradient goes through ``b_dec`` alone, :meth:`SelectionStepMixin.sparse_input`)
    sae_in: torch.Tensor
    #: pre-activations ``[N, F]`` (as the rule saw them; detached on the sparse path)
    hidden_pre: torch.Tensor
    selection: Selection
    #: the kept pre-activations ``[M]``, differentiable
    values: torch.Tensor
    #: leading shape of the input (restored on the outputs)
    lead_shape: tuple[int, ...]
    #: differentiable pre-activations at other entries ``(rows, cols)``, rows non-decreasing
    gather: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    #: the decoder-row norms when ``rescale_acts_by_decoder_norm`` (differentiable), else None
    dec_norm: torch.Tensor | None
    sparse: bool
    #: the rule's context (:meth:`SelectionStepMixin.step_context`) and rule-specific extras
    info: dict[str, Any] = field(default_factory=dict)
    #: what the rule ranked: ``hidden_pre`` itself, or a copy with outlier rows scaled (the guard)
    affinity: torch.Tensor | None = None
    #: ``[N]`` row norms of ``sae_in`` (the guard's and the budget-share metrics' input)
    norms: torch.Tensor | None = None
    #: the batch's median row norm (the global batch's under data parallelism)
    median_norm: torch.Tensor | None = None

    def ranked(self) -> torch.Tensor:
        """The matrix the rule ranked (``hidden_pre``, detached, unless the guard scaled rows)."""
        return self.affinity if self.affinity is not None else self.hidden_pre.detach()

    def budget_shares(self) -> dict[str, torch.Tensor]:
        """Where this step's kept entries went (:func:`~sae_allocators.allocation.outliers.budget_shares`;
        outlier rows at the fixed report ratio), as 0-d tensors computed without a host sync."""
        n = self.selection.n_tokens
        norms = self.norms if self.norms is not None else outliers.row_norms(self.sae_in)
        flagged = outliers.outlier_mask(norms, outliers.REPORT_RATIO, self.median_norm)
        return outliers.budget_shares(self.selection.rows, n, flagged)

    def codes(self) -> torch.Tensor:
        """The detached codes ``[*lead, F]`` SAELens's trainer counts firing on: on the sparse path a
        sparse COO tensor holding only the kept entries (the trainer's bookkeeping is written for
        COO: ``feature_acts.bool().float().sum(-2)``), so no step builds or sweeps a dense
        ``[N, F]`` code matrix; on the dense reference path SAELens's dense matrix."""
        if self.sparse:
            return self.selection.to_sparse_coo(self.values.detach(), self.lead_shape)
        return self.selection.to_dense(self.values.detach()).view(*self.lead_shape, self.selection.n_features)


class SelectionStepMixin:
    """Mixin for SAELens ``TrainingSAE`` subclasses, first in the bases, then
    :class:`~sae_allocators.losses.base.AuxLossMixin` (the auxiliary loss, running densities and
    metrics the step uses), then the SAELens class::

        class MyTrainingSAE(SelectionStepMixin, AuxLossMixin, TopKTrainingSAE):
            rule_kind = kinds.PER_TOKEN

            def select(self, hidden_pre, **context): ...

    Subclasses declare ``rule_kind`` and implement :meth:`select`; they may override
    :meth:`step_context`, :meth:`extra_losses` and :meth:`after_step`. ``training_forward_pass``
    keeps SAELens's contract.
    """

    cfg: Any
    #: the rule's kind (:mod:`sae_allocators.architectures.kinds`), declared once per class
    rule_kind: str = kinds.PER_TOKEN

    @property
    def batch_selection(self) -> bool:
        """True for rules selecting over the whole batch (from :attr:`rule_kind`): the step then
        checks the batch has a budget, ``encode`` refuses non-finite input (one NaN token would
        change every other token's codes) and the outlier guard applies."""
        return kinds.is_batch_rule(type(self))  # the one reading of rule_kind (a bad value raises here)

    # --- what an architecture supplies -------------------------------------------------------

    def select(self, hidden_pre: torch.Tensor, **context: Any) -> Selection:
        """The allocation rule on ``hidden_pre`` ``[N, F]`` (detached); ``context`` is what
        :meth:`step_context` extracted from the step's input (plus ``sae_in``, ``[N, d]``)."""
        raise NotImplementedError

    def step_context(self, step_input: TrainStepInput) -> tuple[TrainStepInput, dict[str, Any]]:
        """The step input the SAE trains on, and extra context for :meth:`select` (default: none)."""
        return step_input, {}

    def extra_losses(self, step_input: TrainStepInput, state: StepState) -> dict[str, torch.Tensor]:
        """Losses beyond MSE and the auxiliary loss (e.g. top-AFA's)."""
        return {}

    def after_step(self, state: StepState, output: TrainStepOutput) -> None:
        """Called once per training step with its state (running thresholds, metrics)."""

    def batch_rule_encode(
        self, x: torch.Tensor, kept: Callable[[torch.Tensor], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-mode ``encode_with_hidden_pre`` of a batch rule, as in a training step: the rule
        ``kept`` (the ``[N, F]`` matrix it ranks -> ascending flat indices of the kept entries) runs
        on the pre-activations with the outlier guard applied; the codes keep the raw values."""
        from sae_allocators.architectures._common import input_and_pre_activations

        sae_in, hidden_pre = input_and_pre_activations(self, x)
        f = hidden_pre.shape[-1]
        ranked, _, _ = self.guard(hidden_pre.detach().reshape(-1, f), sae_in.reshape(-1, sae_in.shape[-1]))
        codes = sparse.keep_flat(hidden_pre.reshape(-1), kept(ranked)).view_as(hidden_pre)
        return self.hook_sae_acts_post(codes), hidden_pre  # type: ignore[attr-defined]

    # --- the step ------------------------------------------------------------------------------

    def uses_sparse_step(self) -> bool:
        return bool(getattr(self.cfg, "sparse_step", True))

    def outlier_norm_ratio(self) -> float:
        """The guard's ratio for a batch-level rule (``cfg.outlier_norm_ratio``; the default for a
        plugin's batch rule whose config lacks the field); 0 for per-token rules (no guard)."""
        if not self.batch_selection:
            return 0.0
        return float(getattr(self.cfg, "outlier_norm_ratio", outliers.DEFAULT_GUARD_RATIO) or 0.0)

    def row_norm_stats(self, sae_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N]`` row norms and the batch's median norm (over the global batch when training
        data-parallel, so every rank ranks with the same median)."""
        norms = outliers.row_norms(sae_in)
        from sae_allocators.distributed import group_of

        group = group_of(self)
        if group is None:
            return norms, outliers.median_norm(norms)
        from sae_allocators.distributed.comm import all_gather_variable

        return norms, outliers.median_norm(torch.cat(all_gather_variable(norms, group)))

    def guard(
        self, pre: torch.Tensor, sae_in: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(affinity, norms, median)``: what the rule ranks -- ``pre`` with outlier rows scaled to
        the median norm (:mod:`sae_allocators.allocation.outliers`) for a batch-level rule, else
        ``pre`` itself -- and the row-norm statistics the step reports."""
        ratio = self.outlier_norm_ratio()
        if ratio <= 0:
            return pre, None, None  # type: ignore[return-value]
        norms, median = self.row_norm_stats(sae_in)
        scale = outliers.ranking_scale(norms, ratio, median)
        return outliers.guarded_affinity(pre, scale), norms, median

    def sparse_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(sae_in, shift)`` for the sparse encoder: SAELens's ``process_sae_in(x)`` and the tensor
        through which it carries a gradient. ``process_sae_in`` ends in ``- b_dec * apply_b_dec_to_input``;
        when ``x`` itself needs no gradient (a training batch), that is the input's only gradient path, so
        the input is computed without autograd and ``b_dec``'s term goes to the encoder as its ``shift``
        (:func:`sparse.selected_values`: no ``[N, d]`` input gradient, no transposed copy of ``W_enc``).
        Otherwise (``x`` requires grad, or no gradient is recorded) the input keeps its own graph."""
        apply = bool(self.cfg.apply_b_dec_to_input)  # type: ignore[attr-defined]
        if not apply or x.requires_grad or not torch.is_grad_enabled():
            return self.process_sae_in(x), None  # type: ignore[attr-defined]
        with torch.no_grad():
            sae_in = self.process_sae_in(x)  # type: ignore[attr-defined]
        return sae_in, self.b_dec * self.cfg.apply_b_dec_to_input  # type: ignore[attr-defined]

    def encode_step(self, x: torch.Tensor, **context: Any) -> StepState:
        """Pre-activations, the rule, and the kept values (sparse or dense path)."""
        W_enc, b_enc = self.W_enc, self.b_enc  # type: ignore[attr-defined]
        if self.uses_sparse_step():
            sae_in, shift = self.sparse_input(x)
            lead = tuple(sae_in.shape[:-1])
            s2 = sae_in.reshape(-1, sae_in.shape[-1])
            rescale = self.cfg.rescale_acts_by_decoder_norm  # type: ignore[attr-defined]
            dec_norm = sparse.decoder_norms(self.W_dec) if rescale else None  # type: ignore[attr-defined]
            with phase("encode"):
                pre = self.hook_sae_acts_pre(sparse.dense_pre(s2, W_enc, b_enc, dec_norm))  # type: ignore[attr-defined]
            with phase("select"):
                aff, norms, median = self.guard(pre, s2)
                sel = self.select(aff, sae_in=s2, **context)
            with phase("values"):
                values = sparse.selected_values(s2, W_enc, b_enc, dec_norm, pre, sel, shift)

            def gather(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
                return sparse.gather_values(s2, W_enc, b_enc, dec_norm, pre, rows, cols, shift)

            return StepState(x, s2, pre, sel, values, lead, gather, dec_norm, True, dict(context), aff, norms, median)
        sae_in = self.process_sae_in(x)  # type: ignore[attr-defined]
        lead = tuple(sae_in.shape[:-1])
        s2 = sae_in.reshape(-1, sae_in.shape[-1])
        dec_norm = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None  # type: ignore[attr-defined]
        with phase("encode"):
            hidden_pre = self.hook_sae_acts_pre(sparse.encoder_pre(s2, W_enc, b_enc, dec_norm))  # type: ignore[attr-defined]
        with phase("select"):
            aff, norms, median = self.guard(hidden_pre.detach(), s2)
            sel = self.select(aff, sae_in=s2.detach(), **context)
        flat = hidden_pre.reshape(-1)
        f = hidden_pre.shape[-1]

        def gather_dense(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            return flat.index_select(0, rows * f + cols)

        return StepState(
            x,
            s2,
            hidden_pre,
            sel,
            flat.index_select(0, sel.flat),
            lead,
            gather_dense,
            dec_norm,
            False,
            dict(context),
            aff,
            norms,
            median,
        )

    def decode_step(self, state: StepState) -> torch.Tensor:
        """SAELens TopK's decode of the kept values: ``codes [/ |W_dec rows|] @ W_dec + b_dec``."""
        W_dec = self.W_dec  # type: ignore[attr-defined]
        if state.sparse:
            recons = self.sparse_decode(state.values, state.selection, state.dec_norm)
        else:
            recons = act_times_W_dec(
                sparse.dense_codes(state.hidden_pre, state.selection), W_dec, state.dec_norm is not None
            )
        out = (recons + self.b_dec).view(*state.lead_shape, W_dec.shape[1])  # type: ignore[attr-defined]
        out = self.hook_sae_recons(out)  # type: ignore[attr-defined]
        out = self.run_time_activation_norm_fn_out(out)  # type: ignore[attr-defined]
        return self.reshape_fn_out(out, self.d_head)  # type: ignore[attr-defined]

    def sparse_decode(self, values: torch.Tensor, sel: Selection, dec_norm: torch.Tensor | None) -> torch.Tensor:
        """Bias-free ``[N, d]`` decode of kept values (divided by the decoder norms if rescaling)."""
        if dec_norm is not None:
            values = values / dec_norm.index_select(0, sel.cols)
        return sparse.decode(values, sel, self.W_dec)  # type: ignore[attr-defined]

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """One training step (SAELens's ``TrainingSAE.training_forward_pass`` contract), top to bottom."""
        if self.batch_selection:  # a batch rule needs floor(k N) >= 1 entries
            require_budget(self.cfg.k, tokens_in(step_input.sae_in), self.cfg.architecture())
        check_finite(step_input.sae_in)
        step_input, context = self.step_context(step_input)  # e.g. gradient TopK's [x | dL/dx] split
        # encode -> guard -> select -> kept values, then the one decode
        state = self.encode_step(step_input.sae_in, **context)
        with phase("decode"):
            sae_out = self.decode_step(state)
            feature_acts = self.hook_sae_acts_post(state.codes())  # type: ignore[attr-defined]
        # losses: MSE, the auxiliary loss (cfg.aux_loss, a function of the step's state), the rule's own
        with phase("mse"):
            mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()  # type: ignore[attr-defined]
        losses = {"mse_loss": mse_loss}
        hidden_pre = state.hidden_pre.view(*state.lead_shape, state.selection.n_features)
        with phase("aux_loss"):
            losses.update(self.calculate_aux_loss(step_input, feature_acts, hidden_pre, sae_out, state=state))  # type: ignore[attr-defined]
            losses.update(self.extra_losses(step_input, state))
        total = mse_loss
        for name, value in losses.items():
            if name != "mse_loss":
                total = total + value
        output = TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=hidden_pre,
            loss=total,
            losses=losses,
        )
        # after the step: the rule's running state, then densities, metrics and budget shares
        with phase("after_step"):
            self.after_step(state, output)
            self.record_budget_shares(state, output)
            self.update_feature_density(output.feature_acts)  # type: ignore[attr-defined]
            output.metrics.update(self.lazy_metrics(output.feature_acts, step_input.dead_neuron_mask))  # type: ignore[attr-defined]
        return output

    # --- where the budget goes (docs/mutual_choice.md, "Real token streams") -----------------

    @torch.no_grad()
    def record_budget_shares(self, state: StepState, output: TrainStepOutput) -> None:
        """Log this step's budget shares (SAELens's metric dict: lazy, no sync unless logged) and
        fold them into a running average (mean over the first 100 steps, then an EMA of rate
        1/100) that the final metrics, the saved ``cfg.json`` and the warning read."""
        shares = state.budget_shares()
        stacked = torch.stack([shares[name] for name in BUDGET_SHARE_KEYS]).double()
        count = getattr(self, "_budget_share_steps", 0) + 1
        prev = getattr(self, "_budget_share_avg", None)
        w = max(1.0 / count, 0.01)
        self._budget_share_avg = stacked if prev is None else prev + w * (stacked - prev)
        self._budget_share_steps = count
        for name, value in shares.items():
            output.metrics[name] = self._share_metric(name, value)

    def _share_metric(self, name: str, value: torch.Tensor) -> Callable[[], float]:
        def read() -> float:
            share = float(value)
            if name in WARNED_SHARES:
                self.warn_budget_share({name: share}, "at this logging step")
            return share

        return read

    def budget_share_summary(self) -> dict[str, float] | None:
        """The running budget shares (see :meth:`record_budget_shares`); None before any step."""
        avg = getattr(self, "_budget_share_avg", None)
        if avg is None:
            return None
        out = {name: round(float(v), 6) for name, v in zip(BUDGET_SHARE_KEYS, avg.tolist())}
        out["steps"] = int(self._budget_share_steps)
        out["outlier_ratio"] = outliers.REPORT_RATIO
        out["guard_ratio"] = self.outlier_norm_ratio()
        return out

    def warn_budget_share(self, shares: dict[str, float], when: str) -> None:
        """Warn (once per SAE) when a few tokens hold more than :data:`WARN_SHARE` of the budget."""
        if getattr(self, "_budget_share_warned", False):
            return
        bad = {k: v for k, v in shares.items() if k in WARNED_SHARES and v > WARN_SHARE}
        if not bad:
            return
        self._budget_share_warned = True
        what = ", ".join(f"{WARNED_SHARES[k]} hold {v:.0%}" for k, v in bad.items())
        arch = self.cfg.architecture()  # type: ignore[attr-defined]
        guard = self.outlier_norm_ratio()
        fix = (
            (
                f"the outlier guard is on (outlier_norm_ratio={guard:g}): lower it (e.g. 2.5)"
                if guard > 0
                else f"set outlier_norm_ratio (default {outliers.DEFAULT_GUARD_RATIO:g}; 0 turns the guard off)"
            )
            if self.batch_selection
            else "exclude those tokens from the data"
        )
        warnings.warn(
            f"{arch}: {what} of the batch budget ({when}): a few tokens take most of the SAE's capacity. "
            f"Usually these are BOS / separator rows or the model's massive-activation tokens. Fix: {fix}, "
            "or exclude special tokens (exclude_special_tokens=True). See docs/mutual_choice.md, 'Real token streams'.",
            stacklevel=2,
        )

    def process_state_dict_for_saving_inference(self, state_dict: dict[str, Any]) -> None:
        super().process_state_dict_for_saving_inference(state_dict)  # type: ignore[misc]
        summary = self.budget_share_summary()
        meta = getattr(self.cfg, "metadata", None)
        if summary is not None and meta is not None:
            meta.budget_shares = summary
            self.warn_budget_share(summary, "averaged over training")
