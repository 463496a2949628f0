"""The plugin host, in-process: discovery, idempotence, clashes, failures, deferral, errors."""

from __future__ import annotations

import importlib
import json
import re
import warnings

import pytest
import torch
from safetensors.torch import save_file
import sae_lens.registry as saelens_registry
from sae_lens import SAE, TrainingSAEConfig

import sae_allocators
from sae_allocators import host, names
from sae_allocators.host import PluginWarning
from sae_allocators.saelens_registry import UnknownArchitectureError

# A genuine tiny third-party architecture, as a plugin module's source.
PLUGIN_SOURCE = """
from dataclasses import dataclass
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_allocators import hookimpl

@dataclass
class Cfg(TopKSAEConfig):
    @classmethod
    def architecture(cls): return "{name}"

@dataclass
class TCfg(TopKTrainingSAEConfig):
    @classmethod
    def architecture(cls): return "{name}"

class Inf(TopKSAE): pass
class Train(TopKTrainingSAE): pass

@hookimpl
def register_architectures(register):
    register("{name}", training=(Train, TCfg), inference=(Inf, Cfg), description="test plugin")
"""


def plugin_source(name: str) -> str:
    return PLUGIN_SOURCE.replace("{name}", name)


def reload_host() -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        host.load(force=True)
    # compare by name: importlib.reload(host) in another test re-creates the class
    return [str(w.message) for w in caught if w.category.__name__ == PluginWarning.__name__]


def test_own_architectures_registered_on_both_sides():
    for name in names.OWN_ARCHITECTURES:
        assert name in saelens_registry.SAE_TRAINING_CLASS_REGISTRY, name
        assert name in saelens_registry.SAE_CLASS_REGISTRY, name
        prov = host.providers()[name]
        assert prov.distribution in (names.DISTRIBUTION, "sae-lens")


def test_loading_twice_and_reloading_never_raises_already_registered():
    before = dict(saelens_registry.SAE_TRAINING_CLASS_REGISTRY)
    host.load()
    host.load(force=True)
    importlib.reload(sae_allocators)
    importlib.reload(importlib.import_module("sae_allocators.host"))
    importlib.import_module("sae_allocators.host").load(force=True)
    after = saelens_registry.SAE_TRAINING_CLASS_REGISTRY
    assert set(after) == set(before)
    for name in names.OWN_ARCHITECTURES:
        assert after[name][0].__name__ == before[name][0].__name__


def test_third_party_plugin_is_discovered_through_entry_points(fake_dists):
    fake_dists.add("acme-sae", "1.2.3", {"acme": "acme_plugin"}, {"acme_plugin": plugin_source("acme_arch")})
    assert reload_host() == []
    assert "acme_arch" in saelens_registry.SAE_TRAINING_CLASS_REGISTRY
    assert "acme_arch" in saelens_registry.SAE_CLASS_REGISTRY
    prov = host.providers()["acme_arch"]
    assert (prov.distribution, prov.version, prov.plugin) == ("acme-sae", "1.2.3", "acme")
    # and SAELens builds its config from the name
    cfg = TrainingSAEConfig.from_dict({"architecture": "acme_arch", "d_in": 4, "d_sae": 8, "k": 2})
    assert cfg.architecture() == "acme_arch"


def test_clash_between_two_plugins_warns_naming_both_distributions(fake_dists):
    fake_dists.add("alpha-sae", "1.0", {"alpha": "alpha_plugin"}, {"alpha_plugin": plugin_source("shared_arch")})
    fake_dists.add("beta-sae", "2.0", {"beta": "beta_plugin"}, {"beta_plugin": plugin_source("shared_arch")})
    msgs = reload_host()
    clash = [m for m in msgs if "shared_arch" in m]
    assert len(clash) == 1 and "alpha-sae" in clash[0] and "beta-sae" in clash[0]
    assert host.providers()["shared_arch"].distribution == "alpha-sae"  # first by distribution name
    assert saelens_registry.SAE_TRAINING_CLASS_REGISTRY["shared_arch"][0].__module__ == "alpha_plugin"


