"""Fast unit tests of ``sae_allocators/io.py`` (atomic writes) and ``sae_allocators/sae_folder.py``
(SAE-folder checks), in this process: the mutation target ``io`` runs them per mutant.

Failures are simulated by monkeypatching ``os.replace`` / ``os.rename`` / ``os.fsync`` and the save's
step hook; nothing here spawns a process (the SIGKILL tests are tests/test_hardening.py). No test
signals a live process: ``_pid_alive``'s ``os.kill`` is faked wherever the pid could be running.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import struct
import sys
from pathlib import Path

import pytest

from sae_allocators import io as sio
from sae_allocators import sae_folder as sf
from sae_allocators.sae_folder import SaeFolderError

#: a pid no process can have (above the kernel's pid_max): os.kill(pid, 0) raises ProcessLookupError
try:
    DEAD_PID = int(Path("/proc/sys/kernel/pid_max").read_text()) + 7
except OSError:  # not Linux
    DEAD_PID = 2**22 + 7


def _tree(root: Path) -> dict[str, str]:
    """``{relative path: text}`` of every file under ``root`` (folders implied)."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _error(fn, *a, **k) -> str:
    """The message of the SaeFolderError that ``fn(*a, **k)`` raises."""
    with pytest.raises(SaeFolderError) as info:
        fn(*a, **k)
    return str(info.value)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def steps(monkeypatch):
    """Record every step of a save (``io._SAVE_STEP_HOOK``); ``steps.at[name]`` runs at that step."""

    class Recorder(list):
        at: dict = {}

    rec = Recorder()
    rec.at = {}

    def hook(name):
        rec.append(name)
        if name in rec.at:
            rec.at[name]()

    monkeypatch.setattr(sio, "_SAVE_STEP_HOOK", hook)
    return rec


# --- atomic_write_bytes / _text / _json ------------------------------------------------------------


def test_atomic_write_bytes_writes_creates_parents_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "a" / "b" / "f.bin"
    out = sio.atomic_write_bytes(str(target), b"\x00\x01payload")
    assert isinstance(out, Path) and out == target
    assert target.read_bytes() == b"\x00\x01payload"
    assert _names(target.parent) == ["f.bin"]
    sio.atomic_write_bytes(target, b"new")  # replaces an existing file whole
    assert target.read_bytes() == b"new" and _names(target.parent) == ["f.bin"]


def test_atomic_write_goes_through_a_hidden_synced_sibling(tmp_path, monkeypatch):
    """The data is written, flushed and fsynced in a hidden temporary file in the same folder
    (so ``os.replace`` is a rename on one file system), and only then replaces the target."""
    target = tmp_path / "m.json"
    target.write_bytes(b"old")
    seen = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        seen.append(("fsync", os.fstat(fd).st_size, target.read_bytes()))  # flushed before the fsync
        real_fsync(fd)

    def replace(src, dst):
        src = Path(src)
        seen.append(("replace", src.parent, src.name, Path(dst), src.read_bytes()))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    sio.atomic_write_bytes(target, b"0123456789")
    assert seen[0] == ("fsync", 10, b"old")  # the target still holds the old bytes while the new ones sync
    kind, parent, name, dst, data = seen[1]
    assert (kind, parent, dst, data) == ("replace", tmp_path, target, b"0123456789")
    assert name.startswith(".m.json.") and name.endswith(".tmp")
    assert len(seen) == 2 and target.read_bytes() == b"0123456789"


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
@pytest.mark.parametrize("exc_type", [OSError, KeyboardInterrupt])
def test_atomic_write_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch, fail_at, exc_type):
    target = tmp_path / "f.txt"
    target.write_text("old")
    boom = exc_type("simulated failure")

    def fail(*a, **k):
        raise boom

    if fail_at == "write":
        monkeypatch.setattr(sio.os, "fdopen", lambda fd, mode: _FailingFile(fd, boom))
    else:
        monkeypatch.setattr(os, fail_at, fail)
    with pytest.raises(exc_type) as info:
        sio.atomic_write_text(target, "new")
    assert info.value is boom
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["f.txt"]  # the temporary file is gone


class _FailingFile:
    """A file object whose write fails (after closing the descriptor, as a real one would)."""

    def __init__(self, fd, exc):
        self.fd, self.exc = fd, exc

    def __enter__(self):
        return self

    def __exit__(self, *a):
        os.close(self.fd)

    def write(self, data):
        raise self.exc


def test_atomic_write_failure_after_the_temporary_vanished_raises_the_original_error(tmp_path, monkeypatch):
    def replace(src, dst):
        os.unlink(src)  # e.g. someone cleaned the folder up
        raise PermissionError("simulated")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PermissionError, match="simulated"):
        sio.atomic_write_bytes(tmp_path / "f", b"x")
    assert _names(tmp_path) == []


def test_atomic_write_text_is_utf8_and_json_is_sorted_indented_with_newline(tmp_path):
    p = sio.atomic_write_text(tmp_path / "t.txt", "é ✓ ß")
    assert p.read_bytes() == "é ✓ ß".encode("utf-8")
    j = sio.atomic_write_json(tmp_path / "x.json", {"z": "é", "a": {"c": 1, "b": [True, None]}})
    assert j == tmp_path / "x.json"
    assert j.read_text(encoding="utf-8") == (
        '{\n  "a": {\n    "b": [\n      true,\n      null\n    ],\n    "c": 1\n  },\n  "z": "\\u00e9"\n}\n'
    )


# --- exchange_paths / _renameat2 --------------------------------------------------------------------


def _two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "fa").write_text("A")
    (b / "fb").write_text("B")
    return a, b


def _kernel_can_exchange(folder: Path) -> bool:
    """Whether ``renameat2(RENAME_EXCHANGE)`` works in ``folder``, asked of libc directly (not
    through io.py, whose mutants must not be able to turn a test into a skip)."""
    if not sys.platform.startswith("linux"):
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    a, b = folder / ".probe_a", folder / ".probe_b"
    a.mkdir()
    b.mkdir()
    try:
        return fn(-100, os.fsencode(str(a)), -100, os.fsencode(str(b)), 2) == 0
    finally:
        a.rmdir()
        b.rmdir()


@pytest.fixture
def exchange_ok(tmp_path):
    if not _kernel_can_exchange(tmp_path):
        pytest.skip("this kernel, libc or file system has no renameat2(RENAME_EXCHANGE)")
    return True


def test_exchange_paths_swaps_two_folders_atomically(tmp_path, exchange_ok):
    a, b = _two_folders(tmp_path)
    assert sio.exchange_paths(a, b) is True
    assert _tree(a) == {"fb": "B"} and _tree(b) == {"fa": "A"}
    f = tmp_path / "f"
    f.write_text("F")
    assert sio.exchange_paths(str(f), str(a)) is True  # a file and a folder swap too
    assert f.is_dir() and _tree(f) == {"fb": "B"} and a.read_text() == "F"


def test_exchange_paths_takes_relative_paths(tmp_path, monkeypatch, exchange_ok):
    _two_folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert sio.exchange_paths("a", Path("b")) is True
    assert _tree(tmp_path / "a") == {"fb": "B"} and _tree(tmp_path / "b") == {"fa": "A"}


