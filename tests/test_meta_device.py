"""GPU readiness without a GPU (issue 22, part 5): no tensor of a hot path is made on the default device.

Every model and input here is built on the CPU; then ``torch.set_default_device("meta")`` is set
and the training steps (sparse path and dense reference path), the running threshold updates,
the lazy metrics, the saved model's ``encode``/``decode``, every allocation rule of
``sae_allocators/allocation/`` and calibration run. A tensor made without the input's device
(``torch.zeros(f)``, ``torch.tensor(x)``, ``torch.arange(n)``) lands on ``meta``, and mixing it with
the CPU tensors raises ("Tensor on device meta is not on the expected device cpu", or ``.item()``
on a meta tensor). On a GPU the same code would put such a tensor on the CPU: an error, or a
silent host copy and sync inside the step. So this catches device bugs on a CPU-only machine.

torch's default-device mode is a Python TorchFunctionMode, and autograd does not carry it into the
code it runs during ``backward()`` (a custom Function's ``backward``, gradient hooks, engine
callbacks): there a tensor made without a device lands on the CPU even inside ``on_meta``. So the
tests also run this project's backward code under ``meta`` explicitly (:func:`meta_backward`:
the sparse step's ``_SelectedValues.backward``, and the data-parallel gradient averaging).

The default device is reset after every test, also when it fails (``on_meta`` and the autouse
fixture below). The optimizer step runs outside ``meta``: torch's Adam makes its step counter with
``torch.tensor(0.0)`` on the default device (torch's code, not ours).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import math
import os
import pkgutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from sae_lens.registry import get_sae_class, get_sae_training_class
from sae_lens.saes.sae import SAE, TrainStepInput

import sae_allocators  # noqa: F401  (registers the architectures)
from sae_allocators import names
from helpers import training_kwargs

D_IN = 16
#: N * F above 4 * 65536 entries: the batch rules take their estimate-and-correct path
N, D_SAE = 320, 1024


@contextlib.contextmanager
def on_meta():
    """Default device ``meta`` inside the block; the previous default comes back even on an error."""
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(previous)


@pytest.fixture(autouse=True)
def _default_device_is_reset():
    """Whatever a test does, the next one starts on the CPU default device."""
    yield
    if torch.get_default_device().type != "cpu":
        torch.set_default_device(None)
        pytest.fail("a test left the default device set")


def test_on_meta_resets_the_default_device_on_failure():
    cpu = torch.ones(2)
    with pytest.raises(RuntimeError, match="device"):
        with on_meta():
            assert torch.zeros(1).device.type == "meta"
            cpu + torch.zeros(2)  # a tensor made on the default device, mixed with a CPU one: the bug caught
    assert torch.zeros(1).device.type == "cpu"


def test_the_default_device_mode_does_not_reach_backward_code():
    """Why :func:`meta_backward` exists (if torch starts carrying the mode into backward, this fails
    and the fixture can go)."""
    seen = []

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            seen.append(torch.zeros(1).device.type)
            return g * 2

    x = torch.ones(3, requires_grad=True)
    with on_meta():
        Double.apply(x).sum().backward()
    assert seen == ["cpu"]


@pytest.fixture
def meta_backward(monkeypatch):
    """Run this project's backward code (the sparse step's Functions) on the meta default device;
    yields the list of backward calls made, so a test can check that the sparse backward ran."""
    from sae_allocators import sparse

    calls: list[str] = []
    original = sparse._SelectedValues.backward

    def backward(ctx, *grads):
        calls.append(torch.get_default_device().type)
        with on_meta():
            return original(ctx, *grads)

    monkeypatch.setattr(sparse._SelectedValues, "backward", staticmethod(backward))
    norms_backward = sparse._RowNorms.backward

    def row_norms_backward(ctx, *grads):
        with on_meta():
            return norms_backward(ctx, *grads)

    monkeypatch.setattr(sparse._RowNorms, "backward", staticmethod(row_norms_backward))
    yield calls


# --- every architecture: training steps, thresholds, metrics, saved model ------------------------

#: (architecture, extra training kwargs): every architecture of this project, plus the variants
#: whose hot path differs (capacities, one_per_token, the auxiliary losses, gradient normalisation)
VARIANTS = [(name, {}) for name in names.OWN_ARCHITECTURES] + [
    ("feature_choice", {"capacity": "uniform"}),
    ("feature_choice", {"one_per_token": True, "k": 0.5}),
    ("mutual_choice", {"aux_loss": "auxk"}),
    ("batchtopk_zipf", {"aux_loss": "none"}),
    ("topk_zipf", {"aux_loss": "auxk"}),
    ("gradient_topk", {"grad_normalization": "batch"}),
    ("top_afa", {"afa_loss_target": "x_minus_b_dec"}),
]


def _ids(v):
    name, extra = v
    return name + "".join(f"-{k}={val}" for k, val in extra.items())


def _build(name: str, extra: dict, **cfg):
    cls, cfg_cls = get_sae_training_class(name)
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    kw = {**training_kwargs(name), "zipf_min_steps": 0, **extra, **cfg}  # zipf: the loss works from step 0
    kw = {k: v for k, v in kw.items() if k in fields}
    torch.manual_seed(0)
    sae = cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, **kw))
    with torch.no_grad():  # off the initialisation: non-zero biases, decoder norms != 1
        g = torch.Generator().manual_seed(1)
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return sae


def _batches(name: str, steps: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(steps):
        x = torch.randn(N, D_IN, generator=g) * 2
        x[3:7] = x[0]  # repeated rows: ties
        if name == "gradient_topk":
            x = torch.cat([x, torch.randn(N, D_IN, generator=g)], dim=-1)  # [x | dL/dx] rows
        out.append(x)
    return out


def _evaluate_metrics(metrics: dict) -> None:
    for key, value in metrics.items():
        value = value() if callable(value) else value
        if torch.is_tensor(value):
            assert value.device.type == "cpu", key
            float(value.float().sum())


@pytest.mark.parametrize("sparse_step", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "norescale"])
@pytest.mark.parametrize("variant", VARIANTS, ids=_ids)
def test_training_steps_make_no_tensor_on_the_default_device(variant, rescale, sparse_step, meta_backward):
    name, extra = variant
    if name == "abstopk" and sparse_step is False:
        pytest.skip("abstopk (SAELens's AbsTopK port) has no sparse_step field: one run covers it")
    sae = _build(name, extra, rescale_acts_by_decoder_norm=rescale, sparse_step=sparse_step)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    for step, x in enumerate(_batches(name, 3)):
        with on_meta():
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=step, is_logging_step=step == 1
                )
            )
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            _evaluate_metrics(out.metrics)
            for key, value in out.losses.items():
                assert math.isfinite(float(value.detach())), key
        opt.step()
        opt.zero_grad()
    for key, value in sae.state_dict().items():
        assert value.device.type == "cpu", key
    # the steps ran: parameters moved, and the running statistics (thresholds, densities) updated
    changed = [k for k, v in sae.state_dict().items() if not torch.equal(v, before[k])]
    assert "W_enc" in changed
    trackers = [
        t
        for t in (getattr(sae, "threshold_tracker", None), getattr(sae, "global_threshold_tracker", None))
        if t is not None
    ]
    for t in trackers:
        assert t.value_name in changed
    # the sparse step's own backward ran (under meta, through the fixture); the dense path has none
    assert bool(meta_backward) == (sparse_step and name != "abstopk")


@pytest.mark.parametrize("variant", [(n, {}) for n in names.OWN_ARCHITECTURES], ids=_ids)
def test_encode_and_the_saved_model_make_no_tensor_on_the_default_device(variant, tmp_path):
    name, extra = variant
    sae = _build(name, extra)
    x = _batches(name, 1)[0]
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    for step in range(2):  # running thresholds away from their initial values
        sae.training_forward_pass(
            TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=step, is_logging_step=False
            )
        )
    plain = x[:, :D_IN]
    with on_meta():
        sae.encode(plain)  # the training SAE's encode (a batch rule for mutual/feature choice)
        if hasattr(sae, "encode_thresholded"):
            sae.encode_thresholded(plain)
        if name == "gradient_topk":
            sae.encode(plain, grad=x[:, D_IN:])
        sae.fold_activation_norm_scaling_factor(2.0)  # the running thresholds follow the fold
    sae.save_inference_model(str(tmp_path))
    loaded = SAE.load_from_disk(str(tmp_path), device="cpu")
    with on_meta():
        codes = loaded.encode(plain)
        out = loaded.decode(codes)  # (gradient_topk saves a plain topk: no gradient at inference)
    assert codes.device.type == "cpu" and out.device.type == "cpu"
    # the batch-mode inference classes (parity checks) run the training-time rule
    inf_cls, inf_cfg_cls = get_sae_class(name)
    if inf_cls.__module__.startswith("sae_allocators"):
        fields = {f.name for f in dataclasses.fields(inf_cfg_cls)}
        kw = {k: v for k, v in training_kwargs(name).items() if k in fields}
        batch_mode = inf_cls(inf_cfg_cls(d_in=D_IN, d_sae=D_SAE, **kw))
        with on_meta():
            batch_mode.encode(plain)


# --- every allocation rule ------------------------------------------------------------------------


def _public_functions(module) -> set[str]:
    return {
        n
        for n, f in inspect.getmembers(module, inspect.isfunction)
        if f.__module__ == module.__name__ and not n.startswith("_")
    }


def _in_blocks(module, call):
    """``call()`` with ``module._ABS_BLOCK_ELEMENTS`` set to three rows of the test's features (its blocked path)."""
    saved = module._ABS_BLOCK_ELEMENTS
    module._ABS_BLOCK_ELEMENTS = 3 * D_SAE
    try:
        return call()
    finally:
        module._ABS_BLOCK_ELEMENTS = saved


