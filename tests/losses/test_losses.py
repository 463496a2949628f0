"""The auxiliary-loss API: auxk / zipf / none, the registry hook, running densities, metrics."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import sae_allocators  # noqa: F401  (registers the architectures and losses)
from sae_allocators import metrics as M
from sae_allocators.architectures.batchtopk_zipf import BatchTopKZipfTrainingSAEConfig
from sae_allocators.architectures.mutual_choice import MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig
from sae_allocators.architectures.topk_zipf import TopKZipfTrainingSAE, TopKZipfTrainingSAEConfig
from sae_allocators.losses import AuxLossInput, available, get
from sae_allocators.losses.builtin import auxk_loss, residual_aux_loss, zipf_loss
from helpers import step_input

D_IN, D_SAE = 16, 64


def make_topk(**kw) -> TopKZipfTrainingSAE:
    torch.manual_seed(0)
    cfg = TopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, **kw)
    sae = TopKZipfTrainingSAE(cfg)
    with torch.no_grad():  # make decoder norms != 1 so the rescaling path matters
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
    return sae


def forward_parts(sae, x):
    acts, pre = sae.encode_with_hidden_pre(x)
    out = sae.decode(acts)
    return acts, pre, out


def test_builtin_losses_registered_through_hook():
    assert {"auxk", "zipf", "none"} <= set(available())
    assert get("zipf").provider.startswith("sae-allocators")


@pytest.mark.parametrize("rescale", [True, False])
def test_auxk_equals_saelens_topk_aux_loss_exactly(rescale):
    sae = make_topk(aux_loss="auxk", rescale_acts_by_decoder_norm=rescale, aux_loss_coefficient=0.7)
    x = torch.randn(40, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    acts, pre, out = forward_parts(sae, x)
    ours = sae.calculate_aux_loss(step_input(x, dead), acts, pre, out)["auxiliary_reconstruction_loss"]
    ref = sae.calculate_topk_aux_loss(sae_in=x, sae_out=out, hidden_pre=pre, dead_neuron_mask=dead)
    assert ours.item() > 0
    assert torch.equal(ours, ref)
    # few dead latents: the min(num_dead / k_aux, 1) scale is applied the same way
    few = torch.zeros(D_SAE, dtype=torch.bool)
    few[:3] = True
    ours = sae.calculate_aux_loss(step_input(x, few), acts, pre, out)["auxiliary_reconstruction_loss"]
    assert torch.equal(ours, sae.calculate_topk_aux_loss(sae_in=x, sae_out=out, hidden_pre=pre, dead_neuron_mask=few))


def test_zipf_with_underused_forced_to_dead_equals_auxk_exactly(monkeypatch):
    sae = make_topk(aux_loss="zipf", zipf_min_steps=0)
    sae.feature_density.copy_(torch.rand(D_SAE) * 0.2)
    sae.density_steps.fill_(1000)
    x = torch.randn(40, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:3] = True  # fewer than k_aux = d_in // 2: the under-used latents get the other slots
    acts, pre, out = forward_parts(sae, x)
    step = AuxLossInput(sae_in=x, sae_out=out, feature_acts=acts, hidden_pre=pre, dead_mask=dead)
    assert not torch.equal(zipf_loss(sae, step), auxk_loss(sae, step))  # U is larger than the dead set here
    monkeypatch.setattr(sae, "underused_mask", lambda dead_mask: dead_mask)
    assert torch.equal(zipf_loss(sae, step), auxk_loss(sae, step))
    monkeypatch.undo()
    many = torch.rand(D_SAE) < 0.3  # at least k_aux dead latents: they take every slot, as in AuxK
    assert int(many.sum()) >= sae.aux_k_value()
    step = AuxLossInput(sae_in=x, sae_out=out, feature_acts=acts, hidden_pre=pre, dead_mask=many)
    assert torch.equal(zipf_loss(sae, step), auxk_loss(sae, step))


def test_dead_latents_take_their_aux_slots_before_underused_ones():
    # k_aux = 8 slots per token; 3 dead latents with small pre-activations and 20 under-used ones
    # with large ones: the dead latents must still be reconstructed with (all 3 slots), and the
    # under-used ones fill the other 5 (before this rule they crowded the dead ones out)
    sae = make_topk(aux_loss="zipf", aux_k=8, rescale_acts_by_decoder_norm=False)
    x = torch.randn(6, D_IN)
    pre = torch.randn(6, D_SAE).abs() + 10.0
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:3] = True
    pre[:, :3] = 0.01 * torch.arange(1, 4)
    under = dead.clone()
    under[10:30] = True
    out = torch.zeros(6, D_IN)
    step = AuxLossInput(sae_in=x, sae_out=out, feature_acts=torch.zeros_like(pre), hidden_pre=pre, dead_mask=dead)
    seen = {}
    original = sae.aux_decode
    sae.aux_decode = lambda acts: (seen.setdefault("acts", acts), original(acts))[1]
    residual_aux_loss(sae, step, under, priority=dead)
    kept = seen["acts"] != 0
    assert bool(kept[:, :3].all())  # every dead latent, on every token
    assert torch.equal(kept.sum(-1), torch.full((6,), 8))
    top_under = pre[:, 10:30].topk(5).indices + 10
    assert bool(kept.gather(1, top_under).all())  # and the 5 largest under-used ones
    seen.clear()
    residual_aux_loss(sae, step, under)  # without priority: the large under-used ones win
    assert not bool(seen["acts"][:, :3].any())


def test_zipf_reduces_to_auxk_before_min_steps():
    sae = make_topk(aux_loss="zipf", zipf_min_steps=50)
    sae.feature_density.copy_(torch.rand(D_SAE) * 0.2)
    sae.density_steps.fill_(49)
    x = torch.randn(40, D_IN)
    dead = torch.rand(D_SAE) < 0.3
    acts, pre, out = forward_parts(sae, x)
    step = AuxLossInput(sae_in=x, sae_out=out, feature_acts=acts, hidden_pre=pre, dead_mask=dead)
    assert torch.equal(sae.underused_mask(dead), dead)
    assert torch.equal(zipf_loss(sae, step), auxk_loss(sae, step))


def test_underused_set_is_far_below_the_zipf_curve():
    sae = make_topk(aux_loss="zipf", zipf_min_steps=0, zipf_underused_ratio=0.1, zipf_fit_fraction=0.5)
    ranks = torch.arange(1, D_SAE + 1, dtype=torch.float32)
    density = 0.3 * ranks**-0.8
    perm = torch.randperm(D_SAE)
    d = density[perm].clone()
    low = perm.argsort()[[40, 50, 60]]  # three features in the tail, pushed 100x below their target
    d[low] /= 100
    sae.feature_density.copy_(d)
    sae.density_steps.fill_(10)
    u = sae.underused_mask(None)
    assert set(u.nonzero().squeeze(1).tolist()) == set(low.tolist())
    # no dead latents, but under-used ones: zipf gives a gradient where auxk gives none
    x = torch.randn(40, D_IN)
    acts, pre, out = forward_parts(sae, x)
    step = AuxLossInput(
        sae_in=x, sae_out=out, feature_acts=acts, hidden_pre=pre, dead_mask=torch.zeros(D_SAE, dtype=torch.bool)
    )
    assert auxk_loss(sae, step).item() == 0
    loss = zipf_loss(sae, step)
    assert loss.item() > 0
    loss.backward()
    grad_rows = sae.W_dec.grad.abs().sum(-1) > 0
    assert set(grad_rows.nonzero().squeeze(1).tolist()) == set(low.tolist())


def test_zipf_fit_recovers_exponent():
    ranks = torch.arange(1, 4097, dtype=torch.float64)
    dens = 0.2 * ranks**-1.3
    alpha, log_c = M.zipf_fit(dens[torch.randperm(4096)], fit_fraction=0.5)
    assert abs(float(alpha) - 1.3) < 1e-9
    assert abs(float(log_c) - math.log(0.2)) < 1e-9


def test_metrics_count_nonzero_not_positive():
    acts = torch.tensor([[1.0, -2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 3.0], [1.0, 1.0, 1.0, 0.0]])
    stats = M.l0_stats(acts)
    assert stats["l0_mean"] == pytest.approx(7 / 4)
    assert stats["empty_token_frac"] == pytest.approx(0.25)
    assert stats["l0_p50"] == pytest.approx(2.0)
    assert stats["l0_p99"] == pytest.approx(float(torch.quantile(torch.tensor([2.0, 0, 2, 3]), 0.99)))
    assert torch.equal(M.batch_density(acts), torch.tensor([0.75, 0.5, 0.25, 0.25]))
    assert M.l0_stats(acts.reshape(2, 2, 4))["l0_mean"] == pytest.approx(7 / 4)  # leading dims flattened


def test_signed_selection_ranks_by_magnitude():
    class Signed(TopKZipfTrainingSAE):
        signed_selection = True

    sae = Signed(
        TopKZipfTrainingSAEConfig(
            d_in=D_IN, d_sae=D_SAE, k=4, aux_loss="auxk", aux_k=1, rescale_acts_by_decoder_norm=False
        )
    )
    pre = torch.zeros(1, D_SAE)
    pre[0, 5], pre[0, 6] = -3.0, 2.0
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[5, 6]] = True
    x = torch.zeros(1, D_IN)
    captured = {}
    sae.aux_decode = lambda acts: captured.setdefault("acts", acts) @ sae.W_dec
    residual_aux_loss(sae, AuxLossInput(sae_in=x, sae_out=x, feature_acts=pre, hidden_pre=pre, dead_mask=dead), dead)
    assert captured["acts"][0, 5] == -3.0 and captured["acts"].count_nonzero() == 1


def test_densities_are_persistent_and_dropped_from_the_inference_model(tmp_path):
    sae = make_topk()
    x = torch.randn(32, D_IN)
    for i in range(3):
        sae.training_forward_pass(step_input(x, step=i))
    assert int(sae.density_steps) == 3
    assert torch.allclose(sae.feature_density, M.batch_density(sae.encode(x)))
    assert {"feature_density", "density_steps"} <= set(sae.state_dict())
    sae.save_model(tmp_path / "ckpt")
    again = TopKZipfTrainingSAE.load_from_disk(tmp_path / "ckpt")
    assert torch.equal(again.feature_density, sae.feature_density) and int(again.density_steps) == 3
    sae.save_inference_model(tmp_path / "inf")
    from safetensors.torch import load_file

    assert "feature_density" not in load_file(tmp_path / "inf" / "sae_weights.safetensors")


def test_lazy_metrics_are_callables_with_the_right_values():
    sae = make_topk(zipf_min_steps=0)
    x = torch.randn(32, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:8] = True
    out = sae.training_forward_pass(step_input(x, dead))
    names = {"dead_frac", "underused_frac", "zipf_exponent", "l0_mean", "l0_p50", "l0_p99", "empty_token_frac"}
    assert names <= set(out.metrics)
    assert all(callable(out.metrics[n]) for n in names)
    assert out.metrics["dead_frac"]() == pytest.approx(8 / D_SAE)
    assert out.metrics["l0_mean"]() == pytest.approx(4.0)
    assert out.metrics["empty_token_frac"]() == 0.0
    assert out.metrics["underused_frac"]() >= 8 / D_SAE
    assert math.isfinite(out.metrics["zipf_exponent"]())


@pytest.mark.parametrize(
    "field,value",
    [
        ("aux_loss", "no_such_loss"),
        ("aux_loss_coefficient", -1.0),
        ("aux_k", 0),
        ("density_window", 0),
        ("zipf_underused_ratio", 1.5),
        ("zipf_fit_fraction", 0.0),
        ("zipf_exponent", -1.0),
    ],
)
def test_bad_aux_fields_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        TopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, **{field: value})


def test_unknown_loss_lists_the_registered_ones():
    with pytest.raises(ValueError, match="aux_loss='nope'.*auxk.*none.*zipf"):
        MutualChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4.0, aux_loss="nope")


def test_none_loss_adds_nothing():
    sae = make_topk(aux_loss="none")
    x = torch.randn(16, D_IN)
    out = sae.training_forward_pass(step_input(x, torch.ones(D_SAE, dtype=torch.bool)))
    assert out.losses["auxiliary_reconstruction_loss"].item() == 0.0
    assert torch.equal(out.loss, out.losses["mse_loss"])


def test_nan_input_is_refused_before_any_update():
    sae = make_topk()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    x = torch.randn(8, D_IN)
    x[2, 3] = float("nan")
    x[4, 1] = float("inf")
    with pytest.raises(ValueError, match="1 NaN and 1 inf"):
        sae.training_forward_pass(step_input(x))
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())


@pytest.mark.parametrize(
    "bad,counts",
    [(float("inf"), "0 NaN and 1 inf"), (float("-inf"), "0 NaN and 1 inf"), (float("nan"), "1 NaN and 0 inf")],
)
def test_inf_alone_or_nan_alone_is_refused_before_any_update(bad, counts):
    # "NaN or inf activations raise before the step touches any weight": each on its own
    sae = make_topk()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    x = torch.randn(8, D_IN)
    x[5, 2] = bad
    with pytest.raises(ValueError, match=counts):
        sae.training_forward_pass(step_input(x))
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())


PLUGIN = """
import torch
from sae_allocators import hookimpl
from sae_allocators.losses.builtin import residual_aux_loss