def test_exchange_paths_names_both_paths_and_the_errno_when_one_is_missing(tmp_path, exchange_ok):
    a = tmp_path / "a"
    a.mkdir()
    ctypes.set_errno(0)
    with pytest.raises(OSError) as info:
        sio.exchange_paths(a, tmp_path / "missing")
    assert info.value.errno == errno.ENOENT
    assert f"renameat2(RENAME_EXCHANGE) of {a} and {tmp_path / 'missing'} failed: {os.strerror(errno.ENOENT)}" in str(
        info.value
    )
    assert a.is_dir() and not (tmp_path / "missing").exists()


def test_exchange_paths_through_the_raw_syscall_when_libc_lacks_renameat2(tmp_path, monkeypatch, exchange_ok):
    """Older glibc has no ``renameat2`` wrapper: the swap goes through ``syscall(SYS_renameat2, ...)``."""
    import platform

    if platform.machine() not in sio._SYS_RENAMEAT2:
        pytest.skip("no syscall number known for this machine")
    real = ctypes.CDLL(None, use_errno=True)
    asked = []

    class OldLibc:
        syscall = real.syscall

    def cdll(name, use_errno=False):
        asked.append((name, use_errno))
        return OldLibc()

    monkeypatch.setattr(ctypes, "CDLL", cdll)
    a, b = _two_folders(tmp_path)
    fn = sio._renameat2()
    assert fn is not None and asked == [(None, True)]
    assert sio.exchange_paths(a, b) is True
    assert _tree(a) == {"fb": "B"} and _tree(b) == {"fa": "A"}
    monkeypatch.chdir(tmp_path)  # relative paths: resolved against the current folder (AT_FDCWD)
    assert sio.exchange_paths("a", "b") is True
    assert _tree(a) == {"fa": "A"} and _tree(b) == {"fb": "B"}
    ctypes.set_errno(0)
    with pytest.raises(OSError) as info:  # the syscall's errno reaches the error too
        sio.exchange_paths(a, tmp_path / "missing")
    assert info.value.errno == errno.ENOENT
    monkeypatch.setattr(platform, "machine", lambda: "pdp11")
    assert sio._renameat2() is None  # no wrapper and no known syscall number: unsupported


def test_renameat2_is_none_off_linux_or_without_libc(monkeypatch, tmp_path):
    monkeypatch.setattr(sio.sys, "platform", "darwin")
    assert sio._renameat2() is None
    a, b = _two_folders(tmp_path)
    assert sio.exchange_paths(a, b) is False  # unsupported: nothing moved
    assert _tree(a) == {"fa": "A"} and _tree(b) == {"fb": "B"}
    monkeypatch.setattr(sio.sys, "platform", "linux")

    def no_libc(*a, **k):
        raise OSError("no libc")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    assert sio._renameat2() is None


@pytest.mark.parametrize(
    "err,supported",
    [
        (errno.EINVAL, False),
        (errno.ENOSYS, False),
        (errno.EOPNOTSUPP, False),
        (errno.EXDEV, None),
        (errno.EACCES, None),
    ],
)
def test_exchange_paths_reports_unsupported_file_systems_as_false_and_other_errors_as_oserror(
    tmp_path, monkeypatch, err, supported
):
    calls = []

    def fake(olddirfd, old, newdirfd, new, flags):
        calls.append((olddirfd, old, newdirfd, new, flags))
        ctypes.set_errno(err)
        return -1

    monkeypatch.setattr(sio, "_renameat2", lambda: fake)
    a, b = _two_folders(tmp_path)
    if supported is False:
        assert sio.exchange_paths(a, b) is False
    else:
        with pytest.raises(OSError) as info:
            sio.exchange_paths(a, b)
        assert info.value.errno == err and os.strerror(err) in str(info.value)
    # the C call: paths as bytes relative to the current folder (AT_FDCWD), flag RENAME_EXCHANGE
    assert calls == [(-100, os.fsencode(str(a)), -100, os.fsencode(str(b)), 2)]
    monkeypatch.setattr(sio, "_renameat2", lambda: lambda *args: 0)
    assert sio.exchange_paths(a, b) is True  # rc 0: swapped


# --- _pid_alive, debris_of, recover_output_dir -----------------------------------------------------


def test_pid_alive_reads_the_pid_before_the_first_dash(monkeypatch):
    sent = []

    def kill(pid, sig):
        sent.append((pid, sig))
        if pid == DEAD_PID:
            raise ProcessLookupError
        if pid == 4242:
            raise PermissionError  # someone else's live process
        return None

    monkeypatch.setattr(sio.os, "kill", kill)
    assert sio._pid_alive(f"{os.getpid()}-ab12cd34") is True and sent == []  # this process: no signal
    assert sio._pid_alive(f"{os.getpid()}-ab-cd") is True and sent == []
    assert sio._pid_alive(f"{DEAD_PID}-ab12cd34") is False
    assert sio._pid_alive("4242-ffff") is True
    assert sio._pid_alive("4343-ffff") is True  # signal 0 delivered: running
    assert sent == [(DEAD_PID, 0), (4242, 0), (4343, 0)]  # signal 0 only: nothing is ever killed
    assert sio._pid_alive("abcdef12") is False and sio._pid_alive("x1-2") is False  # older naming
    assert len(sent) == 3


def test_pid_alive_with_the_real_kill_for_a_dead_pid():
    assert sio._pid_alive(f"{DEAD_PID}-00") is False


def test_debris_of_lists_only_leftovers_of_that_path(tmp_path):
    assert sio.debris_of(tmp_path / "nowhere" / "out") == []
    names = [
        ".out.12-ab.partial",
        ".out.7.old",
        ".out.x-y.old",  # debris of out
        ".out.partial",
        ".out..old",
        ".out.a.b.old",
        ".out.1.tmp",
        "out.1.old",
        ".outx.1.old",
        ".out.1.oldx",
        "out",
        ".out.v1.2.old",
    ]
    for n in names:
        (tmp_path / n).mkdir()
    got = sio.debris_of(tmp_path / "out")
    assert got == [tmp_path / ".out.12-ab.partial", tmp_path / ".out.7.old", tmp_path / ".out.x-y.old"]
    (tmp_path / "o.t").mkdir()
    (tmp_path / ".oXt.1.old").mkdir()  # the name is matched literally, not as a regex
    (tmp_path / ".o.t.1.old").mkdir()
    assert sio.debris_of(str(tmp_path / "o.t")) == [tmp_path / ".o.t.1.old"]


def _debris(tmp_path, name, kind, pid=DEAD_PID, files=None):
    p = tmp_path / f".{name}.{pid}-{kind[:2]}{len(list(tmp_path.iterdir()))}.{kind}"
    p.mkdir()
    for k, v in (files or {"cfg.json": kind}).items():
        (p / k).write_text(v)
    return p


