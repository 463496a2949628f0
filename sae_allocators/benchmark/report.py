"""The report folder: ``report.md`` (a table per dataset, the papers' claims checked),
``report.json`` (every figure of every run), and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae_allocators.benchmark import configs, metrics
from sae_allocators.benchmark.claims import aggregate, check_claims, gradient_cost, mean_of, mean_pm, paired_line
from sae_allocators.benchmark.plots import PLOTS, make_plots, plotted_runs

DEFINITIONS = {
    "explained_variance": "1 - sum||x - x_hat||^2 / sum||x - mean(x)||^2 over evaluation tokens",
    "nmse": "normalised MSE = sum||x - x_hat||^2 / sum||x||^2 (error relative to predicting zero); "
    "Gao et al.'s 'relative to the mean' variant is one_minus_ev in the JSON",
    "l0": "per-token count of non-zero codes (!= 0, so signed codes count); mean, p50, p99",
    "frac_empty_tokens": "fraction of evaluation tokens with no active latent",
    "dead_fraction": "latents that never fire on the evaluation tokens / d_sae",
    "underused_fraction": f"live latents firing below {metrics.UNDERUSED_FACTOR} x their uniform share "
    "(mean L0 / d_sae), / d_sae",
    "mcc": "ground truth only: mean |cosine| of decoder rows and true features under the Hungarian "
    "matching (sae_lens.synthetic.mean_correlation_coefficient)",
    "ce_loss_recovered": "(CE_zero - CE_sae) / (CE_zero - CE_clean), SAE reconstruction spliced in at "
    "the hook on held-out tokens (excluded special tokens keep their activation); zero-ablation "
    "zeroes the same positions",
    "kl_div": "mean over positions of KL(clean next-token distribution || spliced), nats",
    "step_time_vs_topk": "median wall time of one training step (forward, aux losses, backward; "
    "no data loading, no optimizer) on the same batch / that of topk at the same k and seed",
    "l0_drift": "inference L0 (saved model, reloaded) / L0 of the training-time selection on the "
    "same tokens in training-size batches - 1; non-zero only for batch-level selection. Shown as "
    "'before → after' calibration (sae_allocators.calibration: thresholds fitted on held-out tokens "
    "at the end of training); 'before' is the saved model with the running thresholds of training",
    "l0_drift_uncalibrated": "l0_drift of the saved model with the running thresholds (before calibration)",
    "uncalibrated_nmse": "NMSE of the saved model with the running thresholds (before calibration)",
    "train_mode_nmse": "NMSE of the training-time selection (batch-level rules: over batches of the "
    "training batch size) on the evaluation tokens, before the inference threshold is applied",
    "zipf_exponent": "s of the least-squares fit log density = log C - s log rank over live latents",
    "median_token_fvu": "median over ordinary held-out tokens (not special, norm <= 5x the median) of the per-token "
    "FVU ||x - x_hat||^2 / ||x - mean||^2 (NMSE sums errors, so a few outlier rows dominate it; this does not)",
    "l0_bos / l0_doc_first / l0_rest": "the saved model's mean L0 on the held-out stream with every token kept, at "
    "BOS / special tokens, at the first token of a document, and elsewhere; train_mode_l0_*: the training-time rule "
    "(outlier guard included) on the same stream in training-size batches, in order",
    "budget_share_outlier_rows": "share of the training batches' kept entries on rows whose norm exceeds 5x the "
    "batch median (running average over training, from cfg.json metadata.budget_shares); budget_share_top1pct: "
    "share held by the 1 % of tokens with the most entries",
}


# --- markdown ----------------------------------------------------------------------------------


def _markdown(meta: dict[str, Any], agg: list[dict[str, Any]], claims: list[dict[str, Any]], plots: list[str]) -> str:
    """The report page: one function per section, in the page's order."""
    L = _header_section(meta)
    L += _claims_section(meta, claims)
    for src in meta["sources"]:
        L += _source_section(meta, src, agg)
        L += _results_table(src["kind"], agg, plots)
        L += _stream_table(src["kind"], agg, plots)
    L += _architectures_section(meta)
    L += _definitions_section()
    return "\n".join(L) + "\n"


