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
    "allocation": (
        ["sae_allocators/allocation/*.py"],
        ["tests/allocation/test_allocation_properties.py", "tests/test_promises.py"],
        None,
    ),
    "losses": (
        ["sae_allocators/losses/*.py"],
        ["tests/losses/test_losses.py", "tests/losses/test_loss_units.py", "tests/test_promises.py"],
        "not train_with_zipf and not third_party",
    ),
    "autoload": (["sae_allocators_autoload.py"], ["tests/test_promises.py"], None),
    "io": (
        ["sae_allocators/io.py", "sae_allocators/sae_folder.py"],
        ["tests/test_io.py", "tests/test_promises.py"],
        None,
    ),
    # test_calibration.py's unit tests (its runner fixture and torch.compile test are slow): without
    # them 776 of the 927 mutants had no test at all
    "thresholds": (
        ["sae_allocators/thresholds.py", "sae_allocators/calibration/*.py"],
        [
            "tests/test_thresholds.py",
            "tests/test_calibration.py",
            "tests/test_promises.py",
            "tests/architectures/test_mutual_feature_choice.py",
        ],
        "not fresh_interpreter and not runner and not torch_compile and not calibrated and not calibrate_command",
    ),
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


def write_config(work: Path, target: str, k_expr: str | None) -> None:
    """The scratch copy's pyproject.toml: mutmut's settings (files, the target's tests) and the
    checkout's pytest settings. Written again on ``--resume``, so tests added to TARGETS since the
    first run take part."""
    globs, tests, _ = TARGETS[target]
    existing = [g for g in globs if list(work.glob(g))]
    toml_list = lambda xs: "[" + ", ".join(f'"{x}"' for x in xs) + "]"  # noqa: E731
    # -p no:unraisableexception: that plugin runs gc.collect() five times when each pytest session
    # ends, ~1.8 s per mutant with torch and SAELens in memory (4x the tests themselves); it only
    # reports exceptions raised in __del__, never a test's failure
    (work / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        f"source_paths = {toml_list(['sae_allocators', 'sae_allocators_autoload.py'])}\n"
        f"only_mutate = {toml_list(existing)}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
        "pytest_add_cli_args = "
        f"{toml_list(['-p', 'no:xdist', '-p', 'no:cacheprovider', '-p', 'no:unraisableexception'] + (['-k', k_expr] if k_expr else []))}\n"
        # fork from mutmut's main process, which has run the tests once (torch and Hypothesis warm):
        # ~0.8 s per mutant instead of ~3 s from a fork server that only imported them (torch is
        # fork-safe here: one thread, CPU)
        'process_isolation = "fork"\n'
        "use_git_change_detection = false\n"
        # wall limit per mutant = (the covering tests' measured time + 6 s) * 3: a mutant that loops
        # forever costs ~20 s, not minutes (the old 20 s * 5 spent 2 min on each)
        "timeout_multiplier = 3.0\n"
        "timeout_constant = 6.0\n\n" + pytest_ini()
    )


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
    shutil.copytree(REPO / "tests", work / "tests", ignore=shutil.ignore_patterns("__pycache__", "offline"))
    write_config(work, target, k_expr)
    return work


