"""Time full training steps of each architecture against SAELens's ``topk`` at identical shapes.

A step is what SAELens's trainer does: ``training_forward_pass`` (encode, select, decode, MSE,
auxiliary loss), ``backward``, gradient clipping, ``Adam.step``, ``zero_grad``. All architectures
live in one process and are timed round-robin (one step of each per round), so machine noise
hits them alike; the figure reported per architecture is the median over rounds, and the
ratio is to the median of ``topk``. Peak memory of a step is measured per architecture in a
fresh subprocess, on the second step (CPU: peak RSS above the RSS before the step, sampled
every 0.5 ms, with glibc told to return large blocks to the OS at once so RSS follows live
memory; CUDA: ``max_memory_allocated`` above the memory allocated before the step).

Also checks, on the first batch, that the fast selections are exact: Mutual Choice against a
plain full ``torch.topk`` (SAELens's BatchTopK activation) and Feature Choice against a
per-feature ``torch.topk`` loop.

    python benchmarks/step_speed.py                # N=4096, d_in=512, d_sae=8192, k=32
    python benchmarks/step_speed.py --quick        # small shapes, a few seconds
    python benchmarks/step_speed.py --device cuda
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ARCHS = ["topk", "batchtopk", "mutual_choice", "feature_choice", "feature_choice_uniform", "topk_zipf"]


def build(arch: str, d_in: int, d_sae: int, k: int, device: str, aux_loss: str | None):
    import sae_allocators  # noqa: F401
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from sae_allocators.architectures.feature_choice import FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig
    from sae_allocators.architectures.mutual_choice import MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig
    from sae_allocators.architectures.topk_zipf import TopKZipfTrainingSAE, TopKZipfTrainingSAEConfig

    common = dict(d_in=d_in, d_sae=d_sae, device=device)
    ours = {} if aux_loss is None else {"aux_loss": aux_loss}
    torch.manual_seed(0)
    if arch == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **common))
    if arch == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=float(k), **common))
    if arch == "mutual_choice":
        return MutualChoiceTrainingSAE(MutualChoiceTrainingSAEConfig(k=float(k), **common, **ours))
    if arch == "feature_choice":
        return FeatureChoiceTrainingSAE(FeatureChoiceTrainingSAEConfig(k=float(k), **common, **ours))
    if arch == "feature_choice_uniform":
        return FeatureChoiceTrainingSAE(FeatureChoiceTrainingSAEConfig(k=float(k), capacity="uniform", **common, **ours))
    if arch == "topk_zipf":
        return TopKZipfTrainingSAE(TopKZipfTrainingSAEConfig(k=k, **common, **ours))
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


class Stepper:
    def __init__(self, sae, dead_frac: float):
        self.sae = sae
        self.opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
        f = sae.cfg.d_sae
        self.dead = torch.zeros(f, dtype=torch.bool, device=sae.W_dec.device)
        self.dead[: int(dead_frac * f)] = True
        self.n = 0

    def __call__(self, x: torch.Tensor) -> None:
        from sae_lens.saes.sae import TrainStepInput

        self.sae.train()
        out = self.sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=self.dead, n_training_steps=self.n, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad()
        self.n += 1


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def data(n: int, d_in: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g).to(device)


def check_exact(args) -> dict[str, bool]:
    from sae_allocators.allocation.batch import batch_topk_reference, mutual_choice_select
    from sae_allocators.allocation.feature_choice import capacities, feature_choice_reference, feature_choice_select, usage_rank

    x = data(args.n, args.d_in, args.device, 1)
    out = {}
    with torch.no_grad():
        sae = build("mutual_choice", args.d_in, args.d_sae, args.k, args.device, None)
        pre = sae.encode_with_hidden_pre(x)[1]
        codes, _ = mutual_choice_select(pre, float(args.k))
        out["mutual_choice == full torch.topk"] = torch.equal(codes, batch_topk_reference(pre, float(args.k)))
        usage = torch.rand(args.d_sae, generator=torch.Generator().manual_seed(0)).to(args.device)
        caps = capacities(args.n, float(args.k), args.d_sae, rank=usage_rank(usage), exponent=0.5)
        codes, _ = feature_choice_select(pre, caps)
        out["feature_choice == per-feature torch.topk"] = torch.equal(codes, feature_choice_reference(pre, caps))
    return out


def time_all(args) -> dict[str, list[float]]:
    steppers = {a: Stepper(build(a, args.d_in, args.d_sae, args.k, args.device, args.aux_loss), args.dead_frac) for a in args.archs}
    batches = [data(args.n, args.d_in, args.device, s) for s in range(4)]
    for _ in range(args.warmup):
        for st in steppers.values():
            st(batches[0])
    sync(args.device)
    times: dict[str, list[float]] = {a: [] for a in args.archs}
    for r in range(args.rounds):
        order = args.archs if r % 2 == 0 else list(reversed(args.archs))
        for a in order:
            x = batches[r % len(batches)]
            sync(args.device)
            t0 = time.perf_counter()
            steppers[a](x)
            sync(args.device)
            times[a].append(time.perf_counter() - t0)
    return times


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(args) -> None:
    st = Stepper(build(args.archs[0], args.d_in, args.d_sae, args.k, args.device, args.aux_loss), args.dead_frac)
    x = data(args.n, args.d_in, args.device, 0)
    if args.device.startswith("cuda"):
        st(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        st(x)
        torch.cuda.synchronize()
        print(json.dumps({"peak": torch.cuda.max_memory_allocated() - base}))
        return
    import threading

    st(x)  # warm-up: Adam state, library initialisation
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    st(x)
    done.set()
    th.join()
    print(json.dumps({"peak": peak[0] - base}))


def memory_all(args) -> dict[str, float]:
    out = {}
    for a in args.archs:
        cmd = [sys.executable, __file__, "--_memory-child", "--archs", a, "--n", str(args.n), "--d-in", str(args.d_in), "--d-sae", str(args.d_sae), "--k", str(args.k), "--device", args.device, "--dead-frac", str(args.dead_frac)]
        if args.aux_loss:
            cmd += ["--aux-loss", args.aux_loss]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled", "MALLOC_MMAP_THRESHOLD_": "131072"})
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            out[a] = float("nan")
            continue
        out[a] = json.loads(res.stdout.strip().splitlines()[-1])["peak"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="tokens per batch")
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per architecture first (feature_choice's estimate adapts over the first few)")
    p.add_argument("--dead-frac", type=float, default=0.0, help="fraction of latents marked dead (exercises the aux loss)")
    p.add_argument("--aux-loss", default=None, help="aux_loss for this project's architectures (default: each config's default)")
    p.add_argument("--archs", nargs="+", default=ARCHS)
    p.add_argument("--quick", action="store_true", help="N=1024, d_in=128, d_sae=2048, k=16, 5 rounds")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--_memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d_in, args.d_sae, args.k, args.rounds = 1024, 128, 2048, 16, 5
    if args._memory_child:
        memory_child(args)
        return 0
    if "topk" not in args.archs:
        args.archs = ["topk", *args.archs]
    import sae_lens

    dev = args.device
    desc = torch.cuda.get_device_name(0) if dev.startswith("cuda") else f"CPU, torch threads={torch.get_num_threads()}, os.cpu_count={os.cpu_count()}"
    try:
        load = "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = ""
    print(f"device: {dev} ({desc}); {load}")
    print(f"torch {torch.__version__}, sae-lens {sae_lens.__version__}")
    print(f"shapes: N={args.n} d_in={args.d_in} d_sae={args.d_sae} k={args.k}; dead_frac={args.dead_frac}; rounds={args.rounds}")
    if not args.no_check:
        for name, ok in check_exact(args).items():
            print(f"exact selection: {name}: {ok}")
    times = time_all(args)
    ref = statistics.median(times["topk"])
    ref_min = min(times["topk"])
    mem = {} if args.no_memory else memory_all(args)
    print(f"{'architecture':<24}{'median step (s)':>16}{'min (s)':>10}{'median ratio':>14}{'min ratio':>11}{'peak mem (MiB)':>16}{'mem ratio':>11}")
    for a in args.archs:
        med = statistics.median(times[a])
        line = f"{a:<24}{med:>16.3f}{min(times[a]):>10.3f}{med / ref:>14.3f}{min(times[a]) / ref_min:>11.3f}"
        if mem:
            line += f"{mem[a] / 2**20:>16.1f}{mem[a] / mem['topk']:>11.3f}"
        print(line)
    print("ratios are to topk in this process; 'min ratio' is less sensitive to other load on the machine")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
