"""The real-token-stream case (docs/mutual_choice.md, "Real token streams"): SmolLM2-135M at layer 6,
activations from SAELens's ``ActivationsStore`` with its *default* data options (BOS prepended to
every context, special tokens not excluded), batch rules trained with and without the outlier guard.

Used by ``benchmarks/token_streams.py`` (the figures in the docs) and the slow offline tests
(tests/offline/test_real_token_streams.py). The training loop is SAELens's trainer reduced to what
matters here: the SAE's own ``training_forward_pass``, Adam at SAELens's default lr, gradient
clipping at 1.0 (as SAELens's trainer hard-codes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from sae_allocators import devices
from sae_allocators.allocation import outliers
from sae_allocators.allocation.outliers import REPORT_RATIO
from sae_allocators.benchmark.evaluation import POSITIONS, median_token_fvu

HOOK, LAYER, D_IN = "blocks.6.hook_resid_post", 6, 576


@dataclass
class Stream:
    """Training batches (shuffled by SAELens's mixing buffer) and held-out contexts in order."""

    batches: list[torch.Tensor]
    #: further batches of the same store, never trained on (the saved model's mean L0 on them)
    heldout_batches: list[torch.Tensor]
    eval_x: torch.Tensor
    eval_tokens: torch.Tensor
    bos: int

    def positions(self) -> torch.Tensor:
        """``[n]``: 0 at BOS, 1 at the first token of a document (after a BOS), 2 elsewhere."""
        is_bos = self.eval_tokens == self.bos
        first = torch.cat([torch.zeros(1, dtype=torch.bool), is_bos[:-1]]) & ~is_bos
        return torch.where(is_bos, 0, torch.where(first, 1, 2))


def saelens_default_stream(
    prepared: Any,
    n_batches: int = 48,
    batch: int = 1024,
    n_eval_contexts: int = 16,
    n_heldout_batches: int = 4,
    device: str = devices.CPU,
) -> Stream:
    """``n_batches`` training batches from SAELens's ActivationsStore with its default data options
    (``prepend_bos=True``, ``exclude_special_tokens=False``) on the offline corpus, then
    ``n_heldout_batches`` more from the same store (never trained on), and ``n_eval_contexts``
    held-out 128-token contexts (evaluation split) in order, with their token ids."""
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.training.activations_store import ActivationsStore

    from sae_allocators import offline
    from sae_allocators.architectures.mutual_choice import MutualChoiceTrainingSAEConfig

    tok = offline.load_tokenizer(prepared)
    model = offline.load_model(prepared, device, first_n_layers=LAYER + 1, n_ctx=128)
    train = offline.tokenized_dataset(
        prepared, tok, 128, max_tokens=(n_batches + n_heldout_batches + 16) * batch, seed=0, split="train"
    )
    cfg = LanguageModelSAERunnerConfig(
        sae=MutualChoiceTrainingSAEConfig(d_in=D_IN, d_sae=2 * D_IN, k=16),  # the store reads only d_in
        model_name="lm-smollm2-135m",
        hook_name=HOOK,
        dataset_path="",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=128,
        train_batch_size_tokens=batch,
        store_batch_size_prompts=8,
        n_batches_in_buffer=16,
        training_tokens=(n_batches + n_heldout_batches) * batch,
        device=device,
        checkpoint_path=None,
        logger=LoggingConfig(log_to_wandb=False),
        seed=0,
    )
    if not (cfg.prepend_bos is True and cfg.exclude_special_tokens is False):
        raise RuntimeError(
            "SAELens's default data options changed: expected prepend_bos=True, exclude_special_tokens=False"
        )
    torch.manual_seed(0)
    store = ActivationsStore.from_config(model, cfg, override_dataset=train)
    batches = [store.next_batch().float() for _ in range(n_batches + n_heldout_batches)]
    held = offline.tokenized_dataset(prepared, tok, 128, seed=0, split="eval")
    tokens = torch.tensor(held["tokens"][:n_eval_contexts], device=device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK], stop_at_layer=LAYER + 1)
    return Stream(
        batches[:n_batches],
        batches[n_batches:],
        cache[HOOK].reshape(-1, D_IN).float(),
        tokens.reshape(-1),
        int(tok.bos_token_id),
    )


def train(
    name: str,
    stream: Stream,
    steps: int = 100,
    d_sae: int = 4608,
    k: float = 16,
    lr: float = 3e-4,
    seed: int = 0,
    **overrides: Any,
):
    """Train ``name`` on the stream's batches (cycled); return ``(sae, shares)`` where ``shares`` are
    the mean budget shares of the second half of training (the logged metrics)."""
    from sae_lens import TrainingSAEConfig
    from sae_lens.registry import get_sae_training_class
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(seed)
    cls, _ = get_sae_training_class(name)
    sae = cls(TrainingSAEConfig.from_dict({"architecture": name, "d_in": D_IN, "d_sae": d_sae, "k": k, **overrides}))
    sae.to(stream.batches[0].device)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    keys = ("budget_share_outlier_rows", "budget_share_top1pct", "outlier_row_frac")
    sums = dict.fromkeys(keys, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            x = stream.batches[step % len(stream.batches)]
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=step, is_logging_step=False
                )
            )
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            if step >= steps // 2:
                shares = {key: out.metrics[key] for key in keys if key in out.metrics}
                if len(shares) < len(keys):  # not on this project's step (e.g. SAELens's topk): count here
                    rows = (out.feature_acts.detach() != 0).nonzero()[:, 0]
                    norms = outliers.row_norms(x)
                    shares = outliers.budget_shares(rows, x.shape[0], outliers.outlier_mask(norms, REPORT_RATIO))
                for key in keys:
                    value = shares[key]
                    sums[key] += float(value() if callable(value) else value)
    n = steps - steps // 2
    return sae, {key: v / n for key, v in sums.items()}


@torch.no_grad()
def evaluate(sae: Any, stream: Stream, saved: Any) -> dict[str, float]:
    """Per-position L0 of the training rule (held-out contexts as one batch, in order) and of the
    saved model ``saved`` (reloaded from disk), NMSE and median per-token FVU over ordinary tokens
    (not BOS, norm at most 5x the median) on those contexts, and the saved model's mean L0 on the
    store's held-out batches (the training data's mix of BOS and ordinary rows)."""
    x, pos = stream.eval_x, stream.positions()
    train_l0 = (sae.encode_with_hidden_pre(x)[0] != 0).sum(-1).float()
    codes = saved.encode(x)
    l0 = (codes != 0).sum(-1).float()
    x_hat = saved.decode(codes)
    held = torch.cat(stream.heldout_batches)
    out = {
        "export_l0": float((saved.encode(held) != 0).sum(-1).float().mean()),
        "export_l0_contexts": float(l0.mean()),
        "nmse": float((x - x_hat).pow(2).sum() / x.pow(2).sum()),
        "median_token_fvu": median_token_fvu(x, x_hat, pos),
    }
    for label, p in POSITIONS:
        out[f"train_l0_{label}"] = float(train_l0[pos == p].mean())
        out[f"export_l0_{label}"] = float(l0[pos == p].mean())
    return out
