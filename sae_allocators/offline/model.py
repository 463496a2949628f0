"""Loading the prepared language model: SmolLM2-135M-Instruct as a TransformerLens ``HookedTransformer``
(:func:`load_model`) and its tokenizer. See :mod:`sae_allocators.offline`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import devices
from . import preparation
from .preparation import CACHE_ENV, MODEL_PART, TL_TRAP_WORDS, PreparedAssets
from .sources import OfflineAssetError

if TYPE_CHECKING:
    import torch
    from transformer_lens import HookedTransformer


# --------------------------------------------------------------------------------------------
# model


def tl_safe_dir(model_dir: Path) -> Path:
    """A path to ``model_dir`` without "llama"/"gemma" in it (TransformerLens would pick the
    architecture from those words and fail): the folder itself, or a symlink to it in a fresh
    temporary folder."""
    if not any(w in str(model_dir.resolve()).lower() for w in TL_TRAP_WORDS):
        return model_dir
    link = Path(tempfile.mkdtemp(prefix="sae-allocators-lm-")) / MODEL_PART
    if any(w in str(link).lower() for w in TL_TRAP_WORDS):
        raise OfflineAssetError(
            f"{model_dir}: TransformerLens cannot load a model from a path containing {TL_TRAP_WORDS}; move the cache (${CACHE_ENV})"
        )
    try:
        link.symlink_to(model_dir.resolve(), target_is_directory=True)
    except OSError as exc:
        raise OfflineAssetError(
            f"{model_dir}: the path contains one of {TL_TRAP_WORDS}, which TransformerLens misreads, and a symlink "
            f"could not be made ({exc}); move the cache (${CACHE_ENV}) to a path without those words"
        ) from None
    return link


def load_tokenizer(prepared: PreparedAssets) -> Any:
    """The model's Hugging Face tokenizer (fast), loaded from the local folder."""
    return preparation._load_tokenizer_from(prepared.model_dir)


def load_model(
    prepared: PreparedAssets,
    device: str | torch.device = devices.CPU,
    *,
    dtype: torch.dtype | None = None,
    first_n_layers: int | None = None,
    n_ctx: int | None = None,
) -> HookedTransformer:
    """SmolLM2-135M-Instruct as a TransformerLens ``HookedTransformer``, in eval mode.

    Weights are loaded unprocessed (no layer-norm folding, no centring) so the logits equal the
    Hugging Face model's (to ~1e-4 in float32). ``first_n_layers`` keeps only the first blocks
    (for activations at a middle layer, cheaper; the unembedding then sees an unfinished
    residual stream). ``n_ctx`` shortens the context window from 8192 (smaller rotary tables).
    The model's ``cfg.model_name`` is ``"lm-smollm2-135m"``; give SAELens the model itself
    through ``override_model=``.
    """
    import torch
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    path = str(tl_safe_dir(prepared.model_dir))
    tokenizer = preparation._load_tokenizer_from(prepared.model_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    cfg = loading.get_pretrained_model_config(
        path, device=device, dtype=dtype, first_n_layers=first_n_layers, n_ctx=n_ctx
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state_dict = loading.get_pretrained_state_dict(path, cfg, hf_model, dtype=dtype)
    del hf_model
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    del state_dict
    return model.to(device, print_details=False).eval()
