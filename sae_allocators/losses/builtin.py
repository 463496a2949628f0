"""The project's own auxiliary losses, registered through the same hook as a plugin's.

- ``auxk``: AuxK (Gao et al. 2024) over the trainer's dead set, computed exactly as SAELens's
  ``TopKTrainingSAE.calculate_topk_aux_loss`` (same k_aux, scale and reduction).
- ``zipf``: the same residual reconstruction over the set U of dead *and under-used* features
  (:meth:`AuxLossMixin.underused_mask`); with U forced to the dead set it equals ``auxk``.
- ``none``: no auxiliary term.

:func:`residual_aux_loss` is the shared core; a plugin adding a loss over another candidate set
calls it with its own mask (see docs/aux_zipf.md).
"""

from __future__ import annotations

from typing import Any

import torch

from sae_allocators.hookspecs import hookimpl


def residual_aux_loss(
    sae: Any,
    step: Any,
    candidates: torch.Tensor | None,
    weights: torch.Tensor | None = None,
    priority: torch.Tensor | None = None,
) -> torch.Tensor:
    """AuxK-style loss over the latents in ``candidates`` ([d_sae] bool).

    Per token, the ``k_aux`` candidates with the largest ``sae.aux_scores(hidden_pre)`` keep their
    ``hidden_pre`` value (optionally times ``weights[j]``), the rest are zeroed; the codes are
    decoded without bias (``sae.aux_decode``) and regressed onto the detached residual:
    ``coef * min(|C| / k_aux, 1) * mean_tokens sum_d (recons - residual)^2`` with
    ``k_aux = min(sae.aux_k_value(), |C|)``. Zero when ``candidates`` is None or empty.

    ``priority`` ([d_sae] bool, optional): those candidates are taken first, per token (the
    ``min(k_aux, |P|)`` largest of them), and the remaining slots go to the largest of the other
    candidates; so a large set of other candidates cannot crowd the priority ones out.

    With the shared selection step (``step.state`` set) the chosen values come from the step's
    ``gather`` and, on the sparse path, are decoded with ``embedding_bag``: the loss touches
    ``N * k_aux`` entries, never a dense ``[N, d_sae]`` code matrix.
    """
    if candidates is None or (num := int(candidates.sum())) == 0:
        return step.sae_out.new_tensor(0.0)
    sae.aux_check_normalization()
    residual = step.residual
    k_aux = sae.aux_k_value()
    scale = min(num / k_aux, 1.0)
    k_aux = min(k_aux, num)
    hidden_pre = step.hidden_pre
    scores = sae.aux_scores(hidden_pre.detach())

    prio = None if priority is None else priority.bool() & candidates.bool()
    n_prio = 0 if prio is None else int(prio.sum())
    if 0 < n_prio < num:  # (with all or none of the candidates first, the plain rule is the same)
        k1 = min(k_aux, n_prio)
        parts = [_per_token_largest(scores, prio, k1)]
        if k_aux > k1:
            parts.append(_per_token_largest(scores, candidates.bool() & ~prio, k_aux - k1))
        indices = torch.cat(parts, dim=-1)
    else:
        indices = _per_token_largest(scores, candidates.bool(), k_aux)
    if step.state is not None:  # the shared selection step: values from its gather, sparse decode
        recons = _decode_aux_selection(sae, step.state, indices, weights)
    else:  # SAELens's calculate_aux_loss contract: dense codes, dense decode
        values = hidden_pre.gather(-1, indices)
        if weights is not None:
            values = values * weights.to(values.dtype)[indices]
        acts = torch.zeros_like(hidden_pre)
        acts.scatter_(-1, indices, values)
        recons = sae.aux_decode(acts)
    loss = (recons - residual).pow(2).sum(dim=-1).mean()
    return sae.cfg.aux_loss_coefficient * scale * loss


def _per_token_largest(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Per token, the column indices of the ``k`` largest ``scores`` among the columns in ``mask``
    (only those columns are read: ``N x |mask|`` work, not ``N x F``)."""
    cols = mask.nonzero().squeeze(1)
    if cols.numel() == mask.numel():
        return scores.topk(k, sorted=False).indices
    return cols[scores.index_select(-1, cols).topk(k, sorted=False).indices]


def _decode_aux_selection(sae: Any, state: Any, indices: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Bias-free decode of the pre-activations at ``indices`` (per token) through the step's state:
    sparse (``embedding_bag``) on the sparse path, dense codes on the dense reference path."""
    from sae_allocators import sparse

    idx = indices.reshape(-1, indices.shape[-1])
    sel = sparse.from_row_indices(idx, state.selection.n_features)
    values = state.gather(sel.rows, sel.cols)
    if weights is not None:
        values = values * weights.to(values.dtype).index_select(0, sel.cols)
    if state.sparse:
        recons = sae.sparse_decode(values, sel, state.dec_norm)
        recons = recons.view(*state.lead_shape, recons.shape[-1])
        return sae.reshape_fn_out(recons, sae.d_head)
    acts = sel.to_dense(values).view(*state.lead_shape, sel.n_features)
    return sae.aux_decode(acts)


def auxk_loss(sae: Any, step: Any) -> torch.Tensor:
    """``aux_loss="auxk"``: the residual reconstruction over the trainer's dead set."""
    return residual_aux_loss(sae, step, step.dead_mask)


def zipf_loss(sae: Any, step: Any) -> torch.Tensor:
    """``aux_loss="zipf"``: the residual reconstruction over dead and under-used features."""
    under = sae.underused_mask(step.dead_mask)
    weights = sae.zipf_shortfall() if sae.cfg.zipf_weight_by_shortfall else None
    if weights is not None and step.dead_mask is not None:
        weights = torch.where(step.dead_mask.bool(), torch.ones_like(weights), weights)
    return residual_aux_loss(sae, step, under, weights, priority=step.dead_mask)


def no_aux_loss(sae: Any, step: Any) -> Any:
    """``aux_loss="none"``: no auxiliary term."""
    return step.sae_out.new_zeros(())


@hookimpl
def register_aux_losses(register) -> None:
    register("auxk", auxk_loss, description="AuxK over dead latents (SAELens TopK's auxiliary loss)")
    register("zipf", zipf_loss, description="AuxK over dead and under-used latents (below a Zipf curve of densities)")
    register("none", no_aux_loss, description="no auxiliary loss")
