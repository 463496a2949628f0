"""Orchestration: plan, train every architecture at every k and seed, evaluate, write the report.

What runs is in ``settings`` (the presets), resuming and the progress line in ``resume``, the large
preset's time estimate in ``estimate``; the phases here: plan, jobs, train and evaluate each, report."""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from sae_allocators.benchmark import configs
from sae_allocators.benchmark.estimate import estimate_seconds
from sae_allocators.benchmark.evaluation import evaluate_saved
from sae_allocators.benchmark.resume import (
    RUNS_DIR,
    Progress,
    checkout_commit,
    duration,
    job_tag,
    note_invocation,
    open_resume,
    record_path,
    run_tag,
)
from sae_allocators.benchmark.settings import Settings, settings_dict, untrained_same_runs
from sae_allocators.benchmark.sources import _log


def _build_sources(st: Settings, workdir: Path) -> list[Any]:
    from sae_allocators.benchmark.lm_source import LMSource
    from sae_allocators.benchmark.synthetic_source import SyntheticSource

    sources = []
    for name in st.datasets:
        if name == "synthetic":
            sources.append((SyntheticSource(st.synthetic, device=st.device), st.synthetic_ks, st.seeds))
        elif name == "lm":
            t0 = time.perf_counter()
            data = st.lm_data()
            _log(f"[lm] model and corpus ready in {time.perf_counter() - t0:.1f} s")
            src = LMSource(data, st.lm, workdir, device=st.device)
            src.prep_seconds = time.perf_counter() - t0
            sources.append((src, st.lm_ks, st.lm_seeds or st.seeds))
            src.spread_seeds = st.lm_spread_seeds
            if st.live_lm_data is not None and st.live_lm is not None:
                live = LMSource(
                    st.live_lm_data(), st.live_lm, workdir, device=st.device, kind="lm-live", live_only=True
                )
                sources.append((live, st.lm_ks, st.lm_live_seeds or st.lm_seeds or st.seeds))
                live.spread_seeds = 0
        else:
            raise ValueError(f"--datasets: unknown dataset {name!r}; use synthetic and/or lm")
    return sources


def _with_betas(plans: list[configs.Plan], betas: tuple[float, ...]) -> list[configs.Plan]:
    """gradient_topk once per beta when several are asked for (labels gradient_topk[beta=B])."""
    if len(betas) <= 1:
        return plans
    out = []
    for p in plans:
        if p.name == "gradient_topk" and p.skip_reason is None:
            out.extend(
                configs.Plan(p.name, f"{p.name}[beta={b:g}]", p.provider, p.entry, {**p.extra, "beta": float(b)})
                for b in betas
            )
        else:
            out.append(p)
    return out


def _live_controls(todo: list[configs.Plan], all_plans: list[configs.Plan]) -> dict[str, configs.Plan]:
    """For each live-store architecture, its control trained from the plain live store (``topk[live]``)."""
    controls: dict[str, configs.Plan] = {}
    for p in todo:
        name = p.entry.lm_live_control if p.entry is not None and not p.entry.lm_from_cache else None
        if not name or name in controls:
            continue
        base = next((q for q in all_plans if q.name == name and q.label == name), None)
        if base is None or base.entry is None:
            from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

            if name not in SAE_TRAINING_CLASS_REGISTRY or name not in configs.KNOWN:
                continue
            base = configs.Plan(name, name, "sae-lens", configs.KNOWN[name])
        controls[name] = configs.Plan(base.name, f"{name}[live]", base.provider, base.entry, dict(base.extra))
    return controls


def _one_time_seconds(sources: list[Any]) -> float:
    """Seconds the sources have spent on one-time work so far (building their activation caches)."""
    return float(sum(getattr(src, "cache_seconds", None) or 0.0 for src, _, _ in sources))


