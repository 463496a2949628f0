"""How far the saved (batch-free) model's L0 drifts from k on held-out data, before and after calibration.

Trains ``mutual_choice`` and ``feature_choice`` exactly as the main job does (the benchmark's own
sources and configs: SAELens's runners, the synthetic ground-truth model and the offline SmolLM2
activations, the main job's k values), with the end-of-training calibration of
:mod:`sae_allocators.calibration`. For each SAE it reloads the saved ``jumprelu`` with plain
SAELens and measures on the benchmark's held-out evaluation tokens:

- L0 and NMSE with the calibrated thresholds (the saved model) and with the running thresholds of
  training (what was saved before calibration existed), and their drift ``L0 / k - 1``;
- for ``feature_choice``, the NMSE of the uncalibrated thresholds *at the calibrated model's L0*
  (all theta_j scaled by one factor, found by bisection): calibration must not buy its L0 with a
  worse reconstruction. (For ``mutual_choice`` both are one global threshold, so at equal L0 they
  are the same model.)
- the calibration's cost: its seconds against the training's.

    python benchmarks/inference_drift.py --quick              # the main job's --quick scale (CI)
    python benchmarks/inference_drift.py                      # the default scale: k 2,4,8 / 16,32,64
    python benchmarks/inference_drift.py --datasets synthetic --arch mutual_choice
    python benchmarks/inference_drift.py --datasets lm --calibration-tokens 65536 --eval-sequences 512

The language model needs the offline assets (``SAE_ALLOCATORS_CACHE``, see docs/offline-assets.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _measure(sae, batches, theta):
    from sae_allocators.benchmark.evaluation import l0_nmse_at_threshold

    return l0_nmse_at_threshold(sae, batches, theta)


def _at_l0(sae, batches, theta, l0_target, iters=30):
    """Scale ``theta`` by one factor so that the L0 on ``batches`` matches ``l0_target``."""
    lo, hi = 0.0, 1.0
    while _measure(sae, batches, theta * hi)[0] > l0_target and hi < 1e6:
        hi *= 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        if _measure(sae, batches, theta * mid)[0] > l0_target:
            lo = mid
        else:
            hi = mid
    return _measure(sae, batches, theta * hi)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the main job's --quick scale and k values")
    p.add_argument("--datasets", nargs="+", default=["synthetic", "lm"])
    p.add_argument("--arch", action="append", default=None, help="mutual_choice and/or feature_choice (default both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument(
        "--calibration-tokens",
        type=int,
        default=None,
        help="LM: held-out tokens to calibrate on (default: the main job's, 8,192)",
    )
    p.add_argument(
        "--eval-sequences",
        type=int,
        default=None,
        help="LM: held-out sequences of 128 tokens to measure L0 on (default: the main job's, 128)",
    )
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("WANDB_MODE", "disabled")

    import torch
    from sae_lens import SAE

    import sae_allocators  # noqa: F401
    from sae_allocators.benchmark import configs, lm_data
    from sae_allocators.benchmark.settings import default_settings, quick_settings
    from sae_allocators.benchmark.lm_source import LMSource
    from sae_allocators.benchmark.sources import quiet_saelens
    from sae_allocators.benchmark.synthetic_source import SyntheticSource

    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(tempfile.mkdtemp(prefix="inference_drift-"))
    st = quick_settings(work) if args.quick else default_settings(work)
    import dataclasses

    lm_overrides = {"calibration_tokens": args.calibration_tokens, "eval_sequences": args.eval_sequences}
    st.lm = dataclasses.replace(st.lm, **{k: v for k, v in lm_overrides.items() if v is not None})
    archs = args.arch or ["mutual_choice", "feature_choice"]
    plans = [pl for pl in configs.plan_architectures(archs) if pl.skip_reason is None and "aux_loss" not in pl.extra]
    rows = []
    print(
        f"scale: {'--quick' if args.quick else 'default'}; load average {os.getloadavg()[0]:.2f}; torch threads {torch.get_num_threads()}"
    )
    header = (
        f"{'dataset':<10}{'architecture':<16}{'k':>5}{'L0 before':>11}{'drift':>9}{'L0 after':>10}{'drift':>9}"
        f"{'NMSE before':>13}{'NMSE after':>12}{'NMSE before @L0 after':>23}{'cal. s / train s':>18}"
    )
    for name in args.datasets:
        if name == "synthetic":
            src, ks = SyntheticSource(st.synthetic), st.synthetic_ks
        else:
            ctx = 128
            data = lm_data.offline_lm_data(
                ctx,
                int((st.lm.training_tokens + st.lm.calibration_tokens) * 1.3) + 16 * ctx,
                st.lm.eval_sequences,
                None,
            )
            src, ks = LMSource(data, st.lm, work), st.lm_ks
        batches = list(src.eval_batches())
        print(f"\n{src.name}: {sum(b.shape[0] for b in batches)} held-out evaluation tokens")
        print(header)
        for k in ks:
            for plan in plans:
                cctx = configs.Context(d_in=src.d_in, d_sae=src.d_sae, ks=tuple(ks))
                cfg = configs.build_training_config(plan, k, cctx, **src.sae_fields())
                out = work / f"{name}-{plan.label}-k{k:g}"
                t0 = time.perf_counter()
                result = src.train(cfg, args.seed, out)
                cal = result.calibration
                with quiet_saelens():
                    sae = SAE.load_from_disk(str(out), device="cpu")
                l0_a, nmse_a = _measure(sae, batches, sae.threshold.detach().clone())
                l0_b, nmse_b = _measure(sae, batches, cal.theta_before)
                if plan.name == "feature_choice":
                    _, nmse_eq = _at_l0(sae, batches, cal.theta_before.double(), l0_a)
                else:
                    nmse_eq = float("nan")
                row = {
                    "dataset": name,
                    "architecture": plan.name,
                    "k": float(k),
                    "l0_before": l0_b,
                    "l0_after": l0_a,
                    "drift_before": l0_b / k - 1,
                    "drift_after": l0_a / k - 1,
                    "nmse_before": nmse_b,
                    "nmse_after": nmse_a,
                    "nmse_before_at_l0_after": nmse_eq,
                    "calibration_tokens": cal.tokens,
                    "calibration_seconds": cal.seconds,
                    "train_seconds": result.seconds,
                    "calibration_l0": cal.achieved_l0,
                    "held_out": cal.held_out,
                    "wall_seconds": time.perf_counter() - t0,
                }
                rows.append(row)
                eq = "–" if nmse_eq != nmse_eq else f"{nmse_eq:.4f}"
                print(
                    f"{name:<10}{plan.name:<16}{k:>5g}{l0_b:>11.2f}{l0_b / k - 1:>+9.1%}{l0_a:>10.2f}{l0_a / k - 1:>+9.1%}"
                    f"{nmse_b:>13.4f}{nmse_a:>12.4f}{eq:>23}{cal.seconds / result.seconds:>18.1%}",
                    flush=True,
                )
    worst = max(abs(r["drift_after"]) for r in rows) if rows else float("nan")
    print(
        f"\nlargest |L0 after calibration / k - 1| on held-out data: {worst:.2%}; load average {os.getloadavg()[0]:.2f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
