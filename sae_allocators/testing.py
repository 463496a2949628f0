"""Helpers for testing architectures through SAELens's real runner, offline and in seconds.

Shipped with the package so that plugin authors can use them too::

    from sae_allocators.testing import train_tiny
    sae = train_tiny(MyTrainingSAEConfig(d_in=32, d_sae=64, ...), steps=20)

Nothing here touches the network: the model is a random ``HookedTransformer`` built from a
``HookedTransformerConfig`` and the data an in-memory ``datasets.Dataset`` of random tokens.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from sae_allocators import devices

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}

TINY_D_MODEL = 32
TINY_HOOK = "blocks.0.hook_resid_post"


def tiny_model(
    d_model: int = TINY_D_MODEL,
    n_layers: int = 2,
    d_vocab: int = 101,
    n_ctx: int = 64,
    seed: int = 0,
    device: Any = devices.CPU,
):
    """A random 2-layer HookedTransformer (no tokenizer, no download), on ``device`` (the CPU by default;
    ``"auto"``: a GPU when there is one). The weights are drawn on the CPU, so they are the same on
    every device."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    dev = devices.resolve(device)

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_ctx=n_ctx,
        d_head=8,
        n_heads=d_model // 8,
        d_mlp=4 * d_model,
        d_vocab=d_vocab,
        act_fn="gelu",
        normalization_type="LN",
        device=devices.CPU,
        seed=seed,
    )
    model = HookedTransformer(cfg)
    return model if dev.type == devices.CPU else model.to(dev, print_details=False)


def tiny_dataset(n_rows: int = 64, context_size: int = 16, d_vocab: int = 101, seed: int = 0):
    """An in-memory pre-tokenized dataset (``tokens`` column) for SAELens's activation store."""
    import datasets
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, d_vocab, (n_rows, context_size), generator=g)
    return datasets.Dataset.from_dict({"tokens": tokens.tolist()})


def runner_config(
    sae_cfg: Any,
    *,
    steps: int = 10,
    batch_tokens: int = 64,
    context_size: int = 16,
    output_path: str | Path | None = None,
    **overrides: Any,
):
    """A ``LanguageModelSAERunnerConfig`` for the tiny model: no wandb, no checkpoints."""
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig

    kwargs: dict[str, Any] = dict(
        sae=sae_cfg,
        model_name="tiny-random",
        hook_name=TINY_HOOK,
        dataset_path="",
        is_dataset_tokenized=True,
        streaming=False,
        context_size=context_size,
        training_tokens=steps * batch_tokens,
        train_batch_size_tokens=batch_tokens,
        store_batch_size_prompts=4,
        n_batches_in_buffer=max(4, -(-2 * batch_tokens // (4 * context_size))),
        device=devices.CPU,
        checkpoint_path=None,
        output_path=None if output_path is None else str(output_path),
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
        dead_feature_window=5,
        feature_sampling_window=10,
        n_eval_batches=1,
        eval_batch_size_prompts=2,
    )
    kwargs.update(overrides)
    return LanguageModelSAERunnerConfig(**kwargs)


def train_tiny(
    sae_cfg: Any,
    *,
    steps: int = 10,
    output_path: str | Path | None = None,
    model: Any = None,
    dataset: Any = None,
    **overrides: Any,
):
    """Train ``sae_cfg`` for ``steps`` steps through ``LanguageModelSAETrainingRunner``; return the SAE."""
    from sae_lens import LanguageModelSAETrainingRunner

    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    cfg = runner_config(sae_cfg, steps=steps, output_path=output_path, **overrides)
    runner = LanguageModelSAETrainingRunner(
        cfg,
        override_model=model if model is not None else tiny_model(d_model=sae_cfg.d_in, device=cfg.device),
        override_dataset=dataset if dataset is not None else tiny_dataset(context_size=cfg.context_size),
    )
    return runner.run()


def run_fresh(
    code: str,
    *,
    env: dict[str, str] | None = None,
    pythonpath: list[str | Path] | None = None,
    python: str | None = None,
    cwd: str | Path | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (``python -c``); returns the completed process.

    ``pythonpath`` entries are added as *site directories* (so ``.pth`` files and entry points in
    them are honoured, exactly as for an installed distribution).
    """
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SAE_ALLOCATORS_")}
    full_env.update(OFFLINE_ENV)
    full_env.update(env or {})
    prelude = ""
    if pythonpath:
        dirs = ", ".join(repr(str(p)) for p in pythonpath)
        prelude = f"import site\nfor _d in [{dirs}]:\n    site.addsitedir(_d)\n"
    return subprocess.run(
        [python or sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=None if cwd is None else str(cwd),
        timeout=timeout,
    )
