"""Data-parallel cost on this machine: bytes communicated, communication time share, throughput.

Trains the same global batch of synthetic activations three ways, for each architecture, through
SAELens's ``SAETrainer._train_step`` (forward, selection, backward, gradient all-reduce, clip, Adam):

- **2p x 1t**: 2 processes (gloo, CPU), 1 thread each, each on half of the global batch, data-parallel
  with global allocation (sae_allocators.distributed);
- **1p x 2t**: 1 process with 2 threads on the whole batch;
- **1p x 1t**: 1 process, 1 thread (the baseline of both).

Reported per architecture: tokens/s of each (median step time over the timed steps), the bytes each
rank put into collectives per step, split by what they were for (selection candidates and bounds,
gradients, running statistics, trainer counters), and the share of a 2-process step spent inside
collectives (waiting for the other rank included).

    python benchmarks/distributed.py                 # N=2048 tokens, d_in=256, d_sae=4096, k=32
    python benchmarks/distributed.py --quick         # small shapes, a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARCHS = ["mutual_choice", "feature_choice", "batchtopk_zipf", "topk_zipf"]

#: which collectives (by calling function, see sae_allocators.distributed.comm.STATS) serve what
PURPOSE = {
    "_sync_grads": "gradients",
    "global_budget_select": "selection",
    "global_column_select": "selection",
    "token_sizes": "selection",
    "update_topk_threshold": "selection",
    "_train_step": "trainer counters",
    "update_feature_density": "statistics",
    "strided_token_sample": "statistics",
    "_update_demand_global": "statistics",
}


def build(arch: str, a: argparse.Namespace):
    import torch
    from sae_lens import TrainingSAE, TrainingSAEConfig

    torch.manual_seed(0)
    d = {"architecture": arch, "d_in": a.d_in, "d_sae": a.d_sae, "k": a.k}
    return TrainingSAE.from_dict(TrainingSAEConfig.from_dict(d).to_dict())


def trainer_for(sae, a: argparse.Namespace):
    from sae_lens.training.sae_trainer import SAETrainer

    from sae_allocators.testing import runner_config

    cfg = runner_config(sae.cfg, steps=a.steps + a.warmup, batch_tokens=a.tokens)
    return SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=iter(()))


def batches(a: argparse.Namespace):
    import torch

    g = torch.Generator().manual_seed(1)
    mix = torch.randn(a.d_in, a.d_in, generator=g) / a.d_in**0.5
    return [torch.randn(a.tokens, a.d_in, generator=g) @ mix for _ in range(a.steps + a.warmup)]


def time_steps(sae, trainer, data, rows, a: argparse.Namespace, barrier=None) -> list[float]:
    from sae_allocators.distributed import comm

    times = []
    for i, x in enumerate(data):
        if i == a.warmup:
            comm.STATS.clear()
        if barrier:
            barrier()
        t0 = time.perf_counter()
        trainer._train_step(sae=sae, sae_in=x[rows])
        if barrier:
            barrier()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return times


def single(a: argparse.Namespace, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import sae_allocators  # noqa: F401

    out = {}
    data = batches(a)
    for arch in a.archs:
        sae = build(arch, a)
        out[arch] = statistics.median(time_steps(sae, trainer_for(sae, a), data, slice(None), a))
    return out


def worker(a: argparse.Namespace) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    r = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    import sae_allocators  # noqa: F401
    from sae_allocators.distributed import comm, make_data_parallel, sync_trainer

    half = a.tokens // 2
    rows = slice(0, half) if r == 0 else slice(half, a.tokens)
    data = batches(a)
    out = {}
    for arch in a.archs:
        sae = build(arch, a)
        make_data_parallel(sae)
        tr = trainer_for(sae, a)
        sync_trainer(tr)
        times = time_steps(sae, tr, data, rows, a, barrier=dist.barrier)
        n = len(times)
        parts: dict[str, dict[str, float]] = {}
        for fn, s in comm.STATS.items():
            p = parts.setdefault(PURPOSE.get(fn, fn), {"bytes": 0.0, "seconds": 0.0, "calls": 0.0})
            for key in p:
                p[key] += s[key] / n
        out[arch] = {"step_s": statistics.median(times), "mean_step_s": sum(times) / n, "parts": parts}
    with open(os.path.join(os.environ["OUT"], f"rank{r}.json"), "w") as fh:
        json.dump(out, fh)
    dist.destroy_process_group()


def two_processes(a: argparse.Namespace) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "OUT": tmp,
            "OMP_NUM_THREADS": "1",
        }
        argv = [sys.executable, __file__, "--worker", *sys.argv[1:]]
        procs = [subprocess.Popen(argv, env={**env, "RANK": str(r)}) for r in range(2)]
        try:
            for p in procs:
                if p.wait(timeout=1800) != 0:
                    raise SystemExit(f"a worker failed (exit {p.returncode})")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(2)]


def report(a: argparse.Namespace, one1: dict, one2: dict, two: list[dict]) -> str:
    lines = [
        f"N={a.tokens} tokens per global batch, d_in={a.d_in}, d_sae={a.d_sae}, k={a.k}; "
        f"median of {a.steps} steps after {a.warmup} warm-up; "
        f"load average before: {a.load_before}, after: {os.getloadavg()[0]:.2f}",
        "",
        "| architecture | 1p x 1t tok/s | 1p x 2t tok/s | 2p x 1t tok/s | 2p x 1t / 1p x 2t | "
        "KiB/step/rank: gradients | selection | statistics | trainer | comm share of step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arch in a.archs:
        r0 = two[0][arch]
        parts = r0["parts"]
        kib = {
            k: parts.get(k, {}).get("bytes", 0) / 1024
            for k in ("gradients", "selection", "statistics", "trainer counters")
        }
        comm_s = max(sum(p["seconds"] for p in t[arch]["parts"].values()) for t in two)
        share = comm_s / max(t[arch]["mean_step_s"] for t in two)
        t2 = max(t[arch]["step_s"] for t in two)
        lines.append(
            f"| {arch} | {a.tokens / one1[arch]:.0f} | {a.tokens / one2[arch]:.0f} | {a.tokens / t2:.0f} | {one2[arch] / t2:.2f} | "
            f"{kib['gradients']:.0f} | {kib['selection']:.1f} | {kib['statistics']:.1f} | {kib['trainer counters']:.1f} | {share:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="global batch (tokens); each of the 2 ranks takes half")
    p.add_argument("--d-in", type=int, default=256)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--archs", type=lambda s: s.split(","), default=ARCHS)
    p.add_argument("--quick", action="store_true", help="N=256, d_in=32, d_sae=256, k=8, 3 steps")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.tokens, a.d_in, a.d_sae, a.k, a.steps, a.warmup = 256, 32, 256, 8, 3, 1
    for key, value in {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}.items():
        os.environ.setdefault(key, value)
    if a.worker:
        worker(a)
        return
    a.load_before = f"{os.getloadavg()[0]:.2f}"
    one1 = single(a, 1)
    one2 = single(a, 2)
    two = two_processes(a)
    print(report(a, one1, one2, two))
    if a.json:
        a.json.write_text(
            json.dumps(
                {"one_process_1_thread_s": one1, "one_process_2_threads_s": one2, "two_processes": two}, indent=1
            )
        )


if __name__ == "__main__":
    main()