def test_recover_restores_the_newest_old_folder_when_the_output_is_missing(tmp_path):
    out = tmp_path / "out"
    old1 = _debris(tmp_path, "out", "old", files={"cfg.json": "newest"})
    old2 = _debris(tmp_path, "out", "old", files={"cfg.json": "oldest"})
    old3 = _debris(tmp_path, "out", "old", files={"cfg.json": "middle"})
    os.utime(old1, (2_000_000_000, 2_000_000_000))  # old1 is the newest despite its name
    os.utime(old2, (1_000_000_000, 1_000_000_000))
    os.utime(old3, (1_500_000_000, 1_500_000_000))
    partial = _debris(tmp_path, "out", "partial")
    done = sio.recover_output_dir(str(out))
    assert _tree(out) == {"cfg.json": "newest"}
    assert done[0] == old1 and sorted(done[1:]) == sorted([old2, old3, partial])
    assert _names(tmp_path) == ["out"]


def test_recover_never_moves_an_old_folder_onto_an_existing_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "cfg.json").write_text("current")
    old = _debris(tmp_path, "out", "old")
    assert sio.recover_output_dir(out) == [old]
    assert _names(tmp_path) == ["out"] and _tree(out) == {"cfg.json": "current"}


def test_recover_leaves_a_running_saves_leftovers_alone(tmp_path):
    out = tmp_path / "out"
    mine_old = _debris(tmp_path, "out", "old", pid=os.getpid())
    mine_partial = _debris(tmp_path, "out", "partial", pid=os.getpid())
    assert sio.recover_output_dir(out) == []
    assert not out.exists() and mine_old.is_dir() and mine_partial.is_dir()


def test_recover_removes_file_and_symlink_leftovers_without_following_links(tmp_path):
    out = tmp_path / "out"
    keep = tmp_path / "elsewhere"
    keep.mkdir()
    (keep / "precious").write_text("1")
    link = tmp_path / f".out.{DEAD_PID}-l.partial"
    link.symlink_to(keep, target_is_directory=True)
    f = tmp_path / f".out.{DEAD_PID}-f.partial"
    f.write_text("x")
    nested = _debris(tmp_path, "out", "partial")
    (nested / "sub").mkdir()
    (nested / "sub" / "deep").write_text("d")
    done = sio.recover_output_dir(out)
    assert sorted(done) == sorted([link, f, nested])
    assert _names(tmp_path) == ["elsewhere"] and _tree(keep) == {"precious": "1"}


def test_recover_without_debris_does_nothing(tmp_path):
    (tmp_path / "other").mkdir()
    assert sio.recover_output_dir(tmp_path / "out") == []
    assert _names(tmp_path) == ["other"]


# --- _remove_tree, _fsync_path, _fsync_tree ---------------------------------------------------------


def test_remove_tree_removes_everything_reports_its_step_once_and_follows_no_link(tmp_path, steps):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "k").write_text("k")
    d = tmp_path / "d"
    (d / "sub" / "deeper").mkdir(parents=True)
    (d / "sub" / "deeper" / "x").write_text("x")
    (d / "a").write_text("a")
    (d / "z").write_text("z")
    (d / "linkdir").symlink_to(keep, target_is_directory=True)
    (d / "linkfile").symlink_to(keep / "k")
    left_at_step = []
    steps.at["gone1"] = lambda: left_at_step.append(len(list(d.iterdir())))
    sio._remove_tree(d, "gone1")
    assert steps == ["gone1"] and left_at_step == [4]  # reported once, after the first of 5 entries
    assert not d.exists() and _tree(keep) == {"k": "k"}
    sio._remove_tree(d, "gone2")  # nothing left: no error, no step
    assert steps == ["gone1"]


def test_remove_tree_of_a_link_file_or_nothing(tmp_path, steps):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "k").write_text("k")
    link = tmp_path / "link"
    link.symlink_to(keep, target_is_directory=True)
    sio._remove_tree(link, "s")
    assert not link.is_symlink() and _tree(keep) == {"k": "k"}
    f = tmp_path / "f"
    f.write_text("1")
    sio._remove_tree(f)
    sio._remove_tree(tmp_path / "missing")
    assert _names(tmp_path) == ["keep"] and steps == []
    empty = tmp_path / "empty"
    empty.mkdir()
    sio._remove_tree(empty, "s")
    assert not empty.exists() and steps == []  # nothing was removed inside it: no step


def test_remove_tree_tolerates_files_vanishing_under_it(tmp_path, monkeypatch):
    """Another save cleaning up the same leftovers at the same time must not make this one fail."""
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "vanishing").write_text("v")
    (d / "sub" / "other").write_text("o")
    (d / "top_vanishing").write_text("t")
    real_unlink, real_rmdir = os.unlink, os.rmdir

    def unlink(name, *a, **k):
        if "vanish" in os.fspath(name):
            real_unlink(name, *a, **k)
            raise FileNotFoundError(errno.ENOENT, "removed by someone else", os.fspath(name))
        return real_unlink(name, *a, **k)

    def rmdir(name, *a, **k):
        real_rmdir(name, *a, **k)
        if Path(name) == d:
            raise FileNotFoundError(errno.ENOENT, "removed by someone else", os.fspath(name))

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "rmdir", rmdir)
    sio._remove_tree(d)
    assert not d.exists()
    f = tmp_path / f".out.{DEAD_PID}-vanish.partial"  # a leftover file another save removes at the same time
    f.write_text("x")
    assert sio.recover_output_dir(tmp_path / "out") == [f]
    assert not f.exists()


def test_fsync_path_opens_folders_as_folders_and_always_closes(tmp_path, monkeypatch):
    f = tmp_path / "f"
    f.write_text("x")
    log = []
    real_open, real_fsync, real_close = os.open, os.fsync, os.close

    def op(path, flags, *a):
        fd = real_open(path, flags, *a)
        log.append(("open", Path(path), flags, fd))
        return fd

    def fs(fd):
        log.append(("fsync", fd))
        return real_fsync(fd)

    def cl(fd):
        log.append(("close", fd))
        return real_close(fd)

    monkeypatch.setattr(os, "open", op)
    monkeypatch.setattr(os, "fsync", fs)
    monkeypatch.setattr(os, "close", cl)
    sio._fsync_path(tmp_path, directory=True)
    (_, p, flags, fd), *rest = log
    assert p == tmp_path and flags & os.O_DIRECTORY and flags & os.O_ACCMODE == os.O_RDONLY
    assert rest == [("fsync", fd), ("close", fd)]
    log.clear()
    sio._fsync_path(f)
    (_, p, flags, fd), *rest = log
    assert p == f and flags == os.O_RDONLY and rest == [("fsync", fd), ("close", fd)]
    log.clear()
    sio._fsync_path(tmp_path / "missing")  # cannot open: nothing to sync, no error
    sio._fsync_path(f, directory=True)  # not a folder: O_DIRECTORY refuses it, no error
    assert log == []

    def refusing_fsync(fd):
        log.append(("fsync", fd))
        raise OSError(errno.EINVAL, "fsync not supported")

    monkeypatch.setattr(os, "fsync", refusing_fsync)
    sio._fsync_path(tmp_path, directory=True)  # some file systems refuse fsync on folders
    (_, _, _, fd), *rest = log
    assert rest == [("fsync", fd), ("close", fd)]


