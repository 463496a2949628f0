"""The three kinds of allocation rule. Each training class declares its kind once, as the class
attribute ``rule_kind`` (:class:`~sae_allocators.architectures._step.SelectionStepMixin`); what
depends on the kind -- the budget check and the finite check of ``encode``, the outlier guard,
calibration, the benchmark's drift column, the tests' parametrizations -- reads it from the class
(:func:`rule_kind_of`), never from a list of names.

- :data:`PER_TOKEN` -- every token chooses its own latents (TopK, AbsTopK, gradient TopK, top-AFA):
  no batch budget, no threshold to carry to inference.
- :data:`BATCH_GLOBAL` -- one budget ``floor(k N)`` over the whole batch and one running threshold
  theta, saved as a ``jumprelu`` with that threshold for every latent (Mutual Choice, BatchTopK).
- :data:`BATCH_PER_FEATURE` -- per-feature capacities summing to ``floor(k N)`` and one running
  threshold per feature, saved as a ``jumprelu`` (Feature Choice).
"""

from __future__ import annotations

from typing import Any

PER_TOKEN = "per_token"
BATCH_GLOBAL = "batch_global"
BATCH_PER_FEATURE = "batch_per_feature"
KINDS = (PER_TOKEN, BATCH_GLOBAL, BATCH_PER_FEATURE)
#: the kinds whose selection spans the batch (a budget ``floor(k N)``, thresholds to calibrate)
BATCH_KINDS = (BATCH_GLOBAL, BATCH_PER_FEATURE)


def rule_kind_of(training_cls: type) -> str:
    """The kind a training class declares (``rule_kind``); for a SAELens class without one:
    :data:`BATCH_GLOBAL` for BatchTopK and its subclasses, else :data:`PER_TOKEN`."""
    kind = getattr(training_cls, "rule_kind", None)
    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"{training_cls.__name__}.rule_kind = {kind!r}: use one of {', '.join(KINDS)}")
        return str(kind)
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE

    return BATCH_GLOBAL if issubclass(training_cls, BatchTopKTrainingSAE) else PER_TOKEN


def is_batch_rule(training_cls: type) -> bool:
    return rule_kind_of(training_cls) in BATCH_KINDS


def declared_kinds() -> dict[str, str]:
    """Registered training architectures whose class declares ``rule_kind`` (this project's and
    plugins' built on the shared step), name -> kind, sorted by name."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    out: dict[str, str] = {}
    for name in sorted(SAE_TRAINING_CLASS_REGISTRY):
        cls: Any = SAE_TRAINING_CLASS_REGISTRY[name][0]
        if getattr(cls, "rule_kind", None) is not None:
            out[name] = rule_kind_of(cls)
    return out


def architectures_of_kind(*kinds: str) -> tuple[str, ...]:
    """Registered training architectures declaring one of ``kinds`` (see :func:`declared_kinds`)."""
    return tuple(name for name, kind in declared_kinds().items() if kind in kinds)
