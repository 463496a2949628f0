"""Where the language model and its tokens come from.

- default: the project's offline preparation step (:mod:`sae_allocators.offline`): SmolLM2-135M
  and an English corpus built from registry packages, cached in a git-ignored folder;
- ``--model NAME --dataset PATH``: any model SAELens/TransformerLens can load and any dataset
  ``datasets.load_dataset`` can read (needs network for Hub names);
- ``--tiny-lm``: a random 2-layer HookedTransformer and random tokens (tests, CI smoke runs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sae_allocators.benchmark.sources import LMData
from sae_allocators.testing import OFFLINE_ENV


def tiny_lm_data(context_size: int = 32, n_rows: int = 256, n_eval: int = 16, seed: int = 0) -> LMData:
    import datasets

    from sae_allocators.testing import tiny_model

    model = tiny_model(d_model=32, n_ctx=max(64, context_size), seed=seed)
    vocab = model.cfg.d_vocab
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (n_rows + n_eval, context_size), generator=g)
    ds = datasets.Dataset.from_dict({"tokens": tokens[:n_rows].tolist()})
    return LMData(
        model=model,
        train_dataset=ds,
        eval_tokens=tokens[n_rows:],
        name="tiny-random (2-layer random HookedTransformer, d_model 32)",
        corpus="random tokens",
        provenance={"note": "random weights and tokens: tests the harness only"},
    )


def _special_ids(tokenizer: Any) -> list[int]:
    if tokenizer is None:
        return []
    ids = getattr(tokenizer, "all_special_ids", None) or []
    return sorted({int(i) for i in ids})


def offline_lm_data(context_size: int, max_tokens: int, n_eval_sequences: int, cache_dir: str | None) -> LMData:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        from sae_allocators import offline
    except ImportError as exc:  # pragma: no cover - until the offline branch is merged
        raise SystemExit(
            "The offline preparation step (sae_allocators.offline) is not available in this checkout "
            f"({exc}). Run with --datasets synthetic, --tiny-lm, or --model NAME --dataset PATH."
        ) from None
    prepared = offline.prepare(cache_dir=cache_dir)
    model = offline.load_model(prepared, "cpu")
    tok = model.tokenizer
    train = offline.tokenized_dataset(prepared, tok, context_size, max_tokens=max_tokens, seed=0)
    held = offline.tokenized_dataset(
        prepared, tok, context_size, max_tokens=n_eval_sequences * context_size, seed=0, split="heldout"
    )
    eval_tokens = torch.tensor(held["tokens"][:n_eval_sequences])
    return LMData(
        model=model,
        train_dataset=train,
        eval_tokens=eval_tokens,
        name=getattr(prepared, "model_name", "SmolLM2-135M"),
        corpus=getattr(prepared, "corpus_name", "offline English corpus"),
        special_ids=_special_ids(tok),
        bos_token_id=getattr(tok, "bos_token_id", None),
        cache_root=Path(getattr(prepared, "cache_dir", cache_dir or ".cache")),
        provenance=_provenance(prepared),
    )


def _provenance(prepared: Any) -> dict[str, Any]:
    for attr in ("describe", "to_dict"):
        fn = getattr(prepared, attr, None)
        if callable(fn):
            try:
                return dict(fn())
            except Exception:
                pass
    try:
        from dataclasses import asdict

        return {k: str(v) for k, v in asdict(prepared).items()}
    except Exception:
        return {"prepared": repr(prepared)}


def hub_lm_data(model_name: str, dataset: str, context_size: int, max_tokens: int, n_eval_sequences: int) -> LMData:
    """A user's model and dataset (network access): any TransformerLens model name, any dataset."""
    import datasets
    from transformer_lens import HookedTransformer
    from transformer_lens.utils import tokenize_and_concatenate

    model = HookedTransformer.from_pretrained_no_processing(model_name, device="cpu")
    path = Path(dataset)
    if path.exists():
        builder = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
        files = [str(p) for p in (sorted(path.iterdir()) if path.is_dir() else [path])]
        ds = datasets.load_dataset(builder.get(Path(files[0]).suffix, "text"), data_files=files, split="train")
    else:
        ds = datasets.load_dataset(dataset, split="train", streaming=True)
        n_docs = max(1000, max_tokens // 50)
        ds = datasets.Dataset.from_list(list(ds.take(n_docs)))
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    if "tokens" in ds.column_names:
        tokens = ds
    else:
        tokens = tokenize_and_concatenate(ds, model.tokenizer, max_length=context_size, column_name=column)
    n_train = max(1, min(len(tokens) - n_eval_sequences, -(-max_tokens // context_size)))
    if len(tokens) < n_train + n_eval_sequences:
        raise SystemExit(f"--dataset {dataset}: only {len(tokens)} sequences of {context_size} tokens")
    train = tokens.select(range(n_train))
    held = tokens.select(range(len(tokens) - n_eval_sequences, len(tokens)))
    eval_tokens = torch.tensor([list(map(int, t)) for t in held["tokens"]])
    return LMData(
        model=model,
        train_dataset=train,
        eval_tokens=eval_tokens,
        name=model_name,
        corpus=dataset,
        special_ids=_special_ids(model.tokenizer),
        bos_token_id=getattr(model.tokenizer, "bos_token_id", None),
        provenance={"model": model_name, "dataset": dataset},
    )