def _allocation_calls():
    """One call (or several) of every public function of sae_allocators/allocation/*, on CPU inputs."""
    from sae_allocators.allocation import afa, batch, feature_choice, gradient, outliers, signed, topk

    g = torch.Generator().manual_seed(3)
    pre = torch.randn(N, D_SAE, generator=g)
    pre[3:7] = pre[0]
    small = torch.randn(40, 24, generator=g)
    x = torch.randn(N, D_IN, generator=g)
    grad = torch.randn(N, D_IN, generator=g)
    dec = torch.randn(D_SAE, D_IN, generator=g)
    norms = dec.norm(dim=-1)
    target = x.norm(dim=-1)
    usage = torch.rand(D_SAE, generator=g)
    caps = feature_choice.capacities(N, 4.0, D_SAE, rank=feature_choice.usage_rank(usage), exponent=0.5)
    flat = pre.reshape(-1)
    sel_tau, cand_v, cand_i = batch.kth_largest_with_candidates(flat, 1280, D_SAE)
    bf16 = pre.to(torch.bfloat16)
    # every tensor argument is made here, on the CPU: the calls below run on the meta default device
    t_zero, t_one, t_high, t_neg = (torch.full((D_SAE,), v) for v in (0.0, 1.0, 10.0, -1.0))
    first_five, rows50, twos, zeros46 = torch.arange(5), torch.arange(50) // 10, torch.full((24,), 2), torch.zeros(4, 6)
    row_norms = x.norm(dim=-1)
    row_norms[:3] = 100.0  # outlier rows
    flagged = row_norms > 50
    return {
        batch: [
            lambda: batch.budget(4.0, N),
            lambda: batch.kth_largest(flat, 1280, D_SAE),
            lambda: batch.kth_largest(flat, 1280, D_SAE, sample_size=1),  # the estimate misses: exact fallback
            lambda: batch.kth_largest(small.reshape(-1), 5),
            lambda: batch.kth_largest_with_candidates(flat, 1280, D_SAE),
            lambda: batch.keep_at_least(pre, sel_tau),
            lambda: batch.keep_at_least(pre, 0.5),
            lambda: batch.keep_at_least(bf16, 0.5),
            lambda: batch.keep_at_least(pre.double(), 0.5),
            lambda: batch.take_with_ties(cand_v, cand_i, sel_tau, 1280),
            lambda: batch.mutual_choice_indices(pre, 4.0),
            lambda: batch.mutual_choice_indices(pre, 4.0 / N / 2),  # a budget of 0
            lambda: batch.mutual_choice_select(pre, 4.0),
            lambda: batch.mutual_choice_select(bf16, 4.0),
            lambda: batch.batch_topk(pre, 4.0),
            lambda: batch.batch_topk_reference(small, 2.0),
        ],
        feature_choice: [
            # no tensor argument: the device is an argument (None is torch's default device, by design)
            lambda: feature_choice.capacities(N, 4.0, D_SAE, device=pre.device),
            lambda: feature_choice.capacities(
                N, 4.0, D_SAE, rank=feature_choice.usage_rank(usage), exponent=1.5, min_capacity=1
            ),
            lambda: feature_choice.usage_rank(usage),
            lambda: feature_choice.column_thresholds(pre, caps),
            lambda: feature_choice.block_lower_bounds(pre, caps),
            lambda: feature_choice.column_thresholds_estimated(pre, caps, t_zero),
            lambda: feature_choice.column_thresholds_estimated(pre, caps, t_high),  # every feature falls back
            lambda: feature_choice.column_thresholds_estimated(pre, caps, t_neg, max_candidates=10),  # too loose
            lambda: feature_choice.feature_choice_indices(pre, caps),
            lambda: feature_choice.feature_choice_indices(pre, caps, one_per_token=True, t_lo=t_one, stats={}),
            lambda: feature_choice.feature_choice_indices(bf16, caps, t_lo=t_one),
            lambda: feature_choice.with_one_per_token(pre, first_five),
            lambda: feature_choice.feature_choice_select(pre, caps, one_per_token=True),
            lambda: feature_choice.feature_choice_reference(small, twos),
        ],
        gradient: [
            *[lambda m=m: gradient.normalize_grad(grad, m) for m in ("none", "token", "batch")],
            lambda: gradient.gradient_attribution(grad, dec),
            lambda: gradient.gradient_scores(pre.relu(), gradient.gradient_attribution(grad, dec), 2.0),
            lambda: gradient.scores_in_place(pre.relu(), grad, dec, 2.0),
            lambda: gradient.topk_by_score(pre.relu(), pre, 4),
            lambda: gradient.gradient_topk_indices(pre, grad, dec, 4, 2.0, "batch"),
            lambda: gradient.gradient_topk_indices(pre, None, dec, 4, 2.0, "batch"),
            lambda: gradient.gradient_topk(pre, grad, dec, 4, 2.0, "token"),
            # the exact bfloat16 screen and its parts (auto-applied from 8192 features; forced here)
            lambda: gradient.gradient_topk_indices(pre, grad, dec, 4, 2.0, "batch", screen=True, unit_rows=True),
            lambda: gradient.screened_topk_indices(pre, grad, dec, 4, 2.0, stats={}),
            lambda: gradient.screened_topk_indices(pre, grad * 1e4, dec, 4, 2.0, unit_rows=True),  # misfit rows
            lambda: gradient.screened_topk_indices(pre, grad, dec, 4, 2.0, spare=2),  # 7 of 16 blocks: the block top-m
            lambda: gradient.screen_applies(pre, grad, dec, 4),
            lambda: gradient.screen_slack(norms, norms.max(), D_IN, 2.0),
            lambda: gradient.decoder_directions(dec, True),
            lambda: gradient.candidate_attribution(grad, dec, first_five.expand(N, 5)),
            lambda: gradient.candidate_attribution_plain(grad, dec, first_five.expand(N, 5)),
        ],
        signed: [
            lambda: signed.abs_topk(pre, 4),
            lambda: signed.abs_topk_indices(pre, 4),
            lambda: _in_blocks(signed, lambda: signed.abs_topk_indices(pre, 4)),  # |pre| a block of rows at a time
            lambda: signed.signed_mutual_choice_indices(pre, 4.0),
            lambda: signed.signed_mutual_choice_select(pre, 4.0),
            lambda: signed.signed_mutual_choice_reference(small, 2.0),
        ],
        topk: [lambda: topk.topk_indices(pre, 4), lambda: topk.row_topk_by_blocks(pre, 5)],
        outliers: [
            lambda: outliers.row_norms(x),
            lambda: outliers.row_norms(x.half()),
            lambda: outliers.median_norm(row_norms),
            lambda: outliers.outlier_mask(row_norms, 4.0),
            lambda: outliers.outlier_mask(row_norms, 0.0),
            lambda: outliers.ranking_scale(row_norms, 4.0),
            lambda: outliers.guarded_affinity(pre, outliers.ranking_scale(row_norms, 4.0)),
            lambda: outliers.budget_shares(rows50, N, flagged),
            lambda: outliers.budget_shares(rows50[:0], N, flagged),
        ],
        afa: [
            lambda: afa.squared_contributions(pre, norms),
            lambda: afa.check_k_max(8),
            lambda: afa.afa_select(pre, target, None, 8),
            lambda: afa.afa_select(pre, target, norms, None),
            lambda: afa.afa_select(zeros46, zeros46[:, 0], None, 3),  # ties everywhere
            lambda: afa.afa_select(pre[:0], target[:0], None, 8),  # no tokens
            lambda: afa.afa_indices(pre, target, norms, 8),
            lambda: afa.afa_select_reference(small, small.norm(dim=-1)),
            lambda: afa.afa_loss(pre.relu(), target, norms),
            lambda: afa.afa_loss_sparse(flat[:50], rows50, target, norms[:50]),
        ],
    }


