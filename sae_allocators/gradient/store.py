"""An ``ActivationsStore`` that yields ``[x | g]`` rows: the hooked activation and dL/dx side by side.

``L`` is the language model's next-token cross-entropy summed over every predicted position of the
store's LLM batch (not averaged), so the gradient a token gets does not depend on the batch size.
Everything else is SAELens's: tokens, special-token filtering, the mixing buffer (one permutation
for the whole row keeps ``x`` and ``g`` aligned), prefetching, checkpoint state.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from sae_lens.training.activations_store import ActivationsStore

#: hook names that sit after the unembedding (their "activation" is the logits)
_AFTER_UNEMBED = re.compile(r"(^|\.)(unembed|lm_head)(\.|$)|logits")

LOSS_DESCRIPTION = "next-token cross-entropy summed over all predicted positions of the LLM batch"


class GradientStoreError(ValueError):
    """The model, hook or runner settings cannot give (activation, gradient) pairs."""


def _input_device(model: Any) -> torch.device:
    if hasattr(model, "W_E"):
        return model.W_E.device
    return next(model.parameters()).device


@contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on the model's parameters (restored on exit).

    The backward pass then only computes what dL/dx needs: no weight gradients, no ``.grad``.
    """
    flipped = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in flipped:
            p.requires_grad_(False)
        yield
    finally:
        for p in flipped:
            p.requires_grad_(True)


def _loss_of(output: Any) -> torch.Tensor | None:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, tuple) and len(output) == 2:
        loss = output[1]
    return loss if isinstance(loss, torch.Tensor) else None


def forward_backward(
    model: Any,
    tokens: torch.Tensor,
    hook_name: str,
    model_kwargs: dict[str, Any] | None = None,
    autocast: bool = False,
    allow_unused: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, Any]:
    """One full forward and one backward to the hook: ``(x, dL/dx, model output)``.

    The forward runs under ``no_grad`` until the hook point, where the activation is replaced by a
    detached leaf and autograd is switched on for the rest of the forward; ``torch.autograd.grad``
    then differentiates the summed per-token CE with respect to that leaf only. The leaf has the
    hook point's full shape (e.g. ``[batch, pos, head, d_head]`` for ``hook_z``).
    """
    captured: dict[str, torch.Tensor] = {}

    def capture(act: torch.Tensor, hook: Any) -> torch.Tensor:  # noqa: ARG001
        torch.set_grad_enabled(True)  # layers after the hook build a graph; the ones before did not
        leaf = act.detach().requires_grad_(True)
        captured["x"] = leaf
        return leaf

    with (
        torch.no_grad(),
        frozen_parameters(model),
        torch.autocast(device_type=_input_device(model).type, dtype=torch.bfloat16, enabled=autocast),
    ):
        output = model.run_with_hooks(
            tokens,
            return_type="both",
            loss_per_token=True,
            fwd_hooks=[(hook_name, capture)],
            **(model_kwargs or {}),
        )
        leaf = captured.get("x")
        loss = _loss_of(output)
        if leaf is None or loss is None:
            return leaf, None, output
        if not loss.requires_grad:
            if allow_unused:
                return leaf.detach(), None, output
            raise GradientStoreError(f"the model's loss does not depend on hook {hook_name!r}")
        (grad,) = torch.autograd.grad(loss.float().sum(), [leaf], allow_unused=allow_unused)
    return leaf.detach(), grad, output


def check_model(model: Any, hook_name: str, model_kwargs: dict[str, Any] | None = None) -> None:
    """Fail early, with the fix, when ``model``/``hook_name`` cannot give dL/dx.

    Checks the name, then runs one forward/backward on a 1x2 batch of token 0 (cheap) and checks
    that the hook fired, the model returned a per-token loss, the loss depends on the hook, and the
    hooked tensor is not the logits.
    """
    hook_dict = getattr(model, "hook_dict", None)
    if hook_dict is not None and hook_name not in hook_dict:
        close = [n for n in hook_dict if hook_name.split(".")[-1] in n][:5]
        raise GradientStoreError(
            f"hook_name={hook_name!r} is not a hook point of this model" + (f"; similar: {close}" if close else "")
        )
    if _AFTER_UNEMBED.search(hook_name):
        raise GradientStoreError(
            f"hook_name={hook_name!r} is after the unembedding: gradient_topk needs an activation that the "
            "loss is computed from downstream. Hook a residual/MLP/attention point instead."
        )
    tokens = torch.zeros((1, 2), dtype=torch.long, device=_input_device(model))
    try:
        leaf, grad, output = forward_backward(model, tokens, hook_name, model_kwargs, allow_unused=True)
    except GradientStoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means "this model gives no loss"
        raise GradientStoreError(
            f"{type(model).__name__} cannot give the next-token loss gradient_topk needs: "
            f"model.run_with_hooks(tokens, return_type='both', loss_per_token=True) raised "
            f"{type(exc).__name__}: {exc}. Use a causal LM whose forward takes those arguments (a "
            "TransformerLens HookedTransformer does)."
        ) from exc
    if leaf is None:
        raise GradientStoreError(f"hook {hook_name!r} did not fire in a forward pass of the model")
    if _loss_of(output) is None:
        raise GradientStoreError(
            f"{type(model).__name__}.forward(return_type='both', loss_per_token=True) returned no loss: "
            "gradient_topk needs a model with a next-token loss"
        )
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, tuple):
        logits = output[0]
    if isinstance(logits, torch.Tensor) and leaf.shape == logits.shape and torch.equal(leaf, logits.detach()):
        raise GradientStoreError(f"hook_name={hook_name!r} carries the logits (after the unembedding)")
    if grad is None:
        raise GradientStoreError(f"the model's loss does not depend on hook {hook_name!r}, so it has no gradient there")