def test_fsync_tree_syncs_every_file_then_the_folder_but_no_link(tmp_path, monkeypatch):
    (tmp_path / "t" / "sub").mkdir(parents=True)
    (tmp_path / "t" / "a").write_text("a")
    (tmp_path / "t" / "sub" / "b").write_text("b")
    (tmp_path / "outside").write_text("o")
    (tmp_path / "t" / "link").symlink_to(tmp_path / "outside")
    calls = []
    monkeypatch.setattr(sio, "_fsync_path", lambda p, directory=False: calls.append((p, directory)))
    sio._fsync_tree(tmp_path / "t")
    t = tmp_path / "t"
    assert sorted(calls[:-1]) == [(t / "a", False), (t / "sub" / "b", False)]
    assert calls[-1] == (t, True)


# --- atomic_dir ---------------------------------------------------------------------------------------


def _output(path: Path, **files) -> Path:
    path.mkdir(parents=True)
    for k, v in (files or {"cfg.json": "old cfg", "sae_weights.safetensors": "old w"}).items():
        (path / k).write_text(v)
    return path


def test_atomic_dir_creates_a_new_output_through_a_hidden_partial_sibling(tmp_path, steps, monkeypatch):
    out = tmp_path / "a" / "b" / "out"
    seen = {}
    synced = []
    real_sync = sio._fsync_path
    monkeypatch.setattr(
        sio, "_fsync_path", lambda p, directory=False: (synced.append((p, directory)), real_sync(p, directory))
    )
    steps.at["tmp_created"] = lambda: seen.update(debris=sio.debris_of(out))
    with sio.atomic_dir(str(out)) as tmp:
        assert tmp.is_dir() and not out.exists()
        assert tmp.parent == out.parent
        assert re.fullmatch(rf"\.out\.{os.getpid()}-[0-9a-f]{{8}}\.partial", tmp.name), tmp.name
        (tmp / "cfg.json").write_text("new")
    assert seen["debris"] == [tmp]
    assert steps == ["recovered", "tmp_created", "written", "synced", "switched", "done"]
    assert _tree(out) == {"cfg.json": "new"} and _names(out.parent) == ["out"]
    assert synced[-1] == (out.parent, True)  # the rename into place is flushed: the parent, as a folder


def test_atomic_dir_tags_differ_between_saves(tmp_path):
    tags = []
    for _ in range(2):
        with sio.atomic_dir(tmp_path / "out") as tmp:
            tags.append(tmp.name)
    assert tags[0] != tags[1]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_atomic_dir_replaces_an_existing_output_whole(tmp_path, steps, monkeypatch, exchange):
    out = _output(tmp_path / "out", **{"cfg.json": "old cfg", "sparsity.safetensors": "old s", "runner_cfg.json": "r"})
    if not exchange:
        monkeypatch.setattr(sio, "exchange_paths", lambda a, b: False)
    elif not _kernel_can_exchange(tmp_path):
        pytest.skip("no RENAME_EXCHANGE here")
    states = {}

    def snapshot(name):
        return lambda: states.update(
            {
                name: (
                    _tree(out) if out.exists() else None,
                    {p.name.rsplit(".", 1)[-1]: _tree(p) for p in sio.debris_of(out)},
                )
            }
        )

    for name in ("synced", "moved_old_aside", "switched"):
        steps.at[name] = snapshot(name)
    synced = []
    real_sync = sio._fsync_path
    monkeypatch.setattr(
        sio, "_fsync_path", lambda p, directory=False: (synced.append((p, directory)), real_sync(p, directory))
    )
    with sio.atomic_dir(out) as tmp:
        (tmp / "cfg.json").write_text("new cfg")
        (tmp / "sae_weights.safetensors").write_text("new w")
    new = {"cfg.json": "new cfg", "sae_weights.safetensors": "new w"}
    old = {"cfg.json": "old cfg", "sparsity.safetensors": "old s", "runner_cfg.json": "r"}
    assert _tree(out) == new and _names(tmp_path) == ["out"]  # the old files are gone, no leftovers
    assert steps == list(sio.SAVE_STEPS if exchange else sio.FALLBACK_SAVE_STEPS)
    assert states["synced"] == (old, {"partial": new})
    if exchange:
        assert states["switched"] == (new, {"partial": old})  # the hidden name holds the old folder
    else:
        assert states["moved_old_aside"] == (None, {"partial": new, "old": old})
        assert states["switched"] == (new, {"old": old})
    assert (tmp_path, True) in synced  # the switch itself is flushed (the parent folder)
    assert (tmp, True) in synced or (out, True) in synced


def test_atomic_dir_removes_stale_debris_first(tmp_path, steps):
    out = _output(tmp_path / "out")
    stale = _debris(tmp_path, "out", "partial")
    seen = []
    steps.at["recovered"] = lambda: seen.append(stale.exists())
    with sio.atomic_dir(out) as tmp:
        (tmp / "cfg.json").write_text("n")
    assert seen == [False] and _names(tmp_path) == ["out"]


