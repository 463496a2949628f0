"""Mutual Choice and Feature Choice on SmolLM2-135M activations with SAELens's *default* data options
(BOS prepended to every context, special tokens not excluded): the case of docs/mutual_choice.md,
"Real token streams" (layer 6, d_sae 4608, k 16, 1,024-token batches, 100 steps), through
sae_allocators.benchmark.token_streams (the module benchmarks/token_streams.py prints the docs'
figures with).

Slow tier: needs the prepared offline cache (``$SAE_ALLOCATORS_CACHE``); CI runs it on the cache
that its ``benchmarks/run.sh --quick`` step prepared (``$SAE_ALLOCATORS_REQUIRE_ASSETS=1``)."""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.slow

K = 16


@pytest.fixture(scope="module")
def stream():
    from sae_allocators import offline
    from sae_allocators.benchmark import token_streams

    cache = os.environ.get("SAE_ALLOCATORS_CACHE")
    if not cache:
        if os.environ.get("SAE_ALLOCATORS_REQUIRE_ASSETS") == "1":
            pytest.fail("SAE_ALLOCATORS_REQUIRE_ASSETS=1 but SAE_ALLOCATORS_CACHE is not set")
        pytest.skip("set SAE_ALLOCATORS_CACHE to a prepared offline cache (python -m sae_allocators.offline prepare)")
    # 24 distinct training batches, cycled over the 100 steps (CI time); 4 held-out batches
    return token_streams.saelens_default_stream(offline.prepare(cache, verify=False, quiet=True), n_batches=24)


@pytest.mark.parametrize("name", ["mutual_choice", "feature_choice"])
def test_outlier_rows_get_at_most_a_tenth_of_the_budget(stream, name, tmp_path):
    from sae_lens import SAE

    from sae_allocators.benchmark import token_streams

    pos = stream.positions()
    assert int((pos == 0).sum()) >= 16 and int((pos == 1).sum()) >= 16  # BOS rows and document starts
    sae, shares = token_streams.train(name, stream, k=K)
    # outlier rows (norm > 5x the batch median: BOS, separators, massive-activation tokens) hold
    # at most 10 % of the kept entries in the second half of training (98 % / 73 % unguarded)
    assert shares["budget_share_outlier_rows"] <= 0.10, shares
    sae.save_inference_model(tmp_path)
    saved = SAE.load_from_disk(str(tmp_path))
    assert saved.cfg.metadata.thresholds_calibrated is False
    fig = token_streams.evaluate(sae, stream, saved)
    # per-position L0 of the training rule: BOS rows no longer take hundreds of latents, the
    # other tokens get about k
    assert fig["train_l0_bos"] <= K, fig
    assert 0.8 * K <= fig["train_l0_rest"] <= 1.25 * K, fig
    # the uncalibrated saved model (a mid-training checkpoint) fires within 20 % of k on average on
    # held-out batches of the same store
    assert abs(fig["export_l0"] / K - 1) <= 0.2, fig


def test_unguarded_mutual_choice_spends_most_of_the_budget_on_outlier_rows(stream):
    """The problem the guard solves, on the same data (so the bound above is not vacuous)."""
    from sae_allocators.benchmark import token_streams

    _, shares = token_streams.train(
        "mutual_choice", stream, steps=40, k=K, outlier_norm_ratio=0
    )  # shares of steps 20-39
    assert shares["budget_share_outlier_rows"] > 0.5, shares
