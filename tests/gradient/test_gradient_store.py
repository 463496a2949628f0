"""GradientActivationsStore: its gradients are the model's, and stay with their activations."""

from __future__ import annotations

import pytest
import torch

import sae_allocators  # noqa: F401  (registers gradient_topk, installs the store dispatch)
from sae_allocators.architectures.gradient_topk import GradientTopKTrainingSAEConfig
from sae_allocators.gradient import GradientActivationsStore, GradientStoreError, split_rows
from sae_allocators.testing import runner_config, tiny_dataset, tiny_model

D = 32
CTX = 16


@pytest.fixture(scope="module")
def model():
    return tiny_model(d_model=D)


def make_store(model, hook="blocks.0.hook_resid_post", d_in=D, dataset=None, **overrides):
    sae_cfg = GradientTopKTrainingSAEConfig(d_in=d_in, d_sae=2 * d_in, k=4)
    cfg = runner_config(sae_cfg, steps=10, context_size=CTX, hook_name=hook, **overrides)
    return GradientActivationsStore.from_config(model, cfg, override_dataset=dataset or tiny_dataset(context_size=CTX))


def reference_grad(model, tokens, hook):
    """Autograd on the model as it is (no replaced activations): x at the hook and d(sum CE)/dx."""
    captured = {}

    def keep(act, hook):  # noqa: ARG001
        act.retain_grad()
        captured["x"] = act
        return act

    model.zero_grad(set_to_none=True)
    with model.hooks(fwd_hooks=[(hook, keep)]):
        loss = model(tokens, return_type="loss", loss_per_token=True)
    loss.sum().backward()
    x, g = captured["x"].detach(), captured["x"].grad.detach()
    model.zero_grad(set_to_none=True)
    return x, g


HOOKS = [
    ("hook_embed", D, None),
    ("blocks.0.hook_resid_pre", D, None),
    ("blocks.0.hook_resid_post", D, None),
    ("blocks.1.hook_mlp_out", D, None),
    ("blocks.1.attn.hook_z", D, None),  # [b, pos, head, d_head] flattened
    ("blocks.0.attn.hook_z", 8, 1),  # one head (hook_head_index)
    ("blocks.1.hook_resid_post", D, None),  # last block
    ("ln_final.hook_normalized", D, None),
]


@pytest.mark.parametrize("hook,d_in,head", HOOKS)
def test_gradients_are_the_models(model, hook, d_in, head):
    store = make_store(model, hook=hook, d_in=d_in, hook_head_index=head)
    tokens = store.get_batch_tokens()
    x, g = store.get_activations_and_gradients(tokens)
    x_ref, g_ref = reference_grad(model, tokens, hook)
    if head is not None:
        x_ref, g_ref = x_ref[:, :, head], g_ref[:, :, head]
    elif x_ref.ndim > 3:
        x_ref, g_ref = x_ref.flatten(-2), g_ref.flatten(-2)
    torch.testing.assert_close(x, x_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-8)
    assert g[:, :-1].abs().amax() > 0  # a real gradient (the last position predicts nothing)
    # the activations are the ones SAELens's plain store gives for the same tokens
    torch.testing.assert_close(x, store.get_activations(tokens), rtol=0, atol=1e-6)


def test_no_parameter_gradients_and_flags_restored(model):
    store = make_store(model)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    for _ in range(3):
        rows = next(store)
    assert rows.shape == (64, 2 * D) and rows.requires_grad is False
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert torch.is_grad_enabled()


def test_gradient_scale_does_not_depend_on_batch_size(model):
    store = make_store(model)
    tokens = store.get_batch_tokens(4)
    _, g4 = store.get_activations_and_gradients(tokens)
    _, g1 = store.get_activations_and_gradients(tokens[2:3])
    torch.testing.assert_close(g4[2:3], g1, rtol=1e-5, atol=1e-8)


def test_seqpos_slice_applies_to_both_halves(model):
    store = make_store(model, seqpos_slice=(2, 10))
    tokens = store.get_batch_tokens()
    x, g = store.get_activations_and_gradients(tokens)
    x_ref, g_ref = reference_grad(model, tokens, "blocks.0.hook_resid_post")
    assert x.shape[1] == 8
    torch.testing.assert_close(x, x_ref[:, 2:10], rtol=0, atol=1e-6)
    torch.testing.assert_close(g, g_ref[:, 2:10], rtol=1e-5, atol=1e-8)
    rows, token_ids = store.get_raw_llm_batch()
    assert rows.shape[0] == token_ids.shape[0] == 4 * 8


def _dist(a, b):
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def test_rows_stay_aligned_through_shuffle_and_filtering(model):
    """Every served row's gradient is the one autograd gives for that row's own token."""
    hook = "blocks.0.hook_resid_post"
    dataset = tiny_dataset(n_rows=32, context_size=CTX, seed=3)
    all_tokens = torch.tensor(dataset["tokens"])
    excluded = [5, 7, 11]
    store = make_store(model, dataset=dataset, exclude_special_tokens=excluded, n_batches_in_buffer=8)
    # reference for every token of the dataset, computed independently, keyed by its activation
    x_ref, g_ref = reference_grad(model, all_tokens, hook)
    x_ref, g_ref, tok_ref = x_ref.reshape(-1, D), g_ref.reshape(-1, D), all_tokens.reshape(-1)
    served = torch.cat([next(store) for _ in range(6)])
    x, g = split_rows(served, D)
    dist = _dist(x, x_ref)
    match = dist <= 1e-5
    assert match.any(-1).all(), "every served activation is one of the dataset's"
    # a row's gradient must equal the gradient of (one of) the token(s) with that activation
    gdist = _dist(g, g_ref)
    ok = (match & (gdist <= 1e-5 * g_ref.norm(dim=-1).clamp_min(1e-6))).any(-1)
    assert ok.all(), f"{int((~ok).sum())} of {len(ok)} rows carry another token's gradient"
    # excluded tokens were filtered with their gradients
    matched_tokens = tok_ref[match.float().argmax(-1)]
    assert not torch.isin(matched_tokens, torch.tensor(excluded)).any()
    # the buffer really shuffled: served order is not dataset order
    first = match.float().argmax(-1)
    assert not torch.equal(first, torch.sort(first).values)