@pytest.mark.parametrize("exc_type", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_error_while_writing_keeps_the_old_output(tmp_path, steps, exc_type):
    out = _output(tmp_path / "out")
    before = _tree(out)
    with pytest.raises(exc_type, match="in the body"):
        with sio.atomic_dir(out) as tmp:
            (tmp / "cfg.json").write_text("half")
            raise exc_type("in the body")
    assert _tree(out) == before and _names(tmp_path) == ["out"]
    assert steps == ["recovered", "tmp_created"]


def test_atomic_dir_error_while_syncing_keeps_the_old_output(tmp_path, monkeypatch):
    out = _output(tmp_path / "out")
    before = _tree(out)

    def fail(p):
        raise OSError(errno.EIO, "disk failed")

    monkeypatch.setattr(sio, "_fsync_tree", fail)
    with pytest.raises(OSError, match="disk failed"):
        with sio.atomic_dir(out) as tmp:
            (tmp / "cfg.json").write_text("new")
    assert _tree(out) == before and _names(tmp_path) == ["out"]


def test_atomic_dir_fallback_puts_the_old_output_back_when_the_second_rename_fails(tmp_path, monkeypatch, steps):
    out = _output(tmp_path / "out")
    before = _tree(out)
    monkeypatch.setattr(sio, "exchange_paths", lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.endswith(".partial") and Path(dst) == out:
            raise OSError(errno.EIO, "simulated second rename failure")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated second rename"):
        with sio.atomic_dir(out) as tmp:
            (tmp / "cfg.json").write_text("new")
    assert _tree(out) == before and _names(tmp_path) == ["out"]
    assert steps[-1] == "moved_old_aside"


def test_atomic_dir_refuses_a_folder_with_foreign_files_before_writing(tmp_path, steps):
    out = _output(tmp_path / "out", **{"cfg.json": "c", "notes.txt": "mine"})
    ran = []
    with pytest.raises(SaeFolderError, match="holds notes.txt"):
        with sio.atomic_dir(out):
            ran.append(1)
    assert ran == [] and steps == [] and _names(tmp_path) == ["out"] and _tree(out)["notes.txt"] == "mine"


def test_atomic_dir_keeps_the_new_output_when_a_foreign_file_appeared_meanwhile(tmp_path, steps):
    out = _output(tmp_path / "out")
    with pytest.raises(SaeFolderError) as info:
        with sio.atomic_dir(out) as tmp:
            (tmp / "cfg.json").write_text("new")
            (out / "notes.txt").write_text("written meanwhile")
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.new-")]
    assert len(kept) == 1 and _tree(kept[0]) == {"cfg.json": "new"}
    assert re.fullmatch(rf"out\.new-{os.getpid()}-[0-9a-f]{{8}}", kept[0].name)
    msg = str(info.value)
    assert "holds notes.txt" in msg and msg.endswith(f" The new output was kept in {kept[0]}.")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert _tree(out)["notes.txt"] == "written meanwhile" and "switched" not in steps
    assert sorted(_names(tmp_path)) == sorted(["out", kept[0].name])


def test_atomic_dir_through_a_symlink_replaces_the_linked_folder(tmp_path):
    real = _output(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with sio.atomic_dir(link) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".real.")
        (tmp / "cfg.json").write_text("new")
    assert link.is_symlink() and _tree(real) == {"cfg.json": "new"}


# --- check_replaceable_output ------------------------------------------------------------------------


def test_check_replaceable_output_accepts_missing_and_output_folders(tmp_path):
    assert sf.check_replaceable_output(str(tmp_path / "new")) == tmp_path / "new"
    full = _output(tmp_path / "full", **{n: "x" for n in sf.OUTPUT_FILENAMES})
    assert sf.check_replaceable_output(full) == full
    assert sorted(sf.OUTPUT_FILENAMES) == [
        "cfg.json",
        "final_metrics.json",
        "runner_cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
    ]
    link = tmp_path / "link"
    link.symlink_to(full, target_is_directory=True)
    assert sf.check_replaceable_output(link) == full
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert sf.check_replaceable_output(dangling) == tmp_path / "nowhere"


def test_check_replaceable_output_refuses_a_file_a_checkpoint_and_foreign_files(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    assert (
        _error(sf.check_replaceable_output, f)
        == f"output path {f} exists and is a file, not a folder; choose another --output_path or remove it."
    )
    ck = _output(tmp_path / "ck", **{"cfg.json": "c", "trainer_state.pt": "t"})
    assert _error(sf.check_replaceable_output, ck) == (
        f"output path {ck} is a training checkpoint (it has trainer_state.pt); saving there would replace it. "
        "Choose another --output_path (checkpoints go to --checkpoint_path)."
    )
    five = _output(tmp_path / "five", **{n: "x" for n in ["e", "d", "c", "b", "a", "cfg.json"]})
    assert _error(sf.check_replaceable_output, five) == (
        f"output path {five} exists and holds a, b, c, d, e, which an SAE output folder does not; the save replaces "
        "the whole folder, so it would delete them. Choose a new or empty --output_path, or move those files away."
    )
    six = _output(tmp_path / "six", **{n: "x" for n in ["f", "e", "d", "c", "b", "a"]})
    with pytest.raises(SaeFolderError, match=r"holds a, b, c, d, e and 1 more, which"):
        sf.check_replaceable_output(six)
    seven = _output(tmp_path / "seven", **{n: "x" for n in ["g", "f", "e", "d", "c", "b", "a"]})
    with pytest.raises(SaeFolderError, match=r"holds a, b, c, d, e and 2 more, which"):
        sf.check_replaceable_output(seven)
    sub = _output(tmp_path / "sub", **{"cfg.json": "c"})
    (sub / "runs").mkdir()
    with pytest.raises(SaeFolderError, match=r"holds runs, which"):
        sf.check_replaceable_output(sub)
    assert issubclass(SaeFolderError, ValueError)


# --- read_safetensors_header / read_json_file ---------------------------------------------------------

FIX = "re-copy it from the training output, or train again"


def _st(path: Path, header: object, data_len: int, raw: bytes | None = None) -> Path:
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\x00" * data_len)
    return path


def test_read_safetensors_header_bounds(tmp_path):
    p = tmp_path / "w.safetensors"
    t = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    assert sf.read_safetensors_header(_st(p, {"t": t}, 8)) == {"t": t}
    assert sf.read_safetensors_header(_st(p, {}, 0)) == {}  # the header ends exactly at the file's end
    assert sf.read_safetensors_header(_st(p, {"e": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}}, 8))["e"][
        "data_offsets"
    ] == [8, 8]
    for bad in ([4, 12], [-1, 3], [6, 2], [0, 8, 9], "08", None):
        _st(p, {"t": {"dtype": "F32", "shape": [2], "data_offsets": bad}}, 8)
        assert (
            _error(sf.read_safetensors_header, p)
            == f"{p} is corrupted: tensor 't' lies outside the file (truncated?); {FIX}."
        ), bad
    for bad_info in (
        {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
        "F32",
        {"dtype": "F32", "data_offsets": [0, 8]},
    ):
        _st(p, {"t": bad_info}, 8)
        with pytest.raises(SaeFolderError, match="tensor 't' lies outside the file"):
            sf.read_safetensors_header(p)


def test_read_safetensors_header_messages(tmp_path):
    p = tmp_path / "w.safetensors"
    assert _error(sf.read_safetensors_header, p) == f"{p}: file not found; {FIX}."
    p.mkdir()
    with pytest.raises(SaeFolderError, match="file not found"):
        sf.read_safetensors_header(p)  # a folder is not a file
    p.rmdir()
    p.write_bytes(b"\x01" * 7)
    assert (
        _error(sf.read_safetensors_header, str(p))
        == f"{p} is corrupted: 7 bytes, too short for a safetensors file; {FIX}."
    )
    p.write_bytes(b"\x00" * 8)
    assert (
        _error(sf.read_safetensors_header, p)
        == f"{p} is corrupted: not a valid safetensors header (length 0, file size 8); {FIX}."
    )
    p.write_bytes(b"\xff" * 8 + b"{}" * 8)  # a length with the top bit set (an unsigned 64-bit field)
    assert (
        _error(sf.read_safetensors_header, p)
        == f"{p} is corrupted: not a valid safetensors header (length {2**64 - 1}, file size 24); {FIX}."
    )
    p.write_bytes(struct.pack("<Q", 3) + b"{}")
    assert (
        _error(sf.read_safetensors_header, p)
        == f"{p} is corrupted: not a valid safetensors header (length 3, file size 10); {FIX}."
    )
    _st(p, None, 0, raw=b'{"\xff": 1}')
    with pytest.raises(
        SaeFolderError, match=re.escape(f"{p} is corrupted: its safetensors header is not valid JSON (")
    ):
        sf.read_safetensors_header(p)
    _st(p, None, 0, raw=b"{oops}")
    assert re.fullmatch(
        re.escape(f"{p} is corrupted: its safetensors header is not valid JSON (")
        + r"Expecting .+\); "
        + re.escape(FIX + "."),
        _error(sf.read_safetensors_header, p),
    )
    _st(p, [1, 2], 0)
    assert (
        _error(sf.read_safetensors_header, p)
        == f"{p} is corrupted: its safetensors header is not a JSON object; {FIX}."
    )


def test_read_safetensors_header_refuses_headers_above_100_mib_only(tmp_path):
    """The header length is capped at 100 MiB (a corrupted length must not make it read gigabytes).
    Sparse files: no disk space is used."""
    cap = 100 * 1024 * 1024
    p = tmp_path / "big.safetensors"
    for n, expected in ((cap + 1, "not a valid safetensors header"), (cap, "header is not valid JSON")):
        with open(p, "wb") as f:
            f.write(struct.pack("<Q", n))
            f.truncate(8 + n + 16)
        with pytest.raises(SaeFolderError, match=expected):
            sf.read_safetensors_header(p)


def test_read_json_file_messages(tmp_path):
    p = tmp_path / "c.json"
    assert _error(sf.read_json_file, p, "SAE config", "do this") == f"{p}: SAE config not found; do this."
    p.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(SaeFolderError, match=re.escape(f"{p} is not valid JSON (") + r".*\); do this\.$"):
        sf.read_json_file(p, "SAE config", "do this")
    p.write_text("{", encoding="utf-8")
    with pytest.raises(SaeFolderError, match=re.escape(f"{p} is not valid JSON (") + r"Expecting .*\); do this\.$"):
        sf.read_json_file(p, "SAE config", "do this")
    p.write_text('{"x": "é"}', encoding="utf-8")
    assert sf.read_json_file(p, "w", "f") == {"x": "é"}


# --- check_sae_folder ---------------------------------------------------------------------------------

D_IN, D_SAE = 4, 8
WHAT = (
    "an SAE output folder is the --output_path of `sae-allocators train` (or of SAELens's runner) "
    "and holds cfg.json and sae_weights.safetensors"
)


def _jumprelu_tensors(d_in=D_IN, d_sae=D_SAE, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g),
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_enc": torch.randn(d_sae, generator=g),
        "b_dec": torch.randn(d_in, generator=g),
        "threshold": torch.rand(d_sae, generator=g),
    }


def _folder(root: Path, tensors=None, sparsity=None, **cfg_changes) -> Path:
    """A final output folder of a ``mutual_choice`` training run (saved as SAELens ``jumprelu``)."""
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architecture": "jumprelu",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "metadata": {"training_architecture": "mutual_choice"},
    }
    cfg.update(cfg_changes)
    (root / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors if tensors is not None else _jumprelu_tensors(), str(root / "sae_weights.safetensors"))
    if sparsity is not None:
        save_file(sparsity, str(root / "sparsity.safetensors"))
    return root


def test_check_sae_folder_describes_the_folder(tmp_path):
    import torch

    folder = _folder(tmp_path / "out", sparsity={"sparsity": torch.zeros(D_SAE)})
    info = sf.check_sae_folder(str(folder))
    assert isinstance(info, sf.SaeFolderInfo) and info.path == folder
    assert (info.architecture, info.training_architecture, info.has_sparsity) == ("jumprelu", "mutual_choice", True)
    assert info.tensors["W_enc"] == {"dtype": "F32", "shape": [D_IN, D_SAE]} and set(info.tensors) == set(
        _jumprelu_tensors()
    )
    assert info.cfg["d_sae"] == D_SAE and info.metadata == {"training_architecture": "mutual_choice"}
    plain = sf.check_sae_folder(_folder(tmp_path / "plain", metadata="not a dict"))
    assert plain.training_architecture is None and plain.has_sparsity is False
    assert sf.check_sae_folder(_folder(tmp_path / "nometa", metadata=None)).metadata == {}
    bare = _folder(tmp_path / "bare")
    cfg = json.loads((bare / "cfg.json").read_text())
    del cfg["metadata"]
    (bare / "cfg.json").write_text(json.dumps(cfg))
    assert sf.check_sae_folder(bare).training_architecture is None and sf.check_sae_folder(bare).metadata == {}
    assert (
        sf.check_sae_folder(
            _folder(tmp_path / "tt", metadata={"training_architecture": "top_afa"})
        ).training_architecture
        == "top_afa"
    )


def test_check_sae_folder_messages(tmp_path):
    out = tmp_path / "out"
    assert _error(sf.check_sae_folder, out) == f"{out}: no such folder; {WHAT}."
    out.write_text("x")
    assert _error(sf.check_sae_folder, out) == f"{out} is a file, not a folder; {WHAT}."
    out.unlink()
    out.mkdir()
    (out / "cfg.json").mkdir()  # a folder named cfg.json is no config
    assert _error(sf.check_sae_folder, out) == f"{out} is not an SAE output folder: cfg.json is missing; {WHAT}."
    (out / "cfg.json").rmdir()
    _folder(out)
    (out / "trainer_state.pt").write_bytes(b"")
    assert _error(sf.check_sae_folder, out) == (
        f"{out} is a training checkpoint (it has trainer_state.pt), whose cfg.json is the training "
        "config; pass the final output folder (--output_path) instead, which holds the inference config."
    )
    (out / "trainer_state.pt").unlink()
    cfg = out / "cfg.json"
    cfg.write_text("[1]")
    assert _error(sf.check_sae_folder, out) == f"{cfg} must hold a JSON object (an SAE config), not list."
    cfg.write_text("{")
    assert _error(sf.check_sae_folder, out).startswith(f"{cfg} is not valid JSON (")
    assert _error(sf.check_sae_folder, out).endswith(f"); {FIX}.")
    for key in ("architecture", "d_in", "d_sae"):
        c = {"architecture": "jumprelu", "d_in": 4, "d_sae": 8}
        del c[key]
        cfg.write_text(json.dumps(c))
        assert _error(sf.check_sae_folder, out) == f"{cfg} has no {key!r} entry, so it is not an SAE config; {WHAT}."
    cfg.write_text(json.dumps({"architecture": ["jumprelu"], "d_in": 4, "d_sae": 8}))
    assert _error(sf.check_sae_folder, out) == f"{cfg}: 'architecture' must be a string, got ['jumprelu']."
    cfg.write_text(json.dumps({"architecture": "nobody_has_this", "d_in": 4, "d_sae": 8}))
    msg = _error(sf.check_sae_folder, out)
    assert msg.startswith(f"{cfg} names architecture 'nobody_has_this', which nothing provides. ")
    assert "mutual_choice" in msg  # the registry's message lists what is registered
    assert sf.check_sae_folder(out, check_architecture=False).architecture == "nobody_has_this"
    (out / "sae_weights.safetensors").unlink()
    assert _error(sf.check_sae_folder, out, check_architecture=False) == (
        f"{out / 'sae_weights.safetensors'}: weights file not found next to cfg.json; copy the whole output "
        "folder (both files), or train again."
    )
    (out / "sae_weights.safetensors").write_bytes(b"\x00" * 3)
    assert "too short" in _error(sf.check_sae_folder, out, check_architecture=False)


def test_check_sae_folder_checks_the_sparsity_file_too(tmp_path):
    out = _folder(tmp_path / "out")
    (out / "sparsity.safetensors").write_bytes(b"\x00" * 3)
    assert (
        _error(sf.check_sae_folder, out)
        == f"{out / 'sparsity.safetensors'} is corrupted: 3 bytes, too short for a safetensors file; {FIX}."
    )


def test_check_sae_folder_registers_the_plugins_first(tmp_path, monkeypatch):
    """The architecture check loads the plugins (host.load) before it looks the name up."""
    from sae_allocators import host

    calls = []
    real = host.load
    monkeypatch.setattr(host, "load", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    sf.check_sae_folder(_folder(tmp_path / "out"))
    assert calls == [1]
    sf.check_sae_folder(_folder(tmp_path / "out2"), check_architecture=False)
    assert calls == [1]


# --- check_loadable ---------------------------------------------------------------------------------


def test_check_loadable_accepts_a_good_folder_and_reuses_the_info(tmp_path):
    import torch

    out = _folder(tmp_path / "out", sparsity={"sparsity": torch.zeros(D_SAE)})
    info = sf.check_loadable(out)
    assert info.architecture == "jumprelu" and info.has_sparsity
    assert sf.check_loadable(out, info) is info
    _folder(tmp_path / "s2", sparsity={"sparsity": torch.zeros(1, D_SAE)})
    sf.check_loadable(tmp_path / "s2")  # [1, d_sae] sparsity too
    bf = _folder(
        tmp_path / "bf16", tensors={k: v.to(torch.bfloat16) for k, v in _jumprelu_tensors().items()}, dtype="bfloat16"
    )
    assert sf.check_loadable(bf).tensors["W_enc"]["dtype"] == "BF16"


def test_check_loadable_tensor_messages(tmp_path):
    import torch

    w = lambda out: out / "sae_weights.safetensors"  # noqa: E731
    t = _jumprelu_tensors()
    out = _folder(tmp_path / "transposed", tensors={**t, "W_enc": t["W_enc"].T.contiguous()})
    assert _error(sf.check_loadable, out) == (
        f"{w(out)}: tensor 'W_enc' has shape [{D_SAE}, {D_IN}], but cfg.json (d_in={D_IN}, d_sae={D_SAE}) needs [{D_IN}, {D_SAE}]; "
        "SAELens would refuse to load it. The weights and cfg.json do not belong together (transposed, or from another SAE): "
        "re-copy both from the same training output."
    )
    out = _folder(tmp_path / "missing", tensors={k: v for k, v in t.items() if k not in ("b_dec", "threshold")})
    assert _error(sf.check_loadable, out) == (
        f"{w(out)} lacks tensor(s) 'b_dec', 'threshold' that a 'jumprelu' SAE needs; "
        "SAELens would refuse to load it. Re-copy the weights from the training output, or train again."
    )
    out = _folder(tmp_path / "extra", tensors={**t, "stray": torch.zeros(2), "also": torch.zeros(1)})
    assert _error(sf.check_loadable, out) == (
        f"{w(out)} holds tensor(s) 'also', 'stray' that a 'jumprelu' SAE does not have "
        "(it has W_dec, W_enc, b_dec, b_enc, threshold); SAELens would refuse to load it. The weights and cfg.json do "
        "not belong together: re-copy both from the same training output."
    )
    out = _folder(
        tmp_path / "ckpt", tensors={**t, "density_steps": torch.zeros(1), "feature_density": torch.zeros(D_SAE)}
    )
    assert _error(sf.check_loadable, out) == (
        f"{w(out)} holds training-only tensors (density_steps, feature_density): these are a training checkpoint's "
        "weights, which SAELens saves with the training model's buffers. Pass the final output folder "
        "(--output_path of `sae-allocators train`) instead, which holds the inference model."
    )
    # a cfg.json whose training_architecture is not a string (here a list): the same clean error, no TypeError
    out = _folder(
        tmp_path / "listarch",
        tensors={**t, "stray": torch.zeros(2)},
        metadata={"training_architecture": ["mutual_choice"]},
    )
    assert _error(sf.check_loadable, out).startswith(
        f"{w(out)} holds tensor(s) 'stray' that a 'jumprelu' SAE does not have"
    )
    out = _folder(tmp_path / "ints", tensors={**t, "b_enc": torch.zeros(D_SAE, dtype=torch.int64)})
    assert _error(sf.check_loadable, out) == (
        f"{w(out)}: tensor 'b_enc' has dtype I64, but SAE weights are floating point "
        "(F32, F16, BF16, ...); the file was not written by SAELens. Re-copy it from the training output, or train again."
    )
    bad = t["W_dec"].clone()
    bad[0, :3] = float("nan")
    bad[1, 0] = float("inf")
    bad[2, 1] = float("-inf")
    out = _folder(tmp_path / "nan", tensors={**t, "W_dec": bad})
    expected = (
        f"{w(out)}: tensor 'W_dec' holds 3 NaN and 2 inf values, so the SAE would output "
        "NaN. Training diverged or the file was damaged: train again (e.g. with a lower learning rate)."
    )
    assert _error(sf.check_loadable, out) == expected
    sf.check_loadable(out, check_values=False)  # the values are read only when asked
    only_inf = t["b_dec"].clone()
    only_inf[1] = float("inf")
    out = _folder(tmp_path / "inf", tensors={**t, "b_dec": only_inf})
    assert "tensor 'b_dec' holds 0 NaN and 1 inf values" in _error(sf.check_loadable, out)
    out = _folder(tmp_path / "sparsity", sparsity={"sparsity": torch.zeros(D_SAE + 1)})
    assert _error(sf.check_loadable, out) == (
        f"{out / 'sparsity.safetensors'}: tensor 'sparsity' has shape [{D_SAE + 1}], but d_sae={D_SAE}; "
        "re-copy it from the training output, or delete it (it is optional)."
    )
    out = _folder(tmp_path / "sparsity2", sparsity={"sparsity": torch.zeros(D_SAE, 1)})
    assert "has shape [8, 1], but d_sae=8" in _error(sf.check_loadable, out)


def test_check_loadable_config_messages(tmp_path):
    fix = "fix that entry in cfg.json (or re-copy it from the training output)"
    for i, (key, value) in enumerate([("d_in", 0), ("d_sae", -3)]):
        out = _folder(tmp_path / f"c{i}", **{key: value})
        info = sf.check_sae_folder(out)
        assert (
            _error(sf.check_loadable, out, info)
            == f"{out / 'cfg.json'}: {key}={value!r} is invalid: it must be a positive integer; {fix}."
        ), value
    for i, (key, value, kind) in enumerate(
        [("d_in", True, "bool"), ("d_sae", 8.0, "float")]
    ):  # the field-type check sees them first
        out = _folder(tmp_path / f"t{i}", **{key: value})
        msg = _error(sf.check_loadable, out)
        assert msg.startswith(f"{out / 'cfg.json'}: {key}={value!r} is invalid: it must be an integer, not {kind}"), msg
        assert msg.endswith(f"SAELens would fail on it while loading; {fix}."), msg
    out = _folder(tmp_path / "dt", dtype="float33")
    assert (
        _error(sf.check_loadable, out)
        == f"{out / 'cfg.json'}: dtype='float33' is not a torch dtype name (e.g. 'float32'); {fix}."
    )
    out = _folder(tmp_path / "type", d_sae="8")
    msg = _error(sf.check_loadable, out)
    assert msg.startswith(f"{out / 'cfg.json'}: d_sae='8' is invalid") and msg.endswith(
        f"SAELens would fail on it while loading; {fix}."
    )
    out = _folder(tmp_path / "nodtype")
    cfg = json.loads((out / "cfg.json").read_text())
    del cfg["dtype"]
    (out / "cfg.json").write_text(json.dumps(cfg))
    assert sf.check_loadable(out).architecture == "jumprelu"  # dtype defaults to float32


def test_check_loadable_accepts_the_smallest_sae_and_names_what_saelens_cannot_build(tmp_path):
    one = _folder(tmp_path / "one", tensors=_jumprelu_tensors(1, 1), d_in=1, d_sae=1)
    assert sf.check_loadable(one).cfg["d_in"] == 1  # 1 is a positive integer
    out = _folder(tmp_path / "bad", normalize_activations="bogus")
    msg = _error(sf.check_loadable, out)
    assert msg.startswith(f"{out / 'cfg.json'}: SAELens cannot build the 'jumprelu' SAE from it: ValueError: "), msg
    assert "normalize_activations" in msg and "bogus" in msg


def _set_header_shape(path: Path, name: str, shape: list[int]) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header[name]["shape"] = shape
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])


