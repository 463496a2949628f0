"""Mutation testing of the core modules with mutmut (not in CI: slow). Usage: ``bash tests/mutation.sh [TARGET...]``.

For each target this builds a scratch copy of the checkout in ``.cache/mutation/<target>/`` (git-
ignored) with a ``[tool.mutmut]`` section that mutates only the target's files and runs only the
target's fast test modules, runs ``mutmut run`` there with one worker, and prints the mutation
score per module: killed / (all mutants - the equivalent ones listed in docs/testing.md).

mutmut puts its mutated copy of the package first on ``sys.path``, so the tests (which normally
import the *installed* package) import the mutated source. The run is pinned to one process and
one thread (``--max-children 1``, ``OMP_NUM_THREADS=1``): the machine is shared.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRATCH = REPO / ".cache" / "mutation"
DOC = REPO / "docs" / "testing.md"

#: target -> (files to mutate (globs relative to the checkout), test modules that cover them (fast
#: ones), a pytest -k expression leaving out their slow tests (runner training, fresh interpreters))
TARGETS: dict[str, tuple[list[str], list[str], str | None]] = {
    "allocation": (["sae_allocators/allocation/*.py"], ["tests/test_allocation_properties.py", "tests/test_promises.py"], None),
    "losses": (["sae_allocators/losses/*.py"], ["tests/test_losses.py", "tests/test_promises.py"], "not train_with_zipf and not third_party"),
    "autoload": (["sae_allocators_autoload.py"], ["tests/test_promises.py"], None),
    "io": (["sae_allocators/io.py", "sae_allocators/sae_folder.py"], ["tests/test_promises.py"], None),
    "thresholds": (["sae_allocators/thresholds.py", "sae_allocators/calibration.py"], ["tests/test_promises.py", "tests/test_mutual_feature_choice.py"], "not fresh_interpreter and not runner"),
}

#: property tests run fewer examples per mutant (the CI run uses the full count)
PROPERTY_EXAMPLES = "40"


def equivalent_mutants() -> dict[str, str]:
    """``mutant name -> reason`` from the "Equivalent mutants" table of docs/testing.md."""
    out: dict[str, str] = {}
    if not DOC.is_file():
        return out
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\|\s*`([\w.]+__mutmut_\d+)`\s*\|\s*(.+?)\s*\|\s*$", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


def pytest_ini() -> str:
    """The checkout's [tool.pytest.ini_options] (markers, warnings), copied verbatim."""
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r"^\[tool\.pytest\.ini_options\].*?(?=^\[|\Z)", text, flags=re.S | re.M)
    return m.group(0) if m else ""


