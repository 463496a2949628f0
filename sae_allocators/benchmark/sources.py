"""The data the benchmark trains on, and what every source shares.

Each source trains a config through SAELens's own runner (returning a :class:`TrainResult`) and yields
held-out evaluation batches:

- :class:`~sae_allocators.benchmark.synthetic_source.SyntheticSource`: ``sae_lens.synthetic.SyntheticModel``
  with Zipfian firing (known features), trained with ``SyntheticSAERunner``; every architecture sees
  the same stream (the data RNG is re-seeded per seed after the SAE is built).
- :class:`~sae_allocators.benchmark.lm_source.LMSource`: activations of a ``HookedTransformer`` at one
  hook, computed ONCE with SAELens's ``CacheActivationsRunner`` into a local dataset and read back by
  ``LanguageModelSAETrainingRunner(use_cached_activations=True)`` for every architecture.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


def _log(msg: str) -> None:
    print(msg, flush=True)


@contextlib.contextmanager
def quiet_saelens():
    """Hide SAELens's per-run notices (overridden model/dataset, epochs of a small cache, loading
    hints) that would otherwise repeat for every architecture; errors still show."""
    import logging
    import warnings

    lg = logging.getLogger("sae_lens")
    level = lg.level
    lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        for msg in (
            "The training dataset contains fewer",
            "All samples in the training dataset",
            "\nThis SAE has non-empty model_from_pretrained_kwargs",
        ):
            warnings.filterwarnings("ignore", message=msg)
        try:
            yield
        finally:
            lg.setLevel(level)


@dataclass
class TrainResult:
    sae: Any  # the TrainingSAE after fit (normalisation folded in)
    path: Path  # the saved inference model folder
    seconds: float
    steps: int
    tokens: int = 0  # training tokens (samples) the SAE saw
    path_kind: str = "cache"  # synthetic, cache (activation cache) or live (the store computes them)
    store: str | None = None  # the activation store class SAELens's runner built
    #: sae_allocators.calibration.CalibrationResult when the saved thresholds were calibrated
    calibration: Any = None


def _runner_kwargs(cls: type, **kwargs: Any) -> dict[str, Any]:
    """Keep only the fields ``cls`` has (SAELens adds fields across 6.x)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in kwargs.items() if k in names}


def scale_dict(scale: Any) -> dict[str, Any]:
    return asdict(scale)