def _header_section(meta: dict[str, Any]) -> list[str]:
    """Title, machine and versions, how the SAEs were trained and evaluated."""
    L = ["# sae-allocators benchmark report", ""]
    env = meta["environment"]
    L.append(
        f"Run on {env['device']} ({env['cpu_threads']} threads, {env['platform']}), torch {env['torch']}, "
        f"sae-lens {env['sae_lens']}, transformer-lens {env['transformer_lens']}; "
        + (
            f"wall time of this invocation {meta['wall_seconds'] / 60:.1f} min (it resumed earlier ones: below)"
            if (meta.get("resume") or {}).get("runs_from_earlier_records")
            else f"total wall time {meta['wall_seconds'] / 60:.1f} min"
        )
        + (
            f", 1-minute load average {env['load_average_1min']:.1f} at the start and "
            f"{meta.get('load_average_1min_at_end', float('nan')):.1f} at the end on {env.get('cpu_count')} CPUs"
            if env.get("load_average_1min") is not None
            else ""
        )
        + (" (`--quick`: a smoke test, too small for conclusions)" if meta["command_settings"].get("quick") else "")
        + "."
    )
    L.append("")
    L.append(
        "Every SAE was trained through SAELens's own runner and trainer, saved, reloaded from disk as a "
        "user would (`SAE.load_from_disk`), and evaluated on held-out data. Figures are mean ± standard "
        "deviation over seeds (the seed changes the SAE initialisation and the data order)."
    )
    res = meta.get("resume") or {}
    if res.get("runs_from_earlier_records"):
        inv = res.get("invocations") or []
        L.append("")
        L.append(
            f"Resumed: {res['runs_from_earlier_records']} of {res['runs']} runs come from records saved by "
            f"earlier invocations of the same command into this folder (settings fingerprint "
            f"{res['settings_fingerprint']}); {len(inv)} invocation(s)"
            + (
                f" ({n_cut} interrupted: counted up to their last finished run)"
                if (n_cut := sum(1 for v in inv if v.get("finished") is False))
                else ""
            )
            + f", {res.get('wall_seconds_all_invocations', 0) / 60:.1f} min of wall time in all"
            + (
                f"; code at commit(s) {', '.join(commits)} (invocations that recorded one)."
                if (commits := list(dict.fromkeys(v["commit"] for v in inv if v.get("commit"))))
                else "."
            )
        )
    if (
        env.get("load_average_1min") is not None
        and env.get("cpu_count")
        and env["load_average_1min"] > env["cpu_count"]
    ):
        L.append("")
        L.append(
            "The machine was shared with other jobs (load above its CPU count): wall times and step-time "
            "ratios are noisy; repeat a timing on an idle machine before relying on it."
        )
    L.append("")
    return L


def _claims_section(meta: dict[str, Any], claims: list[dict[str, Any]]) -> list[str]:
    """Each claim with its status and evidence, then the cost of gradient_topk's training tokens."""
    L: list[str] = []
    L.append("## Claims from the papers, as these runs show them")
    L.append("")
    for c in claims:
        L.append(f"- **{c['claim']}**: {c['status']}.")
        for e in c["evidence"]:
            L.append(f"  - {e}")
        if c.get("paired_status"):
            L.append(f"  - {c['paired_status'][0].upper()}{c['paired_status'][1:]}:")
            for pd in c["paired"]:
                L.append(f"    - {paired_line(pd['comparison'], pd)}")
    L.append("")
    cost = gradient_cost(meta, meta.get("_records", []))
    if cost:
        L.append(
            "What a training token costs on gradient_topk's path (a whole forward and backward of the "
            "LM per token, recomputed for each SAE) against the cached path (training wall time / "
            "training tokens):"
        )
        L.append("")
        L.extend(f"- {c}" for c in cost)
        L.append("")
    return L


