"""Atomic writes and checks of SAE output folders (used by ``train``, ``push`` and ``load``).

Every message names the file or name at fault and what to do about it. Nothing here unpickles:
safetensors files are checked by reading their JSON header only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

CFG_FILENAME = "cfg.json"  # = sae_lens.constants.SAE_CFG_FILENAME
WEIGHTS_FILENAME = "sae_weights.safetensors"  # = SAE_WEIGHTS_FILENAME
SPARSITY_FILENAME = "sparsity.safetensors"
RUNNER_CFG_FILENAME = "runner_cfg.json"
METRICS_FILENAME = "final_metrics.json"  # written by `sae-allocators train`
CHECKPOINT_MARKER = "trainer_state.pt"  # SAELens checkpoints have it; final output folders don't

_MAX_HEADER = 100 * 1024 * 1024


class SaeFolderError(ValueError):
    """A folder, file or name that is not a usable SAE; the message says which and what to do."""


# --- atomic writes ---------------------------------------------------------------------------


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder + ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` (whole), on error it is removed.

    A reader of ``path`` sees either the old folder or the complete new one, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- checks ----------------------------------------------------------------------------------


def read_safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """Return ``{tensor name: {"dtype", "shape", "data_offsets"}}`` from a safetensors file's header.

    Raises :class:`SaeFolderError` naming the file when it is missing, truncated or not safetensors.
    """
    path = Path(path)
    fix = "re-copy it from the training output, or train again"
    if not path.is_file():
        raise SaeFolderError(f"{path}: file not found; {fix}.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SaeFolderError(f"{path} is corrupted: {size} bytes, too short for a safetensors file; {fix}.")
        (n,) = struct.unpack("<Q", raw)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise SaeFolderError(f"{path} is corrupted: not a valid safetensors header (length {n}, file size {size}); {fix}.")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SaeFolderError(f"{path} is corrupted: its safetensors header is not valid JSON ({exc}); {fix}.") from None
    if not isinstance(header, dict):
        raise SaeFolderError(f"{path} is corrupted: its safetensors header is not a JSON object; {fix}.")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            ok = 0 <= start <= end <= data_len and isinstance(info["shape"], list)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise SaeFolderError(f"{path} is corrupted: tensor {name!r} lies outside the file (truncated?); {fix}.")
    return header


@dataclass
class SaeFolderInfo:
    path: Path
    cfg: dict[str, Any]
    architecture: str
    training_architecture: str | None
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"dtype", "shape"}
    has_sparsity: bool = False

    @property
    def metadata(self) -> dict[str, Any]:
        return self.cfg.get("metadata") or {}


def read_json_file(path: Path, what: str, fix: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SaeFolderError(f"{path}: {what} not found; {fix}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SaeFolderError(f"{path} is not valid JSON ({exc}); {fix}.") from None


def check_sae_folder(path: str | Path, *, check_architecture: bool = True) -> SaeFolderInfo:
    """Check that ``path`` is a final SAE output folder SAELens can load; describe it.

    Checks ``cfg.json`` (valid JSON object with ``architecture``, ``d_in``, ``d_sae``; the
    architecture registered in SAELens, after our plugins are loaded), ``sae_weights.safetensors``
    (present, a valid safetensors header) and, if present, ``sparsity.safetensors``.
    """
    path = Path(path)
    what_is_output = (
        "an SAE output folder is the --output_path of `sae-allocators train` (or of SAELens's runner) "
        f"and holds {CFG_FILENAME} and {WEIGHTS_FILENAME}"
    )
    if not path.exists():
        raise SaeFolderError(f"{path}: no such folder; {what_is_output}.")
    if not path.is_dir():
        raise SaeFolderError(f"{path} is a file, not a folder; {what_is_output}.")
    cfg_path = path / CFG_FILENAME
    if not cfg_path.is_file():
        raise SaeFolderError(f"{path} is not an SAE output folder: {CFG_FILENAME} is missing; {what_is_output}.")
    if (path / CHECKPOINT_MARKER).exists():
        raise SaeFolderError(
            f"{path} is a training checkpoint (it has {CHECKPOINT_MARKER}), whose {CFG_FILENAME} is the training "
            f"config; pass the final output folder (--output_path) instead, which holds the inference config."
        )
    cfg = read_json_file(cfg_path, "SAE config", "re-copy it from the training output, or train again")
    if not isinstance(cfg, dict):
        raise SaeFolderError(f"{cfg_path} must hold a JSON object (an SAE config), not {type(cfg).__name__}.")
    for key in ("architecture", "d_in", "d_sae"):
        if key not in cfg:
            raise SaeFolderError(f"{cfg_path} has no {key!r} entry, so it is not an SAE config; {what_is_output}.")
    arch = cfg["architecture"]
    if check_architecture:
        _check_registered(cfg_path, arch)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    tensors = read_safetensors_header(path / WEIGHTS_FILENAME) if (path / WEIGHTS_FILENAME).exists() else None
    if tensors is None:
        raise SaeFolderError(
            f"{path / WEIGHTS_FILENAME}: weights file not found next to {CFG_FILENAME}; copy the whole output "
            f"folder (both files), or train again."
        )
    has_sparsity = (path / SPARSITY_FILENAME).exists()
    if has_sparsity:
        read_safetensors_header(path / SPARSITY_FILENAME)
    return SaeFolderInfo(
        path=path,
        cfg=cfg,
        architecture=arch,
        training_architecture=meta.get("training_architecture") if meta else None,
        tensors={k: {"dtype": v.get("dtype"), "shape": v.get("shape")} for k, v in tensors.items()},
        has_sparsity=has_sparsity,
    )


def _check_registered(cfg_path: Path, arch: Any) -> None:
    from sae_allocators import host
    from sae_allocators import saelens_registry as reg

    host.load()
    if not isinstance(arch, str):
        raise SaeFolderError(f"{cfg_path}: 'architecture' must be a string, got {arch!r}.")
    try:
        reg.registry(reg.INFERENCE)[arch]
    except KeyError as exc:  # UnknownArchitectureError explains who provides what
        raise SaeFolderError(f"{cfg_path} names architecture {arch!r}, which nothing provides. {exc}") from None
