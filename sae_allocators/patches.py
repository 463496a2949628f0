"""Every change this package makes to code it does not own (SAELens, wandb), and why there is no seam.

SAELens is used through its own seams wherever one exists: the architecture registries (written
through :mod:`sae_allocators.saelens_registry`), subclasses of its runner (module-level:
:class:`sae_allocators.workflow.runner.WorkflowRunner`,
:class:`sae_allocators.distributed.runner.DistributedRunner`), its ``TrainingSAE`` methods
(``training_forward_pass``, ``calculate_aux_loss``, ...), torch's own hooks on its modules (data
parallelism counts each step's tokens with a forward hook on ``hook_sae_input``). What is left has
no seam, and is listed here, in one module:

Process-wide, installed once by :func:`install` (from ``host.load()``, i.e. ``import
sae_allocators``); idempotent; :func:`uninstall` restores the originals of 3-6:

 1 ``wandb.util.generate_id``, only where wandb lacks it.
   Why: SAELens < ~6.40 calls it in every runner config's ``__post_init__``; recent wandb dropped it.
 2 ``sae_lens.registry``'s two dicts become ``ExplainingRegistry`` (:mod:`sae_allocators.saelens_registry`).
   Why: an unknown architecture is a bare ``KeyError``; the subclass's message names it, what is
   registered and which package provides it.
 3 ``ActivationsStore.from_config`` (:func:`sae_allocators.gradient.dispatch.dispatching`).
   Why: the runner builds its store with no choice of class; ``gradient_topk``'s config names its own.
 4 ``LanguageModelSAETrainingRunner.save_final_sae`` and ``SyntheticSAERunner._save_outputs``
   (:mod:`sae_allocators.calibration.runner`).
   Why: no hook between the end of training and the final save: batch-level rules calibrate their
   thresholds there, and the save is made atomic and refuses non-finite weights.
 5 ``LanguageModelSAETrainingRunner.run``, ``_set_sae_metadata``, ``save_checkpoint``
   (:mod:`sae_allocators.calibration.runner`).
   Why: the runner writes its config -- a token in ``model_from_pretrained_kwargs`` -- into every
   file it saves; no hook to redact it.
 6 ``TrainingSAEConfig.from_dict`` (:func:`sae_allocators.config_checks.delegating_from_dict`).
   Why: called on the base class (``TrainingSAEConfig.from_dict({"architecture": "mutual_choice",
   ...})``, as SAELens's docs and runner do) it builds the registered class from the known keys only,
   never calling that class's own ``from_dict``: the unknown keys (``"kk": 4``) vanish unnamed. For
   this project's configs (:class:`~sae_allocators.config_checks.ConfigChecks`) it hands the dict to
   their ``from_dict``, which names them; every other class gets SAELens's ``from_dict`` unchanged.

Per object, by :func:`sae_allocators.mixin.mix_in` (the object becomes an instance of a module-level
subclass of its own class, which adds methods only; its state is untouched; a test checks that every
class passed to it is listed here):

 7 the ``SAETrainer`` SAELens's runner builds inside ``run()``: ``RecordingTrainer``
   (:mod:`sae_allocators.workflow.runner`).
   Why: no trainer-class argument; ``sae-allocators train`` keeps the last step's output for its
   final metrics.
 8 that trainer on a data-parallel rank: ``RankCheckpoints`` (:mod:`sae_allocators.distributed.runner`).
   Why: checkpoint names must count every rank's tokens; ranks other than 0 write their data position only.
 9 rank r's ``ActivationsStore``: ``RankDataPosition`` (:mod:`sae_allocators.distributed.runner`).
   Why: the runner loads every store's position from the one resume folder; rank r reads its own.
10 a trainer and its ``ActivationScaler`` handed to :func:`~sae_allocators.distributed.sync_trainer`:
   ``GlobalTrainerStats``, ``GlobalNormEstimate`` (:mod:`sae_allocators.distributed.data_parallel`).
   Why: the trainer's dead-feature counters, firing counts and norm estimate must be global; no hook
   after its step's bookkeeping.

Scoped, by a context manager, in the benchmark only (never on a user's training path):

11 ``sae_lens.training.sae_trainer.ActivationScaler`` while :func:`fixed_input_scale` is active
   (``LMSource``'s live-store runs).
   Why: the runner builds its trainer, and the trainer its scaler, with no way to pass a factor; the
   live runs (gradient_topk and its control) must share one input scale estimated once, not each
   estimate it from its own rows (``[x | g]`` for the gradient store) at a forward and backward per batch.

No SAE method is ever re-bound on an instance.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

# --- process-wide (1-6) ------------------------------------------------------------------------


def install() -> None:
    """Install 1-6 (idempotent, cheap after the first call)."""
    _wandb_generate_id()
    _install_explaining_registries()
    _install_wraps()


def uninstall() -> None:
    """Restore SAELens's methods of 3-6 (the registries keep their explaining dicts: same content)."""
    _uninstall_wraps()