HUGE = [2**40, 2**20]  # 4 EiB as float32: a check that allocated it would fail


def test_check_loadable_compares_shapes_without_allocating_them(tmp_path):
    out = _folder(tmp_path / "huge")
    _set_header_shape(out / "sae_weights.safetensors", "W_enc", HUGE)
    assert (
        f"tensor 'W_enc' has shape {HUGE}, but cfg.json (d_in={D_IN}, d_sae={D_SAE}) needs [{D_IN}, {D_SAE}]"
        in _error(sf.check_loadable, out)
    )


def test_check_loadable_applies_the_loaders_conversion_and_falls_back_to_raw_names(tmp_path, monkeypatch):
    """The names compared are those SAELens's loader produces (``process_state_dict_for_loading``,
    e.g. a plugin SAE renaming an older tensor); a conversion that needs real values (meta tensors
    have none) falls back to the file's own names, even if it had changed the dict before failing."""
    import torch
    from sae_lens import SAE

    cls = SAE.get_sae_class_for_architecture("jumprelu")

    def convert(self, sd):
        if "log_threshold" in sd:
            sd["threshold"] = torch.exp(sd.pop("log_threshold"))

    monkeypatch.setattr(cls, "process_state_dict_for_loading", convert)
    t = _jumprelu_tensors()
    t["log_threshold"] = torch.log(t.pop("threshold"))
    old = _folder(tmp_path / "old_names", tensors=t)
    assert "log_threshold" in sf.check_loadable(old).tensors
    huge = _folder(tmp_path / "huge")
    _set_header_shape(huge / "sae_weights.safetensors", "b_enc", HUGE)
    assert f"tensor 'b_enc' has shape {HUGE}" in _error(sf.check_loadable, huge)

    def needs_values(self, sd):
        del sd["threshold"]
        float(sd["b_enc"].sum())  # raises on meta tensors

    monkeypatch.setattr(cls, "process_state_dict_for_loading", needs_values)
    good = _folder(tmp_path / "good")
    assert sf.check_loadable(good).architecture == "jumprelu"
    assert f"tensor 'b_enc' has shape {HUGE}" in _error(sf.check_loadable, huge)
    assert "holds tensor(s) 'log_threshold' that a 'jumprelu' SAE does not have" in _error(
        sf.check_loadable, old
    )  # not converted