#: public names of the allocation modules that are not rules (nothing to run)
NOT_RULES: dict[str, set[str]] = {
    "sae_allocators.allocation.feature_choice": {"candidate_limit"},  # an int of an int
}


def test_every_allocation_rule_makes_no_tensor_on_the_default_device():
    import sae_allocators.allocation as pkg

    calls = _allocation_calls()
    modules = {importlib.import_module(f"{pkg.__name__}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)}
    assert modules == set(calls), "a new allocation module: add its rules to _allocation_calls"
    for module, fns in calls.items():
        called: set[str] = set()
        for fn in fns:
            called |= {n for n in fn.__code__.co_names if n in _public_functions(module)}
            with on_meta():
                result = fn()
            for t in result if isinstance(result, tuple) else (result,):
                if torch.is_tensor(t):
                    assert t.device.type == "cpu", (module.__name__, fn)
        missing = _public_functions(module) - called - NOT_RULES.get(module.__name__, set())
        assert not missing, f"{module.__name__}: not run on the meta default device: {sorted(missing)}"


def test_keep_at_least_threshold_below_tau_is_torch_nextafter():
    """keep_at_least computes the float just below tau on the host (no tensor): the same value
    torch.nextafter gives, at the edges too (subnormals, rounding to 0 or to inf, inf)."""
    from sae_allocators.allocation.batch import _next_below

    g = torch.Generator().manual_seed(4)
    values = [
        1e-46,
        7e-46,
        1e-45,
        1.5e-45,
        1.17549435e-38,
        0.1,
        0.5,
        1.0,
        1 / 3,
        3.4028234663852886e38,
        3.4028235e38,
        3.40282357e38,
        1e39,
        math.inf,
    ]
    values += (torch.rand(2000, generator=g, dtype=torch.float64) * 60 - 30).exp().tolist()
    for dtype in (torch.float32, torch.float64):
        for t in values:
            expected = float(torch.nextafter(torch.tensor(t, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)))
            assert _next_below(t, dtype) == expected, (dtype, t)


# --- calibration ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,method",
    [("mutual_choice", None), ("batchtopk_zipf", None), ("feature_choice", "scale"), ("feature_choice", "shares")],
)
def test_calibration_makes_no_tensor_on_the_default_device(name, method, tmp_path):
    from sae_allocators import calibration as C

    sae = _build(name, {})
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    for step, x in enumerate(_batches(name, 2)):
        sae.training_forward_pass(
            TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=step, is_logging_step=False
            )
        )
    held = list(torch.randn(3 * 100, D_IN, generator=torch.Generator().manual_seed(5)).split(100))
    shares = torch.ones(D_SAE) if method == "shares" else None
    with on_meta():
        res = C.calibrate(sae, held, 300, method=method)  # applied to the training SAE's trackers
    assert res.theta.device.type == "cpu"
    sae.save_inference_model(str(tmp_path))
    loaded = SAE.load_from_disk(str(tmp_path), device="cpu")  # a jumprelu: calibrated in place
    with on_meta():
        C.calibrate(loaded, held, 300, k=float(sae.cfg.k), method=method, shares=shares)
    assert loaded.threshold.device.type == "cpu"