def prepare(target: str, k_expr: str | None = None) -> Path | None:
    """A fresh scratch copy for ``target`` (its previous results are discarded)."""
    globs, tests, default_k = TARGETS[target]
    k_expr = " and ".join(f"({e})" for e in (default_k, k_expr) if e) or None
    work = SCRATCH / target
    if not any(True for g in globs for _ in REPO.glob(g)):
        return None
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    shutil.copytree(REPO / "sae_allocators", work / "sae_allocators", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "sae_allocators_autoload.py", work / "sae_allocators_autoload.py")
    shutil.copytree(REPO / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__", "fixtures", "offline"))
    shutil.copytree(REPO / "tests" / "fixtures", work / "tests" / "fixtures")
    existing = [g for g in globs if list(work.glob(g))]
    toml_list = lambda xs: "[" + ", ".join(f'"{x}"' for x in xs) + "]"  # noqa: E731
    (work / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        f"source_paths = {toml_list(['sae_allocators', 'sae_allocators_autoload.py'])}\n"
        f"only_mutate = {toml_list(existing)}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
        f"pytest_add_cli_args = {toml_list(['-p', 'no:xdist', '-p', 'no:cacheprovider'] + (['-k', k_expr] if k_expr else []))}\n"
        'process_isolation = "forkserver"\n'
        "use_git_change_detection = false\n"
        "timeout_multiplier = 5.0\n"
        "timeout_constant = 20.0\n\n" + pytest_ini()
    )
    return work


def results(work: Path, python: str) -> dict[str, str]:
    proc = subprocess.run([python, "-m", "mutmut", "results", "--all", "true"], cwd=work, capture_output=True, text=True, check=False)
    out = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^\s+([\w.]+__mutmut_\d+): (.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def report(target: str, status: dict[str, str], equivalent: dict[str, str]) -> bool:
    by_module: dict[str, dict[str, list[str]]] = {}
    for name, st in sorted(status.items()):
        mod = re.sub(r"\.x[ǁ_].*$", "", name)
        by_module.setdefault(mod, {}).setdefault(st, []).append(name)
    ok = True
    print(f"\n== mutation score, target {target}")
    for mod, groups in sorted(by_module.items()):
        total = sum(len(v) for v in groups.values())
        eq = [n for v in groups.values() for n in v if n in equivalent]
        killed = len([n for n in groups.get("killed", []) if n not in equivalent])
        denom = total - len(eq)
        score = 100.0 * killed / denom if denom else 100.0
        others = ", ".join(f"{k} {len(v)}" for k, v in sorted(groups.items()) if k != "killed")
        checked = denom - len([n for n in groups.get("not checked", []) if n not in equivalent])
        of_checked = f"; of the {checked} checked: {100.0 * killed / checked:.1f}%" if checked and checked < denom else ""
        print(f"  {mod}: {killed}/{denom} non-equivalent mutants killed = {score:.1f}%{of_checked}  (all {total}; equivalent {len(eq)}; {others or 'no survivors'})")
        for st, names in sorted(groups.items()):
            if st in ("killed", "not checked"):
                ok = ok and st == "killed"
                continue
            for n in names:
                if n not in equivalent:
                    print(f"      {st}: {n}")
                    ok = False
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*", default=["allocation"], help=f"any of {sorted(TARGETS)} or 'all' (default: allocation)")
    p.add_argument("--python", default=sys.executable, help="interpreter with the test extra and mutmut installed")
    p.add_argument("-k", dest="k_expr", default=None, help="pytest -k expression restricting the tests (e.g. to leave out a known failure)")
    p.add_argument("--mutants", nargs="+", default=None, metavar="GLOB", help="only these mutant names (fnmatch globs, e.g. 'sae_allocators.allocation.batch.*')")
    p.add_argument("--resume", action="store_true", help="continue the last run of each target (mutmut skips the mutants it already checked)")
    p.add_argument("--max-seconds", type=int, default=None, help="stop each target's run after this long (resume later with --resume)")
    p.add_argument("--report-only", action="store_true", help="print the scores of the last run, do not run")
    args = p.parse_args(argv)
    targets = sorted(TARGETS) if args.targets == ["all"] else args.targets
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}: use any of {sorted(TARGETS)} or 'all'")
    equivalent = equivalent_mutants()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "SAE_ALLOCATORS_PROPERTY_EXAMPLES": PROPERTY_EXAMPLES}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    all_ok = True
    for target in targets:
        work = SCRATCH / target
        if not args.report_only:
            if not (args.resume and (work / "mutants").is_dir()):
                prepared = prepare(target, args.k_expr)
                if prepared is None:
                    print(f"== target {target}: none of {TARGETS[target][0]} is in this checkout; skipped", flush=True)
                    continue
                work = prepared
            t0 = time.monotonic()
            print(f"== mutmut run: target {target} in {work}", flush=True)
            # its own process group: on timeout the forkserver and its workers end with it
            proc = subprocess.Popen([args.python, "-m", "mutmut", "run", "--max-children", "1", *(args.mutants or [])], cwd=work, env=env, start_new_session=True)
            try:
                rc = proc.wait(timeout=args.max_seconds)
                print(f"\n== target {target}: mutmut exited {rc} after {time.monotonic() - t0:.0f} s", flush=True)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                print(f"\n== target {target}: stopped after {args.max_seconds} s; continue with --resume", flush=True)
        all_ok &= report(target, results(work, args.python), equivalent)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