def test_training_only_names_unite_both_architectures(monkeypatch):
    from sae_allocators import saelens_registry as reg

    class A:
        @staticmethod
        def _all_training_only_buffers():
            return ["a1", "a2"]

    class B:
        @staticmethod
        def _all_training_only_buffers():
            return ["b1"]

    class C:  # no training-only buffers
        pass

    table = {"arch_a": (A, None), "arch_b": (B, None), "arch_c": (C, None)}
    asked = []
    monkeypatch.setattr(reg, "get", lambda side, name: (asked.append((side, name)), table.get(name))[1])
    info = lambda t, a: sf.SaeFolderInfo(path=Path("."), cfg={}, architecture=a, training_architecture=t)  # noqa: E731
    assert sf._training_only_names(info("arch_a", "arch_b")) == {"a1", "a2", "b1"}
    assert sf._training_only_names(info("arch_b", "arch_a")) == {"a1", "a2", "b1"}
    assert sf._training_only_names(info(None, "arch_a")) == {"a1", "a2"}
    assert sf._training_only_names(info("arch_c", "nothing")) == set()
    assert asked and all(side == reg.TRAINING for side, _ in asked)
    asked.clear()
    assert sf._training_only_names(info(3, "arch_b")) == {"b1"}
    assert asked == [(reg.TRAINING, "arch_b")]  # a non-string name is never looked up
    asked.clear()
    assert sf._training_only_names(info(["arch_a"], "arch_b")) == {"b1"}  # not hashable: no TypeError
    assert asked == [(reg.TRAINING, "arch_b")]


