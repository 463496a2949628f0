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


@pytest.mark.parametrize(
    "value,disabled",
    [
        ("", False),
        ("0", False),
        ("false", False),
        (" No ", False),
        ("FALSE", False),
        ("1", True),
        ("yes", True),
        ("true", True),
        ("on", True),
    ],
)
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
    monkeypatch.setattr(
        autoload, "_register_after_import", lambda: seen.append(sys.modules["fake_saelens_target"].VALUE)
    )
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
    with pytest.warns(
        RuntimeWarning, match=r"could not register its architectures.*ModuleNotFoundError.*SAE_ALLOCATORS_NO_AUTOLOAD=1"
    ):
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


# --- the Zipf loss options: a fixed zipf_exponent, zipf_weight_by_shortfall --------------------

D_IN, D_SAE = 16, 64


def _power_law_density(alpha: float = 1.0, c: float = 0.1):
    import torch

    ranks = torch.arange(1, D_SAE + 1, dtype=torch.float64)
    return (c * ranks.pow(-alpha)).float()


def _zipf_sae(**kw):
    import torch

    from sae_allocators.architectures.topk_zipf import TopKZipfTrainingSAE, TopKZipfTrainingSAEConfig

    torch.manual_seed(0)
    sae = TopKZipfTrainingSAE(
        TopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, aux_loss="zipf", zipf_min_steps=0, **kw)
    )
    sae.density_steps.fill_(10)
    return sae


def test_fixed_zipf_exponent_fits_only_the_constant():
    import math

    density = _power_law_density(alpha=1.0)
    fixed = _zipf_sae(zipf_exponent=2.0)
    fixed.feature_density.copy_(density)
    alpha, log_c = fixed.zipf_fit()
    assert float(alpha) == 2.0
    # least squares in log space with alpha fixed: log C = mean over the fitted head of log d_r + alpha log r
    head = sorted(density.double().tolist(), reverse=True)[: math.ceil(0.5 * D_SAE)]
    expected = sum(math.log(d) + 2.0 * math.log(r) for r, d in enumerate(head, start=1)) / len(head)
    assert float(log_c) == pytest.approx(expected, rel=1e-9)
    fitted = _zipf_sae()  # zipf_exponent=None: alpha is fitted (the data follow r^-1)
    fitted.feature_density.copy_(density)
    assert float(fitted.zipf_fit()[0]) == pytest.approx(1.0, abs=1e-3)
    import torch

    metrics = fixed.lazy_metrics(torch.zeros(4, D_SAE), None)
    assert metrics["zipf_exponent"]() == 2.0


@pytest.mark.parametrize("weighted", [False, True])
def test_zipf_weight_by_shortfall_scales_the_under_used_codes(weighted):
    """One under-used latent j (the least dense, at 3 % of its Zipf target): with aux_k = 1 every
    token reconstructs its residual with h_tj * w * W_dec[j], w = its shortfall 0.97 when weighted."""
    import torch
    from sae_lens.saes.sae import TrainStepInput

    sae = _zipf_sae(aux_k=1, zipf_exponent=1.0, zipf_weight_by_shortfall=weighted, aux_loss_coefficient=0.5)
    density = _power_law_density(alpha=1.0)
    j = 17
    others = [i for i in range(D_SAE) if i != j]
    d = torch.empty(D_SAE)
    d[others] = density[: D_SAE - 1]
    d[j] = 0.03 * float(density[D_SAE - 1])  # last rank: target 0.1 / 64
    sae.feature_density.copy_(d)
    shortfall = sae.zipf_shortfall()
    assert float(shortfall[j]) == pytest.approx(0.97, abs=1e-5)
    assert float(shortfall[others].max()) < 1e-5  # on the curve
    x = torch.randn(12, D_IN)
    acts, pre = sae.encode_with_hidden_pre(x)
    out = sae.decode(acts)
    step = TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)
    loss = sae.calculate_aux_loss(step, acts, pre, out)["auxiliary_reconstruction_loss"]
    residual = (x - out).detach()
    recons = (pre[:, j] * float(shortfall[j] if weighted else 1.0))[:, None] * sae.W_dec[j][None, :]
    if sae.cfg.rescale_acts_by_decoder_norm:  # TopK's decode divides codes by the decoder row norm
        recons = recons / sae.W_dec[j].norm()
    expected = 0.5 * 1.0 * (recons - residual).pow(2).sum(-1).mean()  # coef * min(|U| / aux_k, 1) * mse
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