def _wandb_generate_id() -> None:
    wandb = sys.modules.get("wandb")
    util = getattr(wandb, "util", None) if wandb is not None else None
    if util is not None and not hasattr(util, "generate_id"):
        import uuid

        util.generate_id = lambda length=8: uuid.uuid4().hex[:length]


# 2: sae_lens.registry's dicts -> saelens_registry.ExplainingRegistry


def _install_explaining_registries() -> None:
    """Swap each registry dict for an :class:`~sae_allocators.saelens_registry.ExplainingRegistry`
    holding the same entries, and rebind every SAELens module-level name that refers to the old
    dict (SAELens's runner imports ``SAE_TRAINING_CLASS_REGISTRY`` by name), so all readers see one."""
    import sae_lens.registry as registry

    from sae_allocators.saelens_registry import DICT_NAMES, ExplainingRegistry

    for side, attr in DICT_NAMES.items():
        current = getattr(registry, attr)
        if isinstance(current, ExplainingRegistry):
            continue
        replacement = ExplainingRegistry(current)
        replacement.side = side
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("sae_lens") and getattr(module, attr, None) is current:
                setattr(module, attr, replacement)


# 3-6: methods of SAELens's classes replaced by wraps; one mark, one install and one uninstall

_MARK = "__sae_allocators_wrapped__"


def _wraps() -> list[tuple[type, str, Any]]:
    """``(class, method name, wrapper factory)`` of 3 to 6 (a factory takes SAELens's function
    and returns the wrap; for a classmethod, the function under it)."""
    from sae_lens.saes.sae import TrainingSAEConfig
    from sae_lens.training.activations_store import ActivationsStore

    from sae_allocators.calibration import runner as calibration_runner
    from sae_allocators.config_checks import delegating_from_dict
    from sae_allocators.gradient.dispatch import dispatching

    return [
        (ActivationsStore, "from_config", dispatching),
        *calibration_runner.runner_wraps(),
        (TrainingSAEConfig, "from_dict", delegating_from_dict),
    ]


def _function(attr: Any) -> Any:
    return attr.__func__ if isinstance(attr, classmethod) else attr


def _set(cls: type, name: str, func: Any, like: Any) -> None:
    setattr(cls, name, classmethod(func) if isinstance(like, classmethod) else func)


def installed() -> bool:
    return all(original_of(_function(cls.__dict__[name])) is not None for cls, name, _ in _wraps())


def _install_wraps() -> None:
    for cls, name, wrap in _wraps():
        attr = cls.__dict__[name]
        original = _function(attr)
        if original_of(original) is not None:
            continue
        wrapped = wrap(original)
        setattr(wrapped, _MARK, original)
        _set(cls, name, wrapped, attr)


def _uninstall_wraps() -> None:
    for cls, name, _ in _wraps():
        attr = cls.__dict__[name]
        original = original_of(_function(attr))
        if original is not None:
            _set(cls, name, original, attr)


def original_of(method: Any) -> Any:
    """SAELens's original of a method wrapped here (None if ``method`` is not a wrap of 3-6)."""
    return getattr(method, _MARK, None)


# --- scoped (11) -------------------------------------------------------------------------------


@contextlib.contextmanager
def fixed_input_scale(factor: float) -> Iterator[None]:
    """11: SAELens's trainer (6.38-6.54) builds ``ActivationScaler()`` and estimates its factor only when it
    is unset: while this is active, the trainers built start with ``factor`` (folded into the saved
    weights at the end as usual)."""
    import sae_lens.training.sae_trainer as trainer_module

    original = trainer_module.ActivationScaler

    class FixedScale(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            if getattr(self, "scaling_factor", None) is None:
                self.scaling_factor = factor

    trainer_module.ActivationScaler = FixedScale
    try:
        yield
    finally:
        trainer_module.ActivationScaler = original