def test_check_sae_folder_when_cfg_json_vanishes_while_it_is_read(tmp_path, monkeypatch):
    """cfg.json removed between the existence check and the read (a concurrent save or copy)."""
    out = _folder(tmp_path / "out")
    real = Path.read_text

    def read_text(self, *a, **k):
        if self.name == "cfg.json":
            raise FileNotFoundError(errno.ENOENT, "gone", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert _error(sf.check_sae_folder, out) == f"{out / 'cfg.json'}: SAE config not found; {FIX}."


def test_json_is_read_as_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """A machine whose locale encoding is not UTF-8 (simulated: the default text encoding is latin-1)."""
    import io

    real = io.text_encoding
    monkeypatch.setattr(io, "text_encoding", lambda encoding, stacklevel=2: real(encoding) if encoding else "latin-1")
    p = tmp_path / "c.json"
    p.write_bytes('{"x": "é"}'.encode("utf-8"))
    assert sf.read_json_file(p, "w", "f") == {"x": "é"}


def test_fsync_path_without_o_directory(tmp_path, monkeypatch):
    """Where ``os`` has no O_DIRECTORY (not POSIX), a folder is opened read-only like a file."""
    flags_seen = []
    real_open = os.open
    monkeypatch.delattr(os, "O_DIRECTORY", raising=False)
    monkeypatch.setattr(os, "open", lambda path, flags, *a: (flags_seen.append(flags), real_open(path, flags, *a))[1])
    sio._fsync_path(tmp_path, directory=True)
    assert flags_seen == [os.O_RDONLY]


def test_renameat2_uses_libcs_function_on_any_machine(monkeypatch):
    """The raw syscall number is only the fallback for an old libc; libc's renameat2 works everywhere."""
    import platform

    if not sys.platform.startswith("linux") or getattr(ctypes.CDLL(None), "renameat2", None) is None:
        pytest.skip("needs a libc with renameat2")
    monkeypatch.setattr(platform, "machine", lambda: "riscv64")
    fn = sio._renameat2()
    assert fn is not None and fn.__name__ == "renameat2"
