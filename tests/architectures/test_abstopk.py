"""AbsTopK on every supported SAELens: the port, SAELens's own, files across versions, aux_zipf.

Runs under whichever SAELens is installed (CI runs it at the floor and at the newest version):
the committed fixtures in tests/fixtures/abstopk/ were written by SAELens 6.54's own AbsTopK
(``saelens/``) and by this project's port at SAELens 6.38 (``port/``); both must load here and
give the codes their writer computed. (The files cross versions through these fixtures: CI runs
this module at both SAELens versions, so each side loads the other's files.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
import sae_lens
import sae_lens.registry as saelens_registry
from sae_lens import SAE

import sae_allocators  # noqa: F401  (registers the architectures)
from sae_allocators import host, metrics
from sae_allocators.allocation.signed import abs_topk, signed_mutual_choice_reference, signed_mutual_choice_select
from sae_allocators.architectures import abstopk as A
from sae_allocators.architectures.abstopk_zipf import AbsTopKZipfTrainingSAE, AbsTopKZipfTrainingSAEConfig
from sae_allocators.losses import AuxLossInput
from sae_allocators.losses.builtin import auxk_loss, zipf_loss
from sae_allocators.testing import run_fresh, train_tiny

from helpers import codes, step_input

FIXTURES = Path(__file__).parent / "fixtures" / "abstopk"
D_IN, D_SAE = 16, 48
SAELENS_VERSION = tuple(int(p) for p in sae_lens.__version__.split(".")[:2])


# --- the activation ------------------------------------------------------------------------


def test_abs_topk_keeps_largest_magnitudes_with_sign():
    x = torch.tensor([[0.5, -3.0, 2.0, -0.1, 1.0], [-1.0, -2.0, -3.0, 0.0, 4.0]], requires_grad=True)
    out = abs_topk(x, 2)
    assert out.tolist() == [[0.0, -3.0, 2.0, 0.0, 0.0], [0.0, 0.0, -3.0, 0.0, 4.0]]
    out.sum().backward()
    assert x.grad.tolist() == [[0, 1, 1, 0, 0], [0, 0, 1, 0, 1]]


def test_abs_topk_matches_brute_force_on_random_inputs():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 40)
    out = abs_topk(x, 5)
    order = x.abs().argsort(dim=-1, descending=True)[..., :5]
    ref = torch.zeros_like(x).scatter(-1, order, x.gather(-1, order))
    assert torch.equal(out, ref)
    assert (out < 0).any()  # features fire negatively


@pytest.mark.skipif(not A.SAELENS_HAS_ABSTOPK, reason="SAELens < 6.53 has no AbsTopK to compare with")
def test_port_activation_is_saelens_activation():
    torch.manual_seed(1)
    x = torch.randn(50, 64)
    assert torch.equal(A.AbsTopK(7)(x), A._saelens_abstopk.AbsTopK(7)(x))


# --- who provides "abstopk" ----------------------------------------------------------------


def test_abstopk_provider_matches_the_installed_saelens():
    prov = host.providers()["abstopk"]
    train_cls, train_cfg = saelens_registry.SAE_TRAINING_CLASS_REGISTRY["abstopk"]
    inf_cls, inf_cfg = saelens_registry.SAE_CLASS_REGISTRY["abstopk"]
    if A.SAELENS_HAS_ABSTOPK:
        assert SAELENS_VERSION >= (6, 53)
        assert prov.distribution == "sae-lens" and prov.deferred  # our offer recorded as deferred
        assert train_cls is A._saelens_abstopk.AbsTopKTrainingSAE and inf_cls is A._saelens_abstopk.AbsTopKSAE
        assert A.AbsTopKSAE is inf_cls  # the public name is SAELens's class
    else:
        assert SAELENS_VERSION < (6, 53)
        assert prov.distribution == "sae-allocators"
        assert (train_cls, train_cfg) == (A.AbsTopKTrainingSAEPort, A.AbsTopKTrainingSAEConfigPort)
        assert (inf_cls, inf_cfg) == (A.AbsTopKSAEPort, A.AbsTopKSAEConfigPort)
        assert A.AbsTopKSAE is A.AbsTopKSAEPort


# --- on-disk format, both ways -------------------------------------------------------------


@pytest.mark.parametrize("side", ["saelens", "port"])
def test_committed_fixture_loads_and_encodes_as_its_writer_did(side):
    folder = FIXTURES / side
    source = json.loads((folder / "SOURCE.json").read_text())
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "abstopk"
    # the saelens/ folder really was written by SAELens's own class, the port/ one by ours at the floor
    if side == "saelens":
        assert source["implementation"] == "sae_lens.saes.abstopk_sae.AbsTopKSAE"
        assert cfg["metadata"]["sae_lens_version"].startswith("6.5")
    else:
        assert source["implementation"].endswith("AbsTopKSAEPort")
        assert cfg["metadata"]["sae_lens_version"] == "6.38.0"
    sae = SAE.load_from_disk(folder)
    assert type(sae) is saelens_registry.SAE_CLASS_REGISTRY["abstopk"][0]
    check = load_file(folder / "check.safetensors")
    with torch.no_grad():
        acts = sae.encode(check["x"])
        out = sae.decode(acts)
    assert torch.equal(acts != 0, check["feature_acts"] != 0)  # the same features, signs included
    assert torch.allclose(acts, check["feature_acts"], atol=1e-6)
    assert torch.allclose(out, check["sae_out"], atol=1e-5)
    assert (acts < 0).any()  # the fixture exercises negative codes


def test_both_fixtures_have_one_format():
    a, b = (json.loads((FIXTURES / s / "cfg.json").read_text()) for s in ("saelens", "port"))
    assert set(a) - {"metadata"} == set(b) - {"metadata"}
    wa, wb = (load_file(FIXTURES / s / "sae_weights.safetensors") for s in ("saelens", "port"))
    assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in wb.items()}
    assert set(wa) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for w in (wa, wb):  # decoder norms were folded into the encoder on save, on both sides
        assert torch.allclose(w["W_dec"].norm(dim=-1), torch.ones(D_SAE), atol=1e-5)


def load_with(cls, cfg_cls, folder: Path):
    """Load a saved folder with a given class pair, bypassing the registry."""
    raw = json.loads((folder / "cfg.json").read_text())
    names = {f.name for f in dataclasses.fields(cfg_cls)} - {"metadata"}
    cfg = cfg_cls(**{k: v for k, v in raw.items() if k in names})
    sae = cls(cfg)
    sae.load_state_dict(load_file(folder / "sae_weights.safetensors"))
    assert cfg.architecture() == "abstopk"
    return sae


def _trained_folder(tmp_path, cfg) -> Path:
    out = tmp_path / "sae"
    train_tiny(cfg, steps=15, output_path=out)
    return out


@pytest.mark.skipif(not A.SAELENS_HAS_ABSTOPK, reason="needs SAELens's own AbsTopK in this process")
def test_in_process_port_and_saelens_files_load_on_the_other_side(tmp_path):
    x = torch.randn(20, D_IN) * 2
    S = A._saelens_abstopk
    for writer_cfg, reader in (
        (A.AbsTopKTrainingSAEConfigPort(d_in=D_IN, d_sae=D_SAE, k=4), (S.AbsTopKSAE, S.AbsTopKSAEConfig)),
        (S.AbsTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4), (A.AbsTopKSAEPort, A.AbsTopKSAEConfigPort)),
    ):
        folder = tmp_path / writer_cfg.__class__.__name__
        torch.manual_seed(0)
        cls = (
            A.AbsTopKTrainingSAEPort
            if isinstance(writer_cfg, A.AbsTopKTrainingSAEConfigPort)
            else A._saelens_abstopk.AbsTopKTrainingSAE
        )
        writer = cls(writer_cfg)
        with torch.no_grad():
            writer.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # norms != 1: folding must happen
        writer.save_inference_model(folder)
        loaded = SAE.load_from_disk(folder)
        assert type(loaded) is A._saelens_abstopk.AbsTopKSAE
        other = load_with(*reader, folder)
        with torch.no_grad():
            ref = writer.decode(writer.encode(x))
            assert torch.allclose(other.decode(other.encode(x)), ref, atol=1e-5)
            assert torch.allclose(loaded.decode(loaded.encode(x)), ref, atol=1e-5)


@pytest.mark.skipif(not A.SAELENS_HAS_ABSTOPK, reason="needs SAELens's own AbsTopK in this process")
def test_port_training_step_equals_saelens_training_step():
    cfg_kw = dict(d_in=D_IN, d_sae=D_SAE, k=4, aux_loss_coefficient=0.5)
    torch.manual_seed(0)
    ours = A.AbsTopKTrainingSAEPort(A.AbsTopKTrainingSAEConfigPort(**cfg_kw))
    theirs = A._saelens_abstopk.AbsTopKTrainingSAE(A._saelens_abstopk.AbsTopKTrainingSAEConfig(**cfg_kw))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(30, D_IN)
    dead = torch.rand(D_SAE) < 0.4
    a, b = ours.training_forward_pass(step_input(x, dead)), theirs.training_forward_pass(step_input(x, dead))
    assert set(a.losses) == set(b.losses)
    for key in a.losses:
        assert torch.equal(a.losses[key], b.losses[key]), key
    assert a.losses["auxiliary_reconstruction_loss"] > 0


# --- abstopk_zipf: signed auxiliary losses and != 0 metrics --------------------------------


def make_zipf(**kw) -> AbsTopKZipfTrainingSAE:
    torch.manual_seed(0)
    sae = AbsTopKZipfTrainingSAE(AbsTopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, **kw))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)
        sae.b_enc.normal_()  # some pre-activations strongly negative
    return sae


def parts(sae, x):
    acts, pre = sae.encode_with_hidden_pre(x)
    return acts, pre, sae.decode(acts)


def test_abstopk_zipf_builds_on_the_installed_abstopk():
    assert issubclass(AbsTopKZipfTrainingSAE, A.AbsTopKTrainingSAE)
    assert AbsTopKZipfTrainingSAE.signed_selection


@pytest.mark.parametrize("rescale", [True, False])
def test_signed_auxk_equals_abstopk_aux_loss_exactly(rescale):
    sae = make_zipf(aux_loss="auxk", rescale_acts_by_decoder_norm=rescale, aux_loss_coefficient=0.7)
    x = torch.randn(40, D_IN)
    for dead in (torch.arange(D_SAE) % 3 == 0, torch.arange(D_SAE) < 3):
        acts, pre, out = parts(sae, x)
        ours = sae.calculate_aux_loss(step_input(x, dead), acts, pre, out)["auxiliary_reconstruction_loss"]
        ref = sae.calculate_abstopk_aux_loss(sae_in=x, sae_out=out, hidden_pre=pre, dead_neuron_mask=dead)
        assert ours.item() > 0
        assert torch.equal(ours, ref)


def test_signed_selection_picks_negative_dead_latents():
    sae = make_zipf(aux_loss="auxk")
    x = torch.randn(8, D_IN)
    acts, pre, out = parts(sae, x)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:10] = True
    with torch.no_grad():
        pre = pre.clone()
        pre[:, 0] = -100.0  # a strongly negative dead latent must be chosen, with its sign
        pre[:, 1] = 50.0
    captured = {}
    orig = sae.aux_decode
    sae.aux_decode = lambda a: captured.setdefault("acts", a) if False else (captured.__setitem__("acts", a) or orig(a))
    sae.calculate_aux_loss(step_input(x, dead), acts, pre, out)
    chosen = captured["acts"]
    assert (chosen[:, 0] == -100.0).all() and (chosen[:, 1] == 50.0).all()
    assert (chosen[:, 10:] == 0).all()  # live latents never take part


def test_zipf_with_dead_set_only_equals_signed_auxk(monkeypatch):
    sae = make_zipf(aux_loss="zipf", zipf_min_steps=0)
    sae.feature_density.copy_(torch.rand(D_SAE) * 0.2)
    sae.density_steps.fill_(1000)
    x = torch.randn(40, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[:3] = True  # fewer than k_aux = d_in // 2: the under-used latents get the other slots
    acts, pre, out = parts(sae, x)
    step = AuxLossInput(sae_in=x, sae_out=out, feature_acts=acts, hidden_pre=pre, dead_mask=dead)
    assert not torch.equal(zipf_loss(sae, step), auxk_loss(sae, step))
    monkeypatch.setattr(sae, "underused_mask", lambda dead_mask: dead_mask)
    assert torch.equal(zipf_loss(sae, step), auxk_loss(sae, step))


def test_negative_only_feature_counts_as_firing():
    sae = make_zipf()
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.zero_()
        sae.b_enc[5] = -10.0  # feature 5 only ever fires negatively
        sae.b_enc[6:9] = 1.0
    x = torch.randn(32, D_IN)
    out = sae.training_forward_pass(step_input(x))
    acts = codes(out)
    assert (acts[:, 5] < 0).all()
    assert sae.feature_density[5] > 0
    assert out.metrics["l0_mean"]() == pytest.approx(4.0)
    assert metrics.batch_density(acts)[5] == 1.0


def test_bad_config_and_nan_input_are_clear_errors():
    with pytest.raises(ValueError, match="k=2.5"):
        AbsTopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=2.5)
    with pytest.raises(ValueError, match="k=100"):
        AbsTopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=100)
    with pytest.raises(ValueError, match="aux_loss="):
        AbsTopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, aux_loss="nope")
    sae = make_zipf()
    x = torch.randn(4, D_IN)
    x[1, 2] = float("nan")
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        sae.training_forward_pass(step_input(x))
    assert all(torch.equal(before[k], v) for k, v in sae.state_dict().items())


def test_abstopk_zipf_trains_through_runner_and_saves_as_plain_abstopk(tmp_path):
    folder = _trained_folder(
        tmp_path, AbsTopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, zipf_min_steps=2, density_window=5)
    )
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "abstopk"
    assert cfg["metadata"]["training_architecture"] == "abstopk_zipf"
    weights = load_file(folder / "sae_weights.safetensors")
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec"}  # no training-only buffers
    sae = SAE.load_from_disk(folder)
    assert type(sae) is saelens_registry.SAE_CLASS_REGISTRY["abstopk"][0]
    assert (sae.encode(torch.randn(6, D_IN)) != 0).sum(-1).tolist() == [4] * 6


def test_abstopk_zipf_file_in_a_fresh_interpreter(tmp_path):
    """Without sae_allocators: plain SAELens >= 6.53 loads the file, older SAELens cannot; then
    importing sae_allocators (the abstopk module imports on every SAELens) makes it load."""
    folder = _trained_folder(tmp_path, AbsTopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    proc = run_fresh(
        f"""
        import sys
        from sae_lens import SAE
        try:
            sae = SAE.load_from_disk({str(folder)!r})
            print("plain", type(sae).__module__)
        except Exception as exc:
            print("plain", type(exc).__name__)
        assert "sae_allocators" not in sys.modules
        import sae_allocators.architectures.abstopk as A
        sae = SAE.load_from_disk({str(folder)!r})
        print("plugin", type(sae).__module__, A.SAELENS_HAS_ABSTOPK, A.AbsTopKSAE.__module__)
        """,
        env={"SAE_ALLOCATORS_NO_AUTOLOAD": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    plain, plugin = proc.stdout.splitlines()[-2:]
    if A.SAELENS_HAS_ABSTOPK:
        assert plain == "plain sae_lens.saes.abstopk_sae"
        assert plugin == "plugin sae_lens.saes.abstopk_sae True sae_lens.saes.abstopk_sae"
    else:
        assert plain.startswith("plain ") and plain != "plain sae_lens.saes.abstopk_sae"
        assert plugin == "plugin sae_allocators.architectures.abstopk False sae_allocators.architectures.abstopk"


# --- signed Mutual Choice (|affinity| over the batch) --------------------------------------


def test_signed_mutual_choice_matches_full_topk_reference():
    torch.manual_seed(0)
    for shape, k in (((64, 32), 3.0), ((4, 50, 128), 2.5), ((8, 16), 16.0)):
        a = torch.randn(shape)
        codes, tau = signed_mutual_choice_select(a, k)
        ref = signed_mutual_choice_reference(a, k)
        assert torch.equal(codes, ref)
        n = a.numel() // a.shape[-1]
        assert int((codes != 0).sum()) == int(k * n)
        assert (codes < 0).any() and float(tau) > 0


def test_signed_mutual_choice_large_batch_uses_fast_path_and_stays_exact():
    torch.manual_seed(1)
    a = torch.randn(2048, 512)
    codes, _ = signed_mutual_choice_select(a, 8)
    assert torch.equal(codes, signed_mutual_choice_reference(a, 8))


def test_signed_mutual_choice_fewer_nonzero_than_budget_keeps_all_nonzero():
    a = torch.zeros(4, 10)
    a[0, 1], a[2, 3] = -2.0, 1.0
    codes, tau = signed_mutual_choice_select(a, 3)
    assert torch.equal(codes, a) and float(tau) == 0.0
    x = a.clone().requires_grad_(True)
    signed_mutual_choice_select(x, 3)[0].sum().backward()
    assert torch.equal(x.grad, (a != 0).float())
