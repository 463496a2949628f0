"""The training step every architecture of this project shares: encode, select, decode, losses.

An architecture supplies one thing, its allocation rule as ``select(hidden_pre, **context) ->
Selection`` (:mod:`sae_allocators.sparse`); :class:`SelectionStepMixin` runs the step around it
and hands the result -- a :class:`StepState` -- explicitly to the losses and to the
architecture's :meth:`SelectionStepMixin.after_step` (running thresholds, usage counts, metrics).
Nothing of a step is kept on the module between calls.

Two interchangeable paths, chosen by the config field ``sparse_step`` (default True):

- **sparse** -- the encoder matmul once without autograd, the rule on it, then only the kept
  entries: differentiable values from :func:`sae_allocators.sparse.selected_values`, decode by
  ``embedding_bag``, auxiliary losses on their own sparse selections;
- **dense** (the reference) -- SAELens's computation: ``hidden_pre`` with autograd, dense codes
  scattered from the same selection, ``codes @ W_dec``.

Both give the same selections, losses and gradients (to float tolerance; tests check it), the
same ``TrainStepOutput`` (SAELens's trainer gets dense, detached ``feature_acts`` either way) and
the same logged losses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput
from sae_lens.saes.topk_sae import act_times_W_dec

from sae_allocators import sparse
from sae_allocators.sparse import Selection


@dataclass
class StepState:
    """One training step's encode, as the losses and the running statistics need it."""

    #: the step's raw input (``TrainStepInput.sae_in``, after :meth:`SelectionStepMixin.step_context`)
    x: torch.Tensor
    #: processed input ``[N, d]`` (leading dimensions flattened)
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

    def codes(self) -> torch.Tensor:
        """Dense detached codes ``[*lead, F]`` (what SAELens's trainer counts firing on)."""
        return self.selection.to_dense(self.values.detach()).view(*self.lead_shape, self.selection.n_features)


class SelectionStepMixin:
    """Mixin for SAELens ``TrainingSAE`` subclasses (before the SAELens class in the bases).

    Subclasses implement :meth:`select`; they may override :meth:`extra_losses` and
    :meth:`after_step`. ``training_forward_pass`` keeps SAELens's contract.
    """

    cfg: Any

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

    # --- the step ------------------------------------------------------------------------------

    def uses_sparse_step(self) -> bool:
        return bool(getattr(self.cfg, "sparse_step", True))

    def encode_step(self, x: torch.Tensor, **context: Any) -> StepState:
        """Pre-activations, the rule, and the kept values (sparse or dense path)."""
        sae_in = self.process_sae_in(x)  # type: ignore[attr-defined]
        lead = tuple(sae_in.shape[:-1])
        s2 = sae_in.reshape(-1, sae_in.shape[-1])
        W_enc, b_enc = self.W_enc, self.b_enc  # type: ignore[attr-defined]
        dec_norm = self.W_dec.norm(dim=-1) if self.cfg.rescale_acts_by_decoder_norm else None  # type: ignore[attr-defined]
        if self.uses_sparse_step():
            pre = self.hook_sae_acts_pre(sparse.dense_pre(s2, W_enc, b_enc, dec_norm))  # type: ignore[attr-defined]
            sel = self.select(pre, sae_in=s2, **context)
            values = sparse.selected_values(s2, W_enc, b_enc, dec_norm, pre, sel)

            def gather(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
                return sparse.gather_values(s2, W_enc, b_enc, dec_norm, pre, rows, cols)

            return StepState(x, s2, pre, sel, values, lead, gather, dec_norm, True, dict(context))
        hidden_pre = self.hook_sae_acts_pre(sparse.encoder_pre(s2, W_enc, b_enc, dec_norm))  # type: ignore[attr-defined]
        sel = self.select(hidden_pre.detach(), sae_in=s2.detach(), **context)
        flat = hidden_pre.reshape(-1)
        f = hidden_pre.shape[-1]

        def gather_dense(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            return flat.index_select(0, rows * f + cols)

        return StepState(x, s2, hidden_pre, sel, flat.index_select(0, sel.flat), lead, gather_dense, dec_norm, False, dict(context))

    def decode_step(self, state: StepState) -> torch.Tensor:
        """SAELens TopK's decode of the kept values: ``codes [/ |W_dec rows|] @ W_dec + b_dec``."""
        W_dec = self.W_dec  # type: ignore[attr-defined]
        if state.sparse:
            recons = self.sparse_decode(state.values, state.selection, state.dec_norm)
        else:
            recons = act_times_W_dec(sparse.dense_codes(state.hidden_pre, state.selection), W_dec, state.dec_norm is not None)
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
        step_input, context = self.step_context(step_input)
        return self.training_step(step_input, **context)

    def training_step(self, step_input: TrainStepInput, **context: Any) -> TrainStepOutput:
        """SAELens's ``TrainingSAE.training_forward_pass`` around :meth:`select` (``context`` goes
        to the rule, e.g. gradient TopK's loss gradients)."""
        state = self.encode_step(step_input.sae_in, **context)
        sae_out = self.decode_step(state)
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()  # type: ignore[attr-defined]
        feature_acts = self.hook_sae_acts_post(state.codes())  # type: ignore[attr-defined]
        losses = {"mse_loss": mse_loss}
        losses.update(self.step_aux_losses(step_input, state, feature_acts, sae_out))
        losses.update(self.extra_losses(step_input, state))
        total = mse_loss
        for name, value in losses.items():
            if name != "mse_loss":
                total = total + value
        output = TrainStepOutput(
            sae_in=step_input.sae_in,
            sae_out=sae_out,
            feature_acts=feature_acts,
            hidden_pre=state.hidden_pre.view(*state.lead_shape, state.selection.n_features),
            loss=total,
            losses=losses,
        )
        self.after_step(state, output)
        return output

    def step_aux_losses(self, step_input: TrainStepInput, state: StepState, feature_acts: torch.Tensor, sae_out: torch.Tensor) -> dict[str, torch.Tensor]:
        """The auxiliary loss (``cfg.aux_loss``) with this step's state (AuxLossMixin provides it)."""
        return {}
