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
    #: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``: everything runs there
    device: str = "auto"
    #: the preset these settings came from (``default``, ``quick``, ``gpu``), for the report
    preset: str = "default"
    #: gradient_topk's beta on the LM; several: one run per beta, labelled gradient_topk[beta=B]
    gradient_betas: tuple[float, ...] = (1.0,)
    #: architectures trained from a live store on the LM (gradient_topk and its control) run at
    #: these k (None: every k of the sweep) and this many seeds (None: as the cached runs)
    lm_live_ks: tuple[float, ...] | None = (32,)
    lm_live_seeds: int | None = 1
    #: TF32 matrix multiplies on CUDA (torch.set_float32_matmul_precision("high")); off: full float32
    tf32: bool = False
    #: a second, small language model (a callable returning sources.LMData, and its scale) on which
    #: the live-store architectures train instead of the main LM (``--quick``: the tiny random LM,
    #: because a few steps of gradient_topk on SmolLM2 cost a minute and learn nothing)
    live_lm_data: Any = None
    live_lm: LMScale | None = None


def quick_settings(out: Path) -> Settings:
    from sae_allocators.benchmark import lm_data

    st = Settings(
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
        lm_live_ks=(32,),
        lm_live_seeds=1,
        quick=True,
        preset="quick",
        # the gradient path as a smoke test, on the tiny random LM (k = 32 of d_sae 128, 300 steps)
        live_lm=LMScale(
            hook_layer=1, expansion=4, training_tokens=19_200, train_batch_size=64, eval_sequences=16,
            ce_eval_sequences=4, dead_feature_window=50, live_training_tokens=19_200, live_train_batch_size=64,
            live_store_batch_size_prompts=8,
        ),
    )
    st.live_lm_data = lambda: lm_data.tiny_lm_data(context_size=32, n_rows=256, n_eval=16, device=st.device)
    return st


def default_settings(out: Path) -> Settings:
    return Settings(out=out)


def gpu_settings(out: Path) -> Settings:
    """``--preset gpu``: one 24-80 GB GPU; estimated 70-80 min on an H100 (arithmetic, untested until run on
    a GPU: docs/benchmark.md).

    On the LM: d_sae 16,384, k in {16, 32, 64}, 2 seeds, 20,480,000 training tokens per SAE (4,096 per
    step, 5,000 steps) -- the offline corpus's training split holds about 3.2M tokens, so SAELens reads
    the activation cache about 7 times per SAE; gradient_topk and topk[live] at every k and seed from
    the live stores, same token count. lr 5e-4: the CPU sweep's 2e-3 at d_sae 1,152 scaled by
    sqrt(1152 / 16384) (Gao et al.'s lr ~ 1/sqrt(d_sae)); not swept at this scale. Synthetic data at
    the default scale (already cheap). TF32 matrix multiplies."""
    return Settings(
        out=out,
        seeds=2,
        synthetic_ks=(2, 4, 8),
        lm_ks=(16, 32, 64),
        lm=LMScale(
            hook_layer=6, d_sae=16_384, training_tokens=20_480_000, train_batch_size=4096,
            eval_sequences=512, ce_eval_sequences=64, lr=5e-4, dead_feature_window=1000,
            store_batch_size_prompts=32, norm_estimate_batches=20,
            live_training_tokens=None, live_train_batch_size=None, live_store_batch_size_prompts=32,
        ),
        lm_seeds=2,
        lm_spread_seeds=2,
        lm_live_ks=None,
        lm_live_seeds=None,
        tf32=True,
        preset="gpu",
    )


PRESETS = {"default": default_settings, "quick": quick_settings, "gpu": gpu_settings}


def _build_sources(st: Settings, workdir: Path) -> list[Any]:
    from sae_allocators.benchmark.sources import LMSource, SyntheticSource

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
                live = LMSource(st.live_lm_data(), st.live_lm, workdir, device=st.device, kind="lm-live",
                                live_only=True)
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


