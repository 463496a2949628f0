"""The project's own auxiliary losses, registered through the same hook as a plugin's."""

from __future__ import annotations

from typing import Any

from sae_allocators.hookspecs import hookimpl


def no_aux_loss(sae: Any, step: Any) -> Any:
    """``aux_loss="none"``: no auxiliary term."""
    return step.sae_out.new_zeros(())


@hookimpl
def register_aux_losses(register) -> None:
    register("none", no_aux_loss, description="no auxiliary loss")