# --- the threshold metric (logged as metrics/threshold) -----------------------------------------


@pytest.mark.parametrize("name", ["mutual_choice", "feature_choice"])
def test_threshold_metric_reports_the_threshold_at_that_step(name):
    import torch
    from sae_lens.saes.sae import TrainStepInput

    from sae_allocators.architectures.feature_choice import FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig
    from sae_allocators.architectures.mutual_choice import MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig

    if name == "mutual_choice":
        sae = MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4.0))
        current = lambda: float(sae.topk_threshold)  # noqa: E731
    else:
        sae = FeatureChoiceTrainingSAE(FeatureChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4.0))
        current = lambda: float(sae.global_threshold)  # noqa: E731
    step = lambda i, s: TrainStepInput(
        sae_in=torch.randn(64, D_IN) * s,
        coefficients={},
        dead_neuron_mask=None,
        n_training_steps=i,
        is_logging_step=True,
    )  # noqa: E731
    for i in range(5):
        before = current()
        out = sae.training_forward_pass(step(i, 1.0))
    after = current()
    logged = out.metrics["threshold"]()
    # the value of that step (taken before or after its own update, as the architecture does it)
    assert after > 0 and before > 0 and logged in (before, after)
    for i in range(5, 9):
        sae.training_forward_pass(step(i, 5.0))  # later steps move the threshold...
    assert current() not in (before, after)
    assert out.metrics["threshold"]() == logged  # ...but the logged value stays the one of its own step


# --- plugin refusals (docs/plugins.md) ------------------------------------------------------------

TRAINING_ONLY = """
from dataclasses import dataclass
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_allocators import hookimpl

@dataclass
class TCfg(TopKTrainingSAEConfig):
    @classmethod
    def architecture(cls): return "train_only_arch"

class Train(TopKTrainingSAE): pass

@hookimpl
def register_architectures(register):
    register("train_only_arch", training=(Train, TCfg))
"""

WRONG_NAME = """
from dataclasses import dataclass
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_allocators import hookimpl

@dataclass
class Cfg(TopKSAEConfig):
    @classmethod
    def architecture(cls): return "some_other_name"

class Inf(TopKSAE): pass

@hookimpl
def register_architectures(register):
    register("offered_name", inference=(Inf, Cfg))
"""


@pytest.mark.parametrize(
    "dist,source,name,reason",
    [
        (
            "train-only-sae",
            TRAINING_ONLY,
            "train_only_arch",
            r"training-only architecture: TCfg must override get_inference_config_class\(\)",
        ),
        (
            "wrong-name-sae",
            WRONG_NAME,
            "offered_name",
            r"architecture\(\) returns 'some_other_name', not 'offered_name'",
        ),
    ],
)
def test_plugin_offers_are_refused_with_the_reason(fake_dists, dist, source, name, reason):
    import re

    import sae_lens.registry as saelens_registry

    from sae_allocators import host

    module = dist.replace("-", "_") + "_plugin"
    fake_dists.add(dist, "0.3", {dist: module}, {module: source})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        host.load(force=True)
    msgs = [str(w.message) for w in caught if w.category.__name__ == "PluginWarning"]
    refused = [m for m in msgs if dist in m and "0.3" in m and re.search(reason, m)]
    assert refused, msgs
    assert name not in saelens_registry.SAE_TRAINING_CLASS_REGISTRY and name not in saelens_registry.SAE_CLASS_REGISTRY


# --- CLI: train --architecture X --help, load ./output, the benchmark's flags --------------------


@pytest.mark.parametrize(
    "arch,own,foreign",
    [
        ("feature_choice", "--capacity_exponent", "--beta"),
        ("gradient_topk", "--grad_normalization", "--capacity_exponent"),
    ],
)
def test_train_help_for_one_architecture_shows_its_fields(capsys, arch, own, foreign):
    from sae_allocators.workflow import train as train_mod

    assert train_mod.main(["--architecture", arch, "--help"]) == 0
    out = capsys.readouterr().out
    assert own in out and foreign not in out
    assert "--train_batch_size_tokens" in out  # SAELens's runner options too


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_help_lists_nproc_per_node(capsys, flag):
    """The README documents ``sae-allocators train --nproc-per-node N``; ``train --help`` says so
    (the option is handled before SAELens's parser, whose help does not know it)."""
    from sae_allocators import cli

    assert cli.main(["train", flag]) == 0
    out = capsys.readouterr().out
    assert "--nproc-per-node N" in out and "torchrun" in out
    assert "Architectures (--architecture NAME)" in out


