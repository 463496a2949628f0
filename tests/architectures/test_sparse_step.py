"""The sparse training step (sae_allocators.sparse + architectures._step) against the dense reference.

For every architecture of this project: the same selection, the same losses and the same
gradient for every parameter, with ``sparse_step=True`` (one dense encoder matmul, the rest on the
kept entries) and ``sparse_step=False`` (SAELens's dense computation on the same selection) --
both settings of ``rescale_acts_by_decoder_norm``, float32 and bfloat16, dead latents (the
auxiliary losses' own sparse decode), repeated rows and ties, tokens with no feature, features
with no token, and 3-D inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput

import sae_allocators  # noqa: F401
from sae_allocators import sparse
from sae_allocators.architectures.abstopk_zipf import AbsTopKZipfTrainingSAE, AbsTopKZipfTrainingSAEConfig
from sae_allocators.architectures.batchtopk_zipf import BatchTopKZipfTrainingSAE, BatchTopKZipfTrainingSAEConfig
from sae_allocators.architectures.feature_choice import FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig
from sae_allocators.architectures.gradient_topk import GradientTopKTrainingSAE, GradientTopKTrainingSAEConfig
from sae_allocators.architectures.mutual_choice import MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig
from sae_allocators.architectures.top_afa import TopAFATrainingSAE, TopAFATrainingSAEConfig
from sae_allocators.architectures.topk_zipf import TopKZipfTrainingSAE, TopKZipfTrainingSAEConfig
from helpers import codes, step_input

D_IN, D_SAE = 16, 64

ARCHS = {
    "mutual_choice": (MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig, {"k": 4.0, "aux_loss": "auxk"}),
    "feature_choice": (
        FeatureChoiceTrainingSAE,
        FeatureChoiceTrainingSAEConfig,
        {"k": 4.0, "aux_loss": "zipf", "zipf_min_steps": 0},
    ),
    "feature_choice_one_per_token": (
        FeatureChoiceTrainingSAE,
        FeatureChoiceTrainingSAEConfig,
        {"k": 0.5, "one_per_token": True, "aux_loss": "auxk"},
    ),
    "topk_zipf": (TopKZipfTrainingSAE, TopKZipfTrainingSAEConfig, {"k": 4, "aux_loss": "zipf", "zipf_min_steps": 0}),
    "batchtopk_zipf": (BatchTopKZipfTrainingSAE, BatchTopKZipfTrainingSAEConfig, {"k": 4.0, "aux_loss": "auxk"}),
    "abstopk_zipf": (
        AbsTopKZipfTrainingSAE,
        AbsTopKZipfTrainingSAEConfig,
        {"k": 4, "aux_loss": "zipf", "zipf_min_steps": 0},
    ),
    "gradient_topk": (GradientTopKTrainingSAE, GradientTopKTrainingSAEConfig, {"k": 4, "beta": 2.0}),
    "top_afa": (TopAFATrainingSAE, TopAFATrainingSAEConfig, {"k_max": 16, "aux_loss": "auxk"}),
}


def _pair(arch: str, rescale: bool, dtype: str = "float32", seed: int = 0):
    cls, cfg_cls, kw = ARCHS[arch]
    torch.manual_seed(seed)
    sae_sparse = cls(
        cfg_cls(d_in=D_IN, d_sae=D_SAE, rescale_acts_by_decoder_norm=rescale, dtype=dtype, sparse_step=True, **kw)
    )
    with torch.no_grad():  # move off the initialisation (b_dec, b_enc non-zero; decoder norms != 1)
        g = torch.Generator().manual_seed(seed + 1)
        for p in sae_sparse.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.1).to(p.dtype))
    sae_dense = cls(
        cfg_cls(d_in=D_IN, d_sae=D_SAE, rescale_acts_by_decoder_norm=rescale, dtype=dtype, sparse_step=False, **kw)
    )
    sae_dense.load_state_dict(sae_sparse.state_dict())
    return sae_sparse, sae_dense


def _batch(arch: str, n: int = 48, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g) * 3
    x[5:9] = x[0]  # repeated rows: ties in every column (the sequence-start token of a real LM)
    x[10] = 0.0
    if arch == "gradient_topk":
        x = torch.cat([x, torch.randn(n, D_IN, generator=g)], dim=-1)  # [x | dL/dx] rows
    return x.to(dtype)


def _step(sae, x: torch.Tensor, dead: torch.Tensor):
    out = sae.training_forward_pass(
        TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
    )
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in sae.named_parameters()}
    return out, grads


def _dead_mask() -> torch.Tensor:
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    return dead


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_sparse_step_equals_dense_reference(arch: str, rescale: bool) -> None:
    sae_s, sae_d = _pair(arch, rescale)
    x = _batch(arch)
    dead = _dead_mask()
    out_s, grads_s = _step(sae_s, x, dead)
    out_d, grads_d = _step(sae_d, x, dead)
    assert torch.equal(codes(out_s), codes(out_d))  # identical selection and values
    assert set(out_s.losses) == set(out_d.losses)
    for name in out_s.losses:
        torch.testing.assert_close(out_s.losses[name], out_d.losses[name], rtol=1e-5, atol=1e-5, msg=name)
    assert float(out_s.losses["auxiliary_reconstruction_loss"]) > 0  # the dead latents' sparse decode ran
    torch.testing.assert_close(out_s.sae_out, out_d.sae_out, rtol=1e-5, atol=1e-5)
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-5, msg=name)
    # the running statistics the step updates agree as well
    for (name, a), (_, b) in zip(sae_s.named_buffers(), sae_d.named_buffers()):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sparse_step_bfloat16(arch: str) -> None:
    sae_s, sae_d = _pair(arch, rescale=True, dtype="bfloat16")
    x = _batch(arch, dtype=torch.bfloat16)
    out_s, grads_s = _step(sae_s, x, _dead_mask())
    out_d, grads_d = _step(sae_d, x, _dead_mask())
    assert torch.equal(codes(out_s) != 0, codes(out_d) != 0)
    for name in out_s.losses:
        torch.testing.assert_close(
            out_s.losses[name].float(), out_d.losses[name].float(), rtol=3e-2, atol=3e-2, msg=name
        )
    for name in grads_d:
        g_s, g_d = grads_s[name].float(), grads_d[name].float()
        assert g_s.dtype == g_d.dtype
        # bfloat16 sums in another order: compare relative to the gradient's scale
        assert float((g_s - g_d).norm()) <= 0.05 * float(g_d.norm()) + 1e-3, name


@pytest.mark.parametrize("arch", ["mutual_choice", "feature_choice", "topk_zipf", "top_afa"])
def test_sparse_step_3d_input(arch: str) -> None:
    sae_s, sae_d = _pair(arch, rescale=False)
    x = _batch(arch, n=48).reshape(4, 12, -1)
    out_s, grads_s = _step(sae_s, x, _dead_mask())
    out_d, grads_d = _step(sae_d, x, _dead_mask())
    assert codes(out_s).shape == (4, 12, D_SAE)
    assert out_s.sae_out.shape == (4, 12, D_IN)
    assert torch.equal(codes(out_s), codes(out_d))
    # the running densities read their token sample from the 3-d COO codes as from the dense ones
    assert out_s.feature_acts.is_sparse and torch.equal(sae_s.feature_density, sae_d.feature_density)
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-5, msg=name)


def test_feature_choice_tokens_without_features_decode_to_b_dec() -> None:
    """Feature Choice at a small budget leaves tokens empty: their output is exactly b_dec."""
    cls, cfg_cls, kw = ARCHS["feature_choice"]
    torch.manual_seed(0)
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, sparse_step=True, **{**kw, "k": 0.25, "aux_loss": "none"}))
    with torch.no_grad():
        sae.b_dec.normal_()
    x = _batch("feature_choice")
    out, grads = _step(sae, x, torch.zeros(D_SAE, dtype=torch.bool))
    empty = (codes(out) != 0).sum(-1) == 0
    assert bool(empty.any())
    torch.testing.assert_close(out.sae_out[empty], sae.b_dec.detach().expand(int(empty.sum()), -1))
    # features that kept no token get no encoder gradient
    unused = (codes(out) != 0).sum(0) == 0
    assert bool(unused.any())
    assert float(grads["W_enc"][:, unused].abs().sum()) == 0.0
    assert float(grads["b_enc"][unused].abs().sum()) == 0.0


def test_mutual_choice_step_spends_exact_budget_on_repeated_rows() -> None:
    sae_s, _ = _pair("mutual_choice", rescale=False)
    x = _batch("mutual_choice")
    x[:24] = x[0]  # half the batch is one repeated row: massive ties
    out, _ = _step(sae_s, x, torch.zeros(D_SAE, dtype=torch.bool))
    assert int((codes(out) != 0).sum()) == math.floor(4.0 * 48)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sparse_step_hands_saelens_trainer_coo_codes_with_identical_bookkeeping(arch: str) -> None:
    """The sparse step returns ``feature_acts`` as a sparse COO tensor holding only the kept entries
    (no dense ``[N, F]`` code matrix is built or swept); SAELens's own trainer counts firing on it
    exactly as on the dense reference's codes: the same ``act_freq_scores``, the same
    ``n_forward_passes_since_fired``, the same running densities, step after step."""
    from sae_lens.training.sae_trainer import SAETrainer

    from sae_allocators.testing import runner_config

    sae_s, sae_d = _pair(arch, rescale=False)
    trainers = [
        SAETrainer(
            cfg=runner_config(sae.cfg, steps=10, batch_tokens=48, dead_feature_window=0).to_sae_trainer_config(),
            sae=sae,
            data_provider=iter(()),
        )
        for sae in (sae_s, sae_d)
    ]
    for i in range(3):
        sae_d.load_state_dict(sae_s.state_dict())  # the same weights and running state before each step
        x = _batch(arch, seed=i)
        out_s = trainers[0]._train_step(sae=sae_s, sae_in=x)
        out_d = trainers[1]._train_step(sae=sae_d, sae_in=x)
        assert out_s.feature_acts.is_sparse and not out_d.feature_acts.is_sparse
        kept = int((codes(out_d) != 0).sum())
        assert out_s.feature_acts._nnz() >= kept and out_s.feature_acts._nnz() <= 16 * 48  # only kept entries
        assert torch.equal(codes(out_s), codes(out_d))
        assert torch.equal(trainers[0].act_freq_scores, trainers[1].act_freq_scores)
        assert torch.equal(trainers[0].n_forward_passes_since_fired, trainers[1].n_forward_passes_since_fired)
        assert torch.equal(sae_s.feature_density, sae_d.feature_density)
        assert float(trainers[0].act_freq_scores.sum()) > 0


def test_selected_values_gradcheck() -> None:
    """The sparse backward of the encoder against torch's numerical gradient (float64)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    norm = (torch.rand(7, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    flat = torch.tensor([0, 3, 9, 10, 11, 20, 33, 41])
    sel = sparse.from_flat(flat, 6, 7, is_sorted=True)

    def f(x, w, b, norm):
        pre = sparse.dense_pre(x, w, b, norm)
        return sparse.selected_values(x, w, b, norm, pre, sel)

    assert torch.autograd.gradcheck(f, (x, w, b, norm))
    assert torch.autograd.gradcheck(lambda x, w, b: f(x, w, b, None), (x, w, b))