# --- data parallel: the global selection and the gradient averaging -------------------------------

RANK_SCRIPT = r"""
import contextlib, json, os, traceback
import torch, torch.distributed as dist
import sae_allocators  # noqa: F401
from sae_lens.registry import get_sae_training_class
from sae_lens.saes.sae import TrainStepInput
from sae_allocators.distributed import group_of, make_data_parallel

r = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=r, world_size=int(os.environ["WORLD_SIZE"]))


@contextlib.contextmanager
def on_meta():
    previous = torch.get_default_device()
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(previous)


# torch's default-device mode does not reach code autograd runs during backward: run ours under it
from sae_allocators import sparse
from sae_allocators.distributed.data_parallel import DataParallel


def under_meta(fn):
    def wrapped(*a, **kw):
        with on_meta():
            return fn(*a, **kw)
    return wrapped


sparse._SelectedValues.backward = staticmethod(under_meta(sparse._SelectedValues.backward))
sparse._RowNorms.backward = staticmethod(under_meta(sparse._RowNorms.backward))
DataParallel._sync_grads = under_meta(DataParallel._sync_grads)

fails, ran = [], []
D_IN, F, N = 16, 1024, 160  # 2 x 160 tokens x 1024 features: the estimate paths of the selection
CASES = [("mutual_choice", {"k": 4.0}, True), ("mutual_choice", {"k": 4.0}, False), ("feature_choice", {"k": 4.0}, True),
         ("feature_choice", {"k": 0.5, "one_per_token": True}, False), ("batchtopk_zipf", {"k": 4.0}, True),
         ("gradient_topk", {"k": 4, "grad_normalization": "batch"}, True)]
for name, extra, sparse_step in CASES:
    try:
        cls, cfg_cls = get_sae_training_class(name)
        torch.manual_seed(0)
        sae = cls(cfg_cls(d_in=D_IN, d_sae=F, sparse_step=sparse_step, **extra))
        make_data_parallel(sae, dist.group.WORLD)
        assert group_of(sae) is not None  # the global (collective) path runs
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
        dead = torch.zeros(F, dtype=torch.bool)
        dead[::3] = True
        g = torch.Generator().manual_seed(10 + r)
        for step in range(3):
            x = torch.randn(N, D_IN * (2 if name == "gradient_topk" else 1), generator=g)
            with on_meta():
                out = sae.training_forward_pass(
                    TrainStepInput(
                        sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=step, is_logging_step=step == 1
                    )
                )
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
                for v in out.metrics.values():
                    v() if callable(v) else v
            opt.step()
            opt.zero_grad()
        ran.append(name)
    except Exception as exc:
        where = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}" for f in traceback.extract_tb(exc.__traceback__)][-4:]
        fails.append(f"{name} {extra} sparse_step={sparse_step}: {type(exc).__name__}: {str(exc)[:300]} at {where}")
print(json.dumps({"fails": fails, "ran": ran}))
dist.destroy_process_group()
"""


@pytest.mark.saelens_independent  # spawns gloo ranks (about 25 s): run once in CI, at the newest SAELens
def test_data_parallel_steps_make_no_tensor_on_the_default_device(tmp_path):
    """Two gloo ranks: the global Mutual Choice / Feature Choice selections (distributed/select.py),
    the global gradient normalisation of gradient_topk and the gradient averaging, on the meta default device."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(RANK_SCRIPT))
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": "2",
        "OMP_NUM_THREADS": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env={**env, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for res in results:
        assert res["fails"] == [], "\n".join(res["fails"])
        assert len(res["ran"]) == 6
