"""Example sae-allocators plugin: the nucleus (top-p) SAE."""
