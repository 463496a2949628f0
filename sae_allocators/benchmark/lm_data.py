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

from sae_allocators import devices
from sae_allocators.benchmark.lm_source import LMData
from sae_allocators.testing import OFFLINE_ENV


def tiny_lm_data(
    context_size: int = 32, n_rows: int = 256, n_eval: int = 16, seed: int = 0, device: Any = devices.AUTO
) -> LMData:
    import datasets

    from sae_allocators.testing import tiny_model

    model = tiny_model(d_model=32, n_ctx=max(64, context_size), seed=seed, device=device)
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


def benchmark_cache_dir() -> Path:
    """Where computed activations are kept between runs: ``<checkout>/.cache/benchmark`` (git-ignored)
    when running from a source checkout, else ``$XDG_CACHE_HOME/sae-allocators/benchmark``."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "sae_allocators").is_dir():
        return checkout / ".cache" / "benchmark"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "sae-allocators" / "benchmark"


def offline_lm_data(
    context_size: int, max_tokens: int, n_eval_sequences: int, cache_dir: str | None, device: Any = devices.AUTO
) -> LMData:
    """SmolLM2-135M and the English corpus from the project's offline preparation step."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    from sae_allocators import offline

    # benchmarks/run.sh has just run the preparation step (checksums verified): sizes only here
    verified = os.environ.get("SAE_ALLOCATORS_ASSETS_VERIFIED") == "1"
    prepared = offline.prepare(cache_dir=cache_dir, verify=not verified)
    model = offline.load_model(prepared, devices.resolve(device), n_ctx=max(context_size, 128))
    tok = offline.load_tokenizer(prepared)
    # Pack each whole split, then take the first rows of its (seeded) row shuffle: the rows come
    # from all documents. (tokenized_dataset's max_tokens takes whole documents from the front of
    # the document shuffle: at the benchmark's sizes that was one or two documents -- one
    # Shakespeare play for training, another text for evaluation and calibration.)
    train = _first_rows(
        offline.tokenized_dataset(prepared, tok, context_size, seed=0, split="train"), max_tokens // context_size
    )
    held = offline.tokenized_dataset(prepared, tok, context_size, seed=0, split="eval")
    eval_tokens = torch.tensor(held["tokens"][:n_eval_sequences])
    info = prepared.model_info
    counts = prepared.token_counts
    return LMData(
        model=model,
        train_dataset=train,
        eval_tokens=eval_tokens,
        name=str(info.get("model") or "SmolLM2-135M-Instruct"),
        corpus=f"English corpus from registry packages ({', '.join(k for k in counts if k != 'total')}; "
        f"{counts.get('total', 0):,} tokens)",
        special_ids=_special_ids(tok),
        bos_token_id=tok.bos_token_id,
        cache_root=benchmark_cache_dir(),
        provenance={
            "offline_cache": str(prepared.cache_dir),
            "model": info,
            "corpus_tokens": counts,
            "split": "train: the corpus's training documents; evaluation: its held-out documents "
            "(sae_allocators.offline.held_out_split, 10%); each side packed whole and its rows shuffled "
            "(seed 0), the first rows used",
        },
    )


def _first_rows(ds: Any, n_rows: int) -> Any:
    """The first ``n_rows`` rows of a row-shuffled dataset (all of it if it has fewer)."""
    return ds.select(range(min(len(ds), max(1, n_rows))))


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


def hub_lm_data(
    model_name: str, dataset: str, context_size: int, max_tokens: int, n_eval_sequences: int, device: Any = devices.AUTO
) -> LMData:
    """A user's model and dataset (network access): any TransformerLens model name, any dataset."""
    import datasets
    from transformer_lens import HookedTransformer
    from transformer_lens.utils import tokenize_and_concatenate

    model = HookedTransformer.from_pretrained_no_processing(model_name, device=str(devices.resolve(device)))
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
    tokens = tokens.shuffle(seed=0)  # rows from all documents on both sides of the split (seeded)
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
