"""Installed-distribution fixtures: real dist-info metadata and entry points written into a
temporary folder on ``sys.path``, so ``importlib.metadata`` (and the host) find plugins exactly as
after ``pip install``; and the clean-up that removes every plugin that is not ours or SAELens's."""

from __future__ import annotations

import textwrap
from pathlib import Path


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


def forget_plugins_not_ours() -> None:
    from sae_allocators import names
    from sae_allocators import saelens_registry as reg

    records = reg.provider_records()
    for name, rec in list(records.items()):
        if rec["distribution"] not in (names.DISTRIBUTION, "sae-lens"):
            reg.remove(reg.TRAINING, name)
            reg.remove(reg.INFERENCE, name)
            del records[name]
