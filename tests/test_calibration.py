"""The threshold tracker, its guards, and calibration of the saved thresholds (issue 12).

Calibration (sae_allocators.calibration) is checked against brute force on Gaussian data, with
repeated rows (what a real LM yields), under chunking, for never-fired and short features; then end
to end through SAELens's runner, with the calibrated export loaded by plain SAELens in a fresh
interpreter, and through `sae-allocators calibrate`.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

import sae_allocators  # noqa: F401
from sae_allocators import calibration as C
from sae_allocators.architectures._common import pre_activations
from sae_allocators.architectures.batchtopk_zipf import BatchTopKZipfTrainingSAE, BatchTopKZipfTrainingSAEConfig
from sae_allocators.architectures.feature_choice import FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig
from sae_allocators.architectures.mutual_choice import MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig
from sae_allocators.testing import TINY_HOOK, run_fresh, runner_config, tiny_dataset, tiny_model
from sae_allocators.thresholds import require_budget, smallest_working_batch

D, F, K = 16, 64, 4.0

TRAINING = {
    "mutual_choice": (MutualChoiceTrainingSAE, lambda **kw: MutualChoiceTrainingSAEConfig(**{"d_in": D, "d_sae": F, "k": K, "topk_threshold_lr": 0.1, **kw})),
    "feature_choice": (FeatureChoiceTrainingSAE, lambda **kw: FeatureChoiceTrainingSAEConfig(**{"d_in": D, "d_sae": F, "k": K, "threshold_lr": 0.1, **kw})),
    "batchtopk_zipf": (BatchTopKZipfTrainingSAE, lambda **kw: BatchTopKZipfTrainingSAEConfig(**{"d_in": D, "d_sae": F, "k": K, "topk_threshold_lr": 0.1, **kw})),
}


def make(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    cls, cfg = TRAINING[name]
    return cls(cfg(**kw))


def step(sae, x: torch.Tensor):
    return sae.training_forward_pass(
        TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=torch.zeros(sae.cfg.d_sae, dtype=torch.bool), n_training_steps=0, is_logging_step=False)
    )


def brute_l0(sae, x: torch.Tensor) -> torch.Tensor:
    """Per-feature firing counts of the saved JumpReLU rule, by brute force."""
    pre = pre_activations(sae, x)
    theta = C.current_thresholds(sae).to(pre.dtype)
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
    assert int((out.feature_acts != 0).sum()) >= 1 and bool(torch.isfinite(C.current_thresholds(sae)).all())


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
        fwd(TrainStepInput(sae_in=b, coefficients={}, dead_neuron_mask=torch.zeros(F, dtype=torch.bool), n_training_steps=0, is_logging_step=False))
    value = eager.threshold_tracker.value_name
    assert float(getattr(compiled, value).abs().sum()) > 0
    assert torch.allclose(getattr(compiled, value), getattr(eager, value))
    assert torch.equal(compiled.threshold_tracker.steps, eager.threshold_tracker.steps)


# --- calibration against brute force -------------------------------------------------------------


@pytest.mark.parametrize("name", ["mutual_choice", "batchtopk_zipf"])
@pytest.mark.parametrize("repeated", [False, True])
def test_global_calibration_gives_mean_l0_k_exactly(name, repeated):
    sae = make(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3001, D, generator=g)
    if repeated:  # an LM's sequence-start token: many identical rows
        x[torch.randperm(3001, generator=g)[:300]] = x[0].clone()
    res = C.calibrate(sae, chunks(x, 128), 3001)
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
    thetas = [C.calibrate(sae, chunks(x, size), 2000, apply=False, method="shares").theta for size in (2000, 97, 7)]
    assert torch.equal(thetas[0], thetas[1]) and torch.equal(thetas[0], thetas[2])


def test_per_feature_calibration_reproduces_the_training_shares():
    sae = make("feature_choice")
    shares = torch.rand(F, generator=torch.Generator().manual_seed(4))
    shares[:4] = 0  # never fired in training
    sae.feature_density.copy_(shares)
    sae.density_steps.fill_(10)
    n = 4000
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(5))
    res = C.calibrate(sae, chunks(x, 256), n, method="shares")
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
    res = C.calibrate(sae, chunks(x, 200), n)  # the default rule
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
    res = C.calibrate(sae, chunks(x, 300), n, method="shares")
    counts = brute_l0(sae, x)
    assert res.short_features == 8 and int(counts[:8].sum()) == int((pre_activations(sae, x)[:, :8] > 0).sum())
    assert int(counts.sum()) == math.floor(K * n)


def test_a_training_step_after_calibration_returns_to_the_running_thresholds():
    sae = make("mutual_choice")
    C.calibrate(sae, chunks(torch.randn(500, D), 100), 500)
    assert sae.threshold_tracker.is_calibrated
    step(sae, torch.randn(64, D))
    assert not sae.threshold_tracker.is_calibrated


def test_calibration_refuses_what_it_cannot_calibrate():
    from sae_allocators.architectures.topk_zipf import TopKZipfTrainingSAE, TopKZipfTrainingSAEConfig

    with pytest.raises(ValueError, match="calibration is defined for"):
        C.calibrate(TopKZipfTrainingSAE(TopKZipfTrainingSAEConfig(d_in=D, d_sae=F, k=4)), [torch.randn(10, D)], 10)
    with pytest.raises(ValueError, match="budget"):
        C.calibrate(make("mutual_choice", k=0.01), [torch.randn(10, D)], 10)
    with pytest.raises(ValueError, match="calibration_tokens"):
        TRAINING["mutual_choice"][1](calibration_tokens=0)


def test_default_tokens_rule():
    assert C.default_tokens(1_000_000, 4096) == 20_000  # 2 %
    assert C.default_tokens(10_000, 512) == 2048  # at least 4 batches
    assert C.default_tokens(10**10, 4096) == C.MAX_TOKENS


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
        runner = LanguageModelSAETrainingRunner(rc, override_model=model, override_dataset=tiny_dataset(n_rows=512, context_size=16))
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

    wrapped = LanguageModelSAETrainingRunner.__dict__["save_final_sae"]
    assert C.installed() and getattr(wrapped, C._MARK, None) is not None
    C.install()  # idempotent: no second layer
    assert LanguageModelSAETrainingRunner.__dict__["save_final_sae"] is wrapped
    try:
        C.uninstall()
        assert not C.installed()
        original = LanguageModelSAETrainingRunner.__dict__["save_final_sae"]
        assert getattr(original, C._MARK, None) is None and original is getattr(wrapped, C._MARK)
    finally:
        C.install()
    assert C.installed()


def test_runner_calibration_uses_the_chosen_source_and_respects_calibrate_false():
    from types import SimpleNamespace

    torch.manual_seed(3)
    held = [torch.randn(256, D) for _ in range(4)]
    for calibrate in (True, False):
        sae = make("mutual_choice", calibrate=calibrate, calibration_tokens=1024)
        runner = SimpleNamespace(cfg=SimpleNamespace(training_tokens=10**6, train_batch_size_tokens=256), calibration_batches=iter(held))
        res = C.calibrate_runner_sae(runner, sae)
        assert runner.calibration_result is res
        if not calibrate:
            assert res is None
            continue
        assert res.tokens == 1024
        pooled = torch.cat(held)
        l0 = ((pre_activations(sae, pooled) > C.current_thresholds(sae).to(pooled.dtype)) & (pre_activations(sae, pooled) > 0)).sum() / pooled.shape[0]
        assert abs(float(l0) - K) < 1e-6  # the global rule is exact on the calibration set
    with pytest.raises(ValueError, match="calibration_batches"):
        C.calibrate_runner_sae(SimpleNamespace(cfg=SimpleNamespace(training_tokens=1, batch_size=1)), make("mutual_choice"))


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
    # without calibration the same short run saves thresholds far from k
    held = calibrated_run["feature_choice_off"][3]
    l0_off = float((SAE.load_from_disk(calibrated_run["feature_choice_off"][1]).encode(held) != 0).sum(-1).float().mean())
    print("OFF", l0_off)
    assert abs(l0_off / 4.0 - 1) > 0.3, l0_off


def test_calibrate_command_on_a_saved_folder(calibrated_run, tmp_path, capsys):
    from sae_allocators.cli import main

    folder = calibrated_run["feature_choice_off"][1]
    model = tiny_model(d_model=32)
    argv = [
        "calibrate", str(folder), "--calibration_tokens", "1024", "--output", str(tmp_path / "cal"), "--feature_rule", "shares",
        "--model_name", "tiny-random", "--hook_name", TINY_HOOK, "--dataset_path", "", "--is_dataset_tokenized", "True",
        "--streaming", "False", "--context_size", "16", "--train_batch_size_tokens", "64", "--store_batch_size_prompts", "4",
        "--n_batches_in_buffer", "4", "--device", "cpu",
    ]
    from sae_allocators.workflow import calibrate as cmd

    rc = cmd.main(argv[1:], override_model=model, override_dataset=tiny_dataset(n_rows=128, context_size=16, seed=7))
    assert rc == 0
    assert "Calibrated feature_choice (per_feature/shares rule) on 1024 tokens" in capsys.readouterr().out
    meta = json.loads((tmp_path / "cal" / "cfg.json").read_text())["metadata"]["calibration"]
    assert meta["tokens"] == 1024 and abs(meta["achieved_l0"] - 4.0) < 0.1 and "sparsity.safetensors" in meta["shares"]
    assert "calibration" not in json.loads((folder / "cfg.json").read_text())["metadata"]  # --output: original untouched
    assert main(["calibrate", str(folder)]) == 2  # no data options: a clear error, not a download