def test_load_a_good_local_folder_batch_mode_feature_choice(tmp_path, monkeypatch, capsys):
    """``sae-allocators load ./output`` on a saved batch-mode FeatureChoiceSAE: loads, describes it, and
    the loaded SAE encodes with uniform capacities (exactly floor(k N) entries, m_j each)."""
    import math

    import torch
    from sae_lens import SAE

    from sae_allocators import cli
    from sae_allocators.architectures.feature_choice import FeatureChoiceSAE, FeatureChoiceSAEConfig

    sae = FeatureChoiceSAE(FeatureChoiceSAEConfig(d_in=D_IN, d_sae=D_SAE, k=2.5))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    sae.save_model(tmp_path / "output")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["load", "./output"]) == 0
    out = capsys.readouterr().out
    assert "Loaded output" in out or "Loaded ./output" in out
    assert "architecture:          feature_choice (" in out and "FeatureChoiceSAE" in out
    assert f"d_in={D_IN} d_sae={D_SAE}" in out and "plain SAELens can load it: no" in out
    loaded = SAE.load_from_disk("./output")
    assert type(loaded) is FeatureChoiceSAE and loaded.cfg.k == 2.5
    x = torch.randn(2, 20, D_IN)
    codes = loaded.encode(x)
    assert torch.equal(codes, sae.encode(x))
    per_feature = (codes.reshape(-1, D_SAE) != 0).sum(0)
    pre = (x.reshape(-1, D_IN) - sae.b_dec) @ sae.W_enc + sae.b_enc
    positives = (pre > 0).sum(0)
    assert int((codes != 0).sum()) <= math.floor(2.5 * 40)
    # uniform capacities: 100 entries over 64 features -> 36 features keep 2, 28 keep 1 (when positive)
    assert bool((per_feature <= 2).all()) and bool(
        (per_feature >= torch.minimum(positives, torch.ones_like(positives))).all()
    )


def test_load_says_a_missing_local_path_that_looks_like_a_repo_needs_a_sae_id(tmp_path, monkeypatch, capsys):
    from sae_allocators import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["load", "org/name"]) == 1
    err = capsys.readouterr().err
    assert "Hub repo id" in err and "SAE_ID" in err and "Traceback" not in err


@pytest.fixture
def bench_run(monkeypatch):
    """Run the benchmark CLI without training: capture the Settings it would run."""
    import torch

    from sae_allocators.benchmark import lm_data
    from sae_allocators.benchmark import run as run_mod

    seen: dict = {}
    monkeypatch.setattr(run_mod, "run", lambda st: seen.setdefault("st", st))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.setdefault("threads", n))
    monkeypatch.setattr(lm_data, "offline_lm_data", lambda *a, **kw: seen.setdefault("offline", a))
    monkeypatch.setattr(lm_data, "hub_lm_data", lambda *a, **kw: seen.setdefault("hub", a))
    monkeypatch.setattr(lm_data, "tiny_lm_data", lambda **kw: seen.setdefault("tiny", kw))

    def call(*argv: str) -> dict:
        from sae_allocators.benchmark.cli import main

        seen.clear()
        assert main(list(argv)) == 0
        return seen

    return call


def test_benchmark_flags_reach_the_settings(bench_run, tmp_path):
    from sae_allocators.benchmark.settings import default_settings, quick_settings

    seen = bench_run(
        "--quick", "--out", str(tmp_path / "r"), "--datasets", "lm", "--arch", "topk", "--arch", "mutual_choice",
        "--seeds", "3", "--lm-seeds", "2", "--ks", "8,16", "--synthetic-ks", "2,4.5", "--lm-tokens", "12345",
        "--layer", "2", "--context-size", "64", "--cache-dir", str(tmp_path / "c"), "--threads", "1", "--keep-saes",
    )  # fmt: skip
    st = seen["st"]
    quick = quick_settings(tmp_path / "r")
    assert st.out == tmp_path / "r" and st.datasets == ("lm",) and st.archs == ["topk", "mutual_choice"]
    assert (st.seeds, st.lm_seeds, st.lm_ks, st.synthetic_ks) == (3, 2, (8.0, 16.0), (2.0, 4.5))
    assert (st.lm.training_tokens, st.lm.hook_layer, st.keep_saes, seen["threads"]) == (12345, 2, True, 1)
    assert st.lm.eval_sequences == quick.lm.eval_sequences  # the --quick preset underneath
    st.lm_data()
    assert seen["offline"] == (
        64,
        int((12345 + st.lm.calibration_tokens) * 1.3) + 16 * 64,
        st.lm.eval_sequences,
        str(tmp_path / "c"),
    )
    plain = bench_run("--out", str(tmp_path / "d"))["st"]
    full = default_settings(tmp_path / "d")
    assert plain.datasets == ("synthetic", "lm") and plain.archs is None and plain.keep_saes is False
    assert (plain.seeds, plain.lm_ks, plain.lm.training_tokens) == (full.seeds, full.lm_ks, full.lm.training_tokens)


