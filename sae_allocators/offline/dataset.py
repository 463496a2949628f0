"""The prepared corpus as documents, deterministic train / held-out splits, and SAELens-style tokenized
rows (:func:`tokenized_dataset`, :func:`pack_rows`). See :mod:`sae_allocators.offline`."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Sequence, TypeVar

from . import builders
from .builders import Document
from .preparation import TOKENS_PART, PreparedAssets

if TYPE_CHECKING:
    import datasets
    import numpy as np

Split = Literal["all", "train", "eval"]
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# corpus


def load_documents(prepared: PreparedAssets, split: Split = "all", eval_fraction: float = 0.1) -> list[Document]:
    """The corpus documents (``doc_id``, ``source``, ``text``), in cache order, optionally one
    side of :func:`held_out_split`."""
    docs = builders.read_documents(prepared.documents_path)
    return select_split(docs, split, eval_fraction, group=lambda d: d.group)


def load_corpus_text(prepared: PreparedAssets, split: Split = "all", eval_fraction: float = 0.1) -> list[str]:
    """The corpus as a list of plain-text documents (see :func:`load_documents`)."""
    return [d.text for d in load_documents(prepared, split, eval_fraction)]


def held_out_split(
    items: Sequence[T], eval_fraction: float = 0.1, *, group: Callable[[T], str] | None = None
) -> tuple[list[T], list[T]]:
    """Deterministic ``(train, eval)`` split of a document sequence; disjoint, order kept.

    Within each group (all items alike if ``group`` is None; for the corpus, the source and
    Brown genre), item ``i`` goes to eval when ``round((i+1)·f) > round(i·f)``: an evenly spread
    share of ``round(n·f)`` items (for ``f = 0.1``, items 4, 14, 24, ...), so the held-out text
    spans every source and genre, and no random seed is involved.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    seen: dict[str, int] = {}
    train: list[T] = []
    held: list[T] = []
    for item in items:
        key = group(item) if group is not None else ""
        i = seen.get(key, 0)
        seen[key] = i + 1
        picked = math.floor((i + 1) * eval_fraction + 0.5) > math.floor(i * eval_fraction + 0.5)
        (held if picked else train).append(item)
    return train, held


def select_split(
    items: Sequence[T], split: Split, eval_fraction: float = 0.1, *, group: Callable[[T], str] | None = None
) -> list[T]:
    """``"all"`` items, or the ``"train"`` / ``"eval"`` side of :func:`held_out_split`."""
    if split == "all":
        return list(items)
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'all', 'train' or 'eval', not {split!r}")
    train, held = held_out_split(items, eval_fraction, group=group)
    return train if split == "train" else held


# --------------------------------------------------------------------------------------------
# tokenized dataset


def pack_rows(
    token_lists: Iterable[Sequence[int]], context_size: int, bos_token_id: int, separator_token_id: int | None = None
) -> np.ndarray:
    """Concatenate documents into rows of exactly ``context_size`` tokens, SAELens-style.

    Reproduces SAELens's pretokenization defaults (``begin_batch_token="bos"``,
    ``sequence_separator_token="bos"``, ``begin_sequence_token=None``): each row starts with
    BOS (unless the document there already starts with it); a document that starts inside a
    row is preceded by the separator (BOS by default); a document that does not fit continues
    in the next row after that row's BOS; the last incomplete row is dropped; empty documents
    are skipped. Returns an ``int64`` array of shape ``(rows, context_size)``.
    """
    import numpy as np

    if context_size < 2:
        raise ValueError(f"context_size must be at least 2 (BOS + one token), got {context_size}")
    sep = bos_token_id if separator_token_id is None else separator_token_id
    rows: list[np.ndarray] = []
    row = np.empty(context_size, dtype=np.int64)
    fill = -1  # -1: no row open
    for doc in token_lists:
        doc = np.asarray(doc, dtype=np.int64)
        i, n = 0, len(doc)
        while i < n:
            if fill < 0:
                fill = 0 if doc[i] == bos_token_id else 1
                row[0] = bos_token_id
            elif i == 0 and doc[0] != sep:
                row[fill] = sep
                fill += 1
            take = min(context_size - fill, n - i)
            row[fill : fill + take] = doc[i : i + take]
            fill += take
            i += take
            if fill == context_size:
                rows.append(row.copy())
                fill = -1
    return np.stack(rows) if rows else np.empty((0, context_size), dtype=np.int64)


def _as_tokenizer(tokenizer: Any) -> Any:
    """Accept a Hugging Face tokenizer or anything with one as ``.tokenizer`` (a HookedTransformer)."""
    inner = getattr(tokenizer, "tokenizer", None)
    return inner if inner is not None and not hasattr(tokenizer, "bos_token_id") else tokenizer


