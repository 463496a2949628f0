"""gradient_topk: the selection rule, the SAE shells, and training through SAELens's runner."""

from __future__ import annotations

import copy

import glob
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

import sae_allocators  # noqa: F401
from sae_allocators.allocation.gradient import gradient_topk, normalize_grad
from sae_allocators.architectures.gradient_topk import (
    GradientTopKSAE,
    GradientTopKTrainingSAE,
    GradientTopKTrainingSAEConfig,
)
from sae_allocators.gradient import GradientActivationsStore
from sae_allocators.testing import run_fresh, runner_config, tiny_dataset, tiny_model
from helpers import codes

D = 32


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- the pure rule ------------------------------------------------------------------------------


def test_no_gradient_or_beta_zero_is_topk():
    from sae_lens.saes.topk_sae import TopK

    pre, g, dec = _rand(3, 5, 64), _rand(3, 5, 16, seed=1), _rand(64, 16, seed=2)
    expected = TopK(8)(pre)
    torch.testing.assert_close(gradient_topk(pre, None, dec, 8, beta=2.0), expected)
    torch.testing.assert_close(gradient_topk(pre, g, dec, 8, beta=0.0), expected)


def test_selection_is_topk_of_score_values_from_z():
    pre, g, dec = _rand(50, 64), _rand(50, 16, seed=1), _rand(64, 16, seed=2)
    beta, k = 3.0, 6
    out = gradient_topk(pre, g, dec, k, beta=beta, grad_normalization="none")
    z = pre.relu()
    score = z + beta * z * (g @ dec.T).abs()
    expected_idx = score.topk(k, dim=-1).indices
    expected = torch.zeros_like(z).scatter_(-1, expected_idx, z.gather(-1, expected_idx))
    torch.testing.assert_close(out, expected)
    # and it differs from plain TopK on this data (the gradient matters)
    assert not torch.equal(out != 0, gradient_topk(pre, None, dec, k, beta=beta) != 0)


@pytest.mark.parametrize(
    "pre_dtype, dec_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
)
def test_the_selection_ranks_by_exactly_gradient_scores(pre_dtype, dec_dtype):
    # gradient_topk_indices builds the scores in place (less memory); they must be gradient_scores' floats,
    # also when codes and decoder differ in dtype (then it uses gradient_scores itself)
    from sae_allocators.allocation.gradient import (
        gradient_attribution,
        gradient_scores,
        gradient_topk_indices,
        scores_in_place,
    )

    pre, g, dec = _rand(300, 512).to(pre_dtype), _rand(300, 16, seed=1), _rand(512, 16, seed=2).to(dec_dtype)
    g = g.to(dec_dtype)
    for beta in (0.0, 0.37, 3.0):
        scores = gradient_scores(pre.relu(), gradient_attribution(g, dec), beta)
        assert torch.equal(scores_in_place(pre.relu(), g, dec, beta), scores)
        idx, _ = gradient_topk_indices(pre, g, dec, 7, beta)
        if beta:
            assert torch.equal(idx, torch.topk(scores, k=7, dim=-1, sorted=False).indices)


def test_gradient_promotes_a_loss_relevant_feature():
    dec = torch.eye(4)
    pre = torch.tensor([[1.0, 0.9, 0.1, 0.0]])
    g = torch.tensor([[0.0, 1.0, 0.0, 0.0]])  # the loss moves along feature 1 only
    assert gradient_topk(pre, g, dec, 1, beta=0.0).nonzero().tolist() == [[0, 0]]
    out = gradient_topk(pre, g, dec, 1, beta=0.5, grad_normalization="none")
    assert out.nonzero().tolist() == [[0, 1]] and out[0, 1] == 0.9  # value from z, not the score


def test_normalizations():
    g = _rand(10, 16)
    scales = torch.rand(10, 1, generator=torch.Generator().manual_seed(5)) + 0.1
    torch.testing.assert_close(normalize_grad(g * scales, "token"), normalize_grad(g, "token"))
    torch.testing.assert_close(normalize_grad(g * 7.0, "batch"), normalize_grad(g, "batch"))
    assert normalize_grad(g, "batch").norm(dim=-1).mean().item() == pytest.approx(1.0, rel=1e-5)
    torch.testing.assert_close(normalize_grad(g, "none"), g)
    with pytest.raises(ValueError, match="grad_normalization"):
        normalize_grad(g, "rms")


