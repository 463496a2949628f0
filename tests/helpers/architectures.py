"""Minimal training-config kwargs per architecture of this project (besides ``d_in`` / ``d_sae``).

Workflow tests are parametrized over ``sae_allocators.names.OWN_ARCHITECTURES``; an architecture
with no entry here fails loudly (see :func:`training_kwargs`) so that a new one is never silently
skipped. Entries other than ``mutual_choice`` were written before those architectures landed:
check them at merge time.
"""

from __future__ import annotations

from typing import Any

MINIMAL_TRAINING_KWARGS: dict[str, dict[str, Any]] = {
    "mutual_choice": {"k": 4},
    "feature_choice": {"k": 4},
    "abstopk": {"k": 4},  # checked (abs-afa branch)
    "abstopk_zipf": {"k": 4},  # checked (abs-afa branch)
    "topk_zipf": {"k": 4},  # added when merging `allocation` into abs-afa
    "batchtopk_zipf": {"k": 4},  # added when merging `allocation` into abs-afa
    "gradient_topk": {"k": 4},
    "top_afa": {"k_max": 8},  # checked (abs-afa branch): top_afa has no k; k_max caps it
}


def training_kwargs(name: str) -> dict[str, Any]:
    if name not in MINIMAL_TRAINING_KWARGS:
        raise KeyError(
            f"tests/helpers/architectures.py has no entry for architecture {name!r}: add its minimal training "
            f"config kwargs to MINIMAL_TRAINING_KWARGS so the workflow tests cover it."
        )
    return dict(MINIMAL_TRAINING_KWARGS[name])


def cli_flags(name: str) -> list[str]:
    """The same kwargs as SAELens command-line flags (``--k 4``)."""
    flags: list[str] = []
    for key, value in training_kwargs(name).items():
        flags += [f"--{key}", str(value)]
    return flags