def test_plugin_clashing_with_our_name_keeps_ours(fake_dists):
    fake_dists.add("rogue-sae", "0.1", {"rogue": "rogue_plugin"}, {"rogue_plugin": plugin_source("mutual_choice")})
    msgs = reload_host()
    assert any("mutual_choice" in m and "rogue-sae" in m and names.DISTRIBUTION in m for m in msgs)
    assert host.providers()["mutual_choice"].distribution == names.DISTRIBUTION


def test_plugin_that_fails_to_import_is_named_and_others_still_load(fake_dists):
    fake_dists.add(
        "broken-sae", "0.9", {"broken": "broken_plugin"}, {"broken_plugin": "raise RuntimeError('boom at import')\n"}
    )
    fake_dists.add("good-sae", "1.0", {"good": "good_plugin"}, {"good_plugin": plugin_source("good_arch")})
    msgs = reload_host()
    assert any("broken-sae" in m and "boom at import" in m for m in msgs)
    assert "good_arch" in saelens_registry.SAE_TRAINING_CLASS_REGISTRY
    assert "mutual_choice" in saelens_registry.SAE_TRAINING_CLASS_REGISTRY


def test_malformed_entry_point_is_reported(fake_dists):
    fake_dists.add("typo-sae", "0.1", {"typo": "no_such_module_xyz:thing"}, {})
    msgs = reload_host()
    assert any("typo-sae" in m and "no_such_module_xyz" in m for m in msgs)


def test_plugin_whose_hook_raises_is_isolated(fake_dists):
    src = "from sae_allocators import hookimpl\n@hookimpl\ndef register_architectures(register):\n    raise ValueError('hook exploded')\n"
    fake_dists.add("angry-sae", "0.1", {"angry": "angry_plugin"}, {"angry_plugin": src})
    fake_dists.add("calm-sae", "0.1", {"calm": "calm_plugin"}, {"calm_plugin": plugin_source("calm_arch")})
    msgs = reload_host()
    assert any("angry-sae" in m and "hook exploded" in m for m in msgs)
    assert "calm_arch" in saelens_registry.SAE_TRAINING_CLASS_REGISTRY


def test_misspelled_hook_is_reported(fake_dists):
    src = "from sae_allocators import hookimpl\n@hookimpl\ndef register_architecture(register):\n    pass\n"
    fake_dists.add("speller-sae", "0.1", {"speller": "speller_plugin"}, {"speller_plugin": src})
    msgs = reload_host()
    assert any("speller-sae" in m and "register_architecture" in m for m in msgs)


def test_registering_a_class_that_is_not_an_sae_is_refused(fake_dists):
    src = (
        "from sae_allocators import hookimpl\n"
        "from sae_lens.saes.topk_sae import TopKTrainingSAEConfig\n"
        "class NotAnSAE: pass\n"
        "@hookimpl\ndef register_architectures(register):\n"
        "    register('fake_arch', training=(NotAnSAE, TopKTrainingSAEConfig))\n"
    )
    fake_dists.add("liar-sae", "0.1", {"liar": "liar_plugin"}, {"liar_plugin": src})
    msgs = reload_host()
    assert any("liar-sae" in m and "fake_arch" in m and "not a subclass" in m for m in msgs)
    assert "fake_arch" not in saelens_registry.SAE_TRAINING_CLASS_REGISTRY


def test_name_saelens_provides_is_deferred_and_recorded(fake_dists):
    fake_dists.add("copycat-sae", "0.1", {"copycat": "copycat_plugin"}, {"copycat_plugin": plugin_source("topk")})
    builtin = saelens_registry.SAE_TRAINING_CLASS_REGISTRY["topk"]
    reload_host()
    assert saelens_registry.SAE_TRAINING_CLASS_REGISTRY["topk"] is builtin
    prov = host.providers()["topk"]
    assert prov.distribution == "sae-lens" and any("copycat-sae" in d for d in prov.deferred)


