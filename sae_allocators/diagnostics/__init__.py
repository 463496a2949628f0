"""Diagnostics users can run on any SAE (pure tensor functions plus thin SAE wrappers).

- :mod:`sae_allocators.diagnostics.afa` -- top-AFA's per-token k statistics and the
  ε_LBO diagnostic of Lee et al. 2025.
"""

from sae_allocators.diagnostics.afa import afa_k_stats, epsilon_lbo, epsilon_lbo_stats, sae_afa_diagnostics

__all__ = ["afa_k_stats", "epsilon_lbo", "epsilon_lbo_stats", "sae_afa_diagnostics"]
