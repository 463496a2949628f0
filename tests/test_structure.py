"""The package's structure: its import graph has no cycle, and plugin state has one home.

Pure ``ast`` over the installed package's sources (milliseconds; nothing is imported to build the
graph).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sae_allocators
from sae_allocators import names

pytestmark = pytest.mark.saelens_independent

PACKAGE = Path(sae_allocators.__file__).resolve().parent


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package's ``__init__``)"""
    out: dict[str, tuple[Path, bool]] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports.

    Counted: every ``import`` statement anywhere in the module -- at module level, inside functions
    and methods, under ``if TYPE_CHECKING`` (a cycle there still tangles the design) -- with relative
    imports resolved. ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else
    to ``pkg``. Not counted: the implicit import of a module's parent packages (every
    ``sae_allocators.x`` import runs ``sae_allocators/__init__``; counting it would make every
    module depend on everything the package's ``__init__`` imports). Added by hand: the host's
    imports by string of this project's own plugins (``names.OWN_ARCHITECTURES``,
    ``names.OWN_LOSS_MODULES``), so that a plugin module importing the host shows up as a cycle.
    """
    mods = _modules(root)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for mod, (path, is_pkg) in mods.items():
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[: len(base) - (node.level - 1)]
                    source = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in mods else source for a in node.names]
            edges[mod] |= {t for t in targets if t in mods and t != mod}
    by_string = set(names.OWN_ARCHITECTURES.values()) | set(names.OWN_LOSS_MODULES)
    edges[f"{root.name}.host"] |= by_string & set(mods)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_package_import_graph_has_no_cycle():
    edges = import_graph(PACKAGE)
    assert len(edges) > 50 and "sae_allocators.losses.base" in edges["sae_allocators.architectures.mutual_choice"]
    found = cycles(edges)
    detail = "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{a} -> {sorted(edges[a] & set(c))}" for a in c) + ")" for c in found
    )
    assert not found, f"import cycles in sae_allocators: {detail}. Move what both sides need into a module below them."


def test_the_cycle_check_finds_a_cycle(tmp_path):
    # the checker itself: a package whose modules import each other (one at function level,
    # one relative) must be reported, with the host -> own plugins edge added by hand
    pkg = tmp_path / "sae_allocators"
    (pkg / "losses").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from sae_allocators import host\n")
    (pkg / "host.py").write_text("def load():\n    from sae_allocators.losses import registry\n")
    (pkg / "losses" / "__init__.py").write_text("")
    (pkg / "losses" / "registry.py").write_text("def get():\n    from .. import host\n")
    (pkg / "other.py").write_text("import sae_allocators.losses\n")
    assert cycles(import_graph(pkg)) == [["sae_allocators.host", "sae_allocators.losses.registry"]]
    (pkg / "losses" / "registry.py").write_text("from sae_allocators import plugin_state\n")
    (pkg / "plugin_state.py").write_text("")
    assert cycles(import_graph(pkg)) == []
    (pkg / "architecture.py").write_text("from sae_allocators.host import load\n")  # host imports it by string
    edges = import_graph(pkg)
    edges["sae_allocators.host"].add("sae_allocators.architecture")  # as names.OWN_ARCHITECTURES adds it
    assert cycles(edges) == [["sae_allocators.architecture", "sae_allocators.host"]]


def test_plugin_state_is_built_by_load_and_only_read_elsewhere():
    from sae_allocators import host, plugin_state
    from sae_allocators.losses import registry

    state = host.state()
    assert state is plugin_state.current()
    assert {"mutual_choice", "feature_choice", "gradient_topk"} <= set(state.architectures)
    assert registry.get("zipf") is state.losses["zipf"] and registry.available() == sorted(state.losses)
    # providers() hands out copies: editing one changes nothing the host holds
    prov = host.providers()["mutual_choice"]
    prov.has_training = False
    prov.deferred.append("someone 1.0")
    assert host.providers()["mutual_choice"].has_training and not state.architectures["mutual_choice"].deferred
    # only the host publishes a state
    publishers = [m for m, (p, _) in _modules(PACKAGE).items() if "plugin_state.publish(" in p.read_text()]
    assert publishers == ["sae_allocators.host"]


def test_the_host_installs_the_store_dispatch_not_a_register_hook():
    from sae_allocators import host, patches

    patches.uninstall()
    try:
        assert not patches.installed()
        host.load(force=True)
        assert patches.installed()
    finally:
        patches.install()
    hooks = (PACKAGE / "architectures" / "gradient_topk.py").read_text()
    assert "install(" not in hooks and "dispatching(" not in hooks


def test_every_change_to_objects_we_do_not_own_is_in_patches():
    """Class swaps, classmethod replacement, method rebinding on instances: only sae_allocators.patches
    does them (and its docstring says why); no SAE method is re-bound on an instance anywhere."""
    import re

    pattern = re.compile(
        r"(\.__class__\s*=[^=]|=\s*classmethod\(|\.training_forward_pass\s*=[^=]|setattr\(cls,|setattr\(module,"
        r"|\b\w*_module\.\w+\s*=[^=])"
    )
    from sae_allocators import patches

    offenders, unlisted = [], []
    for module, (path, _) in _modules(PACKAGE).items():
        text = path.read_text()
        if module not in ("sae_allocators.patches", "sae_allocators.mixin"):
            for n, line in enumerate(text.splitlines(), 1):
                if pattern.search(line.split("#")[0]):
                    offenders.append(f"{module}:{n}: {line.strip()}")
        # every per-object change (mix_in(obj, Mixin, ...)) is listed in patches' table
        for mixin in re.findall(r"mix_in\(\s*[\w.]+,\s*(\w+)", text):
            if f"``{mixin}``" not in patches.__doc__ and f"{mixin}``" not in patches.__doc__:
                unlisted.append(f"{module}: {mixin}")
    assert offenders == []
    assert unlisted == []
    assert len(re.findall(r"^ ?\d+ ", patches.__doc__, re.M)) == 11


def test_configs_are_checked_by_a_plain_mixin_without_metaprogramming():
    """Config checks are explicit (config_checks.ConfigChecks): no class-creation hooks anywhere, no
    reading of stack frames in the config code; unknown from_dict keys are named by a from_dict override."""
    import re

    from sae_allocators import config_checks
    from sae_allocators.losses import AuxLossConfig

    config_modules = ("sae_allocators.config_checks", "sae_allocators.losses.config", "sae_allocators.thresholds")
    offenders = []
    for module, (path, _) in _modules(PACKAGE).items():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            frames = module in config_modules or module.startswith("sae_allocators.architectures")
            if "__init_subclass__" in line or (frames and re.search(r"_getframe|f_locals|f_back|inspect\.stack", line)):
                offenders.append(f"{module}:{n}: {line.strip()}")
    assert offenders == []
    assert issubclass(AuxLossConfig, config_checks.ConfigChecks) and "from_dict" in vars(config_checks.ConfigChecks)


# --- step state and shared helpers -------------------------------------------------------------


def test_feature_choice_selection_estimate_lives_in_buffers_that_are_not_saved():
    # the speed-up estimate of the exact selection (last thresholds, their spread, the margin) is
    # module state: non-persistent buffers follow .to(); they are not in checkpoints or exports
    import torch

    from sae_allocators.architectures.feature_choice import FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig

    sae = FeatureChoiceTrainingSAE(FeatureChoiceTrainingSAEConfig(d_in=8, d_sae=16, k=2.0))
    assert sae.tau_estimate is None and sae.estimate_margin is None and sae._estimate_lower_bound() is None
    torch.manual_seed(0)
    sae._update_running_stats(torch.randn(32, 16), torch.rand(16))
    assert sae.tau_estimate is not None and sae.tau_estimate_spread is not None and float(sae.estimate_margin) == 2.0
    buffers = dict(sae.named_buffers())
    assert {"tau_estimate", "tau_estimate_spread", "estimate_margin"} <= set(buffers)
    assert not {"tau_estimate", "tau_estimate_spread", "estimate_margin"} & set(sae.state_dict())
    assert sae._estimate_lower_bound() is not None
    sae.to("meta")
    assert sae.tau_estimate.is_meta and sae.estimate_margin.is_meta
    assert not any(k.startswith("_") for k in vars(sae) if isinstance(vars(sae)[k], torch.Tensor))


def test_keep_flat_scatters_kept_entries_into_zeros_differentiably():
    import torch

    from sae_allocators.sparse import keep_flat

    flat = torch.tensor([3.0, -1.0, 2.0, 5.0], requires_grad=True)
    kept = torch.tensor([3, 0])
    out = keep_flat(flat, kept)
    assert out.tolist() == [3.0, 0.0, 0.0, 5.0]
    out.sum().backward()
    assert flat.grad.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert keep_flat(flat.detach(), kept, torch.tensor([7.0, 8.0])).tolist() == [8.0, 0.0, 0.0, 7.0]


def test_every_rule_and_the_shared_helpers_use_one_encode_and_one_export():
    # one inference-side pre-activation encode (architectures/_common.py), one threshold export
    # (thresholds.export_threshold), one "kept entries into zeros" (sparse.keep_flat): no copies
    sources = {m: p.read_text() for m, (p, _) in _modules(PACKAGE).items()}
    encode = [
        m for m, text in sources.items() if "@ sae.W_enc + sae.b_enc" in text or "@ self.W_enc + self.b_enc" in text
    ]
    assert encode == ["sae_allocators.architectures._common"], encode
    scatter = [m for m, text in sources.items() if ".index_put((" in text]
    assert scatter == ["sae_allocators.sparse"], scatter
    exports = [
        line.strip() for text in sources.values() for line in text.splitlines() if 'state_dict["threshold"] =' in line
    ]
    assert len(exports) >= 3 and all("export" in line for line in exports), exports