def _cached_token_lists(prepared: PreparedAssets, tokenizer: Any) -> list[Any] | None:
    """Per-document token ids from the cache, if it was built with this very tokenizer."""
    import numpy as np

    info = prepared.manifests.get(TOKENS_PART, {}).get("info", {})
    if info.get("tokenizer_fingerprint") != builders.tokenizer_fingerprint(tokenizer):
        return None
    flat = np.load(prepared.tokens_dir / builders.TOKEN_IDS_FILE).astype(np.int64)
    offsets = np.load(prepared.tokens_dir / builders.DOC_OFFSETS_FILE)
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def tokenized_dataset(
    source: PreparedAssets | Sequence[str],
    tokenizer: Any,
    context_size: int,
    max_tokens: int | None = None,
    seed: int = 0,
    *,
    split: Split | None = None,
    eval_fraction: float = 0.1,
    bos_token_id: int | None = None,
    shuffle: bool = True,
) -> datasets.Dataset:
    """A pre-tokenized ``datasets.Dataset`` with one ``tokens`` column of int rows of exactly
    ``context_size`` tokens, for SAELens's ``LanguageModelSAETrainingRunner(override_dataset=...)``.

    ``source`` is the prepared cache or a list of texts; ``tokenizer`` a Hugging Face tokenizer
    or a ``HookedTransformer`` (its ``.tokenizer`` is used).

    * ``split``: which side of :func:`held_out_split` to use. **The default is ``"train"`` for
      the prepared cache** (``"eval"`` gives the held-out documents, ``"all"`` everything) and
      ``"all"`` for a list of texts.
    * Documents are shuffled with ``seed`` and packed by :func:`pack_rows`: each row starts
      with BOS (the tokenizer's ``bos_token_id`` unless ``bos_token_id`` is given) and BOS
      separates documents, as SAELens's pretokenizer does; rows are shuffled again with
      ``seed``. ``shuffle=False`` keeps document and row order.
    * ``max_tokens`` caps the dataset at ``max_tokens // context_size`` rows, drawn from the
      first shuffled documents that hold enough tokens (only those are tokenized); a warning
      says so if the text holds fewer.

    With the prepared cache and the model's own tokenizer, token ids come from the cache
    (identical to tokenizing, only faster).
    """
    import datasets
    import numpy as np

    tok = _as_tokenizer(tokenizer)
    bos = tok.bos_token_id if bos_token_id is None else bos_token_id
    if bos is None:
        raise ValueError("the tokenizer has no bos_token_id; pass bos_token_id=")
    if max_tokens is not None and max_tokens < context_size:
        raise ValueError(f"max_tokens={max_tokens} is less than one row of context_size={context_size}")

    cached: list[Any] | None = None
    if isinstance(source, PreparedAssets):
        docs = builders.read_documents(source.documents_path)
        texts = [d.text for d in docs]
        indices = select_split(range(len(docs)), split or "train", eval_fraction, group=lambda i: docs[i].group)
        cached = _cached_token_lists(source, tok)
    else:
        texts = list(source)
        indices = select_split(range(len(texts)), split or "all", eval_fraction)

    rng = np.random.default_rng(seed)
    order = [indices[i] for i in rng.permutation(len(indices))] if shuffle else list(indices)
    budget = None if max_tokens is None else max_tokens + context_size
    token_lists = _token_lists(tok, texts, order, cached, budget)
    rows = pack_rows(token_lists, context_size, bos)
    if shuffle:
        rows = rows[rng.permutation(len(rows))]
    if max_tokens is not None:
        if len(rows) < max_tokens // context_size:
            warnings.warn(
                f"only {len(rows) * context_size:,} tokens of text for max_tokens={max_tokens:,}", stacklevel=2
            )
        rows = rows[: max_tokens // context_size]
    if len(rows) == 0:
        raise ValueError(f"not enough text for a single row of {context_size} tokens")
    return datasets.Dataset.from_dict({"tokens": rows.tolist()})


def _token_lists(
    tokenizer: Any,
    texts: Sequence[str],
    order: Sequence[int],
    cached: Sequence[Any] | None,
    budget: int | None,
    batch: int = 32,
) -> list[Any]:
    """Token ids of ``texts[i]`` for ``i`` in ``order`` (from ``cached`` when given), stopping
    once ``budget`` tokens are collected (all of them if ``budget`` is None)."""
    out: list[Any] = []
    total = 0
    for start in range(0, len(order), batch):
        chunk_ids = order[start : start + batch]
        if cached is not None:
            chunk = [cached[i] for i in chunk_ids]
        else:
            chunk = builders.tokenize_texts(tokenizer, [texts[i] for i in chunk_ids])
        for ids in chunk:
            out.append(ids)
            total += len(ids)
            if budget is not None and total >= budget:
                return out
    return out