def test_decode_matches_dense_matmul() -> None:
    g = torch.Generator().manual_seed(0)
    w_dec = torch.randn(7, 5, generator=g)
    sel = sparse.from_flat(torch.tensor([1, 2, 8, 30, 31, 40]), 6, 7)
    values = torch.randn(len(sel), generator=g)
    torch.testing.assert_close(sparse.decode(values, sel, w_dec), sel.to_dense(values) @ w_dec)
    assert sel.tokens_per_row().tolist() == [2, 1, 0, 0, 2, 1]


def test_selection_from_row_indices_with_keep_mask() -> None:
    idx = torch.tensor([[3, 1], [0, 2], [1, 1]])
    keep = torch.tensor([[True, False], [False, False], [True, True]])
    sel = sparse.from_row_indices(idx, 4, keep)
    assert sel.rows.tolist() == [0, 2, 2]
    assert sel.cols.tolist() == [3, 1, 1]
    assert sel.offsets.tolist() == [0, 1, 1, 3]


def test_dense_reference_switch_is_a_validated_config_field() -> None:
    cls, cfg_cls, kw = ARCHS["mutual_choice"]
    with pytest.raises(ValueError, match="sparse_step"):
        cfg_cls(d_in=D_IN, d_sae=D_SAE, sparse_step="yes", **kw)
    assert cfg_cls(d_in=D_IN, d_sae=D_SAE, **kw).sparse_step is True