def test_shuffled_rows_misaligned_would_be_caught(model):
    """The alignment check above has teeth: permuting g alone breaks it."""
    hook = "blocks.0.hook_resid_post"
    tokens = torch.tensor(tiny_dataset(n_rows=8, context_size=CTX)["tokens"])
    x_ref, g_ref = reference_grad(model, tokens, hook)
    x_ref, g_ref = x_ref.reshape(-1, D), g_ref.reshape(-1, D)
    g_bad = g_ref[torch.randperm(len(g_ref), generator=torch.Generator().manual_seed(0))]
    match = _dist(x_ref, x_ref) <= 1e-5
    ok = (match & (_dist(g_bad, g_ref) <= 1e-5 * g_ref.norm(dim=-1).clamp_min(1e-6))).any(-1)
    assert not ok.all()


def test_plain_configs_keep_saelens_store(model):
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
    from sae_lens.training.activations_store import ActivationsStore

    cfg = runner_config(TopKTrainingSAEConfig(d_in=D, d_sae=64, k=4), context_size=CTX)
    store = ActivationsStore.from_config(model, cfg, override_dataset=tiny_dataset(context_size=CTX))
    assert type(store) is ActivationsStore
    g_cfg = runner_config(GradientTopKTrainingSAEConfig(d_in=D, d_sae=64, k=4), context_size=CTX)
    g_store = ActivationsStore.from_config(model, g_cfg, override_dataset=tiny_dataset(context_size=CTX))
    assert type(g_store) is GradientActivationsStore and next(g_store).shape[-1] == 2 * D


def test_dispatch_uninstall_restores_saelens(model):
    from sae_lens.training.activations_store import ActivationsStore

    from sae_allocators import patches

    assert patches.installed()
    try:
        patches.uninstall()
        assert not patches.installed()
        g_cfg = runner_config(GradientTopKTrainingSAEConfig(d_in=D, d_sae=64, k=4), context_size=CTX)
        store = ActivationsStore.from_config(model, g_cfg, override_dataset=tiny_dataset(context_size=CTX))
        assert type(store) is ActivationsStore
    finally:
        patches.install()
    assert patches.installed()


# ---- errors before training starts -------------------------------------------------------------


def test_unknown_hook(model):
    with pytest.raises(GradientStoreError, match="not a hook point"):
        make_store(model, hook="blocks.0.hook_resid_postt")


class _TinyLM:
    """A minimal hooked causal LM (embedding -> readout) with a hook on its logits."""

    @staticmethod
    def build(with_loss: bool = True):
        from transformer_lens.hook_points import HookedRootModule, HookPoint

        class TinyLM(HookedRootModule):
            def __init__(self):
                super().__init__()
                self.W_E = torch.nn.Parameter(torch.randn(101, D))
                self.W_U = torch.nn.Parameter(torch.randn(D, 101))
                self.hook_resid = HookPoint()
                self.hook_out = HookPoint()
                self.setup()

            def forward(self, tokens, return_type="logits", loss_per_token=False, **kwargs):  # noqa: ARG002
                logits = self.hook_out(self.hook_resid(self.W_E[tokens]) @ self.W_U)
                if not with_loss:
                    return logits
                lp = logits[:, :-1].log_softmax(-1)
                loss = -lp.gather(-1, tokens[:, 1:, None])[..., 0]
                return logits, (loss if loss_per_token else loss.mean())

        return TinyLM()


def test_hook_after_unembedding(model):
    from transformer_lens.hook_points import HookPoint

    from sae_allocators.gradient import check_model

    class HookedUnembed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.hook_logits = HookPoint()

        def forward(self, x):
            return self.hook_logits(self.inner(x))

    m = tiny_model(d_model=D)
    m.unembed = HookedUnembed(m.unembed)
    m.setup()
    with pytest.raises(GradientStoreError, match="after the unembedding"):
        make_store(m, hook="unembed.hook_logits", d_in=101)
    # a logits hook whose name does not say so is caught by the probe forward
    lm = _TinyLM.build()
    check_model(lm, "hook_resid")  # fine
    with pytest.raises(GradientStoreError, match="logits"):
        check_model(lm, "hook_out")


def test_model_without_loss():
    with pytest.raises(GradientStoreError, match="no loss"):
        make_store(_TinyLM.build(with_loss=False), hook="hook_resid")


def test_normalize_activations_refused():
    with pytest.raises(ValueError, match="normalize_activations"):
        GradientTopKTrainingSAEConfig(d_in=D, d_sae=64, k=4, normalize_activations="layer_norm")
    with pytest.raises(ValueError, match="grad_normalization='none'"):
        GradientTopKTrainingSAEConfig(
            d_in=D, d_sae=64, k=4, normalize_activations="expected_average_only_in", grad_normalization="none"
        )
    # one factor per row scales x correctly and leaves a self-normalised g's selection unchanged
    cfg = GradientTopKTrainingSAEConfig(d_in=D, d_sae=64, k=4, normalize_activations="expected_average_only_in")
    assert cfg.grad_normalization == "batch"


def test_cached_activations_refused(model):
    with pytest.raises(GradientStoreError, match="cached activations"):
        make_store(model, use_cached_activations=True, cached_activations_path="/nonexistent")