#: what SAELens's scaler may do to the packed rows: nothing, or multiply the whole row by one factor
#: ``c = sqrt(d_in) / mean ||row||`` (right for ``x``; the SAE config then needs a scale-free use of
#: ``g``, which gradient_topk's config checks; ``||g|| << ||x||`` makes the row norm ``||x||`` to
#: about ``||g||^2 / (2 ||x||^2)``, relative)
NORMALIZATIONS = ("none", "expected_average_only_in")


def check_normalization(norm: str) -> None:
    """``normalize_activations`` must be ``'none'`` or ``'expected_average_only_in'``: SAELens's scaler
    scales the packed row as one vector, so anything that is not one factor per row would mix ``x``
    into ``g``'s scale (and whitening would mix the two halves)."""
    if norm not in NORMALIZATIONS:
        raise GradientStoreError(
            f"normalize_activations={norm!r} is not supported with the gradient store: SAELens would transform "
            "the packed [x | g] row as one vector. Use normalize_activations='none' or 'expected_average_only_in'."
        )


def check_runner_config(cfg: Any) -> None:
    """Settings of a ``LanguageModelSAERunnerConfig`` the gradient store cannot honour."""
    check_normalization(getattr(getattr(cfg, "sae", None), "normalize_activations", "none"))
    if getattr(cfg, "use_cached_activations", False):
        raise GradientStoreError(
            "use_cached_activations=True: cached activations carry no gradients. Set use_cached_activations=False."
        )


class GradientActivationsStore(ActivationsStore):
    """SAELens's ``ActivationsStore``, yielding ``[x | g]`` rows of width ``2 * d_in``.

    ``d_in`` stays the activation width. ``get_activations`` (used by nothing in training, but by
    user code) still returns plain activations; ``get_raw_llm_batch`` -- the one method the
    buffer, filtering and prefetching read from -- returns packed rows. Split a row with
    :func:`split_rows`.
    """

    gradient_loss = LOSS_DESCRIPTION

    def __init__(self, *args: Any, check: bool = True, **kwargs: Any):
        if kwargs.get("cached_activations_path") is not None:
            raise GradientStoreError("cached activations carry no gradients; pass cached_activations_path=None")
        check_normalization(kwargs.get("normalize_activations", "none"))
        super().__init__(*args, **kwargs)
        check_normalization(self.normalize_activations)
        if check:
            check_model(self.model, self.hook_name, self.model_kwargs)

    @classmethod
    def from_config(cls, model: Any, cfg: Any, override_dataset: Any = None) -> "GradientActivationsStore":  # type: ignore[override]
        check_runner_config(cfg)
        return super().from_config(model, cfg, override_dataset=override_dataset)  # type: ignore[return-value]

    @property
    def row_width(self) -> int:
        return 2 * self.d_in

    def _shape_like_saelens(self, t: torch.Tensor) -> torch.Tensor:
        """Apply seqpos_slice / head selection / head flattening exactly as SAELens's get_activations."""
        t = t[:, slice(*self.seqpos_slice)]
        if self.hook_head_index is not None:
            t = t[:, :, self.hook_head_index]
        elif t.ndim > 3:
            t = t.reshape(t.shape[0], t.shape[1], -1)
        if t.shape[-1] != self.d_in:
            raise GradientStoreError(f"hook {self.hook_name!r} gives width {t.shape[-1]}, but d_in={self.d_in}")
        return t

    def get_activations_and_gradients(self, batch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, dL/dx)``, each ``[batch, pos, d_in]`` (after ``seqpos_slice``), float32 on the store device."""
        x, g, _ = forward_backward(self.model, batch_tokens, self.hook_name, self.model_kwargs, self.autocast_lm)
        if x is None or g is None:
            raise GradientStoreError(f"hook {self.hook_name!r} gave no activation or gradient")
        x = self._shape_like_saelens(x).to(self.device, torch.float32)
        g = self._shape_like_saelens(g).to(self.device, torch.float32)
        return x, g

    def get_raw_llm_batch(self, raise_on_epoch_end: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        """Packed ``[x | g]`` rows ``[batch * pos, 2 * d_in]`` and their token ids ``[batch * pos]``."""
        batch_tokens = self.get_batch_tokens(raise_at_epoch_end=raise_on_epoch_end)
        x, g = self.get_activations_and_gradients(batch_tokens)
        rows = torch.cat([x, g], dim=-1).reshape(-1, 2 * self.d_in)
        token_ids = batch_tokens[:, slice(*self.seqpos_slice)].reshape(-1).to(self.device)
        return rows, token_ids


def split_rows(rows: torch.Tensor, d_in: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[..., 2*d_in] -> (x, g)``; ``[..., d_in] -> (x, None)`` (a batch without gradients)."""
    width = rows.shape[-1]
    if width == 2 * d_in:
        return rows[..., :d_in], rows[..., d_in:]
    if width == d_in:
        return rows, None
    raise ValueError(
        f"gradient_topk got rows of width {width}; expected d_in={d_in} (activations only) or "
        f"2*d_in={2 * d_in} ([activation | gradient] from GradientActivationsStore)"
    )