def test_benchmark_tiny_lm_and_model_flags(bench_run, tmp_path):
    st = bench_run("--out", str(tmp_path / "t"), "--tiny-lm")["st"]
    assert st.lm.hook_layer <= 1 and st.lm.expansion == 4 and st.lm.train_batch_size <= 256
    seen = bench_run("--out", str(tmp_path / "t"), "--tiny-lm")
    seen["st"].lm_data()
    assert seen["tiny"]["context_size"] == 32
    seen = bench_run("--out", str(tmp_path / "m"), "--model", "gpt2", "--dataset", "data.txt", "--context-size", "16")
    seen["st"].lm_data()
    assert seen["hub"][:3] == ("gpt2", "data.txt", 16)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ks", "8,x"], "expected comma-separated numbers"),
        (["--ks", "0"], "expected positive numbers"),
        (["--model", "gpt2"], "--model and --dataset go together"),
        (["--threads", "0"], "use a positive number of threads"),
    ],
)
def test_benchmark_bad_flags_say_what_to_do(bench_run, capsys, argv, message):
    from sae_allocators.benchmark.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert message in (str(exc.value.code) + capsys.readouterr().err)


@pytest.mark.saelens_independent  # the benchmark harness: run once in CI, at the newest SAELens (tests/run.sh)
def test_benchmark_module_help_in_a_fresh_interpreter():
    from sae_allocators.testing import run_fresh

    proc = run_fresh(
        "import runpy, sys\nsys.argv = ['x', '--help']\nrunpy.run_module('sae_allocators.benchmark', run_name='__main__')"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in (
        "--quick",
        "--out",
        "--datasets",
        "--arch",
        "--seeds",
        "--ks",
        "--lm-tokens",
        "--tiny-lm",
        "--keep-saes",
        "--threads",
    ):
        assert flag in proc.stdout


# --- io.py: folder checks and atomic writes, on hand-made folders (fast) ----------------------------


def _sae_folder(root, **cfg_changes):
    import json

    import torch
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architecture": "jumprelu",
        "d_in": 4,
        "d_sae": 8,
        "metadata": {"training_architecture": "mutual_choice", "hook_name": "h"},
    }
    cfg.update(cfg_changes)
    (root / "cfg.json").write_text(json.dumps(cfg))
    save_file({"W_enc": torch.zeros(4, 8), "b_dec": torch.zeros(4)}, str(root / "sae_weights.safetensors"))
    return root