def run(st: Settings) -> Path:
    from sae_allocators import devices
    from sae_allocators.benchmark import report

    t_start = time.perf_counter()
    device = devices.resolve(st.device)
    st.device = str(device)
    if devices.is_cuda(device) and st.tf32:
        torch.set_float32_matmul_precision("high")
    env_start = _environment(device)
    out = Path(st.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "saes"
    _log(f"[device] {env_start['device']}" + (" (TF32 matrix multiplies)" if env_start.get("tf32") else ""))
    plans, todo, controls = _plan(st)
    sources = _build_sources(st, workdir)
    jobs = _jobs(st, sources, todo, controls)
    records: list[dict[str, Any]] = []
    curves: dict[str, Any] = {}
    failures: list[dict[str, str]] = []
    for i, job in enumerate(jobs, 1):
        _train_and_evaluate(f"{i}/{len(jobs)}", job, st, workdir, records, curves, failures)
    _add_step_ratios(records)
    meta = _meta(st, env_start, sources, plans, controls, failures, device, t_start)
    report.write(out, meta, records, curves)
    if not st.keep_saes:
        shutil.rmtree(workdir, ignore_errors=True)
    _log(f"[done] report: {out / 'report.md'} ({time.perf_counter() - t_start:.0f} s)")
    return out


def _plan(st: Settings) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Phase 1: which architectures (and beta variants) train, which are skipped and why, and the
    live-store controls they are paired with."""
    plans = _with_betas(configs.plan_architectures(st.archs), tuple(st.gradient_betas))
    todo = [p for p in plans if p.skip_reason is None]
    controls = _live_controls(todo, configs.plan_architectures(None) if st.archs else plans)
    _log(f"[plan] {len(todo)} architecture(s) to train: {', '.join(p.label for p in todo)}")
    for p in plans:
        if p.skip_reason:
            _log(f"[plan] skipping {p.name} ({p.provider}): {p.skip_reason}")
    if not any(p.name == "topk" for p in todo):
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
                    if not is_lm and "outlier_norm_ratio" in p.extra:
                        continue  # synthetic data has no outlier-norm rows: the guard-off run is the same run
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


def _train_and_evaluate(
    i: str, job: tuple[Any, ...], st: Settings, workdir: Path, records: list[dict[str, Any]], curves: dict[str, Any], failures: list[dict[str, str]]
) -> None:
    """Phase 3, one run (``i``: "3/40"): train, save, reload, evaluate; its record and curves (or
    its failure) are appended."""
    src, ks, seed, k, p, path = job
    ctx = configs.Context(
        d_in=src.d_in, d_sae=src.d_sae, ks=tuple(ks), has_lm_gradients=path == "live",
        gradient_beta=float(st.gradient_betas[0]),
    )
    tag = f"{src.kind}/{p.label}/k{k:g}/seed{seed}"
    _log(f"[{i}] {src.kind}: training {p.label} at k={k:g}, seed {seed} ({p.provider})"
         + (" from the live store" if path == "live" else ""))
    try:
        folder = workdir / tag.replace("[", "_").replace("]", "").replace("=", "-")
        if path == "live":
            cfg = configs.build_training_config(p, k, ctx, **src.sae_fields())
            result = src.train_live(cfg, seed, folder)
        else:
            cfg = configs.build_training_config(p, k, ctx, **src.sae_fields())
            result = src.train(cfg, seed, folder)
        figures, density, l0 = evaluate_saved(src, result)
    except Exception as exc:  # one broken architecture must not stop the benchmark
        _log(f"[{i}] FAILED {tag}: {type(exc).__name__}: {exc}")
        failures.append({"run": tag, "error": f"{type(exc).__name__}: {exc}"})
        return
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
    records.append(rec)
    curves[tag] = {"density": density.tolist(), "l0_hist": torch.bincount(l0).tolist()}
    _log(
        f"[{i}]   L0 {figures['l0_mean']:.2f}  NMSE {figures['nmse']:.4f}  "
        f"EV {figures['explained_variance']:.4f}  dead {figures['dead_fraction']:.3f}  "
        + (f"MCC {figures['mcc']:.3f}  " if "mcc" in figures else "")
        + (f"CE rec {figures['ce_loss_recovered']:.3f}  " if "ce_loss_recovered" in figures else "")
        + f"({figures['train_seconds']:.1f} s)"
    )


def _meta(
    st: Settings, env_start: dict[str, Any], sources: list[Any], plans: list[Any], controls: dict[str, Any],
    failures: list[dict[str, str]], device: Any, t_start: float,
) -> dict[str, Any]:
    """Phase 4: what the report says about the run itself (settings, sources, plans, failures, machine)."""
    meta: dict[str, Any] = {
        "device": env_start["device"],
        "preset": st.preset,
        "command_settings": _settings_dict(st),
        "sources": [src.describe() for src, _, _ in sources],
        "seeds": {src.kind: n for src, _, n in sources},
        "spread_seeds_at_middle_k": {src.kind: getattr(src, "spread_seeds", 0) for src, _, _ in sources},
        "ks": {src.kind: list(ks) for src, ks, _ in sources},
        "plans": [
            {"name": p.name, "label": p.label, "provider": p.provider, "skip_reason": p.skip_reason,
             "note": p.entry.note if p.entry else "",
             "datasets": [src.kind for src, _, _ in sources]}
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


def _settings_dict(st: Settings) -> dict[str, Any]:
    d = {k: v for k, v in asdict(st).items() if k not in ("lm_data", "live_lm_data")}
    d["out"] = str(st.out)
    return d


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
        "tf32": bool(device is not None and devices.is_cuda(device)
                     and torch.get_float32_matmul_precision() != "highest"),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }


def load_records(report_dir: Path) -> dict[str, Any]:
    return json.loads((Path(report_dir) / "report.json").read_text())
