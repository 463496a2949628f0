"""Crash-consistent writes: files through a temporary sibling + ``os.replace``, output folders switched
into place whole (used by ``train``; ``push`` and ``load`` read what it wrote).

What an SAE output folder holds and whether SAELens can load one is :mod:`sae_allocators.sae_folder`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from sae_allocators.sae_folder import SaeFolderError, check_replaceable_output


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

#: steps of a save, in order, as passed to ``_SAVE_STEP_HOOK`` (the crash tests kill the process at each)
SAVE_STEPS = ("recovered", "tmp_created", "written", "synced", "switched", "removing_old", "done")
FALLBACK_SAVE_STEPS = (
    "recovered",
    "tmp_created",
    "written",
    "synced",
    "moved_old_aside",
    "switched",
    "removing_old",
    "done",
)
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
        return syscall(
            ctypes.c_long(number), ctypes.c_int(olddirfd), old, ctypes.c_int(newdirfd), new, ctypes.c_uint(flags)
        )

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


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, check: Callable[[str | Path], Path] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path`` whole, on error it is removed.

    Whenever the process stops -- an exception, or a kill at any instruction -- ``path`` is the
    complete old folder or the complete new one (see the comment above for the fallback). An
    existing ``path`` that holds files an SAE output folder does not is refused before anything
    is written (:func:`check_replaceable_output`; ``check`` replaces that test, e.g. for
    ``calibrate`` rewriting a checkpoint folder with all its files). Leftovers of earlier
    interrupted saves to the same path are cleaned up first.
    """
    yield from _atomic_dir(path, check or check_replaceable_output)


# (the generator itself is undecorated: mutmut does not mutate decorated functions, and this is
# the crash-consistent save; ``yield from`` hands the with-block's exception to it unchanged)
def _atomic_dir(path: str | Path, check: Callable[[str | Path], Path] = check_replaceable_output) -> Iterator[Path]:
    path = check(path)
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
        check(path)  # again: something may have appeared while it was written
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