CALLS = []

def all_latents(sae, step):
    CALLS.append(1)
    every = torch.ones(sae.cfg.d_sae, dtype=torch.bool, device=step.sae_in.device)
    return {"aux_all": residual_aux_loss(sae, step, every)}

@hookimpl
def register_aux_losses(register):
    register("all_latents", all_latents, description="AuxK over every latent")
"""


def test_third_party_loss_plugs_in_through_the_hook(fake_dists):
    from sae_allocators import host

    fake_dists.add("aux-all", "0.1", {"auxall": "aux_all_plugin"}, {"aux_all_plugin": PLUGIN})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        host.load(force=True)
    assert get("all_latents").provider == "aux-all 0.1"
    cfg = MutualChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4.0, aux_loss="all_latents")
    sae = MutualChoiceTrainingSAE(cfg)
    out = sae.training_forward_pass(step_input(torch.randn(16, D_IN)))
    import aux_all_plugin

    assert aux_all_plugin.CALLS == [1]
    assert out.losses["aux_all"].item() > 0
    assert torch.allclose(out.loss, out.losses["mse_loss"] + out.losses["aux_all"])


@pytest.mark.parametrize(
    "cfg",
    [
        lambda: TopKZipfTrainingSAEConfig(d_in=32, d_sae=64, k=4, zipf_min_steps=5),
        lambda: BatchTopKZipfTrainingSAEConfig(d_in=32, d_sae=64, k=4.0, zipf_min_steps=5),
    ],
)
def test_saelens_topk_and_batchtopk_train_with_zipf_and_load_as_saelens(cfg, tmp_path):
    from sae_lens import SAE

    from sae_allocators.testing import train_tiny

    c = cfg()
    sae = train_tiny(c, steps=15, output_path=tmp_path)
    assert int(sae.density_steps) == 15
    loaded = SAE.load_from_disk(tmp_path)
    assert loaded.cfg.architecture() == ("topk" if c.architecture() == "topk_zipf" else "jumprelu")
    assert loaded.cfg.metadata.training_architecture == c.architecture()


def test_density_is_measured_on_a_strided_token_subsample():
    sae = make_topk()
    acts = (torch.rand(2048, D_SAE) < 0.1).float()
    sae.update_feature_density(acts)
    assert torch.equal(sae.feature_density, M.batch_density(acts[::4]))  # 2048 // 512 = 4


@pytest.mark.parametrize(
    "alias,saved_as", [("topk_zipf", "topk"), ("batchtopk_zipf", "jumprelu"), ("abstopk_zipf", "abstopk")]
)
def test_a_cfg_json_naming_a_zipf_architecture_loads_as_the_saelens_model(alias, saved_as, tmp_path):
    # training saves under SAELens's own name; a hand-made cfg.json with ours must load the same model
    import json

    from sae_lens import SAE
    from sae_lens.registry import get_sae_class

    sae_cls, cfg_cls = get_sae_class(saved_as)
    extra = {"k": 4} if saved_as != "jumprelu" else {}
    torch.manual_seed(0)
    sae = sae_cls(cfg_cls(d_in=8, d_sae=16, **extra))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    sae.save_model(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == saved_as
    cfg["architecture"] = alias
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    loaded = SAE.load_from_disk(tmp_path)
    assert type(loaded) is sae_cls and loaded.cfg.architecture() == alias
    x = torch.randn(5, 8)
    assert torch.equal(loaded.encode(x), sae.encode(x))