def run(st: Settings) -> Path:
    from sae_allocators import devices
    from sae_allocators.benchmark import report

    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    key = f"{started}/{os.getpid()}/{time.perf_counter_ns()}"  # this invocation's entry in settings.json
    checkout_commit()  # read now (cached): the code that runs is the checkout as it is at the start
    device = devices.resolve(st.device)
    st.device = str(device)
    if devices.is_cuda(device) and st.tf32:
        torch.set_float32_matmul_precision("high")
    env_start = _environment(device)
    out = Path(st.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "saes"
    _log(f"[device] {env_start['device']}" + (" (TF32 matrix multiplies)" if env_start.get("tf32") else ""))
    fp, done = open_resume(out, st)
    plans, todo, controls = _plan(st)
    if st.preset == "large" and not any(st.data_args.get(k) for k in ("tiny_lm", "model")):
        est = estimate_seconds(st, labels=[p.label for p in todo])
        _log(
            f"[plan] estimated {duration(est['total'])} on 2 idle CPU cores for SmolLM2-135M ({est['runs']} SAEs; "
            "from the measured step costs, docs/benchmark.md 'The large preset')"
        )
    sources = _build_sources(st, workdir)
    all_jobs = _jobs(st, sources, todo, controls)
    same = _same_runs(st, all_jobs)  # tag -> the tag of the run whose record it takes (Settings.same_runs)
    jobs = [j for j in all_jobs if job_tag(j) not in same]
    tags = [job_tag(j) for j in jobs]
    progress = Progress(tags, [f"{j[0].kind}/{j[4].label}" for j in jobs], set(done))  # time per dataset and label
    if progress.reused:
        _log(
            f"[resume] {progress.reused} of {len(jobs)} runs already done in {out / RUNS_DIR} (settings "
            f"fingerprint {fp}): skipping them"
        )
    by_tag: dict[str, dict[str, Any]] = {}
    curves: dict[str, Any] = {}
    failures: list[dict[str, str]] = []
    for i, (job, tag) in enumerate(zip(jobs, tags), 1):
        if tag in done:
            by_tag[tag] = done[tag]["record"]
            curves[tag] = done[tag]["curves"]
            continue
        t0, once0 = time.perf_counter(), _one_time_seconds(sources)
        got = _train_and_evaluate(f"{i}/{len(jobs)}", job, st, workdir, [], curves, failures, out=out, fp=fp)
        # The run's SAELens runner, activation store and memory-mapped cached dataset sit in reference cycles
        # that Python's automatic collection rarely reaches between runs: without this, every run of the large
        # preset left one more mapping of the 2.8 GB activation cache (file-backed memory +2.3 GiB per run).
        gc.collect()
        if got is not None:
            by_tag[tag] = got
            _log(progress.finished(tag, time.perf_counter() - t0, _one_time_seconds(sources) - once0))
            trained = len(progress.done) - progress.reused
            note_invocation(out, started, time.perf_counter() - t_start, trained, progress.reused, False, key)
    for job in all_jobs:
        tag = job_tag(job)
        if tag in same and same[tag] in by_tag:
            by_tag[tag] = _same_run_record(by_tag[same[tag]], job)
            curves[tag] = curves[same[tag]]
    records = [by_tag[job_tag(j)] for j in all_jobs if job_tag(j) in by_tag]
    _add_step_ratios(records)
    meta = _meta(st, env_start, sources, plans, controls, failures, device, t_start)
    invocations = note_invocation(
        out, started, meta["wall_seconds"], len(records) - progress.reused, progress.reused, True, key
    )
    meta["resume"] = {
        "settings_fingerprint": fp,
        "runs": len(jobs),
        "records_of_the_same_run": len(same),
        "runs_from_earlier_records": progress.reused,
        "invocations": invocations,
        "wall_seconds_all_invocations": sum(v["wall_seconds"] for v in invocations),
    }
    report.write(out, meta, records, curves)
    if not st.keep_saes:
        shutil.rmtree(workdir, ignore_errors=True)
    _log(f"[done] report: {out / 'report.md'} ({time.perf_counter() - t_start:.0f} s)")
    return out


def _plan(st: Settings) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Phase 1: which architectures (and beta variants) train, which are skipped and why, and the
    live-store controls they are paired with."""
    plans = _with_betas(configs.plan_architectures(st.archs), tuple(st.gradient_betas))
    if st.labels is not None:
        labels = [lab for lab in st.labels if not st.archs or lab.split("[")[0] in st.archs]  # --arch narrows
        plans = configs.select_labels(plans, labels)
    if st.sparse_baselines:
        plans = configs.on_sparse_step(plans, st.sparse_baselines)
    todo = [p for p in plans if p.skip_reason is None]
    controls = _live_controls(todo, configs.plan_architectures(None) if st.archs else plans)
    _log(f"[plan] {len(todo)} architecture(s) to train: {', '.join(p.label for p in todo)}")
    for p in plans:
        if p.skip_reason:
            _log(f"[plan] skipping {p.name} ({p.provider}): {p.skip_reason}")
    if not any(p.label == "topk" for p in todo):
        _log("[plan] note: topk is not in the run, so step-time ratios to topk are not reported")

    return plans, todo, controls


def _jobs(st: Settings, sources: list[Any], todo: list[Any], controls: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Phase 2: every ``(source, ks, seed, k, plan, "live" | "cache")`` run, in training order."""
    jobs = []
    for src, ks, n_seeds in sources:
        k_mid = sorted(ks)[len(ks) // 2]
        live_ks = tuple(ks) if st.lm_live_ks is None else tuple(k for k in ks if k in st.lm_live_ks)
        live_seeds = n_seeds if st.lm_live_seeds is None else st.lm_live_seeds
        spread = getattr(src, "spread_seeds", 0)
        is_lm = src.kind != "synthetic"
        trains_live = is_lm and not any(getattr(s, "live_only", False) for s, _, _ in sources if s is not src)
        for seed in range(max(n_seeds, spread, live_seeds if trains_live else 0)):
            for k in ks:
                paired: set[str] = set()
                for p in todo:
                    live = is_lm and p.entry is not None and not p.entry.lm_from_cache
                    if live:
                        if not trains_live or k not in live_ks or seed >= live_seeds:
                            continue
                    elif getattr(src, "live_only", False):
                        continue
                    elif not (seed < n_seeds or (seed < spread and k == k_mid)):
                        continue
                    if not p.fixed_l0 and k != max(ks):
                        continue  # chooses its own L0: trained once per seed
                    if not is_lm and p.extra.get("beta", st.gradient_betas[0]) != st.gradient_betas[0]:
                        continue  # no gradients off the LM: one beta is enough there
                    if not is_lm and "outlier_norm_ratio" in p.extra and p.label.startswith(f"{p.name}["):
                        continue  # synthetic data has no outlier-norm rows: the guard-off variant is the same run
                    control = controls.get(p.entry.lm_live_control or "") if live and p.entry else None
                    if control is not None and control.label not in paired:
                        paired.add(control.label)
                        jobs.append((src, ks, seed, k, control, "live"))
                    jobs.append((src, ks, seed, k, p, "live" if live else "cache"))
        if trains_live:
            for p in todo:
                if p.entry is not None and not p.entry.lm_from_cache:
                    _log(
                        f"[plan] {p.label} on {src.kind} ({src.data.name}): from its own live store at k in "
                        f"{{{', '.join(f'{k:g}' for k in live_ks) or 'none of the sweep'}}}, {live_seeds} seed(s), "
                        f"{src.live_tokens():,} tokens per SAE"
                    )
    return jobs


def _same_runs(st: Settings, jobs: list[tuple[Any, ...]]) -> dict[str, str]:
    """``Settings.same_runs`` on these jobs: the tag of each run that is not trained -> the tag of the run
    (same dataset, k and seed) whose record it takes; a run whose counterpart is not planned trains."""
    pairs = untrained_same_runs(st.same_runs, {j[4].label for j in jobs})
    planned = {job_tag(j) for j in jobs}
    out = {}
    for job in jobs:
        src, _, seed, k, p, _ = job
        twin = run_tag(src.kind, pairs[p.label], k, seed) if p.label in pairs else None
        if twin in planned:
            out[job_tag(job)] = twin
    return out


def _same_run_record(rec: dict[str, Any], job: tuple[Any, ...]) -> dict[str, Any]:
    """The record of ``job``'s run, which trains bit-identically to the run of ``rec``: ``rec`` under the
    job's label, architecture and provider, marked ``same_run_as``."""
    p = job[4]
    return {
        **rec,
        "architecture": p.name,
        "label": p.label,
        "provider": p.provider,
        "run": job_tag(job),
        "same_run_as": rec["label"],
    }


def _train_and_evaluate(
    i: str,
    job: tuple[Any, ...],
    st: Settings,
    workdir: Path,
    records: list[dict[str, Any]],
    curves: dict[str, Any],
    failures: list[dict[str, str]],
    out: Path | None = None,
    fp: str | None = None,
) -> dict[str, Any] | None:
    """Phase 3, one run (``i``: "3/40"): train, save, reload, evaluate; its record and curves (or
    its failure) are appended, and with ``out`` saved at once (atomically) as ``out/runs/<run>.json``
    with the settings' fingerprint ``fp``, so that a rerun skips it. Returns the record (None: failed)."""
    src, ks, seed, k, p, path = job
    ctx = configs.Context(
        d_in=src.d_in,
        d_sae=src.d_sae,
        ks=tuple(ks),
        has_lm_gradients=path == "live",
        gradient_beta=float(st.gradient_betas[0]),
    )
    tag = job_tag(job)
    _log(
        f"[{i}] {src.kind}: training {p.label} at k={k:g}, seed {seed} ({p.provider})"
        + (" from the live store" if path == "live" else "")
    )
    try:
        folder = workdir / tag.replace("[", "_").replace("]", "").replace("=", "-")
        if path == "live":
            cfg = configs.build_training_config(p, k, ctx, **src.sae_fields())
            result = src.train_live(cfg, seed, folder)
        else:
            cfg = configs.build_training_config(p, k, ctx, **src.sae_fields())
            result = src.train(cfg, seed, folder)
        figures, density, l0 = evaluate_saved(src, result)
    except Exception as exc:  # one broken architecture must not stop the benchmark...
        if type(exc).__name__ == "InterruptedException":
            # ...but a stop must: SAELens's runner turns SIGINT / SIGTERM into this exception (the class
            # moved between SAELens versions, hence the name). The finished runs' records are saved;
            # rerunning the command resumes from them.
            _log(f"[{i}] interrupted while training {tag} (SIGINT/SIGTERM): stopping; rerun the command to resume")
            raise KeyboardInterrupt(f"interrupted while training {tag}") from exc
        _log(f"[{i}] FAILED {tag}: {type(exc).__name__}: {exc}")
        failures.append({"run": tag, "error": f"{type(exc).__name__}: {exc}"})
        return None
    rec = {
        "dataset": src.kind,
        "architecture": p.name,
        "label": p.label,
        "provider": p.provider,
        "k_target": float(k) if p.fixed_l0 else None,
        "fixed_l0": p.fixed_l0,
        "batch_level": p.batch_level,
        "seed": seed,
        "run": tag,
        "config_fields": {key: v for key, v in p.config_fields(k, ctx).items()},
        "aux_loss": getattr(cfg, "aux_loss", None) or "SAELens's own",
        "auxk_counterpart": p.auxk_counterpart,
        "training_path": result.path_kind,
        "store": result.store,
        "training_tokens": result.tokens,
        "train_seconds_per_token": result.seconds / max(1, result.tokens),
        **figures,
    }
    if getattr(cfg, "beta", None) is not None and path == "live":
        rec["beta"] = float(cfg.beta)
    # as it reads back from JSON (a resumed run's report is then the same as an uninterrupted one's)
    rec = json.loads(json.dumps(rec, allow_nan=True))
    records.append(rec)
    curves[tag] = {"density": density.tolist(), "l0_hist": torch.bincount(l0).tolist()}
    if out is not None:
        from sae_allocators import io

        io.atomic_write_json(
            record_path(out, tag), {"fingerprint": fp, "tag": tag, "record": rec, "curves": curves[tag]}
        )
    _log(
        f"[{i}]   L0 {figures['l0_mean']:.2f}  NMSE {figures['nmse']:.4f}  "
        f"EV {figures['explained_variance']:.4f}  dead {figures['dead_fraction']:.3f}  "
        + (f"MCC {figures['mcc']:.3f}  " if "mcc" in figures else "")
        + (f"CE rec {figures['ce_loss_recovered']:.3f}  " if "ce_loss_recovered" in figures else "")
        + f"({figures['train_seconds']:.1f} s)"
    )
    return rec


def _meta(
    st: Settings,
    env_start: dict[str, Any],
    sources: list[Any],
    plans: list[Any],
    controls: dict[str, Any],
    failures: list[dict[str, str]],
    device: Any,
    t_start: float,
) -> dict[str, Any]:
    """Phase 4: what the report says about the run itself (settings, sources, plans, failures, machine)."""
    meta: dict[str, Any] = {
        "device": env_start["device"],
        "preset": st.preset,
        "command_settings": settings_dict(st),
        "sources": [src.describe() for src, _, _ in sources],
        "seeds": {src.kind: n for src, _, n in sources},
        "spread_seeds_at_middle_k": {src.kind: getattr(src, "spread_seeds", 0) for src, _, _ in sources},
        "ks": {src.kind: list(ks) for src, ks, _ in sources},
        "plans": [
            {
                "name": p.name,
                "label": p.label,
                "provider": p.provider,
                "skip_reason": p.skip_reason,
                "note": p.entry.note if p.entry else "",
                "datasets": [src.kind for src, _, _ in sources],
            }
            for p in [*plans, *controls.values()]
        ],
        "failures": failures,
        "environment": env_start,
        "load_average_1min_at_end": _environment(device)["load_average_1min"],
        "wall_seconds": time.perf_counter() - t_start,
    }
    for src, _, _ in sources:
        if hasattr(src, "prep_seconds"):
            meta.setdefault("lm_prep_seconds", src.prep_seconds)
    return meta


def _add_step_ratios(records: list[dict[str, Any]]) -> None:
    base = {(r["dataset"], r["k_target"], r["seed"]): r["step_seconds"] for r in records if r["label"] == "topk"}
    topk_any = {}
    for r in records:
        if r["label"] == "topk":
            topk_any.setdefault((r["dataset"], r["seed"]), []).append(r["step_seconds"])
    for r in records:
        ref = base.get((r["dataset"], r["k_target"], r["seed"]))
        if ref is None and r["k_target"] is None and topk_any.get((r["dataset"], r["seed"])):
            ref = max(topk_any[(r["dataset"], r["seed"])])  # topk at the largest k of the sweep
        if ref:
            r["step_time_vs_topk"] = r["step_seconds"] / ref


def _environment(device: Any = None) -> dict[str, Any]:
    import sae_lens

    from sae_allocators import devices
    import transformer_lens  # noqa: F401

    try:
        import importlib.metadata as md

        tl = md.version("transformer-lens")
    except Exception:
        tl = "?"
    import os

    return {
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sae_lens": sae_lens.__version__,
        "transformer_lens": tl,
        "device": devices.describe(device) if device is not None else None,
        "tf32": bool(
            device is not None and devices.is_cuda(device) and torch.get_float32_matmul_precision() != "highest"
        ),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }


def load_records(report_dir: Path) -> dict[str, Any]:
    return json.loads((Path(report_dir) / "report.json").read_text())
