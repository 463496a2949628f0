"""``python -m sae_allocators.benchmark``: see docs/benchmark.md."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from sae_allocators.testing import OFFLINE_ENV


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 16,32,64, got {text!r}")
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers such as 16,32,64, got {text!r}")
    return vals


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sae_allocators.benchmark",
        description="Train every registered SAE architecture at matched L0 on synthetic ground truth and "
        "on a real language model (offline), evaluate the saved models, and write a report folder.",
    )
    p.add_argument("--quick", action="store_true", help="small smoke run for CI (a few minutes on 2 cores)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default reports/<timestamp>[-quick])")
    p.add_argument("--datasets", default="synthetic,lm", help="comma-separated: synthetic, lm (default both)")
    p.add_argument("--arch", action="append", default=None, help="only this architecture (repeatable)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per configuration (synthetic; LM too unless --lm-seeds)")
    p.add_argument("--lm-seeds", type=int, default=None, help="seeds per configuration on the language model")
    p.add_argument("--ks", type=_floats, default=None, help="target L0 sweep on the language model, e.g. 16,32,64")
    p.add_argument("--synthetic-ks", type=_floats, default=None, help="target L0 sweep on synthetic data")
    p.add_argument("--lm-tokens", type=int, default=None, help="training tokens per SAE on the language model")
    p.add_argument("--layer", type=int, default=None, help="hooked block of the language model (resid_post)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per sequence on the language model")
    p.add_argument("--model", default=None, help="with network: any TransformerLens model name (e.g. gpt2)")
    p.add_argument("--dataset", default=None, help="with --model: a Hub dataset name or a local text/json/parquet path")
    p.add_argument("--tiny-lm", action="store_true", help="a random tiny model and random tokens (tests the harness only)")
    p.add_argument("--cache-dir", default=None, help="offline assets cache (default: the preparation step's)")
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: torch's). On a machine shared with other jobs, 1 can be many "
        "times faster than oversubscribed threads",
    )
    p.add_argument("--keep-saes", action="store_true", help="keep the trained SAEs under <out>/saes")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for key, value in OFFLINE_ENV.items():
        if key == "HF_HUB_OFFLINE" and args.model:
            continue  # a user's --model name may need the Hub
        os.environ.setdefault(key, value)
    if args.model and not args.dataset or args.dataset and not args.model:
        raise SystemExit("--model and --dataset go together (a model name and a dataset name or local path)")

    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise SystemExit(f"--threads {args.threads}: use a positive number of threads, e.g. --threads 1")
        torch.set_num_threads(args.threads)
    import sae_allocators  # noqa: F401  registers every architecture (ours and plugins)
    from sae_allocators.benchmark import lm_data
    from sae_allocators.benchmark.run import default_settings, quick_settings, run

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or Path("reports") / (stamp + ("-quick" if args.quick else ""))
    st = quick_settings(out) if args.quick else default_settings(out)
    st.datasets = tuple(d.strip() for d in args.datasets.split(",") if d.strip())
    st.archs = args.arch
    st.keep_saes = args.keep_saes
    if args.seeds is not None:
        st.seeds = args.seeds
    if args.lm_seeds is not None:
        st.lm_seeds = args.lm_seeds
    if args.ks:
        st.lm_ks = args.ks
    if args.synthetic_ks:
        st.synthetic_ks = args.synthetic_ks
    if args.lm_tokens:
        st.lm.training_tokens = args.lm_tokens
    if args.layer is not None:
        st.lm.hook_layer = args.layer
    ctx = args.context_size
    if args.tiny_lm:
        st.lm.hook_layer = min(st.lm.hook_layer, 1)
        st.lm.expansion = 4
        st.lm.train_batch_size = min(st.lm.train_batch_size, 256)
        ctx = min(ctx, 32)
        st.lm_data = lambda: lm_data.tiny_lm_data(context_size=ctx)
    elif args.model:
        st.lm_data = lambda: lm_data.hub_lm_data(
            args.model, args.dataset, ctx, int((st.lm.training_tokens + st.lm.calibration_tokens) * 1.3), st.lm.eval_sequences
        )
    else:
        st.lm_data = lambda: lm_data.offline_lm_data(
            ctx, int((st.lm.training_tokens + st.lm.calibration_tokens) * 1.3) + 16 * ctx, st.lm.eval_sequences, args.cache_dir
        )
    run(st)
    return 0
