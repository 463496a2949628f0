"""Orchestration: plan, train every architecture at every k and seed, evaluate, write the report."""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_allocators.benchmark import configs
from sae_allocators.benchmark.evaluation import evaluate_saved
from sae_allocators.benchmark.sources import LMScale, SyntheticScale, _log


@dataclass
class Settings:
    out: Path
    datasets: tuple[str, ...] = ("synthetic", "lm")
    seeds: int = 2
    synthetic_ks: tuple[float, ...] = (2, 4, 8)
    lm_ks: tuple[float, ...] = (16, 32, 64)
    synthetic: SyntheticScale = field(default_factory=SyntheticScale)
    lm: LMScale = field(default_factory=LMScale)
    lm_seeds: int | None = 1  # None: `seeds`
    #: on the language model, the middle k of the sweep gets this many seeds (the spread)
    lm_spread_seeds: int = 2
    archs: list[str] | None = None
    keep_saes: bool = False
    quick: bool = False
    lm_data: Any = None  # a callable returning sources.LMData (built lazily)


def quick_settings(out: Path) -> Settings:
    return Settings(
        out=out,
        seeds=1,
        lm_spread_seeds=1,
        synthetic_ks=(4, 8),
        lm_ks=(32,),
        synthetic=SyntheticScale(training_samples=76_800, batch_size=256, eval_samples=8192),
        lm=LMScale(
            hook_layer=3, expansion=2, training_tokens=19_200, train_batch_size=64, eval_sequences=32,
            ce_eval_sequences=2, dead_feature_window=50,
        ),
        quick=True,
    )


def default_settings(out: Path) -> Settings:
    return Settings(out=out)


def _build_sources(st: Settings, workdir: Path) -> list[Any]:
    from sae_allocators.benchmark.sources import LMSource, SyntheticSource

    sources = []
    for name in st.datasets:
        if name == "synthetic":
            sources.append((SyntheticSource(st.synthetic), st.synthetic_ks, st.seeds))
        elif name == "lm":
            t0 = time.perf_counter()
            data = st.lm_data()
            _log(f"[lm] model and corpus ready in {time.perf_counter() - t0:.1f} s")
            src = LMSource(data, st.lm, workdir)
            src.prep_seconds = time.perf_counter() - t0
            sources.append((src, st.lm_ks, st.lm_seeds or st.seeds))
            src.spread_seeds = st.lm_spread_seeds
        else:
            raise ValueError(f"--datasets: unknown dataset {name!r}; use synthetic and/or lm")
    return sources


