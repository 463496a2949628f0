"""The threshold tracker, its guards, and calibration of the saved thresholds (issue 12).

Calibration (sae_allocators.calibration) is checked against brute force on Gaussian data, with
repeated rows (what a real LM yields), under chunking, for never-fired and short features; then end
to end through SAELens's runner, with the calibrated export loaded by plain SAELens in a fresh
interpreter, and through `sae-allocators calibrate`.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import warnings
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

import sae_allocators  # noqa: F401
from sae_allocators.architectures import kinds
from sae_allocators.calibration import fit as CF  # the fit (rules, quantiles, calibrate)
from sae_allocators.calibration import runner as CR  # SAELens's runners (end of training, wraps)
from sae_allocators import patches
from sae_allocators.architectures._common import pre_activations
from sae_allocators.architectures.batchtopk_zipf import BatchTopKZipfTrainingSAE, BatchTopKZipfTrainingSAEConfig
from sae_allocators.architectures.feature_choice import FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig
from sae_allocators.architectures.mutual_choice import MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig
from sae_allocators.testing import TINY_HOOK, run_fresh, runner_config, tiny_dataset, tiny_model
from sae_allocators.thresholds import require_budget, smallest_working_batch
from helpers import codes

D, F, K = 16, 64, 4.0

TRAINING = {
    "mutual_choice": (
        MutualChoiceTrainingSAE,
        lambda **kw: MutualChoiceTrainingSAEConfig(**{"d_in": D, "d_sae": F, "k": K, "topk_threshold_lr": 0.1, **kw}),
    ),
    "feature_choice": (
        FeatureChoiceTrainingSAE,
        lambda **kw: FeatureChoiceTrainingSAEConfig(**{"d_in": D, "d_sae": F, "k": K, "threshold_lr": 0.1, **kw}),
    ),
    "batchtopk_zipf": (
        BatchTopKZipfTrainingSAE,
        lambda **kw: BatchTopKZipfTrainingSAEConfig(**{"d_in": D, "d_sae": F, "k": K, "topk_threshold_lr": 0.1, **kw}),
    ),
}


def make(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cls, cfg = TRAINING[name]
    return cls(cfg(**kw))


def step(sae, x: torch.Tensor):
    return sae.training_forward_pass(
        TrainStepInput(
            sae_in=x,
            coefficients={},
            dead_neuron_mask=torch.zeros(sae.cfg.d_sae, dtype=torch.bool),
            n_training_steps=0,
            is_logging_step=False,
        )
    )


def brute_l0(sae, x: torch.Tensor) -> torch.Tensor:
    """Per-feature firing counts of the saved JumpReLU rule, by brute force."""
    pre = pre_activations(sae, x)
    theta = CF.current_thresholds(sae).to(pre.dtype)
    return ((pre > theta) & (pre > 0)).sum(0)


def chunks(x: torch.Tensor, size: int):
    return (x[i : i + size] for i in range(0, x.shape[0], size))


# --- the tracker ---------------------------------------------------------------------------------


def test_tracker_is_running_mean_then_ema_and_skips_non_finite_tau():
    sae = make("feature_choice")
    tr = sae.threshold_tracker
    rate = sae.cfg.threshold_lr  # 0.1: running mean for 10 updates, then EMA
    taus = torch.rand(25, F, dtype=torch.double) + 0.5
    taus[3, :5] = math.inf  # kept nothing: skipped
    taus[4, 5] = math.nan
    ref = torch.zeros(F, dtype=torch.double)
    n = torch.zeros(F)
    for t in taus:
        tr.update(t)
        ok = torch.isfinite(t)
        n += ok.double()
        w = torch.where(ok, (1 / n.clamp_min(1)).clamp_min(rate), torch.zeros(()))
        ref = torch.where(ok, ref + w * (torch.nan_to_num(t) - ref), ref)
    assert torch.allclose(sae.feature_threshold, ref)
    assert bool(torch.isfinite(sae.feature_threshold).all())
    assert sae.feature_threshold_steps[:5].tolist() == [24] * 5 and int(sae.feature_threshold_steps[5]) == 24
    # running-mean warm-up: after 10 updates of features that never skipped, theta is their mean
    sae2 = make("mutual_choice")
    for t in taus[:10, 10]:
        sae2.threshold_tracker.update(t)
    assert float(sae2.topk_threshold) == pytest.approx(float(taus[:10, 10].mean()))


def test_tracker_state_is_persistent_and_folds_with_the_scaling_factor(tmp_path):
    sae = make("mutual_choice")
    sae.threshold_tracker.update(torch.tensor(2.0))
    sae.threshold_tracker.update(torch.tensor(4.0))
    state = sae.state_dict()
    assert {"topk_threshold", "threshold_steps", "threshold_calibrated"} <= set(state)
    other = make("mutual_choice", seed=1)
    other.load_state_dict(state)
    assert float(other.topk_threshold) == 3.0 and int(other.threshold_steps) == 2
    other.threshold_tracker.fold(2.0)  # rescale_acts_by_decoder_norm (default): theta / s
    assert float(other.topk_threshold) == 1.5
    norescale = make("mutual_choice", rescale_acts_by_decoder_norm=False)
    norescale.threshold_tracker.update(torch.tensor(3.0))
    norescale.threshold_tracker.fold(2.0)
    assert float(norescale.topk_threshold) == 3.0


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_zero_budget_is_a_clear_error_not_nan(name):
    sae = make(name, k=0.01)
    before = {n: t.clone() for n, t in sae.state_dict().items()}
    with pytest.raises(ValueError) as err:
        step(sae, torch.randn(64, D))  # floor(0.01 * 64) = 0
    msg = str(err.value)
    assert "k=0.01" in msg and "64 token" in msg and f"at least {smallest_working_batch(0.01)} tokens" in msg
    for n, t in sae.state_dict().items():
        assert torch.equal(t, before[n]), f"{n} changed by a refused step"
    out = step(sae, torch.randn(100, D))  # the smallest batch that works, works
    assert int((codes(out) != 0).sum()) >= 1 and bool(torch.isfinite(CF.current_thresholds(sae)).all())


def test_smallest_working_batch_is_exact():
    for k in (0.001, 0.01, 1 / 3, 0.3, 0.7, 1.0, 2.5):
        n = smallest_working_batch(k)
        assert math.floor(k * n) >= 1 and (n == 1 or math.floor(k * (n - 1)) == 0)
        require_budget(k, n, "x")


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_saving_refuses_a_non_finite_threshold(name, tmp_path):
    sae = make(name)
    value = sae.threshold_tracker.value_name
    getattr(sae, value).fill_(float("nan"))
    if name == "feature_choice":
        sae.threshold_calibrated.fill_(True)  # no fallback: the vector itself is saved
    with pytest.raises(ValueError, match="not finite"):
        sae.save_inference_model(str(tmp_path))
    assert not (tmp_path / "sae_weights.safetensors").exists()


@pytest.mark.parametrize("name", ["mutual_choice"])  # feature_choice: same tracker; its compile took 73 s here
def test_thresholds_under_torch_compile_match_eager(name):
    """SAELens's compile_sae=True compiles training_forward_pass; the tracker runs eagerly inside.
    (aot_eager: dynamo and functionalization as with inductor, without the C++ build.)"""
    x = [torch.randn(128, D, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    eager, compiled = make(name), make(name)
    fwd = torch.compile(compiled.training_forward_pass, backend="aot_eager")
    for b in x:
        step(eager, b)
        fwd(
            TrainStepInput(
                sae_in=b,
                coefficients={},
                dead_neuron_mask=torch.zeros(F, dtype=torch.bool),
                n_training_steps=0,
                is_logging_step=False,
            )
        )
    value = eager.threshold_tracker.value_name
    assert float(getattr(compiled, value).abs().sum()) > 0
    assert torch.allclose(getattr(compiled, value), getattr(eager, value))
    assert torch.equal(compiled.threshold_tracker.steps, eager.threshold_tracker.steps)


# --- calibration against brute force -------------------------------------------------------------


@pytest.mark.parametrize("name", kinds.architectures_of_kind(kinds.BATCH_GLOBAL))
@pytest.mark.parametrize("repeated", [False, True])
def test_global_calibration_gives_mean_l0_k_exactly(name, repeated):
    sae = make(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3001, D, generator=g)
    if repeated:  # an LM's sequence-start token: many identical rows
        x[torch.randperm(3001, generator=g)[:300]] = x[0].clone()
    res = CF.calibrate(sae, chunks(x, 128), 3001)
    counts = brute_l0(sae, x)
    assert res.achieved_l0 == pytest.approx(float(counts.sum()) / 3001)
    budget = math.floor(K * 3001)
    if repeated:  # ties: all copies of the cut value are kept or none, whichever is nearer
        assert abs(int(counts.sum()) - budget) <= 300
    else:
        assert int(counts.sum()) == budget
    assert sae.threshold_calibrated and float(sae.topk_threshold) > 0
    assert sae.cfg.metadata.calibration["tokens"] == 3001 and sae.cfg.metadata.calibration["target_l0"] == K


def test_calibration_does_not_depend_on_the_batching():
    sae = make("feature_choice")
    sae.feature_density.copy_(torch.rand(F, generator=torch.Generator().manual_seed(2)))
    sae.density_steps.fill_(10)
    x = torch.randn(2000, D, generator=torch.Generator().manual_seed(3))
    thetas = [CF.calibrate(sae, chunks(x, size), 2000, apply=False, method="shares").theta for size in (2000, 97, 7)]
    assert torch.equal(thetas[0], thetas[1]) and torch.equal(thetas[0], thetas[2])


def test_per_feature_calibration_reproduces_the_training_shares():
    sae = make("feature_choice")
    shares = torch.rand(F, generator=torch.Generator().manual_seed(4))
    shares[:4] = 0  # never fired in training
    sae.feature_density.copy_(shares)
    sae.density_steps.fill_(10)
    n = 4000
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(5))
    res = CF.calibrate(sae, chunks(x, 256), n, method="shares")
    counts = brute_l0(sae, x)
    target = shares.double() / shares.sum() * math.floor(K * n)
    assert int(counts.sum()) == math.floor(K * n) and res.achieved_l0 == pytest.approx(K)
    assert float((counts - target).abs().max()) <= 1.0  # largest-remainder rounding
    assert counts[:4].tolist() == [0, 0, 0, 0] and res.never_fired_features == 4
    assert bool(torch.isfinite(sae.feature_threshold).all())
    assert torch.equal(sae.inference_thresholds(), sae.feature_threshold)  # no stale fallback once calibrated


def test_scale_rule_keeps_the_running_thresholds_shape_and_hits_k():
    sae = make("feature_choice")
    running = torch.rand(F, dtype=torch.double, generator=torch.Generator().manual_seed(8)) * 3
    running[:3] = 0.0  # fires on every positive value whatever the factor
    sae.feature_threshold.copy_(running)
    sae.feature_threshold_steps.fill_(5)
    n = 3000
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(9))
    res = CF.calibrate(sae, chunks(x, 200), n)  # the default rule
    assert res.rule == "per_feature/scale"
    counts = brute_l0(sae, x)
    assert int(counts.sum()) == math.floor(K * n) and res.achieved_l0 == pytest.approx(K)
    a = sae.feature_threshold[3:] / running[3:]
    assert torch.allclose(a, a[0].expand_as(a)) and float(a[0]) > 0
    assert sae.feature_threshold[:3].tolist() == [0.0, 0.0, 0.0]
    assert torch.equal(sae.inference_thresholds(), sae.feature_threshold)


def test_short_features_hand_their_share_to_the_others():
    sae = make("feature_choice")
    sae.feature_density.fill_(1.0)
    sae.density_steps.fill_(10)
    with torch.no_grad():
        sae.b_enc[:8] = -50.0  # these features are (almost) never positive
    n = 3000
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(6))
    res = CF.calibrate(sae, chunks(x, 300), n, method="shares")
    counts = brute_l0(sae, x)
    assert res.short_features == 8 and int(counts[:8].sum()) == int((pre_activations(sae, x)[:, :8] > 0).sum())
    assert int(counts.sum()) == math.floor(K * n)


def test_a_training_step_after_calibration_returns_to_the_running_thresholds():
    sae = make("mutual_choice")
    CF.calibrate(sae, chunks(torch.randn(500, D), 100), 500)
    assert sae.threshold_tracker.is_calibrated
    step(sae, torch.randn(64, D))
    assert not sae.threshold_tracker.is_calibrated


def test_calibration_refuses_what_it_cannot_calibrate():
    from sae_allocators.architectures.topk_zipf import TopKZipfTrainingSAE, TopKZipfTrainingSAEConfig

    with pytest.raises(ValueError, match="calibration is defined for"):
        CF.calibrate(TopKZipfTrainingSAE(TopKZipfTrainingSAEConfig(d_in=D, d_sae=F, k=4)), [torch.randn(10, D)], 10)
    with pytest.raises(ValueError, match="budget"):
        CF.calibrate(make("mutual_choice", k=0.01), [torch.randn(10, D)], 10)
    with pytest.raises(ValueError, match="calibration_tokens"):
        TRAINING["mutual_choice"][1](calibration_tokens=0)


def test_default_tokens_rule():
    assert CF.default_tokens(1_000_000, 4096) == 20_000  # 2 %
    assert CF.default_tokens(10_000, 512) == 2048  # at least 4 batches
    assert CF.default_tokens(10**10, 4096) == CF.MAX_TOKENS


# --- end to end: SAELens's runner, plain SAELens in a fresh interpreter, the command -------------


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    from sae_lens import LanguageModelSAETrainingRunner

    out = tmp_path_factory.mktemp("calibrated")
    model = tiny_model(d_model=32)
    results = {}
    for name, cfg in {
        "mutual_choice": MutualChoiceTrainingSAEConfig(d_in=32, d_sae=128, k=4.0, calibration_tokens=1024),
        "feature_choice": FeatureChoiceTrainingSAEConfig(d_in=32, d_sae=128, k=4.0, calibration_tokens=1024),
        "feature_choice_off": FeatureChoiceTrainingSAEConfig(d_in=32, d_sae=128, k=4.0, calibrate=False),
    }.items():
        torch.manual_seed(0)
        rc = runner_config(cfg, steps=40, output_path=out / name, lr=1e-3)
        # SAELens's own runner, not a subclass: loading the plugin makes its final save calibrate
        runner = LanguageModelSAETrainingRunner(
            rc, override_model=model, override_dataset=tiny_dataset(n_rows=512, context_size=16)
        )
        sae = runner.run()
        # held out from training and calibration: the store's next tokens
        held = torch.cat([next(runner.activations_store) for _ in range(32)])
        results[name] = (sae, out / name, runner.calibration_result, held)
    return results


def test_runner_calibrates_before_saving_and_records_it(calibrated_run):
    from safetensors.torch import load_file

    for name in ("mutual_choice", "feature_choice"):
        sae, folder, res, _ = calibrated_run[name]
        meta = json.loads((folder / "cfg.json").read_text())["metadata"]["calibration"]
        assert meta["tokens"] == 1024 and meta["target_l0"] == 4.0 and meta["held_out"] is True
        assert abs(meta["achieved_l0"] - 4.0) <= 0.1
        saved = load_file(folder / "sae_weights.safetensors")["threshold"]
        assert torch.allclose(saved, res.theta.float().expand_as(saved))
    sae, folder, res, _ = calibrated_run["feature_choice_off"]
    assert res is None and "calibration" not in json.loads((folder / "cfg.json").read_text())["metadata"]


def test_runner_wrap_is_installed_once_and_uninstall_restores_saelens():
    from sae_lens import LanguageModelSAETrainingRunner

    from sae_allocators import patches

    wrapped = LanguageModelSAETrainingRunner.__dict__["save_final_sae"]
    assert patches.installed() and patches.original_of(wrapped) is not None
    patches.install()  # idempotent: no second layer
    assert LanguageModelSAETrainingRunner.__dict__["save_final_sae"] is wrapped
    try:
        patches.uninstall()
        assert not patches.installed()
        original = LanguageModelSAETrainingRunner.__dict__["save_final_sae"]
        assert patches.original_of(original) is None and original is patches.original_of(wrapped)
    finally:
        patches.install()
    assert patches.installed()


def test_runner_calibration_uses_the_chosen_source_and_respects_calibrate_false():
    from types import SimpleNamespace

    torch.manual_seed(3)
    held = [torch.randn(256, D) for _ in range(4)]
    for calibrate in (True, False):
        sae = make("mutual_choice", calibrate=calibrate, calibration_tokens=1024)
        runner = SimpleNamespace(
            cfg=SimpleNamespace(training_tokens=10**6, train_batch_size_tokens=256), calibration_batches=iter(held)
        )
        res = CR.calibrate_runner_sae(runner, sae)
        assert runner.calibration_result is res
        if not calibrate:
            assert res is None
            continue
        assert res.tokens == 1024
        pooled = torch.cat(held)
        l0 = (
            (pre_activations(sae, pooled) > CF.current_thresholds(sae).to(pooled.dtype))
            & (pre_activations(sae, pooled) > 0)
        ).sum() / pooled.shape[0]
        assert abs(float(l0) - K) < 1e-6  # the global rule is exact on the calibration set
    with pytest.raises(ValueError, match="calibration_batches"):
        CR.calibrate_runner_sae(
            SimpleNamespace(cfg=SimpleNamespace(training_tokens=1, batch_size=1)), make("mutual_choice")
        )


def test_calibrated_export_loads_in_plain_saelens_at_its_l0(calibrated_run):
    folder = calibrated_run["feature_choice"][1]
    code = f"""
