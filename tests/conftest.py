from __future__ import annotations

import os
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}.items():
    os.environ.setdefault(_k, _v)
warnings.filterwarnings("ignore", message=".*model_from_pretrained_kwargs.*")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # several workers on a few cores: one thread each (set before torch starts its thread pool, and
    # inherited by the fresh interpreters tests start); see tests/run.sh
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


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


class FakeDistributions:
    """Writes real installed-distribution metadata (dist-info + entry points) into a temp dir on
    ``sys.path``, so ``importlib.metadata`` finds plugins exactly as it would after ``pip install``."""

    def __init__(self, root: Path):
        self.root = root
        self.modules: list[str] = []

    def add(self, dist: str, version: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
        (info / "entry_points.txt").write_text(f"[sae_allocators]\n{eps}")
        for mod, source in modules.items():
            (self.root / f"{mod}.py").write_text(textwrap.dedent(source))
            self.modules.append(mod)


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
        _forget_plugins_not_ours()
        host.load(force=True)


def _forget_plugins_not_ours() -> None:
    from sae_allocators import names
    from sae_allocators import saelens_registry as reg

    records = reg.provider_records()
    for name, rec in list(records.items()):
        if rec["distribution"] not in (names.DISTRIBUTION, "sae-lens"):
            reg.remove(reg.TRAINING, name)
            reg.remove(reg.INFERENCE, name)
            del records[name]