def test_gradients_flow_to_values_only():
    pre = _rand(4, 32).requires_grad_(True)
    g = _rand(4, 8, seed=1).requires_grad_(True)
    dec = _rand(32, 8, seed=2).requires_grad_(True)
    gradient_topk(pre, g, dec, 3, beta=1.0).sum().backward()
    assert pre.grad is not None and int((pre.grad != 0).sum()) == 4 * 3
    assert g.grad is None and dec.grad is None


# ---- the SAE shells ---------------------------------------------------------------------------------


def _sae(beta=1.0, **kw):
    torch.manual_seed(0)
    sae = GradientTopKTrainingSAE(GradientTopKTrainingSAEConfig(d_in=D, d_sae=64, k=4, beta=beta, **kw))
    with torch.no_grad():
        sae.b_dec.normal_()  # non-trivial
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)  # decoder norms != 1 to exercise the rescaling
    return sae


def _step_input(rows):
    from sae_lens.saes.sae import TrainStepInput

    return TrainStepInput(
        sae_in=rows,
        coefficients={},
        dead_neuron_mask=torch.zeros(64, dtype=torch.bool),
        n_training_steps=0,
        is_logging_step=False,
    )


def test_training_forward_pass_splits_packed_rows():
    sae = _sae(beta=4.0)
    x, g = _rand(20, D), _rand(20, D, seed=1)
    out = sae.training_forward_pass(_step_input(torch.cat([x, g], -1)))
    assert out.sae_in.shape == (20, D) and torch.equal(out.sae_in, x)
    torch.testing.assert_close(codes(out), sae.encode(x, grad=g))
    assert not torch.equal(codes(out) != 0, sae.encode(x) != 0)  # g changed the selection
    assert 0 < float(out.metrics["gradient_selection_changed"]()) <= 1
    # the rule, with the decoder directions the SAE decodes with (unit rows: rescaled decoder)
    pre = out.hidden_pre
    dirs = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(codes(out), gradient_topk(pre, g, dirs, 4, 4.0, "batch"))


@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "norescale"])
def test_a_wide_sae_selects_through_the_screen_and_keeps_the_reference_codes(monkeypatch, rescale):
    """d_sae 8192: the step's selection goes through the exact bfloat16 screen (forced on here, as on
    a CPU or GPU with bfloat16 kernels) and keeps what the float32 reference keeps, on the SAE's own
    decoder directions (unit rows when rescaling)."""
    from sae_lens.saes.sae import TrainStepInput

    from sae_allocators.allocation import gradient as G

    screened, real = [], G.screened_topk_indices
    monkeypatch.setattr(G, "screen_applies", lambda *a: True)
    monkeypatch.setattr(G, "screened_topk_indices", lambda *a, **kw: screened.append(kw) or real(*a, **kw))
    torch.manual_seed(0)
    cfg = GradientTopKTrainingSAEConfig(d_in=D, d_sae=8192, k=16, beta=2.0, rescale_acts_by_decoder_norm=rescale)
    sae = GradientTopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(8192, 1) + 0.5)
    x, g = _rand(64, D), _rand(64, D, seed=1)
    x[1:4] = x[0]  # repeated rows, as sequence starts give
    out = sae.training_forward_pass(
        TrainStepInput(
            sae_in=torch.cat([x, g], -1),
            coefficients={},
            dead_neuron_mask=torch.zeros(8192, dtype=torch.bool),
            n_training_steps=0,
            is_logging_step=False,
        )
    )
    assert screened and screened[0]["unit_rows"] is rescale
    idx, keep = G.gradient_topk_indices(
        out.hidden_pre.detach(), g, sae.W_dec.detach(), 16, 2.0, "batch", screen=False, unit_rows=rescale
    )
    expected = torch.zeros(64, 8192, dtype=torch.bool).scatter_(-1, idx, keep)
    assert torch.equal(codes(out) != 0, expected)


def test_training_forward_pass_without_gradient_is_topk_and_warns_once():
    sae = _sae()
    x = _rand(20, D)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = sae.training_forward_pass(_step_input(x))
        sae.training_forward_pass(_step_input(x))
    assert sum("without gradients" in str(m.message) for m in w) == 1
    torch.testing.assert_close(codes(out), sae.encode(x))