def run(st: Settings) -> Path:
    from sae_allocators.benchmark import report

    t_start = time.perf_counter()
    env_start = _environment()
    out = Path(st.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "saes"
    plans = configs.plan_architectures(st.archs)
    todo = [p for p in plans if p.skip_reason is None]
    _log(f"[plan] {len(todo)} architecture(s) to train: {', '.join(p.label for p in todo)}")
    for p in plans:
        if p.skip_reason:
            _log(f"[plan] skipping {p.name} ({p.provider}): {p.skip_reason}")
    if not any(p.name == "topk" for p in todo):
        _log("[plan] note: topk is not in the run, so step-time ratios to topk are not reported")

    sources = _build_sources(st, workdir)
    jobs = []
    for src, ks, n_seeds in sources:
        k_mid = sorted(ks)[len(ks) // 2]
        for seed in range(max(n_seeds, getattr(src, "spread_seeds", 0))):
            for k in ks:
                if seed >= n_seeds and k != k_mid:
                    continue
                for p in todo:
                    if not p.fixed_l0 and k != max(ks):
                        continue  # chooses its own L0: trained once per seed
                    if src.kind == "lm" and p.entry is not None and not p.entry.lm_from_cache:
                        continue
                    jobs.append((src, ks, seed, k, p))
    for src, _, _ in sources:
        if src.kind == "lm":
            for p in todo:
                if p.entry is not None and not p.entry.lm_from_cache:
                    _log(f"[plan] {p.label} is not trained on the language model: {p.entry.note}")
    records: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    failures: list[dict[str, str]] = []
    for i, (src, ks, seed, k, p) in enumerate(jobs, 1):
        ctx = configs.Context(d_in=src.d_in, d_sae=src.d_sae, ks=tuple(ks))
        tag = f"{src.kind}/{p.label}/k{k:g}/seed{seed}"
        _log(f"[{i}/{len(jobs)}] {src.kind}: training {p.label} at k={k:g}, seed {seed} ({p.provider})")
        try:
            cfg = configs.build_training_config(p, k, ctx, **src.sae_fields())
            result = src.train(cfg, seed, workdir / tag.replace("[", "_").replace("]", "").replace("=", "-"))
            figures, density, l0 = evaluate_saved(src, result)
        except Exception as exc:  # one broken architecture must not stop the benchmark
            _log(f"[{i}/{len(jobs)}] FAILED {tag}: {type(exc).__name__}: {exc}")
            failures.append({"run": tag, "error": f"{type(exc).__name__}: {exc}"})
            continue
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
            **figures,
        }
        records.append(rec)
        curves[tag] = {"density": density.tolist(), "l0_hist": torch.bincount(l0).tolist()}
        _log(
            f"[{i}/{len(jobs)}]   L0 {figures['l0_mean']:.2f}  NMSE {figures['nmse']:.4f}  "
            f"EV {figures['explained_variance']:.4f}  dead {figures['dead_fraction']:.3f}  "
            + (f"MCC {figures['mcc']:.3f}  " if "mcc" in figures else "")
            + (f"CE rec {figures['ce_loss_recovered']:.3f}  " if "ce_loss_recovered" in figures else "")
            + f"({figures['train_seconds']:.1f} s)"
        )
    _add_step_ratios(records)
    meta = {
        "command_settings": _settings_dict(st),
        "sources": [src.describe() for src, _, _ in sources],
        "seeds": {src.kind: n for src, _, n in sources},
        "spread_seeds_at_middle_k": {src.kind: getattr(src, "spread_seeds", 0) for src, _, _ in sources},
        "ks": {src.kind: list(ks) for src, ks, _ in sources},
        "plans": [
            {"name": p.name, "label": p.label, "provider": p.provider, "skip_reason": p.skip_reason,
             "note": p.entry.note if p.entry else "",
             "datasets": [src.kind for src, _, _ in sources
                          if not (src.kind == "lm" and p.entry is not None and not p.entry.lm_from_cache)]}
            for p in plans
        ],
        "failures": failures,
        "environment": env_start,
        "load_average_1min_at_end": _environment()["load_average_1min"],
        "wall_seconds": time.perf_counter() - t_start,
    }
    for src, _, _ in sources:
        if hasattr(src, "prep_seconds"):
            meta.setdefault("lm_prep_seconds", src.prep_seconds)
    report.write(out, meta, records, curves)
    if not st.keep_saes:
        shutil.rmtree(workdir, ignore_errors=True)
    _log(f"[done] report: {out / 'report.md'} ({time.perf_counter() - t_start:.0f} s)")
    return out


def _add_step_ratios(records: list[dict[str, Any]]) -> None:
    base = {(r["dataset"], r["k_target"], r["seed"]): r["step_seconds"] for r in records if r["architecture"] == "topk"}
    topk_any = {}
    for r in records:
        if r["architecture"] == "topk":
            topk_any.setdefault((r["dataset"], r["seed"]), []).append(r["step_seconds"])
    for r in records:
        ref = base.get((r["dataset"], r["k_target"], r["seed"]))
        if ref is None and r["k_target"] is None and topk_any.get((r["dataset"], r["seed"])):
            ref = max(topk_any[(r["dataset"], r["seed"])])  # topk at the largest k of the sweep
        if ref:
            r["step_time_vs_topk"] = r["step_seconds"] / ref


def _settings_dict(st: Settings) -> dict[str, Any]:
    d = {k: v for k, v in asdict(st).items() if k not in ("lm_data",)}
    d["out"] = str(st.out)
    return d


def _environment() -> dict[str, Any]:
    import sae_lens
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
        "device": "cpu",
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }


def load_records(report_dir: Path) -> dict[str, Any]:
    return json.loads((Path(report_dir) / "report.json").read_text())
