"""sae-allocators: adaptive-sparsity SAE architectures for SAELens.

Importing this package registers every architecture it provides -- and those of installed
third-party plugins -- into SAELens's registries (see :mod:`sae_allocators.host`).
"""

from sae_allocators import host
from sae_allocators.hookspecs import ENTRY_POINT_GROUP, hookimpl, hookspec
from sae_allocators.saelens_registry import UnknownArchitectureError

__version__ = "0.1.0"

host.load()

__all__ = ["ENTRY_POINT_GROUP", "UnknownArchitectureError", "hookimpl", "hookspec", "host", "__version__"]
