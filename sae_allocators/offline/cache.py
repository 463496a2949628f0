"""Checksummed, atomically built cache folders.

The cache holds *parts* (one folder each, e.g. ``lm-smollm2-135m/``). A part is valid only if
its ``manifest.json`` exists and every file it lists has the recorded size and SHA-256, and no
listed file is missing. A part is built in a hidden temporary sibling folder, its manifest is
written last, and the finished folder is moved into place with :func:`os.replace`; an
interrupted build therefore leaves only a ``.tmp-*`` folder (ignored, cleaned on the next run),
never a half-written part that looks valid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .sources import sha256_file

MANIFEST = "manifest.json"
FORMAT = 1
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"

#: builds a part's files into the (empty) folder it is given; returns JSON-able info for the manifest
Builder = Callable[[Path], dict[str, Any]]


@dataclass(frozen=True)
class Verdict:
    """Result of checking one part folder against its manifest."""

    ok: bool
    problems: tuple[str, ...] = ()
    manifest: dict[str, Any] | None = None

    def describe(self) -> str:
        return "; ".join(self.problems) if self.problems else "ok"


def hash_tree(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative posix path: {"sha256", "bytes"}}`` for every file under ``folder`` except the manifest."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST:
            continue
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return files


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and :func:`os.replace`."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_manifest(folder: Path, part: str, info: dict[str, Any], build_seconds: float) -> dict[str, Any]:
    """Hash every file of ``folder`` and write its ``manifest.json`` (returns the manifest)."""
    manifest = {
        "format": FORMAT,
        "part": part,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(build_seconds, 2),
        "info": info,
        "files": hash_tree(folder),
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The part's manifest, or None if it is missing or not readable JSON."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def verify_part(folder: Path, *, hashes: bool = True) -> Verdict:
    """Check a part folder against its manifest: presence, sizes and (if ``hashes``) SHA-256.

    Problems name the file (``lm-smollm2-135m/model.safetensors: checksum mismatch ...``).
    """
    name = folder.name
    if not folder.is_dir():
        return Verdict(False, (f"{name}: not built yet",))
    manifest = read_manifest(folder)
    if manifest is None:
        return Verdict(False, (f"{name}/{MANIFEST}: missing or unreadable",))
    if manifest.get("format") != FORMAT:
        return Verdict(False, (f"{name}/{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT}",), manifest)
    problems: list[str] = []
    for rel, rec in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{name}/{rel}: missing")
            continue
        size = path.stat().st_size
        if size != rec.get("bytes"):
            problems.append(f"{name}/{rel}: size {size} bytes, manifest says {rec.get('bytes')}")
            continue
        if hashes:
            got = sha256_file(path)
            if got != rec.get("sha256"):
                problems.append(
                    f"{name}/{rel}: checksum mismatch (SHA-256 {got[:16]}..., manifest {str(rec.get('sha256'))[:16]}...)"
                )
    return Verdict(not problems, tuple(problems), manifest)


def build_part(cache_dir: Path, part: str, builder: Builder) -> dict[str, Any]:
    """Build ``cache_dir/part`` atomically with ``builder``; return its manifest.

    The builder writes into a fresh temporary folder; the manifest is written when it returns;
    only then does the folder replace any previous (invalid) version of the part. If the
    builder raises, the temporary folder is removed and the old state is left untouched.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f"{_TMP_PREFIX}{part}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    start = time.perf_counter()
    try:
        info = builder(tmp)
        manifest = write_manifest(tmp, part, info, time.perf_counter() - start)
        final = cache_dir / part
        if final.exists():
            trash = cache_dir / f"{_TRASH_PREFIX}{part}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def clean_leftovers(cache_dir: Path) -> list[str]:
    """Remove ``.tmp-*`` / ``.trash-*`` leftovers of interrupted runs; return their names."""
    removed = []
    if cache_dir.is_dir():
        for path in cache_dir.iterdir():
            if path.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path.name)
    return removed


@contextlib.contextmanager
def locked(cache_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``cache_dir`` (POSIX ``flock``; a no-op where unavailable),
    so two concurrent preparations do not build or clean the same cache at once."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no lock, builds are still atomic
        yield
        return
    with open(cache_dir / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
