"""Resumable and visible (issue 24): the settings' fingerprint, one record per finished run, the invocations
that made them (with their commits), and the progress line logged after every run."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from sae_allocators.benchmark.settings import Settings, settings_dict
from sae_allocators.benchmark.sources import _log


class ResumeError(ValueError):
    """The report folder holds runs of other settings (resuming would mix them)."""


#: in the report folder: the settings' fingerprint (settings.json) and one record per finished run (runs/)
SETTINGS_FILE = "settings.json"
RUNS_DIR = "runs"
#: settings that do not change what a run computes (left out of the fingerprint)
NOT_FINGERPRINTED = ("out", "keep_saes")


def fingerprinted_settings(st: Settings) -> dict[str, Any]:
    """The settings that decide what every run computes, as JSON values (``fingerprint``'s input)."""
    d = {k: v for k, v in settings_dict(st).items() if k not in NOT_FINGERPRINTED}
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def fingerprint(st: Settings) -> str:
    """A short hash of ``fingerprinted_settings``: records of one fingerprint may be mixed in a report."""
    blob = json.dumps(fingerprinted_settings(st), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_tag(dataset: str, label: str, k: float, seed: int) -> str:
    """A run's name in the records and the log: ``lm/mutual_choice/k32/seed0``."""
    return f"{dataset}/{label}/k{k:g}/seed{seed}"


def job_tag(job: tuple[Any, ...]) -> str:
    src, _, seed, k, p, _ = job
    return run_tag(src.kind, p.label, k, seed)


def record_path(out: Path, tag: str) -> Path:
    safe = tag.replace("/", "__").replace("[", "_").replace("]", "").replace("=", "-")
    return Path(out) / RUNS_DIR / f"{safe}.json"


def open_resume(out: Path, st: Settings) -> tuple[str, dict[str, dict[str, Any]]]:
    """The settings' fingerprint and the finished runs already in ``out`` (tag -> saved record).

    The first run into ``out`` writes ``settings.json``; a later one with other settings is refused
    (``ResumeError`` names the settings that differ) instead of mixing records; so is a record of
    another fingerprint. An unreadable record (a crash can leave none: records are written atomically)
    is ignored and its run trained again."""
    from sae_allocators import io

    out = Path(out)
    fp, now = fingerprint(st), fingerprinted_settings(st)
    sf = out / SETTINGS_FILE
    if sf.exists():
        old = json.loads(sf.read_text())
        if old.get("fingerprint") != fp:
            changed = _changed_keys(old.get("settings") or {}, now)
            raise ResumeError(
                f"{out} holds runs of other settings (fingerprint {old.get('fingerprint')}, now {fp}; "
                f"changed: {', '.join(changed) or 'unknown'}): resuming would mix them. Use another --out, "
                f"or the command that made it (its settings are in {sf})"
            )
    else:
        io.atomic_write_json(sf, {"fingerprint": fp, "settings": now, "invocations": []})
    done: dict[str, dict[str, Any]] = {}
    for f in sorted((out / RUNS_DIR).glob("*.json")) if (out / RUNS_DIR).is_dir() else []:
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            _log(f"[resume] ignoring unreadable record {f} ({exc}): its run trains again")
            continue
        if doc.get("fingerprint") != fp:
            raise ResumeError(f"{f} is a record of other settings (fingerprint {doc.get('fingerprint')}, now {fp})")
        done[doc["tag"]] = doc
    return fp, done


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted names of the settings that differ between two fingerprinted settings dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _changed_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def note_invocation(
    out: Path, started: str, wall: float, trained: int, reused: int, finished: bool = True, key: str = ""
) -> list[dict[str, Any]]:
    """Record this command's wall time so far in settings.json (one entry per invocation, keyed by its
    ``key`` (or its start time), rewritten after every finished run: an invocation that is killed -- a long run across
    sessions -- still counts up to its last finished run); return every invocation so far."""
    from sae_allocators import io

    sf = Path(out) / SETTINGS_FILE
    doc = json.loads(sf.read_text())
    entry = {
        "invocation": key or started,
        "started_utc": started,
        "wall_seconds": wall,
        "runs_trained": trained,
        "runs_from_records": reused,
        "finished": finished,
        "commit": checkout_commit(),
    }
    invocations = [
        v for v in doc.get("invocations", []) if v.get("invocation", v.get("started_utc")) != (key or started)
    ]
    doc["invocations"] = invocations + [entry]
    io.atomic_write_json(sf, doc)
    return doc["invocations"]


@functools.cache
def checkout_commit() -> str | None:
    """The git commit of the directory the command runs in (``benchmarks/run.sh`` runs from the checkout), with
    ``+dirty`` when tracked files differ from it; None outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


class Progress:
    """Runs done / total, time per run and the time left, logged after every run."""

    def __init__(self, tags: list[str], labels: list[str], done: set[str]):
        self.labels = dict(zip(tags, labels))
        self.total = len(tags)
        self.done = set(t for t in tags if t in done)
        self.reused = len(self.done)
        self.seconds: dict[str, list[float]] = {}

    def eta_seconds(self) -> float | None:
        """Remaining runs at the mean time in this command of their key (dataset/label; the mean of all runs where a
        label has not run yet); None before the first run."""
        every = [s for v in self.seconds.values() for s in v]
        if not every:
            return None
        mean_all = sum(every) / len(every)
        left = [lab for t, lab in self.labels.items() if t not in self.done]
        return sum(sum(self.seconds[lab]) / len(self.seconds[lab]) if lab in self.seconds else mean_all for lab in left)

    def finished(self, tag: str, seconds: float, once: float = 0.0) -> str:
        """Log line for a finished run that took ``seconds``, of which ``once`` went to one-time work
        (the activation cache, built during the first run that reads it): left out of the run's time,
        so the estimate of the time left is not inflated by it."""
        self.done.add(tag)
        run_seconds = max(seconds - once, 0.0)
        self.seconds.setdefault(self.labels[tag], []).append(run_seconds)
        trained = sum(len(v) for v in self.seconds.values())
        mean = sum(s for v in self.seconds.values() for s in v) / trained
        eta = self.eta_seconds() or 0.0
        left = self.total - len(self.done)
        return (
            f"[progress] {len(self.done)}/{self.total} runs done"
            + (f" ({self.reused} from earlier records)" if self.reused else "")
            + f"; this run {run_seconds:.0f} s"
            + (f" (+{once:.0f} s of one-time work: the activation cache)" if once >= 1 else "")
            + f", mean {mean:.0f} s per run trained now; "
            + (f"about {duration(eta)} left for {left} run(s)" if left else "all runs done")
            + memory_note()
        )


def memory_note() -> str:
    """This process's resident memory, split into anonymous (its own tensors and objects) and file-backed
    (memory-mapped files such as the activation cache, which the OS can drop), from /proc on Linux; ""
    elsewhere. A long run logs it after every run, so a leak shows as RssAnon growing run after run."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("Rss")
        )
        gib = {k: int(v.split()[0]) / 2**20 for k, v in fields.items()}  # kB -> GiB
        return f"; memory {gib['RssAnon']:.1f} GiB anonymous + {gib['RssFile']:.1f} GiB file-backed"
    except (OSError, KeyError, ValueError, IndexError):
        return ""


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
