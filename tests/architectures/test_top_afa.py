"""top-AFA: the capped rule against brute force and the reference code, the SAE classes, the
AFA loss, metrics and ε_LBO, bad input, training through SAELens's runner, and loading through
the autoload hook of the installed distribution in a fresh interpreter."""

from __future__ import annotations

import importlib.metadata as md
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from sae_lens import SAE
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

import helpers
import sae_allocators  # noqa: F401  (registers the architectures)
from sae_allocators import metrics
from sae_allocators.allocation.afa import afa_loss, afa_select, afa_select_reference
from sae_allocators.architectures.top_afa import (
    TopAFA,
    TopAFASAE,
    TopAFASAEConfig,
    TopAFATrainingSAE,
    TopAFATrainingSAEConfig,
)
from sae_allocators.diagnostics import afa_k_stats, epsilon_lbo, sae_afa_diagnostics
from sae_allocators.testing import OFFLINE_ENV, train_tiny

D_IN, D_SAE = 16, 48


def step_input(x, dead=None):
    return helpers.step_input(x, dead, logging=True)


def reference_code(
    acts: torch.Tensor, target: torch.Tensor, dec_norm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``TopAFASAE.forward`` of SewoongLee/top-afa-sae (training/sae.py), transcribed: argsort,
    the last running norm forced to 1e8, first argmin."""
    afa = target[:, None].pow(2)
    dec_scaled_acts = (acts * dec_norm).pow(2)
    max_indices = torch.argsort(dec_scaled_acts, dim=-1, descending=True)
    cumulative_fa = torch.cumsum(torch.gather(dec_scaled_acts, -1, max_indices), dim=-1)
    cumulative_fa[..., -1] = 1e8
    afa = torch.sqrt(afa)
    cumulative_fa = torch.sqrt(cumulative_fa)
    k = torch.abs(cumulative_fa - afa).argmin(dim=-1) + 1
    mask = torch.zeros_like(acts, dtype=torch.bool).scatter_(
        dim=1, index=max_indices, src=torch.arange(acts.shape[1]).unsqueeze(0) < k.unsqueeze(1)
    )
    return acts * mask, k


# --- the rule ------------------------------------------------------------------------------


def random_case(g: torch.Generator, trial: int):
    n, f = int(torch.randint(1, 24, (), generator=g)), int(torch.randint(2, 70, (), generator=g))
    acts = torch.randn(n, f, generator=g).relu() * 2
    if trial % 3 == 0:  # heavy ties: values on a coarse grid
        acts = (acts * 2).round() / 2
    if trial % 4 == 0:
        acts[0] = 0  # an all-zero row
    dec_norm = torch.rand(f, generator=g) + 0.5 if trial % 2 else None
    if trial % 6 == 1:
        dec_norm = torch.ones(f)  # equal norms: ties in acts are ties in contributions
    scale = torch.rand(n, generator=g) * 1.5
    base = acts * (1 if dec_norm is None else dec_norm)
    target = scale * base.norm(dim=-1)
    if trial % 5 == 0:
        target[-1] = 0  # zero-norm input
    return acts, target, dec_norm


def test_capped_rule_equals_brute_force_whenever_k_fits():
    g = torch.Generator().manual_seed(0)
    n_checked = n_capped = n_ties = 0
    for trial in range(300):
        acts, target, dec_norm = random_case(g, trial)
        f = acts.shape[-1]
        ref_codes, ref_k = afa_select_reference(acts, target, dec_norm)
        for k_max in (None, 1, 2, 3, 8, f - 1, f):
            sel = afa_select(acts, target, dec_norm, k_max)
            fits = ref_k <= (f if k_max is None else k_max)
            assert torch.equal(sel.capped, ~fits), (trial, k_max)
            assert torch.equal(sel.k[fits], ref_k[fits]), (trial, k_max)
            assert torch.equal(sel.codes[fits], ref_codes[fits]), (trial, k_max)
            if k_max is not None:
                assert (sel.k[~fits] == k_max).all()
            n_checked += int(fits.sum())
            n_capped += int((~fits).sum())
        s = (acts * (1 if dec_norm is None else dec_norm)) ** 2
        n_ties += int((s.sort(-1).values.diff(dim=-1) == 0).any(-1).sum())
    assert n_checked > 10_000 and n_capped > 500 and n_ties > 500  # the cases really occurred


def test_ties_at_the_cut_keep_the_lowest_feature_indices():
    acts = torch.tensor([[1.0, 2.0, 1.0, 1.0, 0.0, 1.0]])
    target = torch.tensor([math.sqrt(4 + 1 + 1)])  # the prefix of 3: the 2 and two of the four 1s
    for k_max in (None, 3, 4):
        sel = afa_select(acts, target, None, k_max)
        assert sel.k.tolist() == [3]
        assert sel.codes.tolist() == [[1.0, 2.0, 1.0, 0.0, 0.0, 0.0]]


def test_uncapped_rule_equals_the_reference_code():
    torch.manual_seed(0)
    for n, f in ((64, 300), (7, 9)):
        acts = torch.randn(n, f).relu()
        dec_norm = torch.rand(f) + 0.5
        target = torch.rand(n) * 3 * (acts * dec_norm).norm(dim=-1)
        ref_codes, ref_k = reference_code(acts, target, dec_norm)
        sel = afa_select(acts, target, dec_norm)
        assert (ref_k < f).all()
        assert torch.equal(sel.k, ref_k) and torch.equal(sel.codes, ref_codes)


def test_rule_edge_cases_and_leading_dims():
    acts = torch.zeros(3, 10)
    sel = afa_select(acts, torch.tensor([0.0, 1.0, 5.0]), None, 4)
    assert sel.k.tolist() == [1, 1, 1] and (sel.codes == 0).all() and not sel.capped.any()
    acts = torch.rand(2, 5, 20)
    sel = afa_select(acts, torch.zeros(2, 5), None, 6)  # zero-norm target: one feature, the largest
    assert sel.k.shape == (2, 5) and (sel.k == 1).all()
    assert torch.equal(sel.codes.amax(-1), acts.amax(-1))
    assert afa_select(torch.zeros(0, 8), torch.zeros(0), None, 2).codes.shape == (0, 8)
    pre = torch.randn(30, 25)  # negative pre-activations count as 0: the ReLU is inside the rule
    tgt = torch.rand(30) * 2
    for k_max in (None, 4):
        a, b = afa_select(pre, tgt, None, k_max), afa_select(pre.relu(), tgt, None, k_max)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.k, b.k) and (a.codes >= 0).all()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k_max"):
            afa_select(acts, torch.ones(2, 5), None, bad)
    with pytest.raises(ValueError, match="one target norm per token"):
        afa_select(acts, torch.ones(3), None, 2)


def test_codes_are_differentiable_and_afa_loss_gradient_is_finite_on_zero_rows():
    acts = torch.rand(6, 30, requires_grad=True)
    target = torch.rand(6) * 2
    sel = afa_select(acts, target, None, 5)
    sel.codes.sum().backward()
    assert torch.equal(acts.grad, (sel.codes != 0).float())
    f = torch.zeros(3, 8, requires_grad=True)
    loss = afa_loss(f, torch.tensor([0.0, 1.0, 2.0]))
    loss.backward()
    assert loss.item() == pytest.approx((0 + 1 + 4) / 3)
    assert torch.isfinite(f.grad).all()


# --- configs and bad input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"afa_coefficient": -0.1}, "afa_coefficient"),
        ({"afa_coefficient": float("nan")}, "afa_coefficient"),
        ({"k_max": 0}, "k_max"),
        ({"k_max": D_SAE + 1}, "k_max"),
        ({"k_max": 3.0}, "k_max"),
        ({"afa_loss_target": "x_hat"}, "afa_loss_target"),
        ({"aux_loss": "bogus"}, "aux_loss"),
    ],
)
def test_bad_training_config_values_raise_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=f"{field}="):
        TopAFATrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **kw)


def test_bad_inference_config_raises():
    with pytest.raises(ValueError, match="k_max=0"):
        TopAFASAEConfig(d_in=D_IN, d_sae=D_SAE, k_max=0)


def make_training(**kw) -> TopAFATrainingSAE:
    torch.manual_seed(0)
    sae = TopAFATrainingSAE(TopAFATrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, **kw))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
        sae.b_dec.normal_(0, 0.3)
    return sae


def test_nan_training_input_is_an_error_and_leaves_weights_untouched():
    sae = make_training(k_max=8)
    x = torch.randn(5, D_IN)
    x[2, 3] = float("nan")
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        sae.training_forward_pass(step_input(x))
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())


def test_inference_nan_token_gives_nan_codes_for_that_token_only():
    sae = TopAFASAE(TopAFASAEConfig(d_in=D_IN, d_sae=D_SAE, k_max=8))
    x = torch.randn(4, D_IN)
    clean = sae.encode(x)
    x[1, 0] = float("nan")
    codes = sae.encode(x)
    assert torch.isnan(codes[1]).any()
    keep = torch.tensor([0, 2, 3])
    assert torch.equal(codes[keep], clean[keep])


def test_zero_norm_training_input_gives_finite_loss_and_gradients():
    sae = make_training(k_max=8, afa_loss_target="x_minus_b_dec")
    x = torch.zeros(6, D_IN)
    x[:3] = sae.b_dec.detach()  # ||x - b_dec|| = 0 for half the tokens, ||x|| = 0 for the rest
    out = sae.training_forward_pass(step_input(x))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters() if p.grad is not None)


# --- the training class: loss, metrics ------------------------------------------------------


@pytest.mark.parametrize("target_kind", ["x", "x_minus_b_dec"])
@pytest.mark.parametrize("rescale", [True, False])
def test_afa_loss_term_is_lambda_times_norm_gap(target_kind, rescale):
    sae = make_training(
        k_max=12, afa_coefficient=0.25, afa_loss_target=target_kind, rescale_acts_by_decoder_norm=rescale
    )
    x = torch.randn(20, D_IN) * 2
    out = sae.training_forward_pass(step_input(x))
    f = helpers.codes(out).detach()
    if not rescale:
        f = f * sae.W_dec.detach().norm(dim=-1)
    t = x - sae.b_dec.detach() if target_kind == "x_minus_b_dec" else x
    expected = 0.25 * (f.norm(dim=-1) - t.norm(dim=-1)).square().mean()
    assert out.losses["afa_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.losses.values()), rel=1e-5)
    assert "afa_loss" not in make_training(afa_coefficient=0.0).training_forward_pass(step_input(x)).losses


def test_training_codes_follow_the_rule_and_metrics_are_lazy_and_right():
    sae = make_training(k_max=10)
    x = torch.randn(64, D_IN) * 2
    out = sae.training_forward_pass(step_input(x))
    with torch.no_grad():
        sae_in = x - sae.b_dec
        norm = sae.W_dec.norm(dim=-1)
        # the training step folds the decoder norms into W_enc / b_enc before its matmul (as the saved
        # model does): the same pre-activations up to float rounding
        pre = torch.addmm(sae.b_enc * norm, sae_in, sae.W_enc * norm)
        torch.testing.assert_close(pre, (sae_in @ sae.W_enc + sae.b_enc) * norm)
        ref = afa_select(pre.relu(), sae_in.norm(dim=-1), None, 10)
    assert torch.equal(helpers.codes(out), ref.codes)
    m = out.metrics
    for key in (
        "afa_k_mean",
        "afa_k_p50",
        "afa_k_p99",
        "afa_capped_frac",
        "eps_lbo_mean",
        "eps_lbo_p50",
        "eps_lbo_p99",
        "l0_mean",
    ):
        assert callable(m[key]), key
    stats = afa_k_stats(ref.k, ref.capped)
    assert m["afa_k_mean"]() == pytest.approx(stats["afa_k_mean"])
    assert m["afa_k_p99"]() == pytest.approx(float(torch.quantile(ref.k.double(), 0.99)))
    assert m["afa_capped_frac"]() == pytest.approx(float(ref.capped.double().mean()))
    eps = epsilon_lbo(x, helpers.codes(out).detach(), None, sae.b_dec.detach())
    assert m["eps_lbo_p50"]() == pytest.approx(float(torch.quantile(eps, 0.5)), rel=1e-6)
    assert m["l0_mean"]() == pytest.approx(float((ref.codes != 0).sum(-1).double().mean()))


def test_auxk_and_zipf_options_run_with_dead_latents():
    x = torch.randn(32, D_IN)
    dead = torch.arange(D_SAE) % 2 == 0
    for aux in ("auxk", "zipf", "none"):
        sae = make_training(k_max=8, aux_loss=aux, zipf_min_steps=0)
        losses = sae.training_forward_pass(step_input(x, dead)).losses
        aux_value = losses["auxiliary_reconstruction_loss"].item()
        assert (aux_value > 0) == (aux != "none"), aux


# --- diagnostics on any SAE --------------------------------------------------------------


def test_epsilon_lbo_by_hand_and_conventions():
    z = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    f = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    eps = epsilon_lbo(z, f, torch.tensor([1.0, 1.0, 2.0]), torch.zeros(2))
    assert eps.tolist() == [pytest.approx(20 / (2 * 5)), 0.0, math.inf]
    eps_b = epsilon_lbo(z[:1], f[:1], None, torch.tensor([0.0, 1.0]))  # b_dec is one more "feature"
    assert eps_b.item() == pytest.approx(abs(25 - 6) / (2 * 6))
    with pytest.raises(ValueError, match="d_sae >= 2"):
        epsilon_lbo(z, f[:, :1], None, torch.zeros(2))


def test_diagnostics_run_on_a_plain_saelens_topk_sae():
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5))
    x = torch.randn(3, 7, D_IN)
    d = sae_afa_diagnostics(sae, x)
    assert d["l0_mean"] == pytest.approx(float(metrics.per_token_l0(sae.encode(x)).mean()))
    assert 1 <= d["afa_k_p50"] <= D_SAE and math.isfinite(d["eps_lbo_mean"])
    codes = sae.encode(x).reshape(-1, D_SAE)
    z = x.reshape(-1, D_IN)
    ref = epsilon_lbo(z, codes, sae.W_dec.norm(dim=-1), sae.b_dec)
    assert d["eps_lbo_p50"] == pytest.approx(float(torch.quantile(ref, 0.5)))


# --- through SAELens: runner, save, load -------------------------------------------------


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("top_afa") / "sae"
    torch.manual_seed(0)
    sae = train_tiny(
        TopAFATrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k_max=12, aux_loss="zipf", zipf_min_steps=2),
        steps=15,
        output_path=out,
    )
    x = torch.randn(16, D_IN) * 2
    with torch.no_grad():
        expected = sae.encode(x)
    torch.save({"x": x, "codes": expected}, out.parent / "check.pt")
    return out


def test_trains_through_runner_saves_and_reloads(trained_folder):
    cfg = json.loads((trained_folder / "cfg.json").read_text())
    assert cfg["architecture"] == "top_afa" and cfg["k_max"] == 12
    assert set(load_file(trained_folder / "sae_weights.safetensors")) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    sae = SAE.load_from_disk(trained_folder)
    assert type(sae) is TopAFASAE
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(D_SAE), atol=1e-5)  # norms folded on save
    check = torch.load(trained_folder.parent / "check.pt")
    with torch.no_grad():
        codes = sae.encode(check["x"])
        codes2, k = sae.encode_with_k(check["x"])
    assert torch.equal(codes != 0, check["codes"] != 0)
    assert torch.allclose(codes, check["codes"], atol=1e-5)
    assert torch.equal(codes, codes2) and (k >= 1).all() and (k <= 12).all()
    with torch.no_grad():  # (batch, ctx, d) as evals and HookedSAETransformer pass it: per token
        codes3 = sae.encode(check["x"].reshape(2, 8, D_IN))
    assert torch.equal(codes3.reshape(16, D_SAE), codes)
    with pytest.raises(TypeError):
        TopAFA(4)(torch.randn(2, D_SAE))  # the activation needs the target norm


@pytest.mark.install
def test_saved_top_afa_loads_in_fresh_interpreter_through_autoload(trained_folder, tmp_path):
    """Needs sae-allocators *installed* (tests/run.sh, or ``pip install -e .``): fails otherwise."""
    try:
        md.distribution("sae-allocators")
    except md.PackageNotFoundError:
        pytest.fail(
            "sae-allocators is not installed in this environment: run `bash tests/run.sh` or `pip install -e .`"
        )
    code = f"""
import sys, torch
from sae_lens import SAE
sae = SAE.load_from_disk({str(trained_folder)!r})
check = torch.load({str(trained_folder.parent / "check.pt")!r})
with torch.no_grad():
    codes = sae.encode(check["x"])
assert torch.allclose(codes, check["codes"], atol=1e-5), (codes - check["codes"]).abs().max()
print(type(sae).__module__, type(sae).__name__)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAE_ALLOCATORS_") and k != "PYTHONPATH"}
    env.update(OFFLINE_ENV)
    # cwd: a folder without the checkout, so only the installed distribution can be imported
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["sae_allocators.architectures.top_afa", "TopAFASAE"]
