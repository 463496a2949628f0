"""The large preset's shortcuts are exact: the ``topk``, ``abstopk`` and ``batchtopk`` baselines trained by their
sparse twins (configs.SPARSE_TWINS) take SAELens's own training step, and the CE/KL splice that
starts from the cached hooked activation gives the logits of the full hooked forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sae_lens.registry import get_sae_training_class

import sae_allocators  # noqa: F401  registers the architectures
from sae_allocators.benchmark import configs, lm_data
from sae_allocators.benchmark.lm_source import LMScale, LMSource

from helpers import codes, step_input

D_IN, D_SAE, K = 16, 64, 4


def _batch(n: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, D_IN, generator=g) * 3
    x[5:9] = x[0]  # repeated rows (a sequence-start token): ties
    x[10] = 0.0
    x[11] *= 80  # an outsized norm
    return x


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("baseline", sorted(configs.SPARSE_TWINS))
def test_sparse_twin_takes_saelens_training_step(baseline: str, rescale: bool) -> None:
    twin, extra = configs.SPARSE_TWINS[baseline]
    base_cls, base_cfg = get_sae_training_class(baseline)
    twin_cls, twin_cfg = get_sae_training_class(twin)
    kw = dict(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale, aux_loss_coefficient=0.7)
    torch.manual_seed(0)
    ours = twin_cls(twin_cfg(**kw, **dict(extra)))
    assert ours.cfg.sparse_step and ours.cfg.aux_loss == "auxk"
    with torch.no_grad():  # off the initialisation: non-zero biases, decoder norms != 1
        g = torch.Generator().manual_seed(1)
        for p in ours.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs = base_cls(base_cfg(**kw))
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not missing, missing  # every SAELens parameter and buffer came from the twin
    x = _batch()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    a = ours.training_forward_pass(step_input(x, dead))
    b = theirs.training_forward_pass(step_input(x, dead))
    assert torch.equal(codes(a) != 0, codes(b) != 0)  # the same selection
    torch.testing.assert_close(codes(a), codes(b), rtol=1e-5, atol=1e-5)  # (decoder-norm rescaling rounds apart)
    assert set(a.losses) == set(b.losses)
    for key in b.losses:
        torch.testing.assert_close(a.losses[key], b.losses[key], rtol=1e-5, atol=1e-5, msg=key)
    assert float(b.losses["auxiliary_reconstruction_loss"].detach()) > 0  # AuxK over the dead set ran on both
    a.loss.backward()
    b.loss.backward()
    theirs_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_on_sparse_step_keeps_labels_and_names_the_twin() -> None:
    plans = configs.select_labels(configs.plan_architectures(None), ["topk", "abstopk", "mutual_choice", "batchtopk"])
    out = configs.on_sparse_step(plans, ("topk", "abstopk"))
    by_label = {p.label: p for p in out}
    assert [p.label for p in out] == [p.label for p in plans]
    assert by_label["topk"].name == "topk_zipf" and by_label["topk"].extra == {"aux_loss": "auxk", "sparse_step": True}
    assert by_label["abstopk"].name == "abstopk_zipf" and "sae-allocators" in by_label["abstopk"].provider
    assert "sparse step" in by_label["topk"].entry.note
    assert by_label["batchtopk"].name == "batchtopk" and by_label["mutual_choice"].name == "mutual_choice"
    ctx = configs.Context(d_in=D_IN, d_sae=D_SAE, ks=(4.0,))
    cfg = configs.build_training_config(by_label["topk"], 4, ctx)
    assert type(cfg).__name__ == "TopKZipfTrainingSAEConfig" and cfg.k == 4 and cfg.aux_loss == "auxk"
    with pytest.raises(ValueError, match="mutual_choice: no sparse twin"):
        configs.on_sparse_step(plans, ("mutual_choice",))
    twin = configs.on_sparse_step(plans, ("batchtopk",))
    assert {p.label: p.name for p in twin}["batchtopk"] == "batchtopk_zipf"


@pytest.mark.parametrize("rescale", [False, True])
def test_batchtopk_twin_keeps_saelens_threshold_and_saves_saelens_model(rescale: bool) -> None:
    """Over several steps of training (Adam on both), the twin's threshold follows SAELens's EMA from 0
    and its saved JumpReLU threshold is SAELens's: no running-mean warm start, no export correction,
    no calibration, no outlier guard (the batch below has an outsized row, which the guard would rank down)."""
    twin, extra = configs.SPARSE_TWINS["batchtopk"]
    base_cls, base_cfg = get_sae_training_class("batchtopk")
    twin_cls, twin_cfg = get_sae_training_class(twin)
    kw = dict(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=rescale, topk_threshold_lr=0.2)
    torch.manual_seed(0)
    ours = twin_cls(twin_cfg(**kw, **dict(extra)))
    theirs = base_cls(base_cfg(**kw))
    theirs.load_state_dict(ours.state_dict(), strict=False)
    opt_a = torch.optim.Adam(ours.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(theirs.parameters(), lr=1e-2)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    g = torch.Generator().manual_seed(5)
    for step in range(6):
        x = _batch() + torch.randn(48, D_IN, generator=g) * 0.1 * step
        outs = []
        for sae, opt in ((ours, opt_a), (theirs, opt_b)):
            opt.zero_grad()
            out = sae.training_forward_pass(step_input(x, dead, step=step))
            out.loss.backward()
            opt.step()
            outs.append(out)
        assert torch.equal(codes(outs[0]) != 0, codes(outs[1]) != 0), step  # the same selection, step after step
        torch.testing.assert_close(ours.topk_threshold, theirs.topk_threshold, rtol=1e-5, atol=1e-7, msg=f"step {step}")
    assert float(theirs.topk_threshold) > 0
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(dict(ours.named_parameters())[name], p, rtol=1e-4, atol=1e-5, msg=name)
    saved_a, saved_b = dict(ours.state_dict()), dict(theirs.state_dict())
    ours.process_state_dict_for_saving_inference(saved_a)
    theirs.process_state_dict_for_saving_inference(saved_b)
    torch.testing.assert_close(saved_a["threshold"], saved_b["threshold"], rtol=1e-5, atol=1e-7)


def test_batchtopk_zipf_threshold_rule_is_checked() -> None:
    _, cfg_cls = get_sae_training_class("batchtopk_zipf")
    with pytest.raises(ValueError, match=r"threshold_rule='ema' is invalid: use one of 'tracked', 'saelens'"):
        cfg_cls(d_in=D_IN, d_sae=D_SAE, k=K, threshold_rule="ema")


@pytest.mark.saelens_independent  # TransformerLens only: run once in CI, at the newest SAELens (tests/run.sh)
@pytest.mark.parametrize("hook_layer", [0, 1])
def test_splice_from_the_hooked_activation_equals_the_full_hooked_forward(
    hook_layer: int, tmp_path: Path, monkeypatch
) -> None:
    data = lm_data.tiny_lm_data(context_size=16, n_rows=32, n_eval=8, device="cpu")
    src = LMSource(data, LMScale(hook_layer=hook_layer, ce_eval_sequences=8), tmp_path, device="cpu")
    assert src._resumable
    w = torch.randn(src.d_in, src.d_in, generator=torch.Generator().manual_seed(0)) * 0.2

    def replace(a: torch.Tensor) -> torch.Tensor:
        return a @ w + 1.0

    src.clean_reference()
    assert len(src._clean_acts) == len(src._clean) == 2
    for (toks, clean_logp, _), act in zip(src._clean, src._clean_acts):
        full = src._run(toks, replace)
        torch.testing.assert_close(src._run_from_hook(act, toks, replace), full, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            src._run_from_hook(act, toks, lambda a: a)[:, :-1].float().log_softmax(-1), clean_logp, rtol=1e-4, atol=1e-4
        )
    fast = src.splice(replace)
    # the same figures from a source that runs every block for every SAE (the path other hook points take)
    slow_src = LMSource(data, LMScale(hook_layer=hook_layer, ce_eval_sequences=8), tmp_path, device="cpu")
    monkeypatch.setattr(LMSource, "_resumable", property(lambda self: False))
    slow = slow_src.splice(replace)
    assert not slow_src._clean_acts
    assert set(fast) == set(slow)
    for key in slow:
        assert fast[key] == pytest.approx(slow[key], rel=1e-4, abs=1e-5), key
    assert fast["ce_loss_recovered"] != pytest.approx(1.0)  # the replacement changed the logits


@pytest.mark.saelens_independent  # the benchmark harness: run once in CI, at the newest SAELens
def test_a_run_with_sparse_baselines_trains_the_twin_and_says_so(tmp_path: Path) -> None:
    import json

    from sae_allocators.benchmark import check
    from sae_allocators.benchmark.run import run
    from sae_allocators.benchmark.settings import Settings
    from sae_allocators.benchmark.synthetic_source import SyntheticScale

    out = tmp_path / "report"
    run(
        Settings(
            out=out,
            datasets=("synthetic",),
            seeds=1,
            synthetic_ks=(4,),
            synthetic=SyntheticScale(
                num_features=32,
                hidden_dim=16,
                d_sae=32,
                min_prob=0.02,
                training_samples=100 * 64,
                batch_size=64,
                eval_samples=512,
                dead_feature_window=20,
            ),
            archs=["topk", "batchtopk", "mutual_choice"],
            device="cpu",
            sparse_baselines=("topk", "batchtopk"),
        )
    )
    doc = json.loads((out / "report.json").read_text())
    topk = [r for r in doc["runs"] if r["label"] == "topk"]
    assert topk and all(r["architecture"] == "topk_zipf" and r["aux_loss"] == "auxk" for r in topk)
    assert all(r["inference_architecture"] == "topk" for r in topk)  # saved as SAELens's topk
    btk = [r for r in doc["runs"] if r["label"] == "batchtopk"]
    assert btk and all(r["architecture"] == "batchtopk_zipf" and r["inference_architecture"] == "jumprelu" for r in btk)
    assert check.problems(out) == []
    text = (out / "report.md").read_text()
    assert (
        'Baselines on the sparse step: `batchtopk` as `batchtopk_zipf` with `aux_loss="auxk", '
        'threshold_rule="saelens", calibrate=False, outlier_norm_ratio=0`, `topk` as `topk_zipf` with '
        '`aux_loss="auxk"`' in text
    )
