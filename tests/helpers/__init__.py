"""The test suite's one helpers package (importable as ``helpers``: pyproject's pytest
``pythonpath`` puts ``tests/`` on the path; no test edits ``sys.path``).

- :mod:`helpers.fake_hub`: a local stand-in for the Hugging Face Hub HTTP API (``FakeHub``);
- :mod:`helpers.architectures`: the minimal training config per architecture of ours
  (``training_kwargs``, ``cli_flags``), which parametrized workflow tests use;
- :mod:`helpers.distributions`: installed-distribution fixtures (``FakeDistributions``: real
  dist-info + entry points on ``sys.path``) and the clean-up of plugins that are not ours;
- :mod:`helpers.steps`: ``step_input``, SAELens's ``TrainStepInput`` for a direct training step, and
  ``codes``, a step's ``feature_acts`` made dense (the sparse step returns COO);
- tiny models and data: ``tiny_model``, ``tiny_dataset``, ``train_tiny`` from
  :mod:`sae_allocators.testing` (public: plugin authors use them too), re-exported here;
- ``REPO``: the checkout's root (docs, fixtures, the example plugin).
"""

from __future__ import annotations

from pathlib import Path

from helpers.architectures import cli_flags, training_kwargs
from helpers.distributions import FakeDistributions, forget_plugins_not_ours
from helpers.fake_hub import FakeHub
from helpers.steps import codes, step_input

REPO = Path(__file__).resolve().parents[2]


def __getattr__(name: str):
    # sae_allocators.testing imports torch and SAELens: only when a test asks for it
    if name in ("tiny_model", "tiny_dataset", "train_tiny"):
        from sae_allocators import testing

        return getattr(testing, name)
    raise AttributeError(name)


__all__ = [
    "REPO",
    "FakeDistributions",
    "FakeHub",
    "cli_flags",
    "codes",
    "forget_plugins_not_ours",
    "step_input",
    "training_kwargs",
    "tiny_model",
    "tiny_dataset",
    "train_tiny",
]