def test_sparse_module_names_no_device() -> None:
    """Nothing in the sparse path names a device: every tensor it makes follows its inputs."""
    import inspect

    src = inspect.getsource(sparse)
    assert '"cpu"' not in src and ".cpu()" not in src and "cuda" not in src


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_decoder_norms_value_and_gradient_are_torchs(dtype: torch.dtype) -> None:
    """sparse.decoder_norms (one [F, d] buffer in backward) gives torch's norm and torch's gradient,
    bit for bit, a zero-norm row included."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 7, generator=g).to(dtype)
    w[3] = 0.0
    upstream = torch.randn(40, generator=g).to(dtype)
    grads = []
    for fn in (lambda t: t.norm(dim=-1), sparse.decoder_norms):
        leaf = w.clone().requires_grad_(True)
        out = fn(leaf)
        (out * upstream).sum().backward()
        grads.append((out.detach(), leaf.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])
    assert torch.equal(grads[1][1][3], torch.zeros(7, dtype=dtype))


def _shift_case(dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(3)
    u = torch.randn(6, 5, generator=g, dtype=dtype)
    w = torch.randn(5, 7, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=dtype, requires_grad=True)
    shift = torch.randn(5, generator=g, dtype=dtype, requires_grad=True)
    norm = (torch.rand(7, generator=g, dtype=dtype) + 0.5).requires_grad_(True)
    sel = sparse.from_flat(torch.tensor([0, 3, 9, 10, 11, 20, 33, 41]), 6, 7, is_sorted=True)
    return u, w, b, shift, norm, sel


def test_selected_values_shift_gradcheck() -> None:
    """The shift's gradient (input = u - shift, u constant) against torch's numerical gradient."""
    u, w, b, shift, norm, sel = _shift_case()

    def f(w, b, shift, norm):
        x = (u - shift).detach()
        return sparse.selected_values(x, w, b, norm, sparse.dense_pre(x, w, b, norm), sel, shift)

    assert torch.autograd.gradcheck(lambda w, b, s: f(w, b, s, None), (w, b, shift))
    assert torch.autograd.gradcheck(f, (w, b, shift, norm))


def test_selected_values_shift_equals_input_gradient_path() -> None:
    """Passing the input without autograd and its shift gives the parameters the gradients of the
    plain path (the input with its graph): W_enc, b_enc and the norms bit for bit, the shift's to
    rounding (its sum over tokens runs in another order)."""
    u, w, b, shift, norm, sel = _shift_case(torch.float32)
    upstream = torch.randn(len(sel), generator=torch.Generator().manual_seed(4))
    grads = []
    for with_shift in (False, True):
        for t in (w, b, shift, norm):
            t.grad = None
        x = (u - shift).detach() if with_shift else u - shift
        pre = sparse.dense_pre(x, w, b, norm)
        values = sparse.selected_values(x, w, b, norm, pre, sel, shift if with_shift else None)
        (values * upstream).sum().backward()
        grads.append([t.grad.clone() for t in (w, b, shift, norm)])
    plain, shifted = grads
    for a, c in zip(plain[:2] + plain[3:], shifted[:2] + shifted[3:]):
        assert torch.equal(a, c)
    torch.testing.assert_close(shifted[2], plain[2], rtol=1e-5, atol=1e-6)
    assert float(plain[2].abs().sum()) > 0


@pytest.mark.parametrize("arch", ["mutual_choice", "topk_zipf", "top_afa"])
def test_sparse_step_input_gradient_path_when_input_requires_grad(arch: str) -> None:
    """A training batch carries no gradient: the step's input goes to the encoder without autograd and
    b_dec's term as its shift. An input that requires grad keeps its own graph and gets dL/dx; both
    give every parameter the same gradient as the dense reference."""
    sae_s, sae_d = _pair(arch, rescale=True)
    x = _batch(arch)
    dead = _dead_mask()
    state = sae_s.encode_step(x)
    assert not state.sae_in.requires_grad  # the shift path
    out_d, grads_d = _step(sae_d, x, dead)
    for name, p in sae_s.named_parameters():
        p.grad = None
    xg = x.clone().requires_grad_(True)
    out_s, grads_s = _step(sae_s, xg, dead)
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0
    xd = x.clone().requires_grad_(True)
    for p in sae_d.parameters():
        p.grad = None
    _step(sae_d, xd, dead)
    torch.testing.assert_close(xg.grad, xd.grad, rtol=1e-4, atol=1e-5)
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("aux_loss", ["zipf", "auxk"])
def test_batchtopk_zipf_trains_bit_identically_to_mutual_choice(aux_loss: str) -> None:
    """The same rule, outlier guard, threshold tracker, export correction and auxiliary loss: step
    after step (Adam on both) every parameter and buffer is bit-identical, and so are the calibrated
    saved models. The large preset relies on it: it trains ``batchtopk_zipf``'s runs once, as
    ``mutual_choice``'s (``Settings.same_runs``); if this fails, that shortcut must go."""
    from sae_allocators.calibration import calibrate

    kw = dict(d_in=D_IN, d_sae=D_SAE, k=4.0, aux_loss=aux_loss, topk_threshold_lr=0.1)
    if aux_loss == "zipf":
        kw["zipf_min_steps"] = 0
    torch.manual_seed(0)
    mc = MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(**kw))
    torch.manual_seed(0)
    bz = BatchTopKZipfTrainingSAE(BatchTopKZipfTrainingSAEConfig(**kw))
    opts = [torch.optim.Adam(s.parameters(), lr=1e-2) for s in (mc, bz)]
    dead = _dead_mask()
    for step in range(8):
        x = _batch("mutual_choice", seed=step)
        x[3] *= 60  # an outlier-norm row: the guard ranks it down, on both
        for sae, opt in zip((mc, bz), opts):
            opt.zero_grad()
            out = sae.training_forward_pass(step_input(x, dead, step=step))
            out.loss.backward()
            opt.step()
    a, b = mc.state_dict(), bz.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert float(mc.threshold_export_scale) != 1.0  # the export correction ran (on both)
    held_out = [_batch("mutual_choice", seed=100 + i) for i in range(3)]
    fits = [calibrate(s, held_out, 3 * 48) for s in (mc, bz)]
    assert fits[0].rule == fits[1].rule == "global" and torch.equal(fits[0].theta, fits[1].theta)
    assert mc.threshold_tracker.is_calibrated and bz.threshold_tracker.is_calibrated
    saved = []
    for s in (mc, bz):
        d = dict(s.state_dict())
        s.process_state_dict_for_saving_inference(d)
        saved.append(d)
    assert set(saved[0]) == set(saved[1])
    for name in saved[0]:
        assert torch.equal(saved[0][name], saved[1][name]), name