def test_plain_batches_after_training_on_gradients_do_not_warn():
    """The main job times a training step of the trained gradient_topk on plain evaluation batches
    (benchmark.evaluation.step_seconds): no "without gradients" warning there, nor for eval-mode or
    no-grad steps; a fresh SAE trained on plain batches still warns (once)."""
    x, g = _rand(20, D), _rand(20, D, seed=1)
    sae = _sae(beta=4.0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        sae.training_forward_pass(_step_input(torch.cat([x, g], -1)))  # trained on [x | g] rows
        sae.training_forward_pass(_step_input(x))  # then a plain batch: an evaluation
        fresh = _sae(beta=4.0)
        fresh.eval()
        fresh.training_forward_pass(_step_input(x))
        fresh.train()
        with torch.no_grad():
            fresh.training_forward_pass(_step_input(x))
    assert [str(m.message) for m in w if "without gradients" in str(m.message)] == []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fresh.training_forward_pass(_step_input(x))  # a training step on plain batches: the warning
    assert sum("without gradients" in str(m.message) for m in w) == 1


def test_bad_rows():
    sae = _sae()
    with pytest.raises(ValueError, match="width 33"):
        sae.training_forward_pass(_step_input(_rand(4, D + 1)))
    rows = torch.cat([_rand(4, D), _rand(4, D)], -1)
    rows[1, D + 3] = float("nan")
    with pytest.raises(ValueError, match="1 NaN"):
        sae.training_forward_pass(_step_input(rows))


def test_aux_loss_is_selectable():
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    rows = torch.cat([_rand(40, D), _rand(40, D, seed=1)], -1)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    step = _step_input(rows)
    step.dead_neuron_mask = dead
    losses = {}
    for name in ("auxk", "zipf", "none"):
        sae = _sae(aux_loss=name)
        losses[name] = sae.training_forward_pass(step).losses["auxiliary_reconstruction_loss"]
    assert losses["none"] == 0 and losses["auxk"] > 0 and losses["zipf"] > 0
    # "auxk" is SAELens's TopK auxiliary loss, computed on the activation half of the rows
    sae = _sae(aux_loss="auxk")
    out = sae.training_forward_pass(step)
    ref = TopKTrainingSAE.calculate_topk_aux_loss(
        sae, sae_in=rows[:, :D], sae_out=out.sae_out, hidden_pre=out.hidden_pre, dead_neuron_mask=dead
    )
    torch.testing.assert_close(out.losses["auxiliary_reconstruction_loss"], ref)
    with pytest.raises(ValueError, match="aux_loss"):
        GradientTopKTrainingSAEConfig(d_in=D, d_sae=64, k=4, aux_loss="nope")
    assert issubclass(GradientTopKTrainingSAEConfig, TopKTrainingSAEConfig)


@pytest.mark.parametrize(
    "field,value",
    [
        ("beta", -1.0),
        ("beta", float("nan")),
        ("grad_normalization", "rms"),
        ("k", 0),
        ("k", 65),
        ("normalize_activations", "layer_norm"),
    ],
)
def test_config_errors(field, value):
    with pytest.raises(ValueError, match=field):
        GradientTopKTrainingSAEConfig(**{"d_in": D, "d_sae": 64, "k": 4, field: value})


# ---- through SAELens's runner ---------------------------------------------------------------------


def _runner(sae_cfg, steps=12, **overrides):
    from sae_lens import LanguageModelSAETrainingRunner

    cfg = runner_config(sae_cfg, steps=steps, **overrides)
    return LanguageModelSAETrainingRunner(
        cfg, override_model=tiny_model(d_model=D), override_dataset=tiny_dataset(context_size=cfg.context_size)
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real run: plain SAELens runner, evals on (wandb disabled), a checkpoint, final output."""
    from sae_lens import LoggingConfig
    import sae_lens.llm_sae_training_runner as llm_runner

    tmp = tmp_path_factory.mktemp("gtopk")
    eval_results = []
    real_run_evals = llm_runner.run_evals

    def recording_run_evals(*args, **kwargs):
        result = real_run_evals(*args, **kwargs)
        eval_results.append((kwargs["sae"], result[0]))
        return result

    llm_runner.run_evals = recording_run_evals
    try:
        runner = _runner(
            GradientTopKTrainingSAEConfig(d_in=D, d_sae=64, k=4, beta=2.0),
            steps=12,
            output_path=tmp / "out",
            checkpoint_path=str(tmp / "ckpt"),
            n_checkpoints=1,
            logger=LoggingConfig(
                log_to_wandb=True, wandb_log_frequency=5, eval_every_n_wandb_logs=1, log_weights_to_wandb=False
            ),
        )
        store = runner.activations_store
        sae = runner.run()
    finally:
        llm_runner.run_evals = real_run_evals
    return dict(runner=runner, store=store, sae=sae, out=tmp / "out", ckpt=tmp / "ckpt", evals=eval_results)


def test_plain_runner_trains_with_the_gradient_store(trained):
    assert type(trained["store"]) is GradientActivationsStore
    assert isinstance(trained["sae"], GradientTopKTrainingSAE)
    assert all(p.grad is None for p in trained["runner"].model.parameters())


def test_evals_ran_on_plain_activations(trained):
    assert len(trained["evals"]) >= 2
    for sae, metrics in trained["evals"]:
        assert isinstance(sae, GradientTopKTrainingSAE)
        perf = metrics["model_performance_preservation"]
        assert torch.isfinite(torch.tensor(perf["ce_loss_with_sae"]))
        assert metrics["sparsity"]["l0"] == pytest.approx(4.0)


def test_saved_sae_loads_as_topk_with_plain_saelens(trained, tmp_path):
    code = f"""
        import sys, json, torch
        from sae_lens import SAE
        sae = SAE.load_from_disk({str(trained["out"])!r})
        x = torch.load({str(tmp_path / "x.pt")!r})
        print(json.dumps(dict(cls=type(sae).__name__, arch=sae.cfg.architecture(),
                              ours='sae_allocators' in sys.modules,
                              training=sae.cfg.metadata.training_architecture,
                              codes=sae.encode(x).tolist())))
    """
    x = _rand(6, D)
    torch.save(x, tmp_path / "x.pt")  # not into the shared output folder
    # autoload off: in an installed environment the .pth hook would import this package
    proc = run_fresh(
        code, python=sys.executable, env={"PYTHONPATH": "", "SAE_ALLOCATORS_NO_AUTOLOAD": "1"}, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["cls"] == "TopKSAE" and res["arch"] == "topk" and res["ours"] is False
    assert res["training"] == "gradient_topk"
    # the loaded topk SAE encodes as the training SAE does without a gradient
    sae = copy.deepcopy(trained["sae"]).eval()  # the shared fixture stays in training mode
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(res["codes"]), sae.encode(x), rtol=1e-5, atol=1e-5)


def test_gradient_aware_encode_after_loading(trained):
    from sae_lens import SAE

    loaded = SAE.load_from_disk(str(trained["out"]))
    gsae = GradientTopKSAE.from_topk(loaded, beta=2.0, grad_normalization="batch")
    x, g = _rand(30, D), _rand(30, D, seed=1) * 10
    with torch.no_grad():
        torch.testing.assert_close(gsae.encode(x, grad=g), trained["sae"].encode(x, grad=g), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gsae.encode(x), loaded.encode(x))


def test_resume_from_checkpoint_uses_the_gradient_store(trained, tmp_path):
    ckpts = [
        p
        for p in glob.glob(str(trained["ckpt"] / "*" / "*"))
        if Path(p, "activations_store_state.safetensors").exists()
    ]
    assert ckpts, "the run saved a checkpoint"
    ckpt = sorted(ckpts)[0]
    with open(Path(ckpt) / "cfg.json") as f:
        assert json.load(f)["architecture"] == "gradient_topk"
    runner = _runner(
        GradientTopKTrainingSAEConfig(d_in=D, d_sae=64, k=4, beta=2.0),
        steps=12,
        resume_from_checkpoint=ckpt,
        output_path=tmp_path / "resumed",
    )
    assert type(runner.activations_store) is GradientActivationsStore
    seen = []
    real = runner.sae.training_forward_pass

    def spy(step_input):
        seen.append(step_input.sae_in.shape[-1])
        return real(step_input)

    runner.sae.training_forward_pass = spy
    runner.run()
    state = torch.load(Path(ckpt) / "trainer_state.pt", weights_only=False)
    assert 0 < len(seen) < 12  # continued from the checkpoint's step, not from zero
    assert len(seen) * 64 == 12 * 64 - state["n_training_samples"]
    assert set(seen) == {2 * D}  # with [x | g] rows
    assert runner.activations_store.n_dataset_processed > 0


def test_prefetching_runner_gets_gradient_rows():
    """SAELens >= 6.4x can run the store in a background thread (prefetch_llm_batches)."""
    from sae_lens import LanguageModelSAERunnerConfig

    if "prefetch_llm_batches" not in LanguageModelSAERunnerConfig.__dataclass_fields__:
        pytest.skip("this SAELens has no prefetching")
    runner = _runner(GradientTopKTrainingSAEConfig(d_in=D, d_sae=64, k=4), steps=6, prefetch_llm_batches=2)
    seen = []
    real = runner.sae.training_forward_pass
    runner.sae.training_forward_pass = lambda step_input: (seen.append(step_input.sae_in.shape[-1]), real(step_input))[
        1
    ]
    runner.run()
    assert seen == [2 * D] * 6
    assert all(p.grad is None for p in runner.model.parameters())