def _source_section(meta: dict[str, Any], src: dict[str, Any], agg: list[dict[str, Any]]) -> list[str]:
    """One data source: its heading and how its SAEs were trained and evaluated."""
    L: list[str] = []
    d = src["kind"]
    L.append(f"## {src['name']}")
    L.append("")
    seeds = meta["seeds"][d]
    spread = meta.get("spread_seeds_at_middle_k", {}).get(d, 0)
    seeds_txt = f"{seeds} seed(s)" + (f" ({spread} at the middle k, for the spread)" if spread > seeds else "")
    line = (
        f"{src['training_tokens']:,} training tokens per SAE (batch {src['train_batch_size']}), "
        f"{seeds_txt}, target L0 k ∈ {{{', '.join(f'{k:g}' for k in meta['ks'][d])}}}, "
        f"d_in {src['d_in']}, d_sae {src['d_sae']}, lr {src['lr']}, a latent counts as dead for AuxK "
        f"after {src['dead_feature_window_steps']} steps without firing; evaluation on "
        f"{src['eval_tokens']:,} held-out tokens"
    )
    if d == "synthetic":
        line += f"; the true features fire {src['true_l0']:.2f} per token on average"
    else:
        line += f"; CE/KL on {src['ce_eval_tokens']:,} tokens"
        if not src.get("live_only"):
            line += (
                ". Activations computed once by SAELens's CacheActivationsRunner"
                + (
                    f" in {src['activation_cache_seconds']:.0f} s"
                    if src.get("activation_cache_seconds")
                    else " (reused from an earlier run)"
                )
                + " and read by every run"
                + (
                    f"; {src['cached_tokens']:,} tokens cached, so each SAE reads them "
                    f"{src['passes_over_training_data']:.1f} times"
                    if src.get("passes_over_training_data", 0) > 1.01
                    else ""
                )
            )
        if any(r["dataset"] == d and r["label"] == "topk[live]" for r in agg):
            line += (
                (". Only" if src.get("live_only") else ". Except")
                + f" gradient_topk and topk[live]: trained from live stores (activations, and gradient_topk's "
                f"gradients, computed as they train; same tokens in the same order) on "
                f"{src['live_training_tokens']:,} tokens in batches of {src.get('live_train_batch_size')}"
            )
    L.append(line + ".")
    L.append("")
    if d != "synthetic":
        L.append(_special_tokens_line(src, any(r["dataset"] == d and "[guard=off]" in r["label"] for r in agg)))
        L.append("")
    twins = sorted(
        {
            (r["label"], r["architecture"])
            for r in agg
            if r["dataset"] == d
            and r["label"] != r["architecture"]
            and r["label"] in configs.SPARSE_TWINS
            and r["architecture"] == configs.SPARSE_TWINS[r["label"]][0]
        }
    )
    if twins:
        L.append(_sparse_baselines_line(twins))
        L.append("")
    same = sorted({(r["label"], r["same_run_as"]) for r in agg if r["dataset"] == d and r.get("same_run_as")})
    if same:
        L.append(_same_runs_line(same))
        L.append("")
    return L


def _same_runs_line(same: list[tuple[str, str]]) -> str:
    """Which labels' rows are another label's runs (``Settings.same_runs``)."""
    names = ", ".join(f"`{lab}` are `{trained}`'s" for lab, trained in same)
    return (
        f"Trained once: the rows of {names} runs (the same records, not trained again). The two train "
        "bit-identically: the same selection rule, outlier guard, threshold and auxiliary loss "
        "(tests/architectures/test_sparse_step.py checks every parameter, buffer and the calibrated saved "
        "model bit for bit)."
    )


def _sparse_baselines_line(twins: list[tuple[str, str]]) -> str:
    """Which SAELens baselines were trained by their sparse twins (``Settings.sparse_baselines``)."""

    def fields(lab: str) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in configs.SPARSE_TWINS[lab][1] if key != "sparse_step")

    names = ", ".join(f"`{lab}` as `{arch}` with `{fields(lab)}`".replace("'", '"') for lab, arch in twins)
    saelens_threshold = [lab for lab, _ in twins if ("threshold_rule", "saelens") in configs.SPARSE_TWINS[lab][1]]
    threshold = (
        f" (and for {', '.join(f'`{lab}`' for lab in saelens_threshold)} the same threshold, an EMA from 0, "
        "saved as it is)"
        if saelens_threshold
        else ""
    )
    return (
        f"Baselines on the sparse step: {names}: the same selection, decode, MSE and AuxK{threshold} as SAELens's own "
        "training step (loss and gradients equal to float tolerance: tests/benchmark/test_sparse_baselines.py), "
        "at a quarter of its CPU cost; saved as SAELens's architecture. Their step times, and the ratios to "
        "`topk`, are the sparse step's."
    )


