"""Speed of one top_afa training step against SAELens's own topk, in one process.

A *training step* is what SAELens's trainer does per batch: ``training_forward_pass`` (encode,
decode, MSE, auxiliary losses -- for top_afa also the AFA loss, the running densities and the
finiteness check), ``loss.backward()``, gradient clipping at 1.0, ``Adam.step()`` and
``zero_grad``. Both SAEs start from the same seed; the input is Gaussian. No dead latents
(``dead_neuron_mask=None``) unless ``--dead-frac`` is given, so AuxK is off on both sides by
default.

Default sizes are the issue's: N=4096 tokens, d_in=512, d_sae=8192, top_afa ``k_max=64`` against
SAELens ``topk`` with k=32; the target is a ratio <= 1.3. Steps of the two models are interleaved
and the median of each is reported, so machine load affects both alike. Peak memory: CUDA's
``max_memory_allocated`` per model; on CPU each model's peak RSS in its own child process.

    python benchmarks/afa_speed.py            # the issue's sizes (slow on a small CPU)
    python benchmarks/afa_speed.py --quick    # N=1024, fewer repeats
    python benchmarks/afa_speed.py --uncapped # also k_max=None (a full sort per token)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def build(name: str, n_feat: int, d_in: int, k: int, k_max: int | None, device: str):
    import sae_allocators  # noqa: F401
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from sae_allocators.architectures.top_afa import TopAFATrainingSAE, TopAFATrainingSAEConfig

    torch.manual_seed(0)
    if name == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=n_feat, k=k, device=device))
    else:
        sae = TopAFATrainingSAE(TopAFATrainingSAEConfig(d_in=d_in, d_sae=n_feat, k_max=k_max, device=device))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    return sae, opt


def make_step(sae, opt):
    from sae_lens.saes.sae import TrainStepInput

    def step(x: torch.Tensor, dead: torch.Tensor | None) -> None:
        out = sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def child_peak_rss(args: argparse.Namespace, name: str, k_max: int | None) -> dict[str, float]:
    """Peak RSS (MiB) of a child process that builds one model and runs 2 steps, and the RSS
    before the steps (a crude measure: glibc keeps freed memory, so expect ~10% noise)."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--n",
        str(args.n),
        "--d-in",
        str(args.d_in),
        "--d-sae",
        str(args.d_sae),
        "--k",
        str(args.k),
    ]
    cmd += ["--k-max", str(k_max) if k_max is not None else "none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")
    k_max = None if args.k_max == "none" else int(args.k_max)
    sae, opt = build(args.child, args.d_sae, args.d_in, args.k, k_max, "cpu")
    step = make_step(sae, opt)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    x = torch.randn(args.n, args.d_in)
    for _ in range(2):
        step(x, None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mib": peak / 1024, "before_steps_mib": base / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--k", type=int, default=32, help="SAELens topk's k")
    p.add_argument("--k-max", default="64", help="top_afa's cap (or 'none')")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dead-frac", type=float, default=0.0, help="fraction of latents marked dead (AuxK on)")
    p.add_argument("--quick", action="store_true", help="N=1024, 3 repeats, 1 warm-up")
    p.add_argument("--uncapped", action="store_true", help="also time top_afa with k_max=None")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_child(args)
    if args.quick:
        args.n, args.repeats, args.warmup = 1024, 3, 1
    warnings.filterwarnings("ignore")
    k_max = None if args.k_max == "none" else int(args.k_max)
    dev = args.device
    what = (
        torch.cuda.get_device_name()
        if dev.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores visible"
    )
    print(f"device: {dev} ({what}); torch {torch.__version__}")
    import sae_lens

    print(
        f"sae-lens {sae_lens.__version__}; N={args.n} d_in={args.d_in} d_sae={args.d_sae}; "
        f"topk k={args.k}; top_afa k_max={k_max}; dead_frac={args.dead_frac}"
    )

    variants = [("topk", None), ("top_afa", k_max)]
    if args.uncapped:
        variants.append(("top_afa", None))
    models = {}
    for name, cap in variants:
        sae, opt = build(name, args.d_sae, args.d_in, args.k, cap, dev)
        models[(name, cap)] = (sae, make_step(sae, opt))
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(args.n, args.d_in, generator=g).to(dev)
    dead = None
    if args.dead_frac > 0:
        dead = (torch.rand(args.d_sae, generator=g) < args.dead_frac).to(dev)

    times: dict[tuple, list[float]] = {key: [] for key in models}
    for i in range(args.warmup + args.repeats):
        for key, (_, step) in models.items():
            sync(dev)
            t0 = time.perf_counter()
            step(x, dead)
            sync(dev)
            if i >= args.warmup:
                times[key].append(time.perf_counter() - t0)

    base = statistics.median(times[("topk", None)])
    for key, ts in times.items():
        name, cap = key
        label = name if name == "topk" else f"top_afa k_max={cap}"
        med = statistics.median(ts)
        print(
            f"{label:24s} median {med * 1e3:9.1f} ms  (min {min(ts) * 1e3:8.1f}, max {max(ts) * 1e3:8.1f}, "
            f"n={len(ts)})  ratio vs topk {med / base:5.2f}"
        )

    sae = models[("top_afa", k_max)][0]
    with torch.no_grad():
        sel, _ = sae.afa_encode(x)
    print(
        f"top_afa k_max={k_max} on this batch: k mean {sel.k.double().mean():.1f}, "
        f"capped tokens {sel.capped.double().mean():.1%} (the rule is exact for the others)"
    )

    if not args.no_memory:
        for key in models:
            name, cap = key
            label = name if name == "topk" else f"top_afa k_max={cap}"
            if dev.startswith("cuda"):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                models[key][1](x, dead)
                sync(dev)
                print(
                    f"peak memory {label:24s} {torch.cuda.max_memory_allocated() / 2**20:8.0f} MiB (CUDA allocated, one step)"
                )
            else:
                r = child_peak_rss(args, name, cap)
                print(
                    f"peak memory {label:24s} {r['peak_rss_mib']:8.0f} MiB peak RSS of a child running 2 steps "
                    f"({r['peak_rss_mib'] - r['before_steps_mib']:.0f} MiB above its RSS before the steps)"
                )


if __name__ == "__main__":
    main()