def results(work: Path, python: str) -> dict[str, str]:
    proc = subprocess.run(
        [python, "-m", "mutmut", "results", "--all", "true"], cwd=work, capture_output=True, text=True, check=False
    )
    out = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^\s+([\w.]+__mutmut_\d+): (.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


#: statuses that count as detected: a test failed, or the tests never finished (a test that hangs
#: fails CI too); rerun timeouts once (``--resume --rerun timeout``): a pause of the shared machine
#: can fake one
DETECTED = ("killed", "timeout")


def report(target: str, status: dict[str, str], equivalent: dict[str, str]) -> bool:
    by_module: dict[str, dict[str, list[str]]] = {}
    for name, st in sorted(status.items()):
        mod = re.sub(r"\.x[ǁ_].*$", "", name)
        by_module.setdefault(mod, {}).setdefault(st, []).append(name)
    ok = True
    all_killed = all_denom = 0
    print(f"\n== mutation score, target {target}")
    for mod, groups in sorted(by_module.items()):
        total = sum(len(v) for v in groups.values())
        eq = [n for v in groups.values() for n in v if n in equivalent]
        killed = len([n for st in DETECTED for n in groups.get(st, []) if n not in equivalent])
        timeouts = len([n for n in groups.get("timeout", []) if n not in equivalent])
        denom = total - len(eq)
        all_killed, all_denom = all_killed + killed, all_denom + denom
        score = 100.0 * killed / denom if denom else 100.0
        others = ", ".join(f"{k} {len(v)}" for k, v in sorted(groups.items()) if k not in DETECTED)
        checked = denom - len([n for n in groups.get("not checked", []) if n not in equivalent])
        of_checked = (
            f"; of the {checked} checked: {100.0 * killed / checked:.1f}%" if checked and checked < denom else ""
        )
        by_timeout = f" ({timeouts} by timeout)" if timeouts else ""
        print(
            f"  {mod}: {killed}/{denom} non-equivalent mutants killed{by_timeout} = {score:.1f}%{of_checked}  "
            f"(all {total}; equivalent {len(eq)}; {others or 'no survivors'})"
        )
        for st, names in sorted(groups.items()):
            if st in DETECTED:
                continue
            for n in names:
                if n not in equivalent:
                    if st != "not checked":
                        print(f"      {st}: {n}")
                    ok = False
    if all_denom:
        print(f"  target {target}: {all_killed}/{all_denom} = {100.0 * all_killed / all_denom:.1f}%")
    return ok


def refresh_tests(work: Path) -> None:
    """Copy the checkout's test modules into a resumed scratch copy (tests added since the run
    started take part; mutmut collects the new ones' coverage itself)."""
    for src in (REPO / "tests").rglob("*.py"):
        rel = src.relative_to(REPO / "tests")
        if rel.parts[0] in ("offline", "__pycache__") or "__pycache__" in rel.parts:
            continue
        (work / "tests" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, work / "tests" / rel)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*", default=[], help=f"any of {sorted(TARGETS)} or 'all' (default: allocation)")
    p.add_argument("--python", default=sys.executable, help="interpreter with the test extra and mutmut installed")
    p.add_argument(
        "-k",
        dest="k_expr",
        default=None,
        help="pytest -k expression restricting the tests (e.g. to leave out a known failure)",
    )
    p.add_argument(
        "--mutants",
        nargs="+",
        default=None,
        metavar="GLOB",
        help="only these mutant names (fnmatch globs, e.g. 'sae_allocators.allocation.batch.*')",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the last run of each target (mutmut skips the mutants it already checked)",
    )
    p.add_argument(
        "--max-seconds",
        type=int,
        default=None,
        help="stop each target's run after this long (resume later with --resume)",
    )
    p.add_argument(
        "--rerun",
        nargs="+",
        default=None,
        metavar="STATUS",
        help="with --resume: run again the mutants whose last result is one of these "
        "('timeout', 'survived', 'no tests', ...), e.g. after adding tests",
    )
    p.add_argument("--report-only", action="store_true", help="print the scores of the last run, do not run")
    args = p.parse_args(argv)
    # `--rerun survived io` / `--mutants GLOB io`: those options take several values, so a target
    # written after them lands in their list; a target name is never a status or a mutant glob
    for opt in ("rerun", "mutants"):
        values = getattr(args, opt)
        if values:
            args.targets += [v for v in values if v in TARGETS or v == "all"]
            setattr(args, opt, [v for v in values if not (v in TARGETS or v == "all")] or None)
            if not getattr(args, opt):
                p.error(f"--{opt} needs at least one value besides the target names")
    args.targets = args.targets or ["allocation"]
    targets = sorted(TARGETS) if args.targets == ["all"] else args.targets
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {unknown}: use any of {sorted(TARGETS)} or 'all'")
    equivalent = equivalent_mutants()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "SAE_ALLOCATORS_PROPERTY_EXAMPLES": PROPERTY_EXAMPLES,
    }
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
            else:
                refresh_tests(work)
                default_k = TARGETS[target][2]
                write_config(work, target, " and ".join(f"({e})" for e in (default_k, args.k_expr) if e) or None)
            names = list(args.mutants or [])
            if args.rerun:
                names += [n for n, st in results(work, args.python).items() if st in args.rerun]
            if args.rerun and not names:
                print(f"== target {target}: no mutant is {args.rerun}; nothing to rerun", flush=True)
                all_ok &= report(target, results(work, args.python), equivalent)
                continue
            t0 = time.monotonic()
            print(f"== mutmut run: target {target} in {work}", flush=True)
            # its own process group: on timeout the forkserver and its workers end with it
            proc = subprocess.Popen(
                [args.python, "-m", "mutmut", "run", "--max-children", "1", *names],
                cwd=work,
                env=env,
                start_new_session=True,
            )
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
