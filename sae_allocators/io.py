"""Crash-consistent writes and checks of SAE output folders (used by ``train``, ``push`` and ``load``).

Every message names the file or name at fault and what to do about it. Nothing here unpickles:
:func:`check_sae_folder` reads safetensors headers only; :func:`check_loadable` builds the SAE on
the meta device (no memory) and reads the weights one tensor at a time with ``safetensors``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sae_allocators import devices

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


# --- crash-consistent output folders ----------------------------------------------------------
#
# A save writes the new folder as a hidden sibling ``.NAME.<pid>-<hex>.partial``, flushes it to
# disk, and then switches it with ``NAME`` in ONE system call: ``renameat2(RENAME_EXCHANGE)``
# (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs, ...), which swaps the two names atomically. After the
# switch the hidden name holds the previous folder, which is then removed. So whenever the process
# dies, ``NAME`` is the complete old folder or the complete new one; what is left besides it is a
# hidden ``.partial`` / ``.old`` folder, removed by the next save to the same path
# (:func:`recover_output_dir`). Where the exchange is not available (another OS, a file system
# without it) the switch falls back to two renames (``NAME`` -> ``.NAME.<tag>.old``, then the new
# folder -> ``NAME``); a kill between them leaves ``NAME`` missing until the next save, which puts
# the ``.old`` folder back first. docs/workflow.md describes this.

#: file names an output folder written by ``train`` may hold; an existing folder holding anything
#: else is not replaced (replacing it would delete the user's files)
OUTPUT_FILENAMES = frozenset({CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME, RUNNER_CFG_FILENAME, METRICS_FILENAME})
#: steps of a save, in order, as passed to ``_SAVE_STEP_HOOK`` (the crash tests kill the process at each)
SAVE_STEPS = ("recovered", "tmp_created", "written", "synced", "switched", "removing_old", "done")
FALLBACK_SAVE_STEPS = ("recovered", "tmp_created", "written", "synced", "moved_old_aside", "switched", "removing_old", "done")
#: test seam: called with each step name of a save (the crash tests set it in a subprocess)
_SAVE_STEP_HOOK: Callable[[str], None] | None = None
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}


def _step(name: str) -> None:
    if _SAVE_STEP_HOOK is not None:
        _SAVE_STEP_HOOK(name)


def _renameat2():
    """The C ``renameat2`` (or a ``syscall`` wrapper for it), or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import platform

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    number = _SYS_RENAMEAT2.get(platform.machine())
    if number is None:
        return None
    syscall = libc.syscall
    syscall.restype = ctypes.c_long

    def via_syscall(olddirfd, old, newdirfd, new, flags):
        return syscall(ctypes.c_long(number), ctypes.c_int(olddirfd), old, ctypes.c_int(newdirfd), new, ctypes.c_uint(flags))

    return via_syscall


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Atomically swap the names ``a`` and ``b`` (both must exist); False where unsupported."""
    import ctypes
    import errno

    fn = _renameat2()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # kernel or file system without it
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) of {a} and {b} failed: {os.strerror(err)}")


def _debris_re(name: str) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(name)}\.(?P<tag>[^./]+)\.(?P<kind>partial|old)$")


def _pid_alive(tag: str) -> bool:
    """True when the tag's process (``<pid>-<hex>``) is this one or still running."""
    head = tag.split("-", 1)[0]
    if not head.isdigit():
        return False  # older naming (no pid): from an earlier release, never still running
    pid = int(head)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: someone else's live process
        return True
    return True


def _remove_tree(path: Path, step: str | None = None) -> None:
    """Remove a folder file by file (``step`` is reported after the first removal)."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    first = step is not None
    for entry in sorted(path.iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        if first:
            _step(step)  # type: ignore[arg-type]
            first = False
    with contextlib.suppress(FileNotFoundError):
        path.rmdir()


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for entry in path.rglob("*"):
        if entry.is_file() and not entry.is_symlink():
            _fsync_path(entry)
    _fsync_path(path, directory=True)


def debris_of(path: str | Path) -> list[Path]:
    """Hidden leftovers of interrupted saves to ``path`` (``.NAME.<tag>.partial`` / ``.old``)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = _debris_re(path.name)
    return sorted(p for p in path.parent.iterdir() if pattern.match(p.name))


