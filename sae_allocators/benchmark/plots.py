"""The main job's report, part 2: its PNG plots (NMSE-L0 frontier with error bars, densities, L0
histograms, L0 by token norm), drawn from the runs and the aggregates of
:mod:`sae_allocators.benchmark.claims`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


PLOTS = {
    "frontier": "frontier_{dataset}.png",
    "density": "density_{dataset}.png",
    "l0_hist": "l0_hist_{dataset}.png",
    "l0_norm": "l0_by_norm_{dataset}.png",
}


# --- plots -----------------------------------------------------------------------------------


def make_plots(
    out: Path, records: list[dict[str, Any]], agg: list[dict[str, Any]], curves: dict[str, Any]
) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[report] matplotlib is not installed: no plots (pip install 'sae-allocators[report]')")
        return []
    import numpy as np

    written = []
    datasets = sorted({r["dataset"] for r in records})
    labels = sorted({r["label"] for r in records})
    cmap = plt.cm.tab10 if len(labels) <= 10 else plt.cm.tab20
    colors = {lab: cmap(i % cmap.N) for i, lab in enumerate(labels)}
    for d in datasets:
        written.append(_frontier_plot(plt, out, d, labels, agg, colors))
        # the density and L0 panels: the middle k of the sweep, seed 0
        ks = sorted({r["k_target"] for r in records if r["dataset"] == d and r["k_target"] is not None})
        k_mid = ks[len(ks) // 2] if ks else None
        sel = [r for r in records if r["dataset"] == d and r["seed"] == 0 and (r["k_target"] in (k_mid, None))]
        for kind in ("density", "l0_hist"):
            name = _grid_plot(plt, np, out, d, kind, k_mid, sel, curves, colors)
            if name is not None:
                written.append(name)
        name = _l0_norm_plot(plt, out, d, sel, colors)
        if name is not None:
            written.append(name)
    return written


def _frontier_plot(
    plt: Any, out: Path, d: str, labels: list[str], agg: list[dict[str, Any]], colors: dict[str, Any]
) -> str:
    """L0 vs NMSE frontier of one data source (every architecture, mean ± std over seeds)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=80)
    every: list[float] = []
    for lab in labels:
        rows = sorted([r for r in agg if r["dataset"] == d and r["label"] == lab], key=lambda r: r["l0_mean"]["mean"])
        if not rows:
            continue
        xs = [r["l0_mean"]["mean"] for r in rows]
        ys = [r["nmse"]["mean"] for r in rows]
        es = [r["nmse"]["std"] for r in rows]
        xes = [r["l0_mean"]["std"] for r in rows]  # the saved model's L0 varies over seeds too (batch rules)
        ax.errorbar(xs, ys, yerr=es, xerr=xes, marker="o", ms=4, capsize=2, label=lab, color=colors[lab])
        every.extend(y for y in ys if y > 0)
    ax.set_xscale("log")
    log_y = bool(every) and max(every) > 10 * min(every)  # one far-off architecture must not flatten the rest
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("mean L0 at inference (saved model)")
    ax.set_ylabel("normalised MSE (lower is better" + ("; log scale)" if log_y else ")"))
    ax.set_title(f"{d}: sparsity vs reconstruction")
    return _save_line_plot(plt, fig, ax, out, PLOTS["frontier"].format(dataset=d))


def _save_line_plot(plt: Any, fig: Any, ax: Any, out: Path, name: str) -> str:
    """Grid, legend, layout; write ``out / name`` and close the figure."""
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / name)
    plt.close(fig)
    return name


def _grid_plot(
    plt: Any,
    np: Any,
    out: Path,
    d: str,
    kind: str,
    k_mid: Any,
    sel: list[dict[str, Any]],
    curves: dict[str, Any],
    colors: dict[str, Any],
) -> str | None:
    """One panel per run of ``sel``: feature density by rank with the fitted Zipf law (``kind`` "density")
    or the per-token L0 histogram ("l0_hist"); None when there is no run."""
    n = len(sel)
    if n == 0:
        return None
    cols = min(4, n)
    rows_n = -(-n // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(2.6 * cols, 2.2 * rows_n), dpi=80, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, r in zip(axes.flat, sel):
        tag = _tag(r)
        c = curves.get(tag)
        if c is None:
            continue
        if kind == "density":
            dens = np.sort(np.asarray(c["density"]))[::-1]
            alive = dens[dens > 0]
            ranks = np.arange(1, alive.size + 1)
            ax.loglog(ranks, alive, color=colors[r["label"]], lw=1.2)
            if math.isfinite(r.get("zipf_exponent", float("nan"))):
                ax.loglog(ranks, r["zipf_scale"] * ranks ** (-r["zipf_exponent"]), "k--", lw=0.8)
            if alive.size:
                ax.set_ylim(alive.min() / 2, alive.max() * 2)
            ax.set_title(
                f"{r['label']}\ns={r.get('zipf_exponent', float('nan')):.2f}, dead {r['dead_fraction']:.0%}", fontsize=7
            )
            ax.set_xlabel("rank", fontsize=7)
            ax.set_ylabel("density", fontsize=7)
        else:
            h = np.asarray(c["l0_hist"], dtype=float)
            ax.bar(np.arange(h.size), h / max(h.sum(), 1), width=1.0, color=colors[r["label"]])
            ax.axvline(r["l0_mean"], color="k", lw=0.8, ls="--")
            ax.set_title(f"{r['label']}\nmean {r['l0_mean']:.1f}, p99 {r['l0_p99']:.0f}", fontsize=7)
            ax.set_xlabel("L0 of a token", fontsize=7)
        ax.tick_params(labelsize=6)
    what = "feature density by rank (dashed: fitted Zipf law)" if kind == "density" else "per-token L0 (dashed: mean)"
    fig.suptitle(f"{d}, k={k_mid:g}, seed 0: {what}" if k_mid is not None else f"{d}: {what}", fontsize=8)
    fig.tight_layout()
    name = PLOTS[kind].format(dataset=d)
    fig.savefig(out / name)
    plt.close(fig)
    return name


def plotted_runs(records: list[dict[str, Any]]) -> set[str]:
    out = set()
    for d in {r["dataset"] for r in records}:
        # the density and L0 panels: the middle k of the sweep, seed 0
        ks = sorted({r["k_target"] for r in records if r["dataset"] == d and r["k_target"] is not None})
        k_mid = ks[len(ks) // 2] if ks else None
        out |= {r["run"] for r in records if r["dataset"] == d and r["seed"] == 0 and r["k_target"] in (k_mid, None)}
    return out


def _tag(r: dict[str, Any]) -> str:
    return r["run"]


def _l0_norm_plot(plt: Any, out: Path, d: str, sel: list[dict[str, Any]], colors: dict[str, Any]) -> str | None:
    """The saved models' mean L0 against the token's norm (multiples of the median), one line per run."""
    sel = [r for r in sel if r.get("l0_by_norm")]
    if not sel:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=80)
    for r in sel:
        pts = r["l0_by_norm"]
        xs = [max(p[0], 0.25) for p in pts]
        ax.plot(xs, [p[1] for p in pts], marker="o", ms=3, label=r["label"], color=colors[r["label"]])
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("token norm / median norm (lower edge of the bin)")
    ax.set_ylabel("mean L0 of the saved model")
    ax.set_title(f"{d}: L0 against token norm (held-out stream, every token kept)")
    return _save_line_plot(plt, fig, ax, out, PLOTS["l0_norm"].format(dataset=d))