def test_check_sae_folder_describes_a_good_folder(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sae_allocators.sae_folder import check_sae_folder

    folder = _sae_folder(tmp_path / "out")
    info = check_sae_folder(folder)
    assert (info.architecture, info.training_architecture, info.has_sparsity) == ("jumprelu", "mutual_choice", False)
    assert info.tensors == {"W_enc": {"dtype": "F32", "shape": [4, 8]}, "b_dec": {"dtype": "F32", "shape": [4]}}
    assert info.metadata["hook_name"] == "h" and info.path == folder
    save_file({"sparsity": torch.zeros(8)}, str(folder / "sparsity.safetensors"))
    assert check_sae_folder(folder).has_sparsity is True
    (folder / "sparsity.safetensors").write_bytes(b"\x01")
    with pytest.raises(ValueError, match="sparsity.safetensors is corrupted"):
        check_sae_folder(folder)
    assert check_sae_folder(_sae_folder(tmp_path / "nometa", metadata=None)).training_architecture is None


@pytest.mark.parametrize(
    "damage,phrases",
    [
        ("missing", ["no such folder"]),
        ("file", ["is a file, not a folder"]),
        ("no_cfg", ["cfg.json is missing"]),
        ("checkpoint", ["training checkpoint", "trainer_state.pt"]),
        ("cfg_list", ["must hold a JSON object", "list"]),
        ("no_d_sae", ["no 'd_sae' entry"]),
        ("arch_not_str", ["'architecture' must be a string"]),
        ("unknown_arch", ["'nobody_has_this'", "which nothing provides"]),
        ("bad_json", ["not valid JSON"]),
        ("no_weights", ["weights file not found"]),
        ("short", ["too short for a safetensors file"]),
        ("zero_header", ["not a valid safetensors header"]),
        ("huge_header", ["not a valid safetensors header"]),
        ("header_not_json", ["header is not valid JSON"]),
        ("header_list", ["header is not a JSON object"]),
        ("outside", ["'W_enc' lies outside the file"]),
        ("no_offsets", ["'W_enc' lies outside the file"]),
    ],
)
def test_check_sae_folder_names_each_problem(tmp_path, damage, phrases):
    import json
    import struct

    from sae_allocators.sae_folder import SaeFolderError, check_sae_folder

    folder = tmp_path / "out"
    if damage == "missing":
        pass
    elif damage == "file":
        folder.write_text("x")
    elif damage == "no_cfg":
        folder.mkdir()
    else:
        _sae_folder(folder)
    cfg, weights = folder / "cfg.json", folder / "sae_weights.safetensors"
    header = lambda obj: (lambda b: struct.pack("<Q", len(b)) + b)(json.dumps(obj).encode())  # noqa: E731
    edits = {
        "checkpoint": lambda: (folder / "trainer_state.pt").write_bytes(b""),
        "cfg_list": lambda: cfg.write_text("[1, 2]"),
        "no_d_sae": lambda: cfg.write_text(json.dumps({"architecture": "jumprelu", "d_in": 4})),
        "arch_not_str": lambda: cfg.write_text(json.dumps({"architecture": 3, "d_in": 4, "d_sae": 8})),
        "unknown_arch": lambda: cfg.write_text(json.dumps({"architecture": "nobody_has_this", "d_in": 4, "d_sae": 8})),
        "bad_json": lambda: cfg.write_text("{"),
        "no_weights": lambda: weights.unlink(),
        "short": lambda: weights.write_bytes(b"\x00" * 7),
        "zero_header": lambda: weights.write_bytes(b"\x00" * 16),
        "huge_header": lambda: weights.write_bytes(struct.pack("<Q", 200 * 1024 * 1024) + b"{}" * 8),
        "header_not_json": lambda: weights.write_bytes(struct.pack("<Q", 4) + b"{{{{"),
        "header_list": lambda: weights.write_bytes(header([1])),
        "outside": lambda: weights.write_bytes(
            header({"W_enc": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}) + b"\x00" * 4
        ),
        "no_offsets": lambda: weights.write_bytes(header({"W_enc": {"dtype": "F32", "shape": [2]}}) + b"\x00" * 8),
    }
    if damage in edits:
        edits[damage]()
    with pytest.raises(SaeFolderError) as exc:
        check_sae_folder(folder)
    for phrase in phrases:
        assert phrase in str(exc.value), str(exc.value)


def test_read_safetensors_header_accepts_exact_bounds_and_drops_metadata(tmp_path):
    import json
    import struct

    from sae_allocators.sae_folder import read_safetensors_header

    body = json.dumps(
        {"__metadata__": {"a": "b"}, "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    ).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\x00" * 8)  # data ends exactly at the file's end
    assert read_safetensors_header(path) == {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    with pytest.raises(ValueError, match="file not found"):
        read_safetensors_header(tmp_path / "absent.safetensors")


def test_atomic_writes_replace_whole_files_and_folders(tmp_path):
    import json

    from sae_allocators.io import atomic_dir, atomic_write_json

    target = atomic_write_json(tmp_path / "sub" / "m.json", {"b": 1, "a": [2]})
    assert target == tmp_path / "sub" / "m.json"
    assert target.read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n' and json.loads(target.read_text()) == {
        "a": [2],
        "b": 1,
    }
    assert sorted(p.name for p in target.parent.iterdir()) == ["m.json"]  # no temporary file left
    with atomic_dir(tmp_path / "new" / "out") as tmp:  # a parent that does not exist yet
        (tmp / "f").write_text("1")
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["out"] and (
        tmp_path / "new" / "out" / "f"
    ).read_text() == "1"
