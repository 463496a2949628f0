"""Settings sweeps through the main benchmark (`python -m sae_allocators.benchmark`'s own runs).

Two sweeps, each printing one line per trained SAE (held-out NMSE, dead and under-used fractions,
MCC or CE-loss recovered) and leaving a full report folder per setting under ``--out``:

- ``lr``: the learning rate of one dataset, for the given architectures (how the defaults in
  ``sae_allocators.benchmark.synthetic_source`` / ``lm_source`` were chosen: the best for ``topk``, the baseline);
- ``aux``: every ``*_zipf`` architecture given, also trained with ``aux_loss="auxk"`` (the same
  selection with AuxK) at the same k and seed, so the two losses compare one to one.

    python benchmarks/sweeps.py lr --dataset lm --values 5e-4,1e-3,2e-3,3e-3,5e-3 --ks 16,32
    python benchmarks/sweeps.py lr --dataset synthetic --values 1e-3,3e-3,1e-2,2e-2,4e-2 --seeds 1
    python benchmarks/sweeps.py aux --archs abstopk_zipf,topk_zipf --seeds 1

The LM needs the offline assets (``python -m sae_allocators.offline prepare``, which
``bash benchmarks/run.sh`` runs); its activations are computed once and cached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, as step_speed.py


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _settings(out: Path, dataset: str, archs: list[str], ks: list[float] | None, seeds: int):
    from sae_allocators.benchmark import lm_data
    from sae_allocators.benchmark.settings import default_settings

    st = default_settings(out)
    st.datasets = (dataset,)
    st.archs = archs
    st.seeds = seeds
    st.lm_spread_seeds = 1
    if ks and dataset == "lm":
        st.lm_ks = tuple(ks)
    elif ks:
        st.synthetic_ks = tuple(ks)
    st.lm_data = lambda: lm_data.offline_lm_data(
        128, int(st.lm.training_tokens * 1.3) + 16 * 128, st.lm.eval_sequences, None
    )
    return st


def _print(setting: str, report_dir: Path) -> None:
    runs = json.loads((report_dir / "report.json").read_text())["runs"]
    for r in sorted(runs, key=lambda r: (r["k_target"] or 0, r["label"], r["seed"])):
        extra = f"MCC {r['mcc']:.3f}" if "mcc" in r else f"CE rec {r.get('ce_loss_recovered', float('nan')):.3f}"
        print(
            f"{setting:>10} k={r['k_target']} seed {r['seed']} {r['label']:28s} NMSE {r['nmse']:.4f}  "
            f"dead {r['dead_fraction']:.3f}  under-used {r['underused_fraction']:.3f}  {extra}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", choices=["lr", "aux"])
    p.add_argument("--dataset", choices=["synthetic", "lm"], default="synthetic")
    p.add_argument("--values", type=_floats, default=None, help="lr: the learning rates")
    p.add_argument("--archs", default="topk", help="comma-separated architectures (default topk)")
    p.add_argument("--ks", type=_floats, default=None, help="target L0 values (default: the benchmark's)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("reports/sweeps"))
    args = p.parse_args(argv)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    import sae_allocators  # noqa: F401  registers the architectures
    from sae_allocators.benchmark import configs
    from sae_allocators.benchmark.run import run

    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if args.sweep == "lr":
        if not args.values:
            p.error("lr: give --values, e.g. --values 1e-3,3e-3,1e-2")
        for lr in args.values:
            st = _settings(args.out / f"lr-{args.dataset}-{lr:g}", args.dataset, archs, args.ks, args.seeds)
            (st.lm if args.dataset == "lm" else st.synthetic).lr = lr
            _print(f"lr={lr:g}", run(st))
        return 0

    plain = configs.plan_architectures

    def with_auxk_variants(only=None):
        plans = plain(only)
        zipf = [q for q in plans if q.entry is not None and q.label == q.name and q.name.endswith("_zipf")]
        return plans + [
            configs.Plan(q.name, f"{q.name}[aux=auxk]", q.provider, q.entry, extra={"aux_loss": "auxk"}) for q in zipf
        ]

    configs.plan_architectures = with_auxk_variants
    try:
        _print("aux", run(_settings(args.out / f"aux-{args.dataset}", args.dataset, archs, args.ks, args.seeds)))
    finally:
        configs.plan_architectures = plain
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