def recover_output_dir(path: str | Path) -> list[Path]:
    """Clean up after interrupted saves to ``path``; return what was removed or restored.

    A ``.old`` folder is renamed back to ``path`` when ``path`` is missing (a fallback save killed
    between its two renames: the previous output comes back); every other leftover of a process
    that is no longer running is deleted. Leftovers of running processes are left alone.
    """
    path = Path(path)
    pattern = _debris_re(path.name)
    done: list[Path] = []
    stale = [(p, m) for p in debris_of(path) if (m := pattern.match(p.name)) and not _pid_alive(m["tag"])]
    if not path.exists() and not path.is_symlink():
        olds = sorted((p for p, m in stale if m["kind"] == "old"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.rename(olds[-1], path)
            done.append(olds[-1])
            stale = [(p, m) for p, m in stale if p != olds[-1]]
    for p, _ in stale:
        _remove_tree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        done.append(p)
    return done


def check_replaceable_output(path: str | Path) -> Path:
    """Return the folder a save to ``path`` will replace (symlinks resolved), or raise
    :class:`SaeFolderError` when replacing it would delete something that is not an SAE output."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if not path.exists():
        return path
    if not path.is_dir():
        raise SaeFolderError(f"output path {path} exists and is a file, not a folder; choose another --output_path or remove it.")
    if (path / CHECKPOINT_MARKER).exists():
        raise SaeFolderError(
            f"output path {path} is a training checkpoint (it has {CHECKPOINT_MARKER}); saving there would replace it. "
            f"Choose another --output_path (checkpoints go to --checkpoint_path)."
        )
    foreign = sorted(p.name for p in path.iterdir() if p.name not in OUTPUT_FILENAMES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise SaeFolderError(
            f"output path {path} exists and holds {shown}, which an SAE output folder does not; the save replaces "
            f"the whole folder, so it would delete them. Choose a new or empty --output_path, or move those files away."
        )
    return path


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` whole, on error it is removed.

    Whenever the process stops -- an exception, or a kill at any instruction -- ``path`` is the
    complete old folder or the complete new one (see the comment above for the fallback). An
    existing ``path`` that holds files an SAE output folder does not is refused before anything
    is written (:func:`check_replaceable_output`). Leftovers of earlier interrupted saves to the
    same path are cleaned up first.
    """
    path = check_replaceable_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_output_dir(path)
    _step("recovered")
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = path.parent / f".{path.name}.{tag}.partial"
    tmp.mkdir()
    _step("tmp_created")
    try:
        yield tmp
        _step("written")
        _fsync_tree(tmp)
        _step("synced")
    except BaseException:
        _remove_tree(tmp)
        raise
    try:
        check_replaceable_output(path)  # again: something may have appeared while it was written
    except SaeFolderError as exc:
        kept = path.parent / f"{path.name}.new-{tag}"
        os.rename(tmp, kept)
        raise SaeFolderError(f"{exc} The new output was kept in {kept}.") from None
    if path.exists() and exchange_paths(tmp, path):
        _step("switched")  # path: the new folder; tmp: the old one
        _fsync_path(path.parent, directory=True)
        _remove_tree(tmp, "removing_old")
    elif path.exists():
        old = path.parent / f".{path.name}.{tag}.old"
        os.rename(path, old)
        _step("moved_old_aside")
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            _remove_tree(tmp)
            raise
        _step("switched")
        _fsync_path(path.parent, directory=True)
        _remove_tree(old, "removing_old")
    else:
        os.rename(tmp, path)
        _step("switched")
        _fsync_path(path.parent, directory=True)
    _step("done")


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


# --- what SAELens's loader will do, checked before it does it --------------------------------

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _training_only_names(info: SaeFolderInfo) -> set[str]:
    """Names of training-only buffers of the folder's (training) architecture, if we know them."""
    from sae_allocators import saelens_registry as reg

    names: set[str] = set()
    for arch in {info.training_architecture, info.architecture} - {None}:
        entry = reg.get(reg.TRAINING, arch) if isinstance(arch, str) else None
        if entry is not None and hasattr(entry[0], "_all_training_only_buffers"):
            names |= set(entry[0]._all_training_only_buffers())
    return names


def _expected_state(info: SaeFolderInfo) -> tuple[Any, dict[str, tuple[list[int], Any]]]:
    """Build the SAE the way ``SAE.load_from_disk`` does (on the meta device); return it and
    ``{tensor name: (shape, dtype)}`` of its state dict. Config problems are SaeFolderErrors."""
    import torch
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting
    from sae_lens.util import str_to_dtype

    from sae_allocators import config_checks
    from sae_allocators import saelens_registry as reg

    cfg_path = info.path / CFG_FILENAME
    fix = "fix that entry in cfg.json (or re-copy it from the training output)"
    _, cfg_cls = reg.registry(reg.INFERENCE)[info.architecture]
    problems = config_checks.field_type_problems(cfg_cls, info.cfg)
    if problems:
        raise SaeFolderError(f"{cfg_path}: {problems[0]} SAELens would fail on it while loading; {fix}.")
    for key in ("d_in", "d_sae"):
        value = info.cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SaeFolderError(f"{cfg_path}: {key}={value!r} is invalid: it must be a positive integer; {fix}.")
    try:
        str_to_dtype(info.cfg.get("dtype", "float32"))
    except Exception:  # noqa: BLE001 - SAELens raises ValueError or KeyError depending on version
        raise SaeFolderError(f"{cfg_path}: dtype={info.cfg.get('dtype')!r} is not a torch dtype name (e.g. 'float32'); {fix}.") from None
    try:
        cfg_dict = handle_config_defaulting(dict(info.cfg))
        sae_cfg = SAE.get_sae_config_class_for_architecture(cfg_dict["architecture"]).from_dict(cfg_dict)
        sae_cls = SAE.get_sae_class_for_architecture(sae_cfg.architecture())
        sae_cfg.device = "meta"
        sae = sae_cls(sae_cfg)
    except SaeFolderError:
        raise
    except Exception as exc:  # noqa: BLE001 - the config's own validation (a ValueError naming the field, ...)
        raise SaeFolderError(f"{cfg_path}: SAELens cannot build the {info.architecture!r} SAE from it: {type(exc).__name__}: {exc}") from None
    with torch.no_grad():
        expected = {k: (list(v.shape), v.dtype) for k, v in sae.state_dict().items()}
    return sae, expected


def check_loadable(path: str | Path, info: SaeFolderInfo | None = None, *, check_values: bool = True) -> SaeFolderInfo:
    """Check that SAELens will load ``path`` (``SAE.load_from_disk`` / ``from_pretrained``) into
    a usable SAE, without loading it: the config's field types, the tensors' names, shapes and
    dtypes against the SAE that config builds, and (``check_values``) that every weight is finite.

    Raises :class:`SaeFolderError` naming the file and tensor. Reads one tensor at a time.
    """
    import torch
    from safetensors import safe_open

    info = info if info is not None else check_sae_folder(path)
    weights = info.path / WEIGHTS_FILENAME
    sae, expected = _expected_state(info)
    header = info.tensors
    # what SAELens's loader does to the file's tensors before load_state_dict, on meta tensors
    meta = {name: torch.empty(t["shape"], device="meta") for name, t in header.items()}
    try:
        sae.process_state_dict_for_loading(meta)
    except Exception:  # noqa: BLE001 - a conversion that needs real values: compare the raw names
        meta = {name: torch.empty(t["shape"], device="meta") for name, t in header.items()}
    missing = sorted(set(expected) - set(meta))
    extra = sorted(set(meta) - set(expected))
    if extra:
        if set(extra) & _training_only_names(info):
            raise SaeFolderError(
                f"{weights} holds training-only tensors ({', '.join(extra)}): these are a training checkpoint's "
                f"weights, which SAELens saves with the training model's buffers. Pass the final output folder "
                f"(--output_path of `sae-allocators train`) instead, which holds the inference model."
            )
        raise SaeFolderError(
            f"{weights} holds tensor(s) {', '.join(map(repr, extra))} that a {info.architecture!r} SAE does not have "
            f"(it has {', '.join(sorted(expected))}); SAELens would refuse to load it. The weights and {CFG_FILENAME} do "
            f"not belong together: re-copy both from the same training output."
        )
    if missing:
        raise SaeFolderError(
            f"{weights} lacks tensor(s) {', '.join(map(repr, missing))} that a {info.architecture!r} SAE needs; "
            f"SAELens would refuse to load it. Re-copy the weights from the training output, or train again."
        )
    for name, t in header.items():
        if name in expected and t.get("dtype") not in _FLOAT_DTYPES:
            raise SaeFolderError(
                f"{weights}: tensor {name!r} has dtype {t.get('dtype')}, but SAE weights are floating point "
                f"(F32, F16, BF16, ...); the file was not written by SAELens. Re-copy it from the training output, or train again."
            )
    for name, (shape, _) in expected.items():
        got = list(meta[name].shape)
        if got != shape:
            raise SaeFolderError(
                f"{weights}: tensor {name!r} has shape {got}, but {CFG_FILENAME} (d_in={info.cfg['d_in']}, "
                f"d_sae={info.cfg['d_sae']}) needs {shape}; SAELens would refuse to load it. The weights and "
                f"{CFG_FILENAME} do not belong together (transposed, or from another SAE): re-copy both from the same training output."
            )
    if info.has_sparsity:
        sparsity = read_safetensors_header(info.path / SPARSITY_FILENAME)
        for name, t in sparsity.items():
            if t.get("shape") not in ([info.cfg["d_sae"]], [1, info.cfg["d_sae"]]):
                raise SaeFolderError(
                    f"{info.path / SPARSITY_FILENAME}: tensor {name!r} has shape {t.get('shape')}, but d_sae={info.cfg['d_sae']}; "
                    f"re-copy it from the training output, or delete it (it is optional)."
                )
    if check_values:
        with safe_open(str(weights), framework="pt", device=devices.CPU) as f:  # type: ignore[no-untyped-call]
            for name in f.keys():  # noqa: SIM118
                t = f.get_tensor(name)
                if not bool(torch.isfinite(t).all()):
                    n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                    raise SaeFolderError(
                        f"{weights}: tensor {name!r} holds {n_nan} NaN and {n_inf} inf values, so the SAE would output "
                        f"NaN. Training diverged or the file was damaged: train again (e.g. with a lower learning rate)."
                    )
    return info
