"""The benchmark harness: metric definitions, the config table, report writing and checking,
and one end-to-end run at a tiny scale (synthetic data + a random tiny HookedTransformer)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

import sae_allocators  # noqa: F401  registers the architectures
from sae_allocators.benchmark import check, configs, metrics, report
from sae_allocators.benchmark import claims as claims_mod

# Runs once in CI, at the newest SAELens (tests/run.sh): the benchmark harness (the main job's CI run is at the newest SAELens).
pytestmark = pytest.mark.saelens_independent

# --- metrics on known tensors -------------------------------------------------------------------


def test_explained_variance_and_nmse_definitions():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0): total variance 2, total norm 10
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0]])  # squared error 1
    assert metrics.explained_variance(x, x_hat) == pytest.approx(0.5)
    assert metrics.normalized_mse(x, x_hat) == pytest.approx(0.1)
    assert metrics.explained_variance(x, x) == 1.0
    assert metrics.normalized_mse(x, torch.zeros_like(x)) == pytest.approx(1.0)


def test_l0_counts_signed_codes_and_empty_tokens():
    codes = torch.tensor([[0.0, -2.0, 3.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 5.0]])
    l0 = metrics.token_l0(codes)
    assert l0.tolist() == [2, 0, 3, 1]
    s = metrics.l0_summary(l0)
    assert s["l0_mean"] == pytest.approx(1.5)
    assert s["l0_p50"] == pytest.approx(1.5)
    assert s["frac_empty_tokens"] == pytest.approx(0.25)
    assert s["l0_p99"] == pytest.approx(torch.quantile(torch.tensor([2.0, 0, 3, 1]), 0.99).item())


def test_dead_and_underused_fractions():
    density = torch.tensor([0.0, 0.5, 0.001, 0.2, 0.0, 0.3])
    assert metrics.never_fired_fraction(density) == pytest.approx(2 / 6)
    # l0_mean 1.0 over 6 latents: uniform share 1/6, threshold 1/60; only 0.001 is alive and below
    assert metrics.below_uniform_share_fraction(density, 1.0) == pytest.approx(1 / 6)


def test_zipf_fit_recovers_a_power_law():
    ranks = torch.arange(1, 201, dtype=torch.float64)
    density = 0.3 * ranks.pow(-1.3)
    shuffled = density[torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    fit = metrics.zipf_loglog_fit(torch.cat([shuffled, torch.zeros(10, dtype=torch.float64)]))
    assert fit["zipf_exponent"] == pytest.approx(1.3, abs=1e-9)
    assert fit["zipf_scale"] == pytest.approx(0.3, rel=1e-9)
    assert fit["zipf_r2"] == pytest.approx(1.0)
    assert math.isnan(metrics.zipf_loglog_fit(torch.tensor([0.0, 0.5]))["zipf_exponent"])


def test_ce_recovered_and_kl():
    assert metrics.ce_loss_recovered(2.0, 2.0, 6.0) == pytest.approx(1.0)
    assert metrics.ce_loss_recovered(2.0, 6.0, 6.0) == pytest.approx(0.0)
    assert metrics.ce_loss_recovered(2.0, 3.0, 6.0) == pytest.approx(0.75)
    logits = torch.randn(3, 5, 7)
    assert metrics.kl_divergence(logits, logits).abs().max() < 1e-12
    p = torch.tensor([[0.0, 0.0]])
    q = torch.tensor([[math.log(3.0), 0.0]])  # q = (3/4, 1/4), p = (1/2, 1/2)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert metrics.kl_divergence(p, q).item() == pytest.approx(expected)


def test_accumulator_matches_direct_definitions_over_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g) + 2.0
    codes = torch.relu(torch.randn(300, 16, generator=g) - 1.0)
    codes[:, 3] = 0  # one dead latent
    x_hat = x + 0.1 * torch.randn(300, 8, generator=g)
    acc = metrics.Accumulator(16)
    for i in range(0, 300, 128):
        acc.add(x[i : i + 128], x_hat[i : i + 128], codes[i : i + 128])
    r = acc.result()
    assert r["explained_variance"] == pytest.approx(metrics.explained_variance(x, x_hat), rel=1e-9)
    assert r["nmse"] == pytest.approx(metrics.normalized_mse(x, x_hat), rel=1e-9)
    assert r["l0_mean"] == pytest.approx(float((codes != 0).sum(-1).double().mean()))
    assert r["dead_fraction"] == pytest.approx(1 / 16)
    assert r["n_eval_tokens"] == 300
    with pytest.raises(FloatingPointError):
        acc.add(x[:2], torch.full_like(x[:2], float("nan")), codes[:2])


# --- the config table over the registry ----------------------------------------------------------


def _plan(name):
    return {p.label: p for p in configs.plan_architectures()}[name]


def test_plan_includes_baselines_and_ours_and_skips_other_saelens_builtins():
    plans = {p.label: p for p in configs.plan_architectures()}
    for name in ("topk", "batchtopk", "mutual_choice"):
        assert plans[name].skip_reason is None, name
    assert "L0 budget" in plans["standard"].skip_reason
    assert plans["batchtopk"].batch_level and plans["mutual_choice"].batch_level
    assert not plans["topk"].batch_level


def test_build_training_config_at_target_l0():
    ctx = configs.Context(d_in=16, d_sae=64, ks=(4, 8))
    topk = configs.build_training_config(_plan("topk"), 4.4, ctx)
    assert topk.architecture() == "topk" and topk.k == 4 and isinstance(topk.k, int)
    mc = configs.build_training_config(_plan("mutual_choice"), 4.5, ctx)
    assert mc.architecture() == "mutual_choice" and mc.k == 4.5
    assert (mc.d_in, mc.d_sae) == (16, 64)
    # entries for architectures built on other branches
    assert configs.KNOWN["top_afa"].fields(4, ctx) == {"k_max": 64}
    assert not configs.KNOWN["top_afa"].fixed_l0
    assert configs.KNOWN["feature_choice"].fields(3.5, ctx) == {"k": 3.5}
    assert configs.KNOWN["abstopk"].fields(3.6, ctx) == {"k": 4}


def test_unknown_plugin_is_trained_with_its_k_field_or_skipped_with_a_reason():
    from dataclasses import dataclass as dc

    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

    from sae_allocators import saelens_registry as reg

    @dc
    class WithK(TopKTrainingSAEConfig):
        @classmethod
        def architecture(cls):
            return "bench_test_with_k"

    @dc
    class WithoutK(StandardTrainingSAEConfig):
        @classmethod
        def architecture(cls):
            return "bench_test_without_k"

    class T1(TopKTrainingSAE):
        pass

    class T2(StandardTrainingSAE):
        pass

    reg.put(reg.TRAINING, "bench_test_with_k", (T1, WithK))
    reg.put(reg.TRAINING, "bench_test_without_k", (T2, WithoutK))
    try:
        plans = {p.label: p for p in configs.plan_architectures()}
        assert plans["bench_test_with_k"].skip_reason is None
        assert plans["bench_test_with_k"].config_fields(5.2, configs.Context(8, 16, (5.2,))) == {"k": 5}
        reason = plans["bench_test_without_k"].skip_reason
        assert "no `k` field" in reason and "KNOWN" in reason
        with pytest.raises(ValueError, match="not a registered training architecture"):
            configs.plan_architectures(["no_such_arch"])
    finally:
        reg.remove(reg.TRAINING, "bench_test_with_k")
        reg.remove(reg.TRAINING, "bench_test_without_k")


def test_aux_loss_variants_and_counterparts(monkeypatch):
    from dataclasses import dataclass as dc

    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from sae_allocators import saelens_registry as reg
    from sae_allocators.losses import registry as loss_registry

    @dc
    class WithAux(TopKTrainingSAEConfig):
        aux_loss: str = "zipf"

        @classmethod
        def architecture(cls):
            return "bench_test_aux"

    class T(TopKTrainingSAE):
        pass

    monkeypatch.setattr(loss_registry, "available", lambda: ["auxk", "none", "zipf"])
    monkeypatch.setitem(configs.KNOWN, "bench_test_aux", configs.Entry(configs._int_k, aux_variants=("auxk", "nope")))
    reg.put(reg.TRAINING, "bench_test_aux", (T, WithAux))
    try:
        plans = [p for p in configs.plan_architectures() if p.name == "bench_test_aux"]
        assert [p.label for p in plans] == ["bench_test_aux", "bench_test_aux[aux=auxk]"]
        assert plans[1].config_fields(4, configs.Context(8, 16, (4,))) == {"k": 4, "aux_loss": "auxk"}
        assert plans[0].auxk_counterpart == "bench_test_aux[aux=auxk]" and plans[1].auxk_counterpart is None
    finally:
        reg.remove(reg.TRAINING, "bench_test_aux")
    assert configs.KNOWN["topk_zipf"].auxk_counterpart == "topk"
    assert configs.KNOWN["mutual_choice"].auxk_counterpart == "batchtopk"


# --- report and checker --------------------------------------------------------------------------


def _record(label, k, seed, nmse, l0, dead=0.0, arch=None, fixed=True, batch=False, **extra):
    r = {
        "dataset": "synthetic",
        "architecture": arch or label,
        "label": label,
        "provider": "x",
        "k_target": k,
        "fixed_l0": fixed,
        "batch_level": batch,
        "seed": seed,
        "run": f"synthetic/{label}/k{k if k is not None else 8:g}/seed{seed}",
        "config_fields": {"k": k},
        "l0_mean": l0,
        "l0_p50": l0,
        "l0_p99": l0 + 1,
        "frac_empty_tokens": 0.0,
        "explained_variance": 1 - nmse,
        "nmse": nmse,
        "dead_fraction": dead,
        "underused_fraction": 0.01,
        "mcc": 0.8,
        "step_seconds": 0.01,
        "train_mode_l0_mean": l0,
        "train_mode_nmse": nmse,
        "l0_drift": 0.0,
        "zipf_exponent": 1.0,
        "zipf_scale": 0.1,
        "train_seconds": 1.0,
        "inference_architecture": "topk",
    }
    r.update(extra)
    return r


def _meta():
    return {
        "command_settings": {"quick": True},
        "sources": [
            {
                "kind": "synthetic",
                "name": "synthetic",
                "training_tokens": 10,
                "train_batch_size": 2,
                "d_in": 4,
                "d_sae": 8,
                "lr": 1e-3,
                "dead_feature_window_steps": 5,
                "eval_tokens": 10,
                "true_l0": 2.0,
            }
        ],
        "seeds": {"synthetic": 2},
        "ks": {"synthetic": [4, 8]},
        "plans": [],
        "failures": [],
        "environment": {
            "device": "cpu",
            "cpu_threads": 2,
            "platform": "test",
            "torch": "t",
            "sae_lens": "s",
            "transformer_lens": "t",
        },
        "wall_seconds": 1.0,
    }


def _records():
    recs = []
    for seed in (0, 1):
        for k, base in ((4, 0.30), (8, 0.20)):
            recs.append(_record("topk", k, seed, base + 0.01 * seed, k, dead=0.05))
            recs.append(_record("feature_choice", k, seed, base - 0.05, k, batch=True, train_mode_nmse=base - 0.05))
            recs.append(
                _record("mutual_choice", k, seed, base + 0.05, k, dead=0.1, batch=True, train_mode_nmse=base + 0.05)
            )
            recs.append(_record("topk_zipf", k, seed, base, k, dead=0.0, aux_loss="zipf", auxk_counterpart="topk"))
        recs.append(_record("top_afa", None, seed, 0.25, 5.7, fixed=False, config_fields={"k_max": 128}))
    return recs


def test_claims_are_stated_from_the_numbers():
    claims = {c["claim"]: c for c in claims_mod.check_claims(claims_mod.aggregate(_records()))}
    assert claims["Feature Choice reaches zero dead features"]["status"] == "holds in these runs"
    fm = claims["Feature and Mutual Choice reconstruct better than TopK at equal L0"]
    assert fm["status"].startswith("mixed")  # FC better, MC worse
    assert any("mutual_choice" in e and "not lower" in e for e in fm["evidence"])
    afa = claims["top-AFA matches TopK without tuning k"]
    # TopK at L0 5.7 interpolated in log L0 between (4, 0.305) and (8, 0.205): about 0.254
    assert afa["status"] == "holds in these runs", afa
    zipf = claims["aux_zipf leaves fewer dead and under-used features than AuxK"]
    assert zipf["status"] == "holds in these runs"  # topk_zipf: 0% + 1% vs topk: 5% + 1%
    assert len(zipf["evidence"]) == 2


def test_report_is_written_and_checked(tmp_path):
    recs = _records()
    curves = {r["run"]: {"density": [0.5, 0.1, 0.0, 0.01], "l0_hist": [0, 1, 3, 2]} for r in recs}
    report.write(tmp_path, _meta(), recs, curves)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert len(doc["runs"]) == len(recs)
    md = (tmp_path / "report.md").read_text()
    assert "| feature_choice | 4 |" in md and "Definitions" in md and "normalised MSE" in md
    assert check.problems(tmp_path) == []
    if importlib.util.find_spec("matplotlib"):  # the `report` extra (tests/run.sh installs it)
        assert {"frontier_synthetic.png", "density_synthetic.png", "l0_hist_synthetic.png"} <= set(doc["plots"])
        assert all((tmp_path / p).stat().st_size > 1000 for p in doc["plots"])
    assert check.main([str(tmp_path)]) == 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"nmse": float("nan")}, "not finite"),
        ({"train_mode_l0_mean": 4.5}, "exceeds the budget"),
        ({"l0_mean": 9.0}, "exceeds 2 x k"),
        ({"dead_fraction": 1.5}, "outside [0, 1]"),
    ],
)
def test_checker_rejects_insane_figures(tmp_path, change, message):
    recs = _records()
    recs[0].update(change)
    report.write(tmp_path, _meta(), recs, {})
    found = check.problems(tmp_path)
    assert any(message in p for p in found), found
    assert check.main([str(tmp_path)]) == 1


def test_checker_rejects_missing_report(tmp_path):
    assert check.problems(tmp_path)[0].startswith("missing")
    assert check.main([]) == 2


# --- end to end, tiny --------------------------------------------------------------------------


def test_end_to_end_tiny_run(tmp_path):
    from sae_allocators.benchmark import lm_data
    from sae_allocators.benchmark.run import run
    from sae_allocators.benchmark.settings import Settings
    from sae_allocators.benchmark.lm_source import LMScale
    from sae_allocators.benchmark.synthetic_source import SyntheticScale

    st = Settings(
        out=tmp_path / "report",
        seeds=1,
        synthetic_ks=(2, 4),
        lm_ks=(8,),
        synthetic=SyntheticScale(
            num_features=32,
            hidden_dim=16,
            d_sae=32,
            min_prob=0.02,
            training_samples=300 * 64,
            batch_size=64,
            eval_samples=1024,
            dead_feature_window=20,
        ),
        lm=LMScale(
            hook_layer=1,
            expansion=2,
            training_tokens=300 * 64,
            train_batch_size=64,
            eval_sequences=8,
            ce_eval_sequences=4,
            dead_feature_window=20,
            store_batch_size_prompts=8,
            norm_estimate_batches=2,
        ),
        archs=["topk", "mutual_choice"],
        lm_data=lambda: lm_data.tiny_lm_data(context_size=16, n_rows=128, n_eval=8),
    )
    out = run(st)
    doc = json.loads((out / "report.json").read_text())
    assert doc["meta"]["failures"] == []
    runs = doc["runs"]
    assert {(r["dataset"], r["label"]) for r in runs} == {
        (d, a) for d in ("synthetic", "lm") for a in ("topk", "mutual_choice")
    } | {("lm", "mutual_choice[guard=off]")}  # the outlier guard off: on the LM only (synthetic rows have no outliers)
    for r in runs:
        assert r["inference_architecture"] == ("topk" if r["label"] == "topk" else "jumprelu")
        if r["label"] == "topk":
            assert r["l0_mean"] == pytest.approx(r["k_target"])
    # the step-time ratio: each run's step time over TopK's at the same dataset, k and seed
    topk_step = {(r["dataset"], r["k_target"], r["seed"]): r["step_seconds"] for r in runs if r["label"] == "topk"}
    for r in runs:
        assert r["step_seconds"] > 0
        assert r["step_time_vs_topk"] == pytest.approx(
            r["step_seconds"] / topk_step[(r["dataset"], r["k_target"], r["seed"])], rel=1e-9
        )
    syn = [r for r in runs if r["dataset"] == "synthetic"]
    assert all(0 <= r["mcc"] <= 1 for r in syn)
    lm = [r for r in runs if r["dataset"] == "lm"]
    assert all("ce_loss_recovered" in r and r["kl_div"] >= 0 for r in lm)
    assert doc["meta"]["sources"][1]["activation_cache_seconds"] is not None  # computed once...
    assert not (out / "saes").exists()  # trained SAEs are removed unless --keep-saes
    assert check.problems(out) == []