import json, torch, sys
assert 'sae_allocators' not in sys.modules
from sae_lens import SAE
sae = SAE.load_from_disk({str(folder)!r})
torch.manual_seed(0)
x = torch.randn(8, 32)
print(json.dumps({{"arch": sae.cfg.architecture(), "cal": sae.cfg.metadata.calibration,
                  "threshold": sae.threshold.tolist(), "plugins": [m for m in sys.modules if m.split('.')[0] == 'sae_allocators']}}))
"""
    proc = run_fresh(code, env={"SAE_ALLOCATORS_NO_AUTOLOAD": "1", "PYTHONPATH": ""}, cwd=folder, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["arch"] == "jumprelu" and got["plugins"] == []
    assert got["cal"]["rule"] == "per_feature/scale" and got["cal"]["tokens"] == 1024
    theta = calibrated_run["feature_choice"][2].theta.float()
    assert torch.allclose(torch.tensor(got["threshold"]), theta)


def test_calibrated_model_keeps_l0_on_held_out_activations(calibrated_run):
    from sae_lens import SAE

    drift = {}
    for name in ("mutual_choice", "feature_choice"):
        held = calibrated_run[name][3]
        l0 = float((SAE.load_from_disk(calibrated_run[name][1]).encode(held) != 0).sum(-1).float().mean())
        drift[name] = abs(l0 / 4.0 - 1)
    print("DRIFT", drift)
    # 2048 held-out tokens of a 40-step SAE on random tokens; per-feature thresholds from 1024 tokens
    assert drift["mutual_choice"] < 0.1 and drift["feature_choice"] < 0.2, drift
    # without calibration the same short run saves its running thresholds with the export correction
    # (sae_allocators.thresholds.ExportSteering): near k, but calibration is closer (before the
    # correction this export fired at more than 1.3 k)
    held = calibrated_run["feature_choice_off"][3]
    l0_off = float(
        (SAE.load_from_disk(calibrated_run["feature_choice_off"][1]).encode(held) != 0).sum(-1).float().mean()
    )
    print("OFF", l0_off)
    assert drift["feature_choice"] < abs(l0_off / 4.0 - 1) < 0.5, l0_off


def test_calibrate_command_on_a_saved_folder(calibrated_run, tmp_path, capsys):
    from sae_allocators.cli import main

    folder = calibrated_run["feature_choice_off"][1]
    model = tiny_model(d_model=32)
    argv = [
        "calibrate",
        str(folder),
        "--calibration_tokens",
        "1024",
        "--output",
        str(tmp_path / "cal"),
        "--feature_rule",
        "shares",
        "--model_name",
        "tiny-random",
        "--hook_name",
        TINY_HOOK,
        "--dataset_path",
        "",
        "--is_dataset_tokenized",
        "True",
        "--streaming",
        "False",
        "--context_size",
        "16",
        "--train_batch_size_tokens",
        "64",
        "--store_batch_size_prompts",
        "4",
        "--n_batches_in_buffer",
        "4",
        "--device",
        "cpu",
    ]
    from sae_allocators.workflow import calibrate as cmd

    rc = cmd.main(argv[1:], override_model=model, override_dataset=tiny_dataset(n_rows=128, context_size=16, seed=7))
    assert rc == 0
    assert "Calibrated feature_choice (per_feature/shares rule) on 1024 tokens" in capsys.readouterr().out
    meta = json.loads((tmp_path / "cal" / "cfg.json").read_text())["metadata"]["calibration"]
    assert meta["tokens"] == 1024 and abs(meta["achieved_l0"] - 4.0) < 0.1 and "sparsity.safetensors" in meta["shares"]
    assert (
        "calibration" not in json.loads((folder / "cfg.json").read_text())["metadata"]
    )  # --output: original untouched
    assert main(["calibrate", str(folder)]) == 2  # no data options: a clear error, not a download


# --- fast unit tests of the streaming quantiles, the rules' helpers and the end-of-training step --
# (no runner training, no subprocess: the mutation target `thresholds` runs these per mutant; their
# names avoid the words its -k expression leaves out)


def ref_cut(values: list[float], c: int) -> float:
    """The documented cut, by brute force on one group's positive values: c = 0 -> the largest
    value (nothing above it); c >= #values -> 0 (every positive fires); else the c-th largest t,
    lowered to the midpoint with the next smaller value (0 if none) when keeping all copies of t is
    nearer to c than dropping them all (ties to dropping)."""
    vals = sorted((v for v in values if v > 0), reverse=True)
    if c <= 0:
        return vals[0] if vals else 0.0
    if c >= len(vals):
        return 0.0
    t = vals[c - 1]
    above = sum(v > t for v in vals)
    at_or_above = sum(v >= t for v in vals)
    if at_or_above - c < c - above:
        return (t + max((v for v in vals if v < t), default=0.0)) / 2
    return t


def streamed_cut(
    chunks_: list[torch.Tensor], caps: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, CF._TopPerGroup]:
    top = CF._TopPerGroup(caps)
    top.pruned_during_pass = False
    for ch in chunks_:
        top.add(ch)
        # bounded memory: what the collector holds never grows past its limit by more than a batch
        assert sum(int(t.numel()) for t in top.vals) <= top.limit + ch.numel()
        top.pruned_during_pass |= bool(top.floor.max() > 0)
    v, starts, counts = top.sorted_values()
    return CF._cut(v, starts, counts, c, top.dropped_max), top


def test_cut_matches_brute_force_with_and_without_ties():
    cases = [
        ([5.0, 4.0, 3.0, 2.0, 1.0], [0, 1, 2, 4, 5, 6]),
        ([3.0, 3.0, 3.0, 1.0], [1, 2, 3]),  # ties at the cut: keep all 3 (c=2, 3) or none (c=1)
        ([4.0, 2.0, 2.0, 2.0, 2.0, 1.0], [2, 3, 4]),  # 1 above, 4 tied: nearer to drop for c=2
        ([2.0, 2.0], [1]),  # tie between keeping 2 and keeping 0: drop
        ([7.0, 0.0, -1.0], [1, 2]),  # non-positive values never fire
    ]
    for values, cs in cases:
        for c in cs:
            theta, _ = streamed_cut([torch.tensor(values)], torch.tensor([c + 1]), torch.tensor([c]))
            assert float(theta) == pytest.approx(ref_cut(values, c)), (values, c)
    empty, _ = streamed_cut([torch.tensor([-1.0, 0.0])], torch.tensor([3]), torch.tensor([2]))
    assert float(empty) == 0.0


def test_cut_uses_the_largest_dropped_value_as_the_next_one_down():
    v = torch.tensor([5.0, 4.0])  # kept values of one group; 3.0 was dropped on arrival
    theta = CF._cut(v, torch.tensor([0]), torch.tensor([2]), torch.tensor([1]), torch.tensor([3.0]))
    assert float(theta) == 4.5
    theta = CF._cut(v, torch.tensor([0]), torch.tensor([2]), torch.tensor([2]), torch.tensor([3.0]))
    assert float(theta) == 0.0  # c = all kept values: every positive value fires


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_streaming_top_values_with_pruning_match_sorting_everything(groups):
    g = torch.Generator().manual_seed(11)
    n = 300_000 // groups
    x = (torch.randn(n, groups, generator=g) * 4).round() / 4 + 2  # many ties, zeros and negatives
    x[:50] = 100.0  # a burst of huge values first
    if groups == 1:
        c = torch.tensor([7_000])
    elif groups == 2:
        c = torch.tensor([5_000, 40])
    else:
        c = torch.tensor([0, 1, 50, 3_000, 9_000, 40_000])  # 40,000 > the positives of a column
    caps = c + 1
    chunks_ = [x[i : i + 9_000] for i in range(0, n, 9_000)]
    theta, top = streamed_cut(chunks_, caps, c)
    cols = [x.reshape(-1).tolist()] if groups == 1 else [x[:, j].tolist() for j in range(groups)]
    assert theta.tolist() == pytest.approx([ref_cut(col, int(cj)) for col, cj in zip(cols, c)])
    assert top.positive.tolist() == [sum(v > 0 for v in col) for col in cols]
    assert top.pruned_during_pass  # (more positive values than the limit: it had to prune mid-stream)
    kept = sum(int(t.numel()) for t in top.vals)
    assert kept < int((x > 0).sum()) // 2  # dropped what could never be in the top c + 1
    # chunking does not change the result
    theta_one, _ = streamed_cut([x], caps, c)
    assert torch.equal(theta, theta_one)


def test_largest_remainder_rounding():
    assert CF._largest_remainder(torch.tensor([0.5, 0.3, 0.2]), 7).tolist() == [4, 2, 1]
    assert CF._largest_remainder(torch.tensor([1.0, 3.0]), 8).tolist() == [2, 6]
    assert CF._largest_remainder(torch.tensor([0.7, 0.3]), 2).tolist() == [1, 1]  # 1.4, 0.6: the larger remainder
    assert CF._largest_remainder(torch.tensor([-1.0, 1.0]), 3).tolist() == [0, 3]
    out = CF._largest_remainder(torch.tensor([0.0, 0.0]), 5)
    assert out.tolist() == [0, 0] and out.dtype == torch.long
    assert CF._largest_remainder(torch.tensor([1.0, 2.0]), 0).tolist() == [0, 0]
    w = torch.rand(50, generator=torch.Generator().manual_seed(0))
    for total in (1, 49, 50, 1001):
        out = CF._largest_remainder(w, total)
        assert int(out.sum()) == total and out.dtype == torch.long
        assert float((out.double() - w.double() / w.sum() * total).abs().max()) < 1.0


def test_water_fill_moves_the_shortfall_by_share_within_room_and_data():
    c = CF._water_fill(
        torch.tensor([6, 0, 0]),
        torch.tensor([0, 100, 100]),
        torch.tensor([100, 100, 100]),
        torch.tensor([1.0, 1.0, 2.0]),
    )
    assert c.tolist() == [0, 2, 4]  # feature 0 has no data: its 6 go 1:2 to the others
    c = CF._water_fill(
        torch.tensor([4, 4, 4]), torch.tensor([1, 10, 10]), torch.tensor([10, 5, 10]), torch.tensor([1.0, 1.0, 1.0])
    )
    assert c.tolist() == [1, 5, 6]  # feature 1 is capped by its room: the rest goes to feature 2
    c = CF._water_fill(torch.tensor([3, 3]), torch.tensor([1, 4]), torch.tensor([9, 9]), torch.tensor([1.0, 0.0]))
    assert c.tolist() == [1, 3]  # a feature with share 0 takes nothing: the total stays short
    c = CF._water_fill(torch.tensor([2, 2]), torch.tensor([5, 5]), torch.tensor([9, 9]), torch.tensor([1.0, 1.0]))
    assert c.tolist() == [2, 2]  # no shortfall: the targets


def test_water_fill_places_the_whole_shortfall_whenever_the_data_allow():
    """Skewed shares (feature i has share 2^-i, room for one more entry): each round fills only the
    few largest shares, so this takes 17 rounds; the shortfall of feature 0 must still all move."""
    n = 87
    target = torch.zeros(n + 1, dtype=torch.long)
    target[0] = n  # no data at all: all of its n entries go to the others
    avail = torch.ones(n + 1, dtype=torch.long)
    avail[0] = 0
    shares = torch.tensor([1.0] + [2.0**-i for i in range(n)], dtype=torch.double)
    c = CF._water_fill(target, avail, torch.full((n + 1,), 100), shares)
    assert int(c.sum()) == n and c[1:].tolist() == [1] * n


def test_values_tied_with_the_floor_still_count():
    """A copy of the running floor value arriving after a prune is one more tie at the cut."""
    filler = torch.full((70_000,), 0.5)  # enough values to make the collector prune mid-stream
    first = torch.cat([torch.tensor([5.0, 4.0, 4.0, 4.0, 4.0]), filler])
    theta, top = streamed_cut([first, torch.tensor([4.0])], torch.tensor([5]), torch.tensor([4]))
    assert float(top.floor[0]) == 4.0  # pruned at the 5th largest value
    # 1 above 4 and 5 copies of 4: keeping all (6) is nearer to c = 4 than dropping them (1)
    assert float(theta) == ref_cut([5.0] + [4.0] * 5 + [0.5] * 70_000, 4) == 2.25


def test_training_shares_sources():
    sae = make("feature_choice")
    shares, source = CF.training_shares(sae, 1000)
    assert source == "current capacities (the SAE has not trained)" and torch.equal(
        shares, sae.current_capacities(1000).double()
    )
    sae.feature_density.copy_(torch.linspace(0, 1, F))
    sae.density_steps.fill_(1)
    shares, source = CF.training_shares(sae, 1000)
    assert source == "feature_density (running firing rate of the training selection)" and shares.dtype == torch.double
    assert torch.equal(shares, torch.linspace(0, 1, F).double())
    with pytest.raises(
        ValueError, match="^feature_choice calibration needs each feature's training share: none found$"
    ):
        CF.training_shares(torch.nn.Linear(2, 2), 10)


def jumprelu(training_architecture: str | None = "mutual_choice", theta: float = 0.0, seed: int = 0):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    torch.manual_seed(seed)
    cfg = JumpReLUSAEConfig(d_in=D, d_sae=F)
    cfg.metadata.training_architecture = training_architecture
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        sae.threshold.fill_(theta)
    return sae


def test_rules_and_architectures():
    assert [CF.rule_of(a) for a in ("mutual_choice", "batchtopk_zipf", "feature_choice", "topk", "jumprelu")] == [
        "global",
        "global",
        "per_feature",
        None,
        None,
    ]
    assert CF.architecture_of(make("batchtopk_zipf")) == "batchtopk_zipf"
    assert CF.architecture_of(jumprelu("feature_choice")) == "feature_choice"
    assert CF.architecture_of(jumprelu(None)) == "jumprelu"
    assert CR.wants_calibration(make("feature_choice")) and CR.wants_calibration(jumprelu("mutual_choice"))
    assert not CR.wants_calibration(make("feature_choice", calibrate=False))
    assert not CR.wants_calibration(jumprelu(None)) and not CR.wants_calibration(jumprelu("topk"))


def test_planned_tokens_config_or_default():
    assert CR.planned_tokens(make("mutual_choice", calibration_tokens=1234), 10**6, 4096) == 1234
    assert CR.planned_tokens(make("mutual_choice"), 10**6, 4096) == 20_000
    assert CR.planned_tokens(make("mutual_choice"), 10_000, 512) == 2048
    assert CF.default_tokens(1_000_030, 10) == 20_001  # 2 % = 20,000.6: rounded, not cut
    assert CF.default_tokens(0, 1) == 4
    assert CR.planned_tokens(jumprelu("mutual_choice"), 10**6, 4096) == 20_000  # a config without the field


def test_calibrating_a_saved_jumprelu_writes_its_threshold():
    sae = jumprelu("mutual_choice", theta=0.3)
    n = 600
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(1))
    before = brute_l0(sae, x)
    with pytest.raises(
        ValueError, match=r"^calibrating a saved mutual_choice model needs its training k \(pass k=\.\.\."
    ):
        CF.calibrate(sae, [x], n)
    res = CF.calibrate(sae, chunks(x, 128), n, k=2.0)
    assert res.rule == "global" and res.architecture == "mutual_choice" and res.tokens == n and res.shares == ""
    assert res.never_fired_features == 0 and res.short_features == 0 and 0 <= res.seconds < 60
    assert res.l0_before == pytest.approx(float(before.sum()) / n)
    assert res.theta_before.tolist() == pytest.approx([0.3] * F)
    counts = brute_l0(sae, x)
    assert int(counts.sum()) == 2 * n and res.achieved_l0 == 2.0 and res.target_l0 == 2.0
    assert sae.threshold.tolist() == [float(res.theta)] * F
    meta = sae.cfg.metadata.calibration
    assert set(meta) == {f.name for f in dataclasses_fields(CF.CalibrationResult)} - {"theta", "theta_before"} | {
        "method"
    }
    assert meta["method"] == "sae_allocators.calibration (exact quantile on held-out activations)"
    assert meta["tokens"] == n and meta["held_out"] is True and meta["achieved_l0"] == 2.0 and meta["seconds"] >= 0
    with pytest.raises(
        ValueError,
        match=r"^calibration is defined for batchtopk_zipf, mutual_choice, feature_choice \(saved as jumprelu\); this SAE is 'jumprelu'",
    ):
        CF.calibrate(jumprelu(None), [x], n, k=2.0)


def dataclasses_fields(cls):
    import dataclasses

    return dataclasses.fields(cls)


def test_calibrate_without_apply_leaves_the_sae_alone():
    sae = jumprelu("mutual_choice", theta=0.3)
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(2))
    res = CF.calibrate(sae, [x], 300, k=1.0, apply=False)
    assert sae.threshold.tolist() == [pytest.approx(0.3)] * F and getattr(sae.cfg.metadata, "calibration", None) is None
    assert res.theta is not None and float(res.theta) != pytest.approx(0.3)


def test_calibrate_refuses_bad_arguments_with_the_fix():
    sae = make("feature_choice")
    x = torch.randn(50, D)
    with pytest.raises(
        ValueError, match=r"^feature_choice calibration rule 'median': use 'scale' \(default\) or 'shares'\.$"
    ):
        CF.calibrate(sae, [x], 50, method="median")
    for bad in (0, -3, 2.5, "10"):
        with pytest.raises(ValueError, match=r"^calibration tokens=.* use a positive number of tokens\.$"):
            CF.calibrate(make("mutual_choice"), [x], bad)
    with pytest.raises(
        ValueError,
        match=r"^calibration with k=0\.01 on 10 tokens has a budget floor\(k \* N\) = 0: use at least 100 tokens\.$",
    ):
        CF.calibrate(make("mutual_choice", k=0.01), [x], 10)
    with pytest.raises(ValueError, match=r"feature shares must be 64 non-negative values with a positive sum"):
        CF.calibrate(sae, [x], 50, method="shares", shares=torch.zeros(F))
    with pytest.raises(ValueError, match=r"feature shares must be 64"):
        CF.calibrate(sae, [x], 50, method="shares", shares=torch.ones(F + 1))
    for name, method in (("mutual_choice", None), ("feature_choice", "scale"), ("feature_choice", "shares")):
        with pytest.raises(
            ValueError, match=r"^calibration: the activation source gave no tokens; give it held-out activations\.$"
        ):
            CF.calibrate(make(name), iter([]), 100, method=method)
        with pytest.raises(ValueError, match="gave no tokens"):
            CF.calibrate(make(name), [torch.zeros(0, D)], 100, method=method)


def test_calibrate_takes_exactly_n_tokens_and_leaves_the_rest_of_the_source():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(2, 50, D, generator=g) for _ in range(3)]  # [batch, seq, d_in]: 100 tokens each
    it = iter(batches)
    sae = make("mutual_choice")
    res = CF.calibrate(sae, it, 130, apply=False)
    assert res.tokens == 130
    assert next(it) is batches[2]  # the third batch is still held out
    flat = torch.cat([b.reshape(-1, D) for b in batches])[:130]
    assert torch.equal(res.theta, CF.calibrate(sae, [flat], 130, apply=False).theta)


@pytest.mark.parametrize(
    "name,method", [("mutual_choice", None), ("feature_choice", "scale"), ("feature_choice", "shares")]
)
def test_a_short_source_warns_and_calibrates_on_what_it_gave(name, method):
    sae = make(name)
    if name == "feature_choice":
        sae.feature_threshold.copy_(torch.rand(F, dtype=torch.double, generator=torch.Generator().manual_seed(4)))
        sae.feature_threshold_steps.fill_(3)
        sae.feature_density.copy_(torch.rand(F, generator=torch.Generator().manual_seed(5)))
        sae.density_steps.fill_(3)
    x = torch.randn(450, D, generator=torch.Generator().manual_seed(6))
    before = brute_l0(sae, x)
    with pytest.warns(
        UserWarning, match=r"^calibration asked for 1000 tokens but the source gave 450; calibrated on those\.$"
    ) as rec:
        res = CF.calibrate(sae, chunks(x, 100), 1000, method=method)
    # reported at the caller, not inside calibration.py; in a mutation run (tests/mutation.sh) the
    # caller of calibrate is mutmut's trampoline, one frame between this test and calibrate
    where = [w.filename for w in rec]
    if "mutmut" in sys.modules:
        assert len(where) == 1 and where[0].startswith(os.path.dirname(sys.modules["mutmut"].__file__)), where
    else:
        assert where == [__file__]
    assert res.tokens == 450 and res.l0_before == pytest.approx(float(before.sum()) / 450)
    assert 0 <= res.seconds < 60
    assert int(brute_l0(sae, x).sum()) == math.floor(K * 450) and res.achieved_l0 == pytest.approx(K)


def test_scale_rule_silences_the_rest_when_zero_threshold_features_exceed_the_budget():
    sae = make("feature_choice", k=0.5)
    running = torch.rand(F, dtype=torch.double, generator=torch.Generator().manual_seed(7)) + 0.5
    running[:10] = 0.0  # these fire on every positive value: about 10 * n / 2 entries > K = n / 2
    sae.feature_threshold.copy_(running)
    sae.feature_threshold_steps.fill_(5)
    n = 200
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(8))
    before = brute_l0(sae, x)
    res = CF.calibrate(sae, [x], n)
    assert res.l0_before == pytest.approx(float(before.sum()) / n)
    counts = brute_l0(sae, x)
    pre = pre_activations(sae, x)
    assert counts[10:].sum() == 0 and counts[:10].tolist() == (pre[:, :10] > 0).sum(0).tolist()
    assert res.achieved_l0 == pytest.approx(float(counts.sum()) / n) and res.achieved_l0 > 0.5
    assert bool(torch.isfinite(sae.feature_threshold).all())


def test_shares_rule_records_never_fired_and_short_features():
    sae = make("feature_choice")
    shares = torch.ones(F)
    shares[:3] = 0
    with torch.no_grad():
        sae.b_enc[3:7] = -50.0
    n = 500
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(9))
    before = brute_l0(sae, x)
    res = CF.calibrate(sae, chunks(x, 64), n, method="shares", shares=shares, shares_source="given")
    assert res.l0_before == pytest.approx(float(before.sum()) / n)
    assert res.rule == "per_feature/shares" and res.shares == "given"
    assert res.never_fired_features == 3 and res.short_features == 4
    counts = brute_l0(sae, x)
    assert counts[:3].tolist() == [0, 0, 0] and int(counts.sum()) == math.floor(K * n)
    assert res.achieved_l0 == pytest.approx(K)
    scale = CF.calibrate(make("feature_choice"), [x], n, apply=False)
    assert scale.rule == "per_feature/scale" and scale.shares.startswith(
        "running thresholds of training scaled by one factor a = "
    )
    assert scale.never_fired_features == 0 and scale.short_features == 0


def test_current_and_applied_thresholds_of_each_kind_of_sae():
    fc = make("feature_choice")
    assert torch.equal(CF.current_thresholds(fc), fc.inference_thresholds().float())
    jr = jumprelu("mutual_choice", theta=0.25)
    assert CF.current_thresholds(jr).tolist() == [0.25] * F
    with pytest.raises(ValueError, match="^Linear has no inference threshold to calibrate$"):
        CF.current_thresholds(torch.nn.Linear(2, 2))
    res = CF.CalibrationResult("global", "mutual_choice", 10, 1.0, 1.0, 0.5, 0.0)
    CF.apply_thresholds(jr, torch.tensor(0.75), res)
    assert jr.threshold.tolist() == [0.75] * F and jr.cfg.metadata.calibration == res.metadata()
    with pytest.raises(ValueError, match=r"^calibrated threshold is not finite"):
        CF.apply_thresholds(jr, torch.tensor(math.inf), res)
    assert jr.threshold.tolist() == [0.75] * F
    with pytest.raises(ValueError, match="^Linear has no threshold to write the calibration into$"):
        CF.apply_thresholds(torch.nn.Linear(2, 2), torch.tensor(0.5), res)
    mc = make("mutual_choice")
    CF.apply_thresholds(mc, torch.tensor(0.5), res)
    assert mc.threshold_tracker.is_calibrated and float(mc.topk_threshold) == 0.5


# --- the end-of-training step (what SAELens's runners call before their final save) -------------


def test_held_out_batches_note_a_new_epoch_and_pass_other_warnings_on():
    import warnings

    lines = []

    def source():
        yield torch.zeros(1)
        warnings.warn("All samples in the training dataset have been exhausted, beginning new epoch.")
        yield torch.ones(1)
        lines.append(inspect.currentframe().f_lineno + 1)
        warnings.warn("something else", FutureWarning)
        yield torch.full((1,), 2.0)

    b = CR.HeldOutBatches(source())
    assert iter(b) is b and b.wrapped is False
    assert next(b).tolist() == [0.0] and not b.wrapped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert next(b).tolist() == [1.0]
        assert b.wrapped and caught == []  # swallowed: recorded as wrapped
        assert next(b).tolist() == [2.0]
    assert [(w.category, str(w.message)) for w in caught] == [(FutureWarning, "something else")]
    assert (caught[0].filename, caught[0].lineno) == (__file__, lines[0])  # re-emitted where the source warned
    with pytest.raises(StopIteration):
        next(b)
    epoch = CR.HeldOutBatches([torch.zeros(1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing escapes
        assert [t.tolist() for t in epoch] == [[0.0]] and not epoch.wrapped

    def new_epoch():
        warnings.warn("starting a new epoch")
        yield torch.zeros(1)

    b2 = CR.HeldOutBatches(new_epoch())
    next(b2)
    assert b2.wrapped


def test_end_of_training_calibration_evaluates_logs_and_restores_the_mode():
    g = torch.Generator().manual_seed(10)
    modes = []

    def source(sae):
        while True:
            modes.append(sae.training)
            yield torch.randn(100, D, generator=g)

    for start_training in (True, False):
        sae = make("mutual_choice", calibration_tokens=300)
        sae.train(start_training)
        modes.clear()
        logged = []
        res = CR.calibrate_after_training(sae, source(sae), 10**6, 256, log=logged.append)
        assert modes == [False, False, False]  # eval() while calibrating: 3 batches of 100 tokens
        assert sae.training is start_training
        assert res.tokens == 300 and res.held_out and sae.threshold_tracker.is_calibrated
        assert len(logged) == 1
        assert re.fullmatch(
            r"Calibrated mutual_choice thresholds on 300 held-out tokens \(\d+\.\d s\): L0 \S+ -> 4 \(target k=4\)",
            logged[0],
        ), logged[0]
    # the mode comes back when calibration fails, too
    sae = make("mutual_choice", calibration_tokens=300)
    logged.clear()
    with pytest.raises(ValueError, match="gave no tokens"):
        CR.calibrate_after_training(sae, iter([]), 10**6, 256, log=logged.append)
    assert sae.training
    off = make("mutual_choice", calibrate=False)
    assert CR.calibrate_after_training(off, source(off), 10**6, 256, log=logged.append) is None
    assert not off.threshold_tracker.is_calibrated and logged == []  # nothing calibrated, nothing logged


def test_end_of_training_calibration_on_a_source_that_wrapped_records_it():
    import warnings

    def source():
        g = torch.Generator().manual_seed(12)
        for i in range(5):
            if i == 2:
                warnings.warn("All samples in the training dataset have been exhausted")
            yield torch.randn(100, D, generator=g)

    sae = make("mutual_choice", calibration_tokens=400)
    with pytest.warns(
        UserWarning,
        match=r"^calibration: the activation source started a new epoch, so some calibration tokens were also "
        r"training tokens \(recorded as held_out=false\)\. Give the run more data than training_tokens \+ "
        r"calibration_tokens for held-out calibration\.$",
    ) as rec:
        res = CR.calibrate_after_training(sae, source(), 10**6, 100, log=lambda m: None)
    assert res.held_out is False and sae.cfg.metadata.calibration["held_out"] is False
    assert all(w.filename != CR.__file__ for w in rec)  # reported at the caller, not inside calibration/runner.py
    assert sae.cfg.metadata.calibration["tokens"] == 400


class StandIn:
    """What calibrate_runner_sae reads of a SAELens runner: cfg, and a held-out source."""

    def __init__(self, batches=None, **cfg):
        self.cfg = SimpleNamespace(**cfg)
        if batches is not None:
            self.calibration_batches = batches


def gaussian_batches(seed: int, rows: int = 100):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(rows, D, generator=g)


def test_final_save_step_logs_to_the_package_logger(caplog, capsys):
    import logging

    holder = StandIn(gaussian_batches(6), training_tokens=10_000, train_batch_size_tokens=100)
    with caplog.at_level(logging.INFO, logger="sae_allocators"):
        CR.calibrate_runner_sae(holder, make("mutual_choice"))
    assert [r.name for r in caplog.records] == ["sae_allocators"]
    assert caplog.records[0].getMessage().startswith("Calibrated mutual_choice thresholds on 400 held-out tokens")
    assert capsys.readouterr().out.startswith("Calibrated mutual_choice thresholds on 400 held-out tokens")


def test_final_save_step_plans_tokens_from_the_training_config():
    # SAELens's LM runner: training_tokens and train_batch_size_tokens (2 % of 100,000 = 2,000)
    holder = StandIn(gaussian_batches(0), training_tokens=100_000, train_batch_size_tokens=100)
    res = CR.calibrate_runner_sae(holder, make("mutual_choice"))
    assert holder.calibration_result is res and res.tokens == 2000
    # the synthetic runner's config has training_samples and batch_size (2 % of 100,000 = 2,000) ...
    holder = StandIn(gaussian_batches(1), training_samples=100_000, batch_size=10)
    assert CR.calibrate_runner_sae(holder, make("mutual_choice")).tokens == 2000
    # ... and at least 4 batches of 300 > 2 % of 50,000
    holder = StandIn(gaussian_batches(1), training_tokens=None, training_samples=50_000, batch_size=300)
    assert CR.calibrate_runner_sae(holder, make("mutual_choice")).tokens == 1200
    holder = StandIn(gaussian_batches(2))  # neither: 4 batches of 1 token
    assert CR.calibrate_runner_sae(holder, make("mutual_choice")).tokens == 4
    # switched off: the result of an earlier call is cleared
    holder = StandIn(gaussian_batches(3), training_tokens=1000, batch_size=10)
    holder.calibration_result = "stale"
    assert (
        CR.calibrate_runner_sae(holder, make("mutual_choice", calibrate=False)) is None
        and holder.calibration_result is None
    )


def test_final_save_step_uses_the_mixin_source():
    class Custom(CR.CalibratingRunnerMixin):
        def __init__(self):
            self.cfg = SimpleNamespace(training_tokens=10_000, train_batch_size_tokens=100)
            self.calibration_batches = iter([])  # would give no tokens: the override wins

        def calibration_source(self):
            return gaussian_batches(4)

    holder = Custom()
    res = CR.calibrate_runner_sae(holder, make("batchtopk_zipf"))
    assert res.tokens == 400 and holder.calibration_result is res
    plain = CR.CalibratingRunnerMixin()
    batches = [torch.zeros(1, D)]
    plain.calibration_batches = batches
    assert plain.calibration_source() is batches
    assert (
        CR.CalibratingRunnerMixin.calibration_batches is None and CR.CalibratingRunnerMixin.calibration_result is None
    )


class FakeGenerator:
    def __init__(self, sparse: bool):
        self.sparse, self.calls = sparse, []
        self.g = torch.Generator().manual_seed(13)

    def sample(self, n: int) -> torch.Tensor:
        self.calls.append(n)
        dense = torch.rand(n, 5, generator=self.g) * (torch.rand(n, 5, generator=self.g) < 0.3)
        return dense.to_sparse() if self.sparse else dense


def test_default_held_out_source_order_and_synthetic_samples():
    store, given = object(), [torch.zeros(1, D)]
    both = SimpleNamespace(calibration_batches=given, activations_store=store, synthetic_model=object(), cfg=None)
    assert CR.default_calibration_source(both) is given
    assert CR.default_calibration_source(SimpleNamespace(calibration_batches=None, activations_store=store)) is store
    assert CR.default_calibration_source(SimpleNamespace(activations_store=store, synthetic_model=object())) is store
    for sparse in (True, False):
        lin = torch.nn.Linear(5, D)
        model = SimpleNamespace(activation_generator=FakeGenerator(sparse), feature_dict=lin)
        it = CR.default_calibration_source(
            SimpleNamespace(activations_store=None, synthetic_model=model, cfg=SimpleNamespace(batch_size=7))
        )
        first, second = next(it), next(it)
        assert model.activation_generator.calls == [7, 7]
        assert first.shape == (7, D) and not first.requires_grad and not torch.equal(first, second)
        g = torch.Generator().manual_seed(13)
        feats = torch.rand(7, 5, generator=g) * (torch.rand(7, 5, generator=g) < 0.3)
        assert torch.allclose(first, lin(feats))
    with pytest.raises(ValueError) as err:
        CR.default_calibration_source(SimpleNamespace(cfg=None))
    assert str(err.value) == (
        "SimpleNamespace: no held-out activation source for calibration; set runner.calibration_batches = "
        "<iterable of [batch, d_in] tensors>, or cfg.sae.calibrate = False"
    )


def test_install_wraps_both_final_save_methods_and_uninstall_restores_them(monkeypatch, tmp_path):
    from sae_lens import LanguageModelSAETrainingRunner
    from sae_lens.synthetic import SyntheticSAERunner

    assert [
        (cls.__name__, name) for cls, name, _ in CR.runner_wraps() if name in ("save_final_sae", "_save_outputs")
    ] == [
        ("LanguageModelSAETrainingRunner", "save_final_sae"),
        ("SyntheticSAERunner", "_save_outputs"),
    ]
    calls = []

    def save_final_sae(self, sae, output_path, extra=None):
        calls.append(("lm", self.calibration_result, output_path, extra))
        return "lm saved"

    def _save_outputs(self, output_path, sae):
        calls.append(("synthetic", self.calibration_result, output_path, None))
        return "synthetic saved"

    # stand-ins for SAELens's methods (monkeypatch puts the installed wraps back afterwards)
    monkeypatch.setattr(LanguageModelSAETrainingRunner, "save_final_sae", save_final_sae)
    monkeypatch.setattr(SyntheticSAERunner, "_save_outputs", _save_outputs)
    assert not patches.installed()
    patches.install()
    assert patches.installed()
    wrapped = LanguageModelSAETrainingRunner.__dict__["save_final_sae"]
    assert patches.original_of(wrapped) is save_final_sae and wrapped.__name__ == "save_final_sae"
    patches.install()  # idempotent: no second layer
    assert LanguageModelSAETrainingRunner.__dict__["save_final_sae"] is wrapped

    holder = StandIn(gaussian_batches(5), training_tokens=10_000, train_batch_size_tokens=100)
    sae = make("mutual_choice")
    # the original writes into a hidden sibling that is switched into place whole (crash-consistent)
    assert LanguageModelSAETrainingRunner.save_final_sae(holder, sae, str(tmp_path / "out"), extra=1) == "lm saved"
    assert calls[-1][0] == "lm" and calls[-1][1].tokens == 400 and calls[-1][3] == 1
    assert re.match(r"^\.out\.[^.]+\.partial$", Path(calls[-1][2]).name) and (tmp_path / "out").is_dir()
    assert sae.threshold_tracker.is_calibrated  # calibrated before the original saved it
    sae = make("mutual_choice")
    LanguageModelSAETrainingRunner.save_final_sae(holder, sae=sae, output_path=str(tmp_path / "kw"))
    assert Path(calls[-1][2]).name.startswith(".kw.") and sae.threshold_tracker.is_calibrated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kw", "out"]
    sae = make("feature_choice")
    assert SyntheticSAERunner._save_outputs(holder, "syn", sae) == "synthetic saved"
    assert calls[-1][:1] == ("synthetic",) and calls[-1][1].architecture == "feature_choice"
    assert sae.threshold_tracker.is_calibrated

    # one method unwrapped is not "installed"; install() wraps it and leaves the other as it is
    monkeypatch.setattr(SyntheticSAERunner, "_save_outputs", _save_outputs)
    assert not patches.installed()
    patches.install()
    assert patches.installed() and LanguageModelSAETrainingRunner.__dict__["save_final_sae"] is wrapped
    patches.uninstall()
    assert LanguageModelSAETrainingRunner.__dict__["save_final_sae"] is save_final_sae
    assert SyntheticSAERunner.__dict__["_save_outputs"] is _save_outputs
    assert not patches.installed()
    patches.uninstall()  # nothing left to restore
    assert LanguageModelSAETrainingRunner.__dict__["save_final_sae"] is save_final_sae
    # uninstall also restored the redacting wraps (run, _set_sae_metadata, save_checkpoint) and the
    # store dispatch, which monkeypatch does not know about: put them back for the tests after this one
    patches.install()
    assert all(patches.original_of(cls.__dict__[name]) is not None for cls, name, _ in CR.runner_wraps())


def test_calibration_log_goes_to_stdout_and_the_package_logger(capsys, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="sae_allocators"):
        CR._log("Calibrated x")
    assert capsys.readouterr().out == "Calibrated x\n"
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("sae_allocators", logging.INFO, "Calibrated x")
    ]


def test_final_save_methods_without_the_synthetic_module(monkeypatch):
    """SAELens < 6.35 has no sae_lens.synthetic: only the LM runner's save is wrapped."""
    monkeypatch.setitem(sys.modules, "sae_lens.synthetic", None)  # makes the import fail
    assert [
        (cls.__name__, name) for cls, name, _ in CR.runner_wraps() if name in ("save_final_sae", "_save_outputs")
    ] == [("LanguageModelSAETrainingRunner", "save_final_sae")]