def _special_tokens_line(src: dict[str, Any], guard_off_rows: bool = False) -> str:
    """How this LM source handled special tokens and outlier-norm rows (issue 19's decision)."""
    from sae_allocators.allocation.outliers import DEFAULT_GUARD_RATIO

    ids = src.get("excluded_token_ids") or []
    return (
        "Special tokens: "
        + (
            f"the token ids {', '.join(map(str, ids))} (BOS and the other special tokens; every context starts "
            "with BOS) are excluded from the training stream and the reconstruction, density and L0 figures "
            "(SAELens's `exclude_special_tokens`), and kept in the CE/KL splice (left unchanged there) and in "
            "the per-position figures of the stream table"
            if ids
            else "none are excluded (this model declares none)"
        )
        + f". The batch rules train with their default outlier guard (`outlier_norm_ratio` = "
        f"{DEFAULT_GUARD_RATIO:g}: rows above that multiple of the batch's median norm are ranked as if "
        "they had the median norm; docs/mutual_choice.md, 'Real token streams')"
        + (", except the `[guard=off]` rows." if guard_off_rows else ".")
    )


def _results_table(d: str, agg: list[dict[str, Any]], plots: list[str]) -> list[str]:
    """One data source's table of figures (one row per architecture and k) and its plots."""
    L: list[str] = []
    rows = [r for r in agg if r["dataset"] == d]
    extra = "MCC" if d == "synthetic" else "CE rec. | KL"
    L.append(
        f"| architecture | k | saved as | L0 mean | p50 / p99 | empty | EV | NMSE | dead | under-used | "
        f"{extra} | step / topk | L0 drift |"
    )
    L.append("|" + " --- |" * (13 + (0 if d == "synthetic" else 1)))
    for r in rows:
        k = "own" if r["k_target"] is None else f"{r['k_target']:g}"
        ex = (
            mean_pm(r, "mcc")
            if d == "synthetic"
            else f"{mean_pm(r, 'ce_loss_recovered')} | {mean_pm(r, 'kl_div', '{:.3f}')}"
        )
        drift = mean_pm(r, "l0_drift", "{:+.1%}") if r["batch_level"] else "–"
        if r["batch_level"] and r.get("l0_drift_uncalibrated") is not None:
            drift = f"{mean_pm(r, 'l0_drift_uncalibrated', '{:+.1%}')} → {drift}"
        L.append(
            f"| {r['label']} | {k} | {r['inference_architecture']} | {mean_pm(r, 'l0_mean', '{:.2f}')} | "
            f"{mean_of(r, 'l0_p50'):.0f} / {mean_of(r, 'l0_p99'):.0f} | {mean_pm(r, 'frac_empty_tokens', '{:.1%}')} | "
            f"{mean_pm(r, 'explained_variance', '{:.4f}')} | {mean_pm(r, 'nmse', '{:.4f}')} | "
            f"{mean_pm(r, 'dead_fraction', '{:.1%}')} | {mean_pm(r, 'underused_fraction', '{:.1%}')} | {ex} | "
            f"{mean_pm(r, 'step_time_vs_topk', '{:.2f}')} | {drift} |"
        )
    L.append("")
    for p in plots:
        if p.endswith(f"_{d}.png"):
            L.append(f"![{p}]({p})")
    L.append("")
    return L


def _stream_table(d: str, agg: list[dict[str, Any]], plots: list[str]) -> list[str]:
    """Where the budget goes on a real token stream (language models only)."""
    rows = [r for r in agg if r["dataset"] == d and r.get("l0_rest") is not None]
    if not rows:
        return []
    L = [
        "### Real token streams: where the budget goes",
        "",
        "Held-out contexts with every token kept (BOS and separators too, as with SAELens's default data "
        "options). L0 of the saved model at BOS / special tokens, at the first token of a document and "
        "elsewhere (the training-time rule in brackets); the share of the training budget on rows above 5x "
        "the median norm; the median per-token FVU over ordinary tokens. `[guard=off]` rows train the same "
        "rule without the outlier guard (docs/mutual_choice.md, 'Real token streams').",
        "",
        "| architecture | k | L0 BOS | L0 doc first | L0 rest | L0 outlier rows | budget on outlier rows | top 1 % | "
        "median token FVU | NMSE | CE rec. |",
        "|" + " --- |" * 11,
    ]

    def both(r: dict[str, Any], key: str) -> str:
        saved = mean_pm(r, key, "{:.1f}")
        train = r.get(f"train_mode_{key}")
        return f"{saved} ({mean_of(r, f'train_mode_{key}'):.1f})" if train is not None else saved

    for r in rows:
        k = "own" if r["k_target"] is None else f"{r['k_target']:g}"
        share = (
            mean_pm(r, "budget_share_outlier_rows", "{:.1%}") if r.get("budget_share_outlier_rows") is not None else "–"
        )
        top = mean_pm(r, "budget_share_top1pct", "{:.1%}") if r.get("budget_share_top1pct") is not None else "–"
        out_l0 = mean_pm(r, "l0_outlier_rows", "{:.1f}") if r.get("l0_outlier_rows") is not None else "–"
        L.append(
            f"| {r['label']} | {k} | {both(r, 'l0_bos')} | {both(r, 'l0_doc_first')} | {both(r, 'l0_rest')} | {out_l0} | "
            f"{share} | {top} | {mean_pm(r, 'median_token_fvu', '{:.4f}')} | {mean_pm(r, 'nmse', '{:.4f}')} | "
            f"{mean_pm(r, 'ce_loss_recovered')} |"
        )
    L.append("")
    for p in plots:
        if p == PLOTS["l0_norm"].format(dataset=d):
            L.append(f"![{p}]({p})")
    L.append("")
    return L


