"""Small shims so the supported SAELens range (6.38 to the newest 6.x) behaves the same."""

from __future__ import annotations

import sys
import uuid


def _generate_id(length: int = 8) -> str:
    return uuid.uuid4().hex[:length]


def apply() -> None:
    """Apply every shim (idempotent, cheap)."""
    # SAELens < ~6.40 calls wandb.util.generate_id() in every runner config's __post_init__,
    # even with wandb logging off; recent wandb releases dropped that function.
    wandb = sys.modules.get("wandb")
    util = getattr(wandb, "util", None) if wandb is not None else None
    if util is not None and not hasattr(util, "generate_id"):
        util.generate_id = _generate_id
