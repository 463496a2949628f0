from __future__ import annotations

import os
import sys
import warnings

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # several workers on a few cores: one thread each (inherited by the fresh interpreters tests
    # start; see tests/run.sh). Set before anything imports torch, and set on torch too in case a
    # plugin imported it first (then the variable alone comes too late for this process).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from helpers import FakeDistributions, forget_plugins_not_ours  # noqa: E402  (after the thread setting)

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
}.items():
    os.environ.setdefault(_k, _v)
warnings.filterwarnings("ignore", message=".*model_from_pretrained_kwargs.*")


@pytest.fixture(autouse=True)
def _seed_every_random_source():
    """Seed Python's, NumPy's and torch's global generators before every test, so a test that
    draws random numbers without its own generator sees the same numbers alone, in any order and
    on any xdist worker."""
    import random

    random.seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:
        pass
    import torch

    torch.manual_seed(0)
    yield


@pytest.fixture
def fake_dists(tmp_path, monkeypatch):
    """Yield a FakeDistributions; afterwards reload the host so the fakes leave no trace."""
    from sae_allocators import host

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("SAE_ALLOCATORS_DISABLE_PLUGINS", raising=False)
    fakes = FakeDistributions(tmp_path)
    yield fakes
    sys.path.remove(str(tmp_path)) if str(tmp_path) in sys.path else None
    for mod in fakes.modules:
        sys.modules.pop(mod, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forget_plugins_not_ours()
        host.load(force=True)
