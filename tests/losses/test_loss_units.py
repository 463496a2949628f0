"""Unit tests of sae_allocators.losses (base, builtin, config, registry, zipf) against plain computations.

Fast (milliseconds each), seeded, in process. The aux-loss reference below picks each token's codes
with Python's ``sorted`` and shares no code with ``residual_aux_loss`` (no topk, no masks of ours).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, fields
from types import SimpleNamespace

import pytest
import torch

import sae_allocators  # noqa: F401  (registers the architectures and losses)
from sae_allocators.architectures.mutual_choice import MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig
from sae_allocators.architectures.topk_zipf import TopKZipfTrainingSAE, TopKZipfTrainingSAEConfig
from sae_allocators.losses import AuxLossConfig, AuxLossInput, AuxLossMixin, available, check_finite, get, registry
from sae_allocators.losses.builtin import auxk_loss, no_aux_loss, register_aux_losses, residual_aux_loss, zipf_loss
from sae_allocators.plugin_state import LossEntry
from helpers import step_input

D_IN, D_SAE = 16, 64


def make_topk(**kw) -> TopKZipfTrainingSAE:
    torch.manual_seed(0)
    cfg = TopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, **kw)
    sae = TopKZipfTrainingSAE(cfg)
    with torch.no_grad():  # decoder norms != 1, so the rescaling matters
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    return sae


# --- the plain reference of the residual reconstruction loss --------------------------------------


def plain_aux_loss(pre, x, out, W_dec, cand, *, k_cfg, coef, rescale, prio=None, weights=None, signed=False):
    """``coef * min(|C|/k, 1) * mean_t ||a_t W_dec' - (x_t - out_t)||^2``, codes picked per token in Python
    (priority latents first, then the others, each by descending score)."""
    F = pre.shape[-1]
    C = [j for j in range(F) if bool(cand[j])]
    if not C:
        return torch.zeros(())
    k = min(k_cfg, len(C))
    P = [j for j in C if prio is not None and bool(prio[j])]
    R = [j for j in C if j not in P]
    flat = pre.reshape(-1, F)
    keep = torch.zeros(flat.shape, dtype=torch.bool)
    for t in range(flat.shape[0]):
        s = flat[t].detach().abs() if signed else flat[t].detach()
        first = sorted(P, key=lambda j: -float(s[j]))[: min(k, len(P))]
        rest = sorted(R, key=lambda j: -float(s[j]))[: k - len(first)]
        keep[t, first + rest] = True
    w = torch.ones(F) if weights is None else weights
    acts = torch.where(keep, flat * w, torch.zeros_like(flat))
    if rescale:
        acts = acts / W_dec.norm(dim=1)
    recons = (acts @ W_dec).reshape(*pre.shape[:-1], -1)
    resid = (x - out).detach()
    return coef * min(len(C) / k_cfg, 1.0) * ((recons - resid) ** 2).sum(-1).mean()


def plain_shortfall(density: torch.Tensor, alpha: float, fit_fraction: float) -> torch.Tensor:
    """``clamp(1 - d_j / (C rank_j^-alpha), 0, 1)`` with ``log C`` the mean of ``log d + alpha log r`` over
    the densest ``ceil(fraction * F)`` positive ranks (alpha fixed)."""
    d = [float(v) for v in density]
    order = sorted(range(len(d)), key=lambda j: -d[j])
    rank = {j: r + 1 for r, j in enumerate(order)}
    head = [(d[j], rank[j]) for j in order[: math.ceil(fit_fraction * len(d))] if d[j] > 0]
    log_c = sum(math.log(v) + alpha * math.log(r) for v, r in head) / len(head)
    return torch.tensor(
        [min(max(1 - d[j] / math.exp(log_c - alpha * math.log(rank[j])), 0.0), 1.0) for j in range(len(d))]
    )


def _step(sae, x, dead, pre=None):
    acts, hp = sae.encode_with_hidden_pre(x)
    pre = hp if pre is None else pre
    out = sae.decode(acts).detach()
    return AuxLossInput(sae_in=x, sae_out=out, feature_acts=acts, hidden_pre=pre, dead_mask=dead)


CASES = {
    # name: (candidates, priority, input shape, aux_k)
    "dead only, 2-D": (lambda: torch.arange(D_SAE) % 3 == 0, None, (12, D_IN), None),
    "fewer candidates than k_aux (scale < 1)": (lambda: torch.arange(D_SAE) < 5, None, (12, D_IN), None),
    "every latent a candidate": (lambda: torch.ones(D_SAE, dtype=torch.bool), None, (12, D_IN), None),
    "one priority latent": (lambda: torch.arange(D_SAE) < 30, lambda: torch.arange(D_SAE) == 7, (12, D_IN), None),
    "priority fewer than k_aux": (
        lambda: torch.arange(D_SAE) < 40,
        lambda: torch.arange(D_SAE) % 10 == 1,
        (12, D_IN),
        None,
    ),
    "priority more than k_aux": (lambda: torch.arange(D_SAE) < 40, lambda: torch.arange(D_SAE) < 20, (12, D_IN), 6),
    "3-D input": (lambda: torch.arange(D_SAE) % 2 == 0, lambda: torch.arange(D_SAE) % 8 == 0, (3, 5, D_IN), None),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("rescale", [True, False])
def test_residual_aux_loss_equals_the_plain_reference_with_gradients(case, rescale):
    cand_f, prio_f, shape, aux_k = CASES[case]
    sae = make_topk(aux_loss="auxk", aux_k=aux_k, rescale_acts_by_decoder_norm=rescale, aux_loss_coefficient=0.7)
    torch.manual_seed(1)
    x = torch.randn(*shape)
    cand = cand_f()
    prio = prio_f() if prio_f else None
    step = _step(sae, x, cand)
    loss = residual_aux_loss(sae, step, cand, priority=prio)
    params = [sae.W_enc, sae.b_enc, sae.W_dec]
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    ref = plain_aux_loss(
        step.hidden_pre,
        x,
        step.sae_out,
        sae.W_dec,
        cand,
        k_cfg=aux_k or D_IN // 2,
        coef=0.7,
        rescale=rescale,
        prio=prio,
    )
    ref_grads = torch.autograd.grad(ref, params)
    assert loss.shape == () and ref.item() > 0
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_residual_aux_loss_weights_scale_the_chosen_codes():
    sae = make_topk(aux_loss="zipf", aux_k=5)
    torch.manual_seed(2)
    x = torch.randn(10, D_IN)
    cand = torch.arange(D_SAE) % 2 == 1
    weights = torch.rand(D_SAE, dtype=torch.float64)  # another dtype: cast to the codes' dtype
    step = _step(sae, x, cand)
    loss = residual_aux_loss(sae, step, cand, weights)
    ref = plain_aux_loss(
        step.hidden_pre, x, step.sae_out, sae.W_dec, cand, k_cfg=5, coef=1.0, rescale=True, weights=weights.float()
    )
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss, residual_aux_loss(sae, step, cand))


def test_residual_aux_loss_is_zero_without_candidates():
    sae = make_topk(aux_loss="auxk")
    step = _step(sae, torch.randn(4, D_IN), None)
    for cand in (None, torch.zeros(D_SAE, dtype=torch.bool)):
        z = residual_aux_loss(sae, step, cand)
        assert z.shape == () and z.item() == 0.0
    z = no_aux_loss(sae, step)
    assert z.shape == () and z.item() == 0.0 and z.dtype == step.sae_out.dtype


def test_signed_selection_ranks_by_magnitude_against_the_reference():
    class Signed(TopKZipfTrainingSAE):
        signed_selection = True

    torch.manual_seed(0)
    sae = Signed(
        TopKZipfTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=4, aux_loss="auxk", aux_k=3, rescale_acts_by_decoder_norm=False
        )
    )
    pre = torch.randn(6, D_SAE)
    assert torch.equal(sae.aux_scores(pre), pre.abs())
    assert torch.equal(make_topk().aux_scores(pre), pre)
    x = torch.randn(6, D_IN)
    cand = torch.arange(D_SAE) < 30
    step = AuxLossInput(sae_in=x, sae_out=torch.zeros_like(x), feature_acts=pre, hidden_pre=pre, dead_mask=cand)
    ref = plain_aux_loss(pre, x, torch.zeros_like(x), sae.W_dec, cand, k_cfg=3, coef=1.0, rescale=False, signed=True)
    torch.testing.assert_close(residual_aux_loss(sae, step, cand), ref, rtol=1e-5, atol=1e-6)


# --- the training step's aux loss (the shared selection step: sparse and dense paths) -------------


def _power_law_density(seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = 0.2 * torch.arange(1, D_SAE + 1, dtype=torch.float32) ** -1.0
    d = d[torch.randperm(D_SAE, generator=g)]
    d[torch.randperm(D_SAE, generator=g)[:10]] *= 0.02  # ten latents far below their target
    return d


@pytest.mark.parametrize("sparse_step", [True, False])
@pytest.mark.parametrize("shape", [(24, D_IN), (3, 8, D_IN)])
@pytest.mark.parametrize("loss", ["auxk", "zipf_weighted"])
def test_training_step_aux_loss_equals_the_reference_on_both_paths(sparse_step, shape, loss):
    kw = (
        dict(aux_loss="auxk")
        if loss == "auxk"
        else dict(
            aux_loss="zipf", zipf_weight_by_shortfall=True, zipf_min_steps=0, zipf_exponent=1.0, zipf_fit_fraction=0.5
        )
    )
    sae = make_topk(sparse_step=sparse_step, rescale_acts_by_decoder_norm=True, aux_loss_coefficient=0.5, **kw)
    density = _power_law_density()
    sae.feature_density.copy_(density)
    sae.density_steps.fill_(10)
    torch.manual_seed(4)
    x = torch.randn(*shape)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[2, 9, 33]] = True  # 3 dead latents < k_aux = 8
    out = sae.training_forward_pass(step_input(x, dead))
    aux = out.losses["auxiliary_reconstruction_loss"]
    params = [sae.W_enc, sae.b_enc, sae.W_dec]
    grads = torch.autograd.grad(aux, params)

    pre = sae.encode_with_hidden_pre(x)[1]
    if loss == "auxk":
        cand, weights, prio = dead, None, None
    else:
        short = plain_shortfall(density, 1.0, 0.5)
        cand = dead | (short > 0.9)
        weights = torch.where(dead, torch.ones(D_SAE), short)
        prio = dead
        assert int(cand.sum()) > 3 and bool((short[dead] < 1).any())  # dead weights must be forced to 1
    ref = plain_aux_loss(
        pre, x, out.sae_out, sae.W_dec, cand, k_cfg=D_IN // 2, coef=0.5, rescale=True, prio=prio, weights=weights
    )
    ref_grads = torch.autograd.grad(ref, params)
    assert ref.item() > 0
    torch.testing.assert_close(aux, ref, rtol=1e-4, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-6)


def test_training_step_aux_decode_keeps_hook_z_heads():
    # hook_z SAEs reshape the output back to [.., n_heads, d_head]; the aux reconstruction must too
    sae = make_topk(aux_loss="auxk", rescale_acts_by_decoder_norm=False)
    sae.turn_on_forward_pass_hook_z_reshaping()
    torch.manual_seed(5)
    x = torch.randn(10, 4, 4)  # 4 heads of 4 = d_in
    dead = torch.arange(D_SAE) < 12
    out = sae.training_forward_pass(step_input(x, dead))
    pre = sae.encode_with_hidden_pre(x)[1]
    ref = plain_aux_loss(
        pre, x.reshape(10, D_IN), out.sae_out.reshape(10, D_IN), sae.W_dec, dead, k_cfg=8, coef=1.0, rescale=False
    )
    # SAELens's reduction on hook_z: sum over d_head, mean over tokens and heads
    ref = ref / 4
    torch.testing.assert_close(out.losses["auxiliary_reconstruction_loss"], ref, rtol=1e-4, atol=1e-6)
    acts = torch.randn(3, D_SAE)
    assert torch.equal(sae.aux_decode(acts), (acts @ sae.W_dec).reshape(3, 4, 4))


# --- aux_decode, aux_k_value, normalization, the finite check -----------------------------------


def test_aux_decode_rescales_only_when_the_config_says_so():
    sae = make_topk(rescale_acts_by_decoder_norm=True)
    acts = torch.randn(5, D_SAE)
    W = sae.W_dec
    torch.testing.assert_close(sae.aux_decode(acts), (acts / W.norm(dim=1)) @ W)
    sae.cfg.rescale_acts_by_decoder_norm = False
    torch.testing.assert_close(sae.aux_decode(acts), acts @ W)
    # a plugin's config without the field: no rescale (TopK's default)
    fake = SimpleNamespace(cfg=SimpleNamespace(), W_dec=W, d_head=None, reshape_fn_out=lambda r, d_head: r)
    torch.testing.assert_close(AuxLossMixin.aux_decode(fake, acts), acts @ W)


def test_aux_k_value_defaults_to_half_of_d_in():
    cfg = TopKZipfTrainingSAEConfig(d_in=17, d_sae=D_SAE, k=4)
    assert TopKZipfTrainingSAE(cfg).aux_k_value() == 8
    cfg = TopKZipfTrainingSAEConfig(d_in=17, d_sae=D_SAE, k=4, aux_k=11)
    assert TopKZipfTrainingSAE(cfg).aux_k_value() == 11


@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_aux_check_normalization_names_the_fix(norm):
    sae = make_topk(aux_loss="zipf")
    sae.cfg.normalize_activations = norm  # set after the config check, as a resumed run could
    msg = (
        f"aux_loss='zipf' does not support normalize_activations='{norm}': the residual reconstruction would be in "
        "normalized space while the residual is not. Use normalize_activations='none' or "
        "'expected_average_only_in', or aux_loss='none'."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        sae.aux_check_normalization()
    step = _step(sae, torch.randn(4, D_IN), torch.ones(D_SAE, dtype=torch.bool))
    with pytest.raises(ValueError, match=re.escape(msg)):
        auxk_loss(sae, step)


def test_aux_check_normalization_accepts_the_other_normalizations():
    sae = make_topk()
    for norm in ("none", "expected_average_only_in"):
        sae.cfg.normalize_activations = norm
        sae.aux_check_normalization()


@pytest.mark.parametrize("nan,inf", [(1, 2), (0, 1), (3, 0)])
def test_check_finite_message_counts_nan_and_inf_and_names_the_fix(nan, inf):
    x = torch.zeros(4, 5)
    x.view(-1)[:nan] = float("nan")
    x.view(-1)[nan : nan + inf] = float("-inf")
    msg = (
        f"input activations contain {nan} NaN and {inf} inf values (shape (4, 5)): the SAE refuses to train on them "
        "rather than write NaN into its weights. Fix the activation source (e.g. the model's dtype overflowing: "
        "try dtype='float32', or filter the batch)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        check_finite(x)
    with pytest.raises(ValueError, match=re.escape("acts contain") + ".*" + re.escape("(shape (4, 5)): because. Fix")):
        check_finite(x, "acts", "because")
    check_finite(torch.full((3,), 3e38))  # large but finite


def test_batch_rule_encode_refuses_non_finite_input_with_the_reason():
    torch.manual_seed(0)
    sae = MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4.0))
    x = torch.randn(4, D_IN)
    x[1, 2] = float("inf")
    msg = (
        "mutual_choice encode input contain 0 NaN and 1 inf values (shape (4, 16)): the selection is over the whole "
        "batch, so a non-finite token would take other tokens' share of the budget; the SAE refuses to encode them. "
        "Fix the activation source"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}"):
        sae.encode(x)
    sae.encode(torch.randn(4, D_IN))  # finite: no error
    make_topk().encode(x)  # a per-token rule encodes it (no batch-wide selection to spoil)


# --- the mixin's buffers, dispatch and metrics -------------------------------------------------------


def test_density_buffers_are_float32_and_long_on_the_sae_device():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        sae = TopKZipfTrainingSAE(TopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    finally:
        torch.set_default_dtype(default)
    assert sae.feature_density.dtype == torch.float32 and sae.feature_density.shape == (D_SAE,)
    assert sae.density_steps.dtype == torch.long and sae.density_steps.shape == ()
    assert not bool(sae.feature_density.any()) and int(sae.density_steps) == 0
    meta = TopKZipfTrainingSAE(TopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, device="meta"))
    assert meta.feature_density.device.type == "meta" and meta.density_steps.device.type == "meta"


def test_use_error_term_reaches_saelens():
    cfg = TopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4)
    assert TopKZipfTrainingSAE(cfg).use_error_term is False
    assert TopKZipfTrainingSAE(cfg, use_error_term=True).use_error_term is True


def _capturing_entry(name, result):
    seen = {}

    def loss(sae, step):
        seen["sae"], seen["step"] = sae, step
        return result

    return LossEntry(name, loss, "", "test"), seen


def test_calculate_aux_loss_hands_the_step_to_the_registered_loss():
    sae = make_topk(aux_loss="auxk")
    x = torch.randn(4, D_IN)
    dead = torch.ones(D_SAE, dtype=torch.bool)
    si = step_input(x, dead)
    acts, pre, out = torch.randn(4, D_SAE), torch.randn(4, D_SAE), torch.randn(4, D_IN)
    value = torch.tensor(2.5)
    entry, seen = _capturing_entry("capture", value)
    sae.cfg.aux_loss = "capture"
    sae._aux_entry = entry  # the cached entry for that name
    state = object()
    got = sae.calculate_aux_loss(si, acts, pre, out, state=state)
    assert got == {"auxiliary_reconstruction_loss": value}
    step = seen["step"]
    assert seen["sae"] is sae and step.sae_in is x and step.sae_out is out and step.feature_acts is acts
    assert step.hidden_pre is pre and step.dead_mask is dead and step.step_input is si and step.state is state
    assert torch.equal(step.residual, x - out) and not step.residual.requires_grad
    named, _ = _capturing_entry("capture", {"a": value, "b": value})
    sae._aux_entry = named
    assert set(sae.calculate_aux_loss(si, acts, pre, out)) == {"a", "b"}  # a dict passes through


def test_the_training_step_hands_its_state_and_the_leading_shape_to_the_aux_loss():
    from sae_allocators.architectures._step import StepState

    sae = make_topk()
    entry, seen = _capturing_entry("capture", torch.tensor(0.0))
    sae.cfg.aux_loss = "capture"
    sae._aux_entry = entry
    x = torch.randn(2, 3, D_IN)
    out = sae.training_forward_pass(step_input(x))
    step = seen["sae"] is sae and seen["step"]
    assert isinstance(step.state, StepState) and step.state.lead_shape == (2, 3)
    assert step.feature_acts is out.feature_acts and step.feature_acts.shape == (2, 3, D_SAE)
    assert torch.equal(step.hidden_pre, step.state.hidden_pre.view(2, 3, D_SAE)) and step.sae_out is out.sae_out
    assert out.losses["auxiliary_reconstruction_loss"].item() == 0.0 and step.step_input.sae_in is x


def test_changing_aux_loss_switches_the_dispatched_loss():
    sae = make_topk(aux_loss="auxk")
    x = torch.randn(8, D_IN)
    dead = torch.ones(D_SAE, dtype=torch.bool)
    acts, pre = sae.encode_with_hidden_pre(x)
    out = sae.decode(acts)
    assert sae.calculate_aux_loss(step_input(x, dead), acts, pre, out)["auxiliary_reconstruction_loss"].item() > 0
    sae.cfg.aux_loss = "none"
    assert sae.calculate_aux_loss(step_input(x, dead), acts, pre, out)["auxiliary_reconstruction_loss"].item() == 0.0


def test_lazy_metrics_equal_plain_computations():
    sae = make_topk(zipf_min_steps=5, zipf_underused_ratio=0.1, zipf_exponent=1.0)
    density = _power_law_density()
    sae.feature_density.copy_(density)
    acts = torch.zeros(8, D_SAE)
    for t in range(8):
        acts[t, : t + 1] = 1.0  # token t has L0 = t + 1
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    short = plain_shortfall(density, 1.0, 0.5)
    on_curve = (short < 0.9).nonzero().squeeze(1)
    dead[on_curve[:4]] = True  # dead but not below the curve
    below = short > 0.9
    for steps, expect in ((4, dead), (5, dead | below)):
        sae.density_steps.fill_(steps)
        m = sae.lazy_metrics(acts.to_sparse(), dead)
        l0 = torch.arange(1, 9, dtype=torch.float32)
        assert m["l0_mean"]() == pytest.approx(4.5)
        assert m["l0_p50"]() == pytest.approx(float(torch.quantile(l0, 0.5)))
        assert m["l0_p99"]() == pytest.approx(float(torch.quantile(l0, 0.99)))
        assert m["empty_token_frac"]() == 0.0
        assert m["dead_frac"]() == pytest.approx(4 / D_SAE)
        assert m["underused_frac"]() == pytest.approx(float(expect.float().mean()))
        assert m["zipf_exponent"]() == 1.0
        assert torch.equal(sae.underused_mask(dead), expect)  # the loss's set U, same rule
    m = sae.lazy_metrics(acts, None)
    sae.feature_density.zero_()  # the metrics read the densities of their own step
    assert m["dead_frac"]() == 0.0 and m["underused_frac"]() == pytest.approx(float(below.float().mean()))


def test_inference_state_dict_drops_training_only_buffers_of_every_class():
    class Extra(TopKZipfTrainingSAE):
        training_only_buffers = ("extra_buffer", "never_registered")

    sae = Extra(TopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    assert Extra._all_training_only_buffers() >= {
        "feature_density",
        "density_steps",
        "extra_buffer",
        "never_registered",
    }
    sd = {k: v.clone() for k, v in sae.state_dict().items()}
    sd["extra_buffer"] = torch.zeros(3)
    assert {"feature_density", "density_steps"} <= set(sd)
    sae.process_state_dict_for_saving_inference(sd)  # a listed name that is absent is fine
    assert "feature_density" not in sd and "density_steps" not in sd and "extra_buffer" not in sd and "W_dec" in sd


# --- zipf fit ---------------------------------------------------------------------------------------


def test_zipf_fit_uses_the_configured_fit_fraction():
    d = _power_law_density()  # not an exact power law: the fraction changes the fit
    for fraction in (0.25, 0.5, 1.0):
        sae = make_topk(zipf_fit_fraction=fraction)
        sae.feature_density.copy_(d)
        alpha, log_c = sae.zipf_fit()
        # plain least squares of log d on log r over the densest ceil(fraction * F) ranks
        head = sorted(d.tolist(), reverse=True)[: math.ceil(fraction * D_SAE)]
        xs = [math.log(r) for r in range(1, len(head) + 1)]
        ys = [math.log(v) for v in head]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
        assert float(alpha) == pytest.approx(-slope, rel=1e-6)
        assert float(log_c) == pytest.approx(my - slope * mx, rel=1e-6, abs=1e-9)


# --- registry ---------------------------------------------------------------------------------------


def _loss(sae, step):
    return step.sae_out.new_zeros(())


def test_registry_add_refuses_bad_offers_with_the_reason():
    table: dict = {}
    assert registry.add(table, "", _loss) == "aux loss name '' must be a non-empty string"
    assert registry.add(table, 3, _loss) == "aux loss name 3 must be a non-empty string"
    assert registry.add(table, "x", 3) == "aux loss 'x' must be callable as loss(sae, step), got 3"
    assert table == {}
    assert registry.add(table, "x", _loss) is None
    assert table["x"] == LossEntry("x", _loss, "", "")
    assert registry.add(table, "x", no_aux_loss, description="again", provider="") is None  # same provider: replaced
    assert table["x"] == LossEntry("x", no_aux_loss, "again", "")
    assert registry.add(table, "y", _loss, description="d", provider="dist-a 1.0") is None
    assert table["y"] == LossEntry("y", _loss, "d", "dist-a 1.0")
    problem = registry.add(table, "y", no_aux_loss, provider="dist-b 2.0")
    assert problem == "aux loss 'y' is already provided by dist-a 1.0; the offer from dist-b 2.0 was ignored"
    assert table["y"].loss is _loss


def test_registry_get_names_the_registered_losses():
    names = available()
    assert names == sorted(names) and {"auxk", "none", "zipf"} <= set(names)
    msg = (
        f"aux_loss='nope' is not a registered auxiliary loss. Use one of {', '.join(names)}, "
        "or install/enable the plugin that provides it."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        get("nope")
    assert get("auxk").loss is auxk_loss and get("zipf").loss is zipf_loss and get("none").loss is no_aux_loss


def test_builtin_hook_registers_the_three_losses_with_descriptions():
    calls = []
    register_aux_losses(lambda name, loss, description="": calls.append((name, loss, description)))
    assert calls == [
        ("auxk", auxk_loss, "AuxK over dead latents (SAELens TopK's auxiliary loss)"),
        ("zipf", zipf_loss, "AuxK over dead and under-used latents (below a Zipf curve of densities)"),
        ("none", no_aux_loss, "no auxiliary loss"),
    ]


# --- config validation: each bad value names the field and the fix ------------------------------------


BAD = [
    ("aux_loss_coefficient", -1.0, "use a finite number >= 0 (e.g. 1.0; 0 disables the term)"),
    ("aux_loss_coefficient", float("nan"), "use a finite number >= 0 (e.g. 1.0; 0 disables the term)"),
    ("aux_loss_coefficient", float("inf"), "use a finite number >= 0 (e.g. 1.0; 0 disables the term)"),
    ("aux_k", 0, f"use an integer in [1, d_sae={D_SAE}], or None for d_in // 2"),
    ("aux_k", D_SAE + 1, f"use an integer in [1, d_sae={D_SAE}], or None for d_in // 2"),
    ("density_window", 0, "use an integer number of steps >= 1 (e.g. 1000)"),
    ("zipf_underused_ratio", 0.0, "use a fraction in (0, 1) (e.g. 0.1: ten times below the Zipf curve)"),
    ("zipf_underused_ratio", 1.0, "use a fraction in (0, 1) (e.g. 0.1: ten times below the Zipf curve)"),
    ("zipf_fit_fraction", 0.0, "use a fraction in (0, 1] of the ranks (e.g. 0.5)"),
    ("zipf_fit_fraction", 1.5, "use a fraction in (0, 1] of the ranks (e.g. 0.5)"),
    ("zipf_exponent", -0.5, "use a finite exponent >= 0, or None to fit it"),
    ("zipf_exponent", float("inf"), "use a finite exponent >= 0, or None to fit it"),
    ("zipf_min_steps", -1, "use an integer >= 0"),
]


@pytest.mark.parametrize("field,value,fix", BAD, ids=[f"{f}={v}" for f, v, _ in BAD])
def test_bad_aux_field_message_names_the_value_and_the_fix(field, value, fix):
    msg = f"{field}={value!r} is invalid: {fix}"
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        TopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, **{field: value})


GOOD = [
    ("aux_loss_coefficient", 0.0),
    ("aux_loss_coefficient", 2),
    ("aux_k", 1),
    ("aux_k", D_SAE),
    ("density_window", 1),
    ("zipf_underused_ratio", 0.999),
    ("zipf_fit_fraction", 1.0),
    ("zipf_exponent", 0.0),
    ("zipf_exponent", 0.5),
    ("zipf_min_steps", 0),
]


@pytest.mark.parametrize("field,value", GOOD, ids=[f"{f}={v}" for f, v in GOOD])
def test_aux_field_boundary_values_are_accepted(field, value):
    cfg = TopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, **{field: value})
    assert getattr(cfg, field) == value


@pytest.mark.parametrize("aux_loss", ["auxk", "zipf"])
@pytest.mark.parametrize("norm", ["constant_norm_rescale", "layer_norm"])
def test_residual_losses_refuse_normalizations_they_cannot_reconstruct(aux_loss, norm):
    msg = (
        f"aux_loss='{aux_loss}' does not support normalize_activations='{norm}': its residual reconstruction would be "
        "in normalized space while the residual is not, which fails at the first dead latent. Use "
        "normalize_activations='none' or 'expected_average_only_in', or aux_loss='none'."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        TopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, aux_loss=aux_loss, normalize_activations=norm)
    # aux_loss="none" accepts them
    assert (
        TopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, aux_loss="none", normalize_activations=norm).aux_loss
        == "none"
    )


def test_inference_cfg_dict_records_the_training_architecture_and_its_fields():
    cfg = TopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, aux_loss="auxk", zipf_min_steps=7, aux_k=3)
    meta = cfg.get_inference_sae_cfg_dict()["metadata"]
    assert meta["training_architecture"] == "topk_zipf"
    details = meta["training_architecture_details"]
    for f in fields(AuxLossConfig):
        assert details[f.name] == getattr(cfg, f.name)
    assert not {"d_in", "d_sae", "k", "metadata", "architecture"} & set(details)


# --- the shared checks (config_checks.ConfigChecks): first in every __post_init__ that calls them ---------


def test_a_subclass_that_calls_the_shared_checks_first_never_sees_bad_values():
    # the documented pattern for a config's own __post_init__: self.check_shared_fields() on its first line
    ran = []

    @dataclass
    class Sub(TopKZipfTrainingSAEConfig):
        extra: int = 0

        def __post_init__(self) -> None:
            self.check_shared_fields()
            ran.append(self.d_sae)
            super().__post_init__()

    with pytest.raises(
        ValueError, match=re.escape("d_sae='64' is invalid: it must be an integer, not str (write 64 without quotes).")
    ):
        Sub(d_in=D_IN, d_sae="64", k=4)
    with pytest.raises(ValueError, match=re.escape("d_sae=0 is invalid: use a positive integer")):
        Sub(d_in=D_IN, d_sae=0, k=4)
    assert ran == []  # the subclass's own check never saw the bad values
    assert Sub(d_in=D_IN, d_sae=D_SAE, k=4).d_sae == D_SAE and ran == [D_SAE]

    @dataclass
    class NoOwn(Sub):  # no __post_init__ of its own: Sub's runs, once
        more: int = 1

    assert NoOwn(d_in=D_IN, d_sae=D_SAE, k=4).more == 1 and ran == [D_SAE, D_SAE]
    with pytest.raises(ValueError, match=re.escape("d_sae=0 is invalid")):
        NoOwn(d_in=D_IN, d_sae=0, k=4)
    assert len(ran) == 2


@pytest.mark.parametrize("how", ["slots dataclass", "re-used parent __post_init__", "own checks first"])
def test_every_subclass_gets_the_shared_checks_and_from_dict_names_unknown_keys(how):
    # whatever a subclass's __post_init__ does, AuxLossConfig's runs the shared checks when it is reached
    # (a subclass that checks before calling them may trip first: that is why the pattern calls them first)
    if how == "slots dataclass":

        @dataclass(slots=True)
        class Sub(TopKZipfTrainingSAEConfig):
            def __post_init__(self) -> None:
                super(Sub, self).__post_init__()

    elif how == "re-used parent __post_init__":

        class Base(TopKZipfTrainingSAEConfig):
            def __post_init__(self) -> None:
                super().__post_init__()

        class Sub(Base):
            __post_init__ = Base.__post_init__

    else:

        @dataclass
        class Sub(TopKZipfTrainingSAEConfig):
            def __post_init__(self) -> None:
                if self.k > 2 * self.d_sae + 10**6:  # compares before the shared checks: "64" trips here
                    raise AssertionError
                super().__post_init__()

    with pytest.raises(ValueError, match=re.escape("d_sae=0 is invalid: use a positive integer")):
        Sub(d_in=D_IN, d_sae=0, k=4)
    if how == "own checks first":
        with pytest.raises(TypeError):
            Sub(d_in=D_IN, d_sae="64", k=4)
    else:
        with pytest.raises(ValueError, match=re.escape("d_sae='64' is invalid: it must be an integer")):
            Sub(d_in=D_IN, d_sae="64", k=4)
    from sae_allocators.config_checks import UnknownConfigKeyWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert Sub.from_dict({"d_in": D_IN, "d_sae": D_SAE, "k": 4, "zipf_min_step": 5}).d_sae == D_SAE
    found = [w for w in caught if issubclass(w.category, UnknownConfigKeyWarning)]
    assert len(found) == 1 and "did you mean 'zipf_min_steps'" in str(found[0].message)  # once


def test_a_config_without_its_own_post_init_gets_the_shared_checks():
    from sae_lens.saes.topk_sae import TopKSAEConfig, TopKTrainingSAEConfig

    @dataclass
    class Plain(AuxLossConfig, TopKTrainingSAEConfig):
        @classmethod
        def architecture(cls) -> str:
            return "plain_test"

        def get_inference_config_class(self):
            return TopKSAEConfig

    with pytest.raises(
        ValueError, match=re.escape("d_sae=0 is invalid: use a positive integer (the number of latents, e.g. 16384).")
    ):
        Plain(d_in=D_IN, d_sae=0, k=4)
    assert Plain(d_in=D_IN, d_sae=D_SAE, k=4).aux_loss == "zipf"


def test_from_dict_warns_about_an_unknown_key_naming_the_nearest_field():
    from sae_allocators.config_checks import UnknownConfigKeyWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        TopKZipfTrainingSAEConfig.from_dict({"d_in": D_IN, "d_sae": D_SAE, "k": 4, "zipf_min_step": 5})
    found = [w for w in caught if issubclass(w.category, UnknownConfigKeyWarning)]
    assert len(found) == 1 and "zipf_min_step" in str(found[0].message) and "zipf_min_steps" in str(found[0].message)


@pytest.mark.parametrize(
    "parent_meta",
    [None, {"training_architecture_details": {"from": "saelens"}}],
    ids=["no metadata", "details already recorded"],
)
def test_inference_cfg_dict_keeps_what_saelens_recorded(monkeypatch, parent_meta):
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    parent = {} if parent_meta is None else {"metadata": dict(parent_meta)}
    monkeypatch.setattr(
        TopKTrainingSAEConfig, "get_inference_sae_cfg_dict", lambda self: {k: dict(v) for k, v in parent.items()}
    )
    cfg = TopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, aux_loss="auxk")
    meta = cfg.get_inference_sae_cfg_dict()["metadata"]
    assert meta["training_architecture"] == "topk_zipf"
    if parent_meta is None:
        assert meta["training_architecture_details"]["aux_loss"] == "auxk"
    else:
        assert meta["training_architecture_details"] == {"from": "saelens"}


@pytest.mark.parametrize("sparse_step", [True, False])
def test_a_plugin_loss_with_float64_weights_on_the_training_step(sparse_step):
    # a plugin's loss gets step.state and may pass weights of another dtype: they are cast to the codes'
    sae = make_topk(sparse_step=sparse_step, rescale_acts_by_decoder_norm=True)
    g = torch.Generator().manual_seed(6)
    weights = torch.rand(D_SAE, generator=g, dtype=torch.float64)
    cand = torch.arange(D_SAE) % 4 == 1

    def weighted(s, step):
        assert step.state is not None
        return residual_aux_loss(s, step, cand, weights)

    sae.cfg.aux_loss = "weighted_test"
    sae._aux_entry = LossEntry("weighted_test", weighted, "", "test")
    torch.manual_seed(7)
    x = torch.randn(16, D_IN)
    out = sae.training_forward_pass(step_input(x))
    aux = out.losses["auxiliary_reconstruction_loss"]
    assert aux.dtype == torch.float32
    pre = sae.encode_with_hidden_pre(x)[1]
    ref = plain_aux_loss(
        pre, x, out.sae_out, sae.W_dec, cand, k_cfg=D_IN // 2, coef=1.0, rescale=True, weights=weights.float()
    )
    torch.testing.assert_close(aux, ref, rtol=1e-4, atol=1e-6)


def test_running_density_is_a_mean_then_an_ema_with_rate_one_over_window():
    sae = make_topk(density_window=3)
    g = torch.Generator().manual_seed(8)
    batches = [(torch.rand(40, D_SAE, generator=g) < p).float() for p in (0.1, 0.5, 0.2, 0.9, 0.3)]
    expect = torch.zeros(D_SAE, dtype=torch.float64)
    for i, b in enumerate(batches, start=1):
        sae.update_feature_density(b if i % 2 else b.to_sparse())  # sparse codes count the same
        frac = (b != 0).double().mean(0)
        expect += (frac - expect) * max(1 / i, 1 / 3)  # mean over the first 3 steps, then EMA 1/3
        assert int(sae.density_steps) == i
        torch.testing.assert_close(sae.feature_density.double(), expect, rtol=1e-5, atol=1e-6)


def test_data_parallel_density_is_the_strided_sample_of_the_global_batch(monkeypatch):
    # two ranks (simulated): this rank holds the first 600 tokens of a 1200-token global batch; the
    # density must be that of the global tokens 0, 2, 4, ... (1200 // 512 = 2), counts summed over ranks
    from sae_allocators.losses import density as density_mod

    g = torch.Generator().manual_seed(9)
    glob = (torch.rand(1200, D_SAE, generator=g) < 0.3).float()
    mine, other = glob[:600], glob[600:]
    group = object()
    calls = []

    def fake_sample(n_local, stride_tokens, grp, device):
        assert (n_local, stride_tokens, grp) == (600, 512, group)
        return torch.arange(0, 600, 2), 600

    def fake_all_reduce(t, op, grp):
        calls.append((op, grp))
        return t + (other[::2] != 0).float().sum(0)

    monkeypatch.setattr(density_mod, "strided_token_sample", fake_sample)
    monkeypatch.setattr(density_mod, "all_reduce", fake_all_reduce)
    fd, steps = torch.zeros(D_SAE), torch.zeros((), dtype=torch.long)
    density_mod.update_running_density(fd, steps, mine, 10, 512, group)
    assert calls == [("sum", group)] and int(steps) == 1
    torch.testing.assert_close(fd, (glob[::2] != 0).float().mean(0))


def test_zipf_shortfall_is_one_minus_density_over_target_clamped_to_0_1():
    sae = make_topk(zipf_exponent=1.0, zipf_fit_fraction=0.5)
    density = _power_law_density()
    sae.feature_density.copy_(density)
    short = sae.zipf_shortfall()
    expect = plain_shortfall(density, 1.0, 0.5)
    torch.testing.assert_close(short, expect, rtol=1e-5, atol=1e-6)
    assert float(short.min()) == 0.0 and float(short.max()) <= 1.0  # features above the curve: 0, not negative
    assert short.dtype == density.dtype