@pytest.mark.parametrize("value", ["1", "all", "disabled_plugin", "disabled-sae"])
def test_environment_variable_disables_external_plugins(fake_dists, monkeypatch, value):
    fake_dists.add(
        "disabled-sae", "0.1", {"disabled_plugin": "disabled_mod"}, {"disabled_mod": plugin_source("disabled_arch")}
    )
    monkeypatch.setenv(names.ENV_DISABLE_PLUGINS, value)
    reload_host()
    assert "disabled_arch" not in saelens_registry.SAE_TRAINING_CLASS_REGISTRY
    assert "mutual_choice" in saelens_registry.SAE_TRAINING_CLASS_REGISTRY  # ours still register
    monkeypatch.delenv(names.ENV_DISABLE_PLUGINS)
    reload_host()
    assert "disabled_arch" in saelens_registry.SAE_TRAINING_CLASS_REGISTRY


def test_unknown_architecture_error_names_the_problem_and_the_fix(tmp_path):
    (tmp_path / "cfg.json").write_text(
        json.dumps({"architecture": "no_such_arch", "d_in": 4, "d_sae": 8, "dtype": "float32", "device": "cpu"})
    )
    save_file({"W_enc": torch.zeros(4, 8)}, str(tmp_path / "sae_weights.safetensors"))
    with pytest.raises(KeyError) as err:
        SAE.load_from_disk(tmp_path)
    assert isinstance(err.value, UnknownArchitectureError)
    msg = str(err.value)
    assert "no_such_arch" in msg and "Registered inference architectures" in msg and "mutual_choice" in msg
    with pytest.raises(UnknownArchitectureError, match="no_such_arch.*training"):
        TrainingSAEConfig.from_dict({"architecture": "no_such_arch", "d_in": 4, "d_sae": 8})


def test_unknown_error_says_which_package_provides_our_names(monkeypatch):
    entry = saelens_registry.SAE_CLASS_REGISTRY.pop("mutual_choice")
    try:
        with pytest.raises(UnknownArchitectureError) as err:
            saelens_registry.get_sae_class("mutual_choice")
        assert "sae-allocators" in str(err.value) and "import sae_allocators" in str(err.value)
    finally:
        saelens_registry.SAE_CLASS_REGISTRY["mutual_choice"] = entry


def test_cli_list_prints_providers_and_sides(capsys):
    from sae_allocators.cli import main

    assert main(["list", "--all"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("mutual_choice"))
    cells = re.split(r"\s{2,}", row)
    assert cells[1].startswith(names.DISTRIBUTION) and cells[2:4] == ["yes", "yes"]
    topk = next(line for line in out.splitlines() if line.startswith("topk "))
    assert "sae-lens" in topk


def test_name_registered_directly_by_other_code_is_attributed_to_its_module():
    from sae_lens import register_sae_training_class

    from sae_allocators import saelens_registry as reg

    src = plugin_source("direct_arch")
    namespace: dict = {"__name__": "direct_module"}
    exec(compile(src, "direct_module.py", "exec"), namespace)
    register_sae_training_class("direct_arch", namespace["Train"], namespace["TCfg"])
    try:
        prov = host.providers()["direct_arch"]
        assert prov.distribution == "(module direct_module)" and prov.has_training and not prov.has_inference
        assert host.providers()["topk"].distribution == "sae-lens"
    finally:
        reg.remove(reg.TRAINING, "direct_arch")


def test_every_provided_architecture_has_a_module_and_is_registered():
    assert set(names.PROVIDED_ARCHITECTURES) <= set(names.OWN_ARCHITECTURES)
    for name in names.PROVIDED_ARCHITECTURES:
        prov = host.providers()[name]
        assert prov.has_training and prov.has_inference, name
        assert prov.distribution in (names.DISTRIBUTION, "sae-lens"), (name, prov)
