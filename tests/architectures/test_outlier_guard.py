"""Real token streams (docs/mutual_choice.md, "Real token streams"): the outlier guard of the batch
rules, the budget-share metrics and warning, the export correction and what a saved folder records.

The SmolLM2 version of these checks (SAELens's default data options) is in
tests/offline/test_real_token_streams.py (slow tier)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import codes, step_input
from safetensors.torch import load_file
from sae_lens import SAE

import sae_allocators  # noqa: F401
from sae_lens.registry import get_sae_training_class

from sae_allocators.architectures import kinds
from sae_allocators.architectures._common import pre_activations
from sae_allocators.architectures.mutual_choice import MutualChoiceTrainingSAEConfig
from sae_allocators.architectures.topk_zipf import TopKZipfTrainingSAE, TopKZipfTrainingSAEConfig

D_IN, D_SAE, K = 32, 256, 4.0
#: every registered rule whose class declares a batch kind (sae_allocators.architectures.kinds)
BATCH_RULES = {name: get_sae_training_class(name) for name in kinds.architectures_of_kind(*kinds.BATCH_KINDS)}


def make(name: str, **kw):
    cls, cfg_cls = BATCH_RULES[name]
    torch.manual_seed(0)
    return cls(cfg_cls(d_in=D_IN, d_sae=D_SAE, k=K, **kw))


def stream(n: int = 512, n_out: int = 8, scale: float = 30.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows like a residual stream: ordinary tokens, plus ``n_out`` repeated BOS-like rows of a
    large norm (the same vector each time, as every context's first token is)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    bos = torch.randn(D_IN, generator=g) * scale
    idx = torch.arange(0, n, n // n_out)[:n_out]
    x[idx] = bos
    flagged = torch.zeros(n, dtype=torch.bool)
    flagged[idx] = True
    return x, flagged


def outlier_share(out, flagged: torch.Tensor) -> float:
    kept = (codes(out) != 0).sum(-1).float()
    return float(kept[flagged].sum() / kept.sum())


@pytest.mark.parametrize("name", sorted(BATCH_RULES))
def test_guard_keeps_outlier_rows_from_taking_the_budget(name):
    x, flagged = stream()
    off = make(name, outlier_norm_ratio=0)
    on = make(name)
    out_off = off.training_forward_pass(step_input(x))
    out_on = on.training_forward_pass(step_input(x))
    assert outlier_share(out_off, flagged) > 0.3  # the paper's rule: 1.6 % of the rows take a large share
    assert outlier_share(out_on, flagged) < 0.10
    # exact budget either way (Feature Choice: sum of capacities = k N)
    assert int((codes(out_on) != 0).sum()) == int((codes(out_off) != 0).sum()) == int(K * x.shape[0])
    # the logged metric says the same
    assert float(out_on.metrics["budget_share_outlier_rows"]()) == pytest.approx(outlier_share(out_on, flagged))
    assert float(out_on.metrics["outlier_row_frac"]()) == pytest.approx(float(flagged.float().mean()))


@pytest.mark.parametrize("name", sorted(BATCH_RULES))
def test_without_outlier_rows_the_guard_changes_nothing(name):
    x = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(1))
    a = make(name).training_forward_pass(step_input(x))
    b = make(name, outlier_norm_ratio=0).training_forward_pass(step_input(x))
    assert torch.equal(codes(a), codes(b))
    assert torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("name", sorted(BATCH_RULES))
def test_guard_values_are_raw_and_dense_path_agrees(name):
    x, flagged = stream()
    sparse_out = make(name).training_forward_pass(step_input(x))
    dense_out = make(name, sparse_step=False).training_forward_pass(step_input(x))
    assert torch.equal(codes(sparse_out) != 0, codes(dense_out) != 0)
    kept = codes(sparse_out) != 0
    # kept values are the raw pre-activations (the guard changes the ranking only)
    assert torch.allclose(codes(sparse_out)[kept], sparse_out.hidden_pre[kept])


def test_per_token_rules_have_no_guard_but_log_the_shares():
    x, flagged = stream()
    sae = TopKZipfTrainingSAE(TopKZipfTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4))
    assert sae.outlier_norm_ratio() == 0.0
    out = sae.training_forward_pass(step_input(x))
    assert float(out.metrics["budget_share_outlier_rows"]()) == pytest.approx(float(flagged.float().mean()))


@pytest.mark.parametrize("bad", [1.0, 0.5, -2, float("nan"), float("inf")])
def test_bad_outlier_norm_ratio_is_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match="outlier_norm_ratio=.*use a number above 1.*or 0 to turn"):
        MutualChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, outlier_norm_ratio=bad)


@pytest.mark.parametrize("bad", ["4", True])
def test_outlier_norm_ratio_of_the_wrong_type_is_refused(bad):
    with pytest.raises(ValueError, match="outlier_norm_ratio"):
        MutualChoiceTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, outlier_norm_ratio=bad)


def test_a_few_tokens_taking_the_budget_warns_once_with_the_fix():
    x, _ = stream()
    sae = make("mutual_choice", outlier_norm_ratio=0)
    out = sae.training_forward_pass(step_input(x, logging=True))
    with pytest.warns(UserWarning, match=r"mutual_choice: .*of the batch budget.*Fix: set outlier_norm_ratio"):
        out.metrics["budget_share_outlier_rows"]()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out.metrics["budget_share_outlier_rows"]()  # once per SAE
    guarded = make("mutual_choice")
    out = guarded.training_forward_pass(step_input(x, logging=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out.metrics["budget_share_outlier_rows"]()
        out.metrics["budget_share_top1pct"]()


@pytest.mark.parametrize("name", sorted(BATCH_RULES))
def test_saved_folder_records_shares_and_whether_thresholds_were_calibrated(name, tmp_path):
    x, _ = stream()
    sae = make(name)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for i in range(5):
        out = sae.training_forward_pass(step_input(x, step=i))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    sae.save_inference_model(tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())["metadata"]
    assert meta["thresholds_calibrated"] is False
    shares = meta["budget_shares"]
    assert shares["steps"] == 5 and shares["guard_ratio"] == 4.0 and 0 <= shares["budget_share_outlier_rows"] < 0.1
    sae.threshold_tracker.set_calibrated(torch.tensor(0.5))
    sae.save_inference_model(tmp_path / "cal")
    assert json.loads((tmp_path / "cal" / "cfg.json").read_text())["metadata"]["thresholds_calibrated"] is True
    assert torch.allclose(
        load_file(str(tmp_path / "cal" / "sae_weights.safetensors"))["threshold"], torch.full((D_SAE,), 0.5)
    )


@pytest.mark.parametrize("name", sorted(BATCH_RULES))
def test_uncalibrated_export_fires_near_k_while_the_sae_still_learns(name, tmp_path):
    """The running thresholds lag while pre-activations grow; the export correction keeps the saved
    rule at the training L0 (here inputs grow 3 % a step, as early in training)."""
    sae = make(name, outlier_norm_ratio=0)
    g = torch.Generator().manual_seed(3)
    for i in range(60):
        x = torch.randn(512, D_IN, generator=g) * (1.03**i)
        sae.training_forward_pass(step_input(x, step=i))
    x = torch.randn(2048, D_IN, generator=g) * (1.03**59)
    sae.save_inference_model(tmp_path)
    saved = SAE.load_from_disk(str(tmp_path))
    l0 = float((saved.encode(x) != 0).sum(-1).float().mean())
    assert abs(l0 / K - 1) < 0.2, l0
    # without the correction (c = 1) the lagging running threshold fires far above k
    pre = pre_activations(sae, x)
    l0_raw = float(
        (pre > sae.running_thresholds() if name == "feature_choice" else pre > sae.topk_threshold)
        .sum(-1)
        .float()
        .mean()
    )
    assert l0_raw > 1.3 * K
