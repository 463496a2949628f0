"""Through the real installed distribution, in fresh interpreters: metadata, entry points, the
``.pth`` autoload hook, the console script, and a separately installed plugin distribution.

These tests need the project *installed* (``bash tests/run.sh`` does it; by hand:
``pip install -e .``). They fail, rather than skip, when it is not: entry points are metadata, and
only an install proves them.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sae_allocators.testing import run_fresh

from helpers import REPO as ROOT

PLUGIN_DIR = ROOT / "plugins" / "sae-allocators-nucleus"

# Runs once in CI, at the newest SAELens (tests/run.sh; CI time budget): its subject is this distribution's
# metadata, entry points, .pth hook and console script; at the floor SAELens every other test already runs
# through the installed distribution and its entry points.
pytestmark = [pytest.mark.install, pytest.mark.saelens_independent]


@pytest.fixture(scope="module")
def dist() -> md.Distribution:
    try:
        return md.distribution("sae-allocators")
    except md.PackageNotFoundError:
        pytest.fail(
            "sae-allocators is not installed in this environment: run `bash tests/run.sh` or `pip install -e .`"
        )


def fresh(code: str, tmp_path: Path, **kw) -> subprocess.CompletedProcess:
    proc = run_fresh(code, cwd=tmp_path, **kw)  # cwd: the checkout must not shadow the install
    return proc


def test_distribution_ships_pth_hook_and_console_script(dist):
    files = {str(f) for f in dist.files or []}
    assert "sae_allocators_autoload.pth" in files and "sae_allocators_autoload.py" in files
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"sae-allocators": "sae_allocators.cli:main"}


def test_bare_interpreter_imports_only_the_tiny_hook(dist, tmp_path):
    proc = fresh(
        "import sys; print(sorted(m for m in sys.modules if m.startswith(('sae', 'torch', 'pluggy'))))", tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['sae_allocators_autoload']"


@pytest.fixture(scope="module")
def saved_mutual_choice(tmp_path_factory) -> Path:
    """An SAE folder whose cfg.json says ``"architecture": "mutual_choice"`` (inference side)."""
    from sae_allocators.architectures.mutual_choice import MutualChoiceSAE, MutualChoiceSAEConfig

    path = tmp_path_factory.mktemp("mc")
    MutualChoiceSAE(MutualChoiceSAEConfig(d_in=8, d_sae=16, k=2)).save_model(path)
    assert json.loads((path / "cfg.json").read_text())["architecture"] == "mutual_choice"
    return path


LOAD = """
import sys
from sae_lens import SAE
sae = SAE.load_from_disk({path!r})
print(type(sae).__module__, type(sae).__name__, 'sae_allocators' in sys.modules)
"""


def test_plain_saelens_loads_our_architecture_via_autoload(dist, tmp_path, saved_mutual_choice):
    proc = fresh(LOAD.format(path=str(saved_mutual_choice)), tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["sae_allocators.architectures.mutual_choice", "MutualChoiceSAE", "True"]


def test_autoload_can_be_switched_off(dist, tmp_path, saved_mutual_choice):
    proc = fresh(LOAD.format(path=str(saved_mutual_choice)), tmp_path, env={"SAE_ALLOCATORS_NO_AUTOLOAD": "1"})
    assert proc.returncode != 0
    assert "KeyError" in proc.stderr and "mutual_choice" in proc.stderr
    # importing the package by hand still works with the hook off
    code = "import sae_allocators\n" + LOAD.format(path=str(saved_mutual_choice))
    proc = fresh(code, tmp_path, env={"SAE_ALLOCATORS_NO_AUTOLOAD": "1"})
    assert proc.returncode == 0, proc.stderr


def test_unknown_name_error_in_fresh_interpreter(dist, tmp_path, saved_mutual_choice):
    bad = tmp_path / "bad"
    shutil.copytree(saved_mutual_choice, bad)
    cfg = json.loads((bad / "cfg.json").read_text())
    cfg["architecture"] = "mutual_choise"
    (bad / "cfg.json").write_text(json.dumps(cfg))
    proc = fresh(LOAD.format(path=str(bad)), tmp_path)
    assert proc.returncode != 0
    assert (
        "Unknown SAE architecture 'mutual_choise'" in proc.stderr
        and "Registered inference architectures" in proc.stderr
    )


def _console_script() -> str:
    exe = Path(sys.executable).with_name("sae-allocators")
    assert exe.exists(), f"console script missing next to {sys.executable}"
    return str(exe)


def test_console_script_lists_architectures(dist, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAE_ALLOCATORS_")}
    proc = subprocess.run([_console_script(), "list"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "mutual_choice" in proc.stdout and f"sae-allocators {dist.version}" in proc.stdout


# --- the example plugin, installed as its own distribution -----------------------------------


@pytest.fixture(scope="module")
def installed_plugin(dist, tmp_path_factory) -> Path:
    """``pip install`` plugins/sae-allocators-nucleus into a private target directory."""
    target = tmp_path_factory.mktemp("plugin-site")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(PLUGIN_DIR),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert any(p.name.startswith("sae_allocators_nucleus-0.1.0.dist-info") for p in target.iterdir())
    return target


TRAIN_NUCLEUS = """
import sae_allocators
from sae_allocators import host
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
prov = host.providers()['nucleus']
print('provider', prov.distribution, prov.version, prov.plugin)
from sae_lens import TrainingSAEConfig
from sae_allocators.testing import train_tiny
cfg = TrainingSAEConfig.from_dict({'architecture': 'nucleus', 'd_in': 32, 'd_sae': 64, 'top_p': 0.5, 'k_max': 8})
sae = train_tiny(cfg, steps=1, output_path=%r)
print('trained', type(sae).__name__, sae.cfg.architecture())
"""


def test_plugin_is_discovered_and_trains_one_step(installed_plugin, tmp_path):
    out = tmp_path / "out"
    proc = fresh(TRAIN_NUCLEUS % str(out), tmp_path, pythonpath=[installed_plugin])
    assert proc.returncode == 0, proc.stderr
    assert "provider sae-allocators-nucleus 0.1.0 nucleus" in proc.stdout
    assert "trained NucleusTrainingSAE nucleus" in proc.stdout
    # and the saved SAE loads with plain SAELens in yet another fresh interpreter (autoload + plugin)
    load = fresh(LOAD.format(path=str(out)), tmp_path, pythonpath=[installed_plugin])
    assert load.returncode == 0, load.stderr
    assert load.stdout.split() == ["sae_allocators_nucleus.plugin", "NucleusSAE", "True"]


DISABLE = """
import os
import sae_allocators
from sae_allocators import host
from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY as R
print('startup', 'nucleus' in R, 'mutual_choice' in R)  # disabled from interpreter start
for value in ['nucleus', 'sae-allocators-nucleus', '']:
    os.environ['SAE_ALLOCATORS_DISABLE_PLUGINS'] = value
    host.load(force=True)
    print(value or 'unset', 'nucleus' in R, 'mutual_choice' in R)
"""


def test_plugin_can_be_disabled(installed_plugin, tmp_path):
    proc = fresh(DISABLE, tmp_path, pythonpath=[installed_plugin], env={"SAE_ALLOCATORS_DISABLE_PLUGINS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "startup False True",
        "nucleus False True",
        "sae-allocators-nucleus False True",
        "unset True True",  # and enabled again: discovery itself works in this interpreter
    ]


def test_console_script_shows_plugin_distribution(installed_plugin, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAE_ALLOCATORS_")}
    env["PYTHONPATH"] = str(installed_plugin)
    proc = subprocess.run([_console_script(), "list"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("nucleus"))
    assert "sae-allocators-nucleus 0.1.0" in row
