"""``python -m sae_allocators.benchmark``: see docs/benchmark.md."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from sae_allocators import devices
from sae_allocators.testing import OFFLINE_ENV


def _floats(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 16,32,64, got {text!r}")
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive numbers such as 16,32,64, got {text!r}")
    return vals


def _floats0(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,1,2, got {text!r}")
    if not vals or any(v < 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected numbers >= 0 such as 0.5,1,2, got {text!r}")
    return vals


def parser(prog: str = "python -m sae_allocators.benchmark") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train every registered SAE architecture at matched L0 on synthetic ground truth and "
        "on a real language model (offline), evaluate the saved models, and write a report folder.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small smoke run for CI (a few minutes on 2 cores); the same as --preset quick",
    )
    p.add_argument(
        "--preset",
        choices=("default", "quick", "gpu", "large"),
        default=None,
        help="sizes: default (about 30 min on 2 idle CPU cores), quick (CI smoke run), gpu (one 24-80 GB GPU, "
        "about an hour, untested until run on one: docs/benchmark.md), large (the LM at scale: d_sae 4,608, "
        "1M tokens per SAE, 58 SAEs of which 51 trained; 2.7 h measured on 2 CPU cores from an empty cache, docs/report-large; "
        "report in "
        "reports/large unless --out, and rerunning the same command resumes); other options override its values",
    )
    p.add_argument(
        "--device",
        type=devices.cli_device,
        default=devices.AUTO,
        help="auto (default: CUDA when torch sees a GPU, else the CPU), cpu, cuda or cuda:N: the model, "
        "activation caching, training and evaluation all run there",
    )
    p.add_argument(
        "--gradient-betas",
        type=_floats0,
        default=None,
        help="gradient_topk's beta on the LM (default 1, from the sweep in docs/benchmark.md); several, "
        "e.g. 0.5,1,2: one run per beta (a sweep)",
    )
    p.add_argument(
        "--live-tokens",
        type=int,
        default=None,
        help="training tokens per SAE for gradient_topk and its topk[live] control on the LM (they compute "
        "activations, and gradient_topk the LM's gradients, as they train; default: the preset's)",
    )
    p.add_argument(
        "--live-ks",
        type=_floats,
        default=None,
        help="the k at which gradient_topk and its control are trained on the LM (default: the preset's; "
        "default: 32 only, gpu: every k)",
    )
    p.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="TF32 matrix multiplies on CUDA (default: on with --preset gpu, else off)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="report folder (default reports/<timestamp>[-quick], reports/large for --preset large). A folder "
        "with finished runs of the same settings resumes: those runs are skipped and the report covers all; "
        "other settings are refused",
    )
    p.add_argument("--datasets", default=None, help="comma-separated: synthetic, lm (default both; --preset large: lm)")
    p.add_argument("--arch", action="append", default=None, help="only this architecture (repeatable)")
    p.add_argument(
        "--seeds", type=int, default=None, help="seeds per configuration (synthetic; LM too unless --lm-seeds)"
    )
    p.add_argument("--lm-seeds", type=int, default=None, help="seeds per configuration on the language model")
    p.add_argument("--ks", type=_floats, default=None, help="target L0 sweep on the language model, e.g. 16,32,64")
    p.add_argument("--synthetic-ks", type=_floats, default=None, help="target L0 sweep on synthetic data")
    p.add_argument("--lm-tokens", type=int, default=None, help="training tokens per SAE on the language model")
    p.add_argument("--layer", type=int, default=None, help="hooked block of the language model (resid_post)")
    p.add_argument("--context-size", type=int, default=128, help="tokens per sequence on the language model")
    p.add_argument("--model", default=None, help="with network: any TransformerLens model name (e.g. gpt2)")
    p.add_argument("--dataset", default=None, help="with --model: a Hub dataset name or a local text/json/parquet path")
    p.add_argument(
        "--tiny-lm", action="store_true", help="a random tiny model and random tokens (tests the harness only)"
    )
    p.add_argument("--cache-dir", default=None, help="offline assets cache (default: the preparation step's)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's). On a machine shared with other jobs, 1 can be many "
        "times faster than oversubscribed threads",
    )
    p.add_argument("--keep-saes", action="store_true", help="keep the trained SAEs under <out>/saes")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m sae_allocators.benchmark") -> int:
    args = parser(prog).parse_args(argv)
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
    from sae_allocators.benchmark.resume import ResumeError
    from sae_allocators.benchmark.run import run
    from sae_allocators.benchmark.settings import DEFAULT_OUT, PRESETS

    if args.quick and args.preset not in (None, "quick"):
        raise SystemExit(f"--quick is --preset quick; drop one of --quick and --preset {args.preset}")
    preset = "quick" if args.quick else (args.preset or "default")
    try:
        device = devices.resolve(args.device)
    except devices.DeviceError as exc:
        raise SystemExit(f"--device: {exc}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (
        args.out or DEFAULT_OUT.get(preset) or Path("reports") / (stamp + ("" if preset == "default" else f"-{preset}"))
    )
    st = PRESETS[preset](out)
    st.device = str(device)
    if preset == "gpu" and not devices.is_cuda(device):
        print(f"note: --preset gpu on {device}: sized for one GPU, this will take many hours here", flush=True)
    if args.gradient_betas:
        st.gradient_betas = args.gradient_betas
    if args.live_tokens:
        st.lm.live_training_tokens = args.live_tokens
    if args.live_ks:
        st.lm_live_ks = args.live_ks
    if args.tf32 is not None:
        st.tf32 = args.tf32
    if args.datasets is not None:
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
        st.lm.d_sae = None
        st.lm.train_batch_size = min(st.lm.train_batch_size, 256)
        ctx = min(ctx, 32)
        st.lm_data = lambda: lm_data.tiny_lm_data(context_size=ctx, device=device)
        st.live_lm_data = None  # the LM is already the tiny one: the live runs train on it
    elif args.model:
        st.lm_data = lambda: lm_data.hub_lm_data(
            args.model,
            args.dataset,
            ctx,
            int((st.lm.training_tokens + st.lm.calibration_tokens) * 1.3),
            st.lm.eval_sequences,
            device=device,
        )
    else:
        st.lm_data = lambda: lm_data.offline_lm_data(
            ctx,
            int((st.lm.training_tokens + st.lm.calibration_tokens) * 1.3) + 16 * ctx,
            st.lm.eval_sequences,
            args.cache_dir,
            device=device,
        )
    st.data_args = {
        "model": args.model,
        "dataset": args.dataset,
        "tiny_lm": bool(args.tiny_lm),
        "context_size": ctx,
        "cache_dir": args.cache_dir,
    }
    try:
        run(st)
    except ResumeError as exc:
        raise SystemExit(f"--out: {exc}")
    return 0


HELP = (
    "run the benchmark (the main job: every registered architecture at matched L0, offline; the same as "
    "python -m sae_allocators.benchmark), then check its report; --help for its options"
)


def cmd_bench(args: argparse.Namespace) -> int:
    """``sae-allocators bench [options]``: the main job for a pip-installed user (``benchmarks/run.sh``
    is not in the wheel). Prepares the offline model and corpus when the LM is used (cached after the
    first time), runs the benchmark, then checks the report (exit 1 when the check fails)."""
    argv = list(args.argv)
    if any(a in ("-h", "--help") for a in argv):
        return main(argv, prog="sae-allocators bench")
    out = _out_arg(argv)
    if out is None:
        quick = "--quick" in argv
        preset = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--preset"), None)
        preset = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), preset)
        suffix = "-quick" if quick else ("" if preset in (None, "default") else f"-{preset}")
        out = str(Path("reports") / (time.strftime("%Y%m%d-%H%M%S") + suffix))
        if preset == "large" and not quick:
            out = str(Path("reports") / "large")  # a fixed folder: rerunning the same command resumes
        argv += ["--out", out]
    status = main(argv, prog="sae-allocators bench")
    if status != 0:
        return status
    from sae_allocators.benchmark import check

    status = check.main([out])
    print(f"report: {Path(out).resolve() / 'report.md'}")
    return status


def _out_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--out" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    return None