def _architectures_section(meta: dict[str, Any]) -> list[str]:
    """Every planned architecture (trained or why not) and every failed run."""
    L: list[str] = []
    L.append("## Architectures")
    L.append("")
    for p in meta["plans"]:
        status = f"skipped: {p['skip_reason']}" if p["skip_reason"] else "trained"
        if not p["skip_reason"] and p.get("datasets") is not None and len(p["datasets"]) < len(meta["sources"]):
            status += f" on {', '.join(p['datasets'])} only"
        note = f" ({p['note']})" if p.get("note") else ""
        L.append(f"- `{p['label']}` from {p['provider']}: {status}{note}")
    if meta["failures"]:
        L.append("")
        L.append("**Runs that failed:**")
        for f in meta["failures"]:
            L.append(f"- {f['run']}: {f['error']}")
    L.append("")
    return L


def _definitions_section() -> list[str]:
    """What each figure means."""
    L: list[str] = []
    L.append("## Definitions")
    L.append("")
    for k, v in DEFINITIONS.items():
        L.append(f"- `{k}`: {v}")
    L.append("")
    L.append("Every figure of every run (per seed) is in `report.json`.")
    return L


def write(out: Path, meta: dict[str, Any], records: list[dict[str, Any]], curves: dict[str, Any]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(records)
    claims = check_claims(agg)
    plotted = plotted_runs(records)
    kept_curves = {
        tag: {"density": [float(f"{v:.4g}") for v in c["density"]], "l0_hist": c["l0_hist"]}
        for tag, c in curves.items()
        if tag in plotted
    }
    plots = make_plots(out, records, agg, curves) if curves else []
    meta = {k: v for k, v in meta.items() if k != "_records"}
    doc = {
        "meta": meta,
        "definitions": DEFINITIONS,
        "runs": records,
        "aggregates": agg,
        "claims": claims,
        "plots": plots,
        "curves": kept_curves,  # density and L0 histogram of the plotted runs (re-rendering)
    }
    (out / "report.json").write_text(json.dumps(doc, indent=1, allow_nan=True))
    (out / "report.md").write_text(_markdown({**meta, "_records": records}, agg, claims, plots))


def rerender(out: Path) -> None:
    """Rewrite report.md / report.json (and the plots, when the JSON holds their curves) from
    report.json's runs -- after a change to the report code, without training again."""
    out = Path(out)
    doc = json.loads((out / "report.json").read_text())
    curves = doc.get("curves") or {}
    old_plots = doc.get("plots", [])
    write(out, doc["meta"], doc["runs"], curves)
    if not curves and old_plots:  # keep the plots drawn by the original run
        new = json.loads((out / "report.json").read_text())
        new["plots"] = [p for p in old_plots if (out / p).is_file()]
        (out / "report.json").write_text(json.dumps(new, indent=1, allow_nan=True))
        agg = aggregate(new["runs"])
        (out / "report.md").write_text(
            _markdown({**new["meta"], "_records": new["runs"]}, agg, check_claims(agg), new["plots"])
        )


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m sae_allocators.benchmark.report REPORT_DIR  (re-render a report)")
    rerender(Path(sys.argv[1]))
    print(f"re-rendered {sys.argv[1]}/report.md")