def identity_jumprelu(architecture: str = "feature_choice", d: int = 4):
    """A saved jumprelu whose pre-activations are its input (W_enc = I, no bias): exact counts."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    cfg = JumpReLUSAEConfig(d_in=d, d_sae=d)
    cfg.metadata.training_architecture = architecture
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_shares_rule_counts_features_with_fewer_values_than_their_target():
    sae = identity_jumprelu()
    x = -torch.ones(8, 4)
    x[:2, 0] = torch.tensor([1.0, 2.0])  # exactly its target of 2: not short
    x[:1, 1] = 3.0  # 1 < 2: short
    x[:, 2] = torch.arange(1.0, 9.0)
    x[:, 3] = torch.arange(1.0, 9.0) + 0.5
    res = CF.calibrate(sae, [x], 8, k=1.0, method="shares", shares=torch.ones(4))
    assert res.short_features == 1 and res.never_fired_features == 0
    counts = ((x > sae.threshold) & (x > 0)).sum(0)
    assert counts[:2].tolist() == [2, 1] and int(counts.sum()) == 8  # the missing one moved to feature 2 or 3
    assert res.achieved_l0 == 1.0


def test_a_feature_takes_at_most_the_room_of_the_one_pass_collector():
    """The pass keeps ceil(1.25 c_j) + 1 values per feature (memory ~ 1.25 k N): water-filling
    can give a feature at most ceil(1.25 c_j) entries, however many it has."""
    sae = identity_jumprelu()
    x = -torch.ones(8, 4)
    x[:, 3] = torch.arange(1.0, 9.0)  # features 0-2 never positive: their 6 entries look for a home
    res = CF.calibrate(sae, [x], 8, k=1.0, method="shares", shares=torch.ones(4))  # targets 2 each
    counts = ((x > sae.threshold) & (x > 0)).sum(0)
    assert counts.tolist() == [0, 0, 0, math.ceil(1.25 * 2)] and res.short_features == 3
    assert res.achieved_l0 == 3 / 8


@pytest.mark.parametrize("method", ["global", "scale", "shares"])
def test_nothing_positive_calibrates_to_l0_zero(method):
    sae = identity_jumprelu("mutual_choice" if method == "global" else "feature_choice")
    with torch.no_grad():
        sae.threshold.fill_(0.5)
    res = CF.calibrate(
        sae, [-torch.rand(8, 4) - 0.1], 8, k=1.0, method=None if method == "global" else method, shares=torch.ones(4)
    )
    assert res.achieved_l0 == 0.0 and res.l0_before == 0.0 and bool(torch.isfinite(sae.threshold).all())


def test_one_token_is_enough_when_k_allows():
    sae = make("mutual_choice")
    x = torch.randn(1, D, generator=torch.Generator().manual_seed(14))
    res = CF.calibrate(sae, [x], 1)
    assert res.tokens == 1 and res.achieved_l0 == K and int(brute_l0(sae, x).sum()) == K


def test_feature_choice_rule_comes_from_its_config():
    sae = make("feature_choice", calibration_rule="shares")
    res = CF.calibrate(sae, [torch.randn(300, D, generator=torch.Generator().manual_seed(15))], 300, apply=False)
    assert res.rule == "per_feature/shares" and res.shares.startswith("current capacities")
    assert CF.calibrate(sae, [torch.randn(300, D)], 300, method="scale", apply=False).rule == "per_feature/scale"


def test_never_fired_features_stay_silent_at_their_largest_value_or_zero():
    """Shares 2:0:1:0:1 of K = 8: feature 1 never fired in training and is never positive (theta 0),
    feature 3 never fired and has values (theta = its largest: silent), feature 4 has no data (its
    2 entries go to features 0 and 2 by their shares 2:1, largest remainder: 5 and 3)."""
    sae = identity_jumprelu(d=5)
    g = torch.Generator().manual_seed(16)
    x = -torch.ones(8, 5)
    x[:, 0] = torch.rand(8, generator=g) + 0.1
    x[:, 2] = torch.rand(8, generator=g) + 0.1
    x[:, 3] = torch.rand(8, generator=g) + 0.1
    res = CF.calibrate(sae, [x], 8, k=1.0, method="shares", shares=torch.tensor([2.0, 0.0, 1.0, 0.0, 1.0]))
    theta = sae.threshold.detach()
    assert float(theta[1]) == 0.0 and float(theta[4]) == 0.0 and float(theta[3]) == float(x[:, 3].max())
    counts = ((x > theta) & (x > 0)).sum(0)
    assert counts.tolist() == [5, 0, 3, 0, 0] and res.achieved_l0 == 1.0
    assert res.never_fired_features == 2 and res.short_features == 1


# --- calibrate's counts at the edges (survivors of the mutation run once calibrate was mutated) --


@pytest.mark.parametrize("method", ["global", "scale", "shares"])
def test_l0_before_counts_strictly_above_the_old_threshold_and_above_zero(method):
    """``l0_before`` is the saved JumpReLU rule's L0 with the old thresholds: an entry counts when
    pre > theta and pre > 0, so a value equal to theta, and a zero under a negative theta, do not."""
    sae = identity_jumprelu("mutual_choice" if method == "global" else "feature_choice")
    x = torch.tensor([[1.0, 0.0, 2.0, 0.5], [1.0, 3.0, 0.0, 1.0], [0.25, 1.0, 1.0, 0.0]])
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([1.0, -1.0, 1.0, -0.5]))
    # strictly above: row 0: 2.0 (f2), 0.5 (f3); row 1: 3.0 (f1), 1.0 (f3); row 2: 1.0 (f1) -> 5 of 3 tokens
    want = int(((x > sae.threshold) & (x > 0)).sum())
    assert want == 5
    res = CF.calibrate(
        sae, [x], 3, k=1.0, method=None if method == "global" else method, shares=torch.ones(4), apply=False
    )
    assert res.l0_before == want / 3


def test_l0_before_of_one_token_is_that_tokens_count():
    sae = identity_jumprelu("mutual_choice")
    with torch.no_grad():
        sae.threshold.fill_(0.5)
    res = CF.calibrate(sae, [torch.tensor([[1.0, 2.0, 0.25, 3.0]])], 1, k=1.0, apply=False)
    assert res.tokens == 1 and res.l0_before == 3.0


def test_a_budget_of_exactly_one_entry_calibrates():
    """floor(k * N) = 1 is a working budget (the error is for 0): one entry of the batch fires."""
    sae = identity_jumprelu("mutual_choice")
    x = torch.tensor([[0.5, 4.0, 1.0, 2.0], [3.0, 0.25, 1.5, 0.75]])
    res = CF.calibrate(sae, [x], 2, k=0.5)  # floor(0.5 * 2) = 1
    assert int(((x > sae.threshold) & (x > 0)).sum()) == 1 and res.achieved_l0 == 0.5
    assert bool((x[0, 1] > sae.threshold).all())  # the largest value is the one kept


def test_a_source_with_exactly_the_tokens_asked_gives_no_warning():
    sae = make("mutual_choice")
    x = torch.randn(300, D, generator=torch.Generator().manual_seed(21))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = CF.calibrate(sae, chunks(x, 100), 300)
    assert res.tokens == 300 and res.achieved_l0 == K


def test_per_feature_method_defaults_to_scale_for_a_saved_model_without_the_config_field():
    """A saved jumprelu's config has no ``calibration_rule``: the per-feature rule is ``scale``."""
    sae = identity_jumprelu("feature_choice")
    assert not hasattr(sae.cfg, "calibration_rule")
    with torch.no_grad():
        sae.threshold.fill_(1.0)
    res = CF.calibrate(
        sae, [torch.rand(16, 4, generator=torch.Generator().manual_seed(22)) * 2], 16, k=1.0, apply=False
    )
    assert res.rule == "per_feature/scale"


def test_shares_that_sum_to_one_or_less_are_fine():
    """Shares are relative: normalised ones (sum 1) or smaller ones give the same thresholds as counts."""
    sae = identity_jumprelu("feature_choice")
    x = torch.rand(40, 4, generator=torch.Generator().manual_seed(23))
    counts = CF.calibrate(sae, [x], 40, k=1.0, method="shares", shares=torch.tensor([4.0, 2.0, 1.0, 1.0]), apply=False)
    for shares in (torch.tensor([0.5, 0.25, 0.125, 0.125]), torch.tensor([0.2, 0.1, 0.05, 0.05])):
        res = CF.calibrate(sae, [x], 40, k=1.0, method="shares", shares=shares, apply=False)
        assert torch.equal(res.theta, counts.theta) and res.achieved_l0 == 1.0
