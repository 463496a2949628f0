"""Tokens per second of SAELens's own training loop, per architecture, against SAELens ``topk``.

``benchmarks/step_speed.py`` times the step alone (forward, losses, backward, clipping, Adam).
SAELens's trainer does more on every step: ``SAETrainer.fit`` moves the batch, applies the
activation scaler, runs the step through ``_train_step`` -- which also sweeps the step's
``feature_acts`` (``.bool().float().sum(...)``) for its dead-latent counters and firing frequencies:
N x F work on SAELens topk's dense codes, k x N on the sparse COO codes of this project's sparse
step -- and updates the learning-rate and coefficient schedules -- then the progress bar and the checkpoint
test. This script runs that loop (``SAETrainer.fit``, SAELens's real class) on activations held in
memory (the cached activations of a real run, here a fixed pool of batches), no W&B, no
evaluation, and reports per architecture:

- ``trainer tok/s``: tokens per second of ``fit`` after ``--warmup`` steps;
- ``step ms`` and ``trainer ms``: the bare step (``step_speed.Stepper``) and one ``fit`` step, side
  by side in this process, and the trainer's share ``1 - step / trainer`` (its bookkeeping);
- the ratios of both to SAELens ``topk`` (below 1.00 = faster).

Round-robin over architectures (``--rounds``), medians, so machine noise hits them alike.

    python benchmarks/trainer_speed.py                          # N 4096, d_in 512, d_sae 32768 and 65536, k 32
    python benchmarks/trainer_speed.py --d-sae 65536 --n 2048 --archs topk mutual_choice feature_choice
    python benchmarks/trainer_speed.py --quick                  # tiny sizes, seconds (a smoke run)
    python benchmarks/trainer_speed.py --device cuda --out reports/trainer-speed

Writes ``trainer_speed.json`` and ``trainer_speed.md`` into ``--out`` (default reports/trainer-speed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")  # before SAELens imports tqdm: no progress bars in the timing

import torch  # noqa: E402

import step_speed  # noqa: E402  (the architectures, built as its step timing builds them)

#: SAELens topk (the reference) and this project's architectures: the sweep's methods
ARCHS = list(step_speed.SWEEP_ARCHS)
QUICK = {"n": 64, "d_in": 16, "d_sae": [256], "k": 4, "steps": 3, "warmup": 1, "rounds": 2}


def _pool(n: int, d_in: int, device: str, size: int = 4) -> list[torch.Tensor]:
    """A few fixed batches (cycled): cached activations, no data pipeline in the timing."""
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(n, d_in, generator=g) * 3).to(device) for _ in range(size)]


def _trainer(sae, n: int, steps: int, device: str, batches: list[torch.Tensor], marks: dict[str, float], warmup: int):
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = LanguageModelSAERunnerConfig(
        sae=sae.cfg,
        model_name="none",
        hook_name="none",
        dataset_path="",
        training_tokens=steps * n,
        train_batch_size_tokens=n,
        device=device,
        checkpoint_path=None,
        output_path=None,
        logger=LoggingConfig(log_to_wandb=False),
        verbose=False,
    )
    gradient = sae.cfg.architecture() == "gradient_topk"

    def provider():
        for i in itertools.count():
            if i == warmup:
                step_speed.sync(device)
                marks["start"] = time.perf_counter()
            x = batches[i % len(batches)]
            yield torch.cat([x, step_speed.gradient_rows(x)], dim=-1) if gradient else x

    return SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=provider())


def time_trainer(arch: str, args, d_sae: int, batches: list[torch.Tensor]) -> float:
    """Seconds per step of ``SAETrainer.fit`` after ``args.warmup`` steps."""
    sae = step_speed.build(arch, args.d_in, d_sae, args.k, args.device, None)
    marks: dict[str, float] = {}
    trainer = _trainer(sae, args.n, args.warmup + args.steps, args.device, batches, marks, args.warmup)
    trainer.fit()
    step_speed.sync(args.device)
    return (time.perf_counter() - marks["start"]) / args.steps


def time_step(arch: str, args, d_sae: int, batches: list[torch.Tensor]) -> float:
    """Seconds per bare step (``step_speed.Stepper``: forward, losses, backward, clipping, Adam)."""
    stepper = step_speed.Stepper(step_speed.build(arch, args.d_in, d_sae, args.k, args.device, None), 0.0)
    for i in range(args.warmup):
        stepper(batches[i % len(batches)])
    step_speed.sync(args.device)
    t0 = time.perf_counter()
    for i in range(args.steps):
        stepper(batches[i % len(batches)])
    step_speed.sync(args.device)
    return (time.perf_counter() - t0) / args.steps


def run(args) -> dict:
    record: dict = {
        "device": step_speed.device_description(args.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "shape": {"n": args.n, "d_in": args.d_in, "k": args.k, "steps": args.steps, "warmup": args.warmup},
        "rounds": args.rounds,
        "points": [],
    }
    import sae_lens

    record["sae_lens"] = sae_lens.__version__
    for d_sae in args.d_sae:
        batches = _pool(args.n, args.d_in, args.device)
        times: dict[str, dict[str, list[float]]] = {a: {"trainer": [], "step": []} for a in args.archs}
        errors: dict[str, str] = {}
        for _ in range(args.rounds):
            for arch in args.archs:
                if arch in errors:
                    continue
                try:
                    times[arch]["trainer"].append(time_trainer(arch, args, d_sae, batches))
                    times[arch]["step"].append(time_step(arch, args, d_sae, batches))
                except Exception as exc:  # recorded, the others go on (e.g. out of memory)
                    errors[arch] = f"{type(exc).__name__}: {exc}"
        record["points"].append({"d_sae": d_sae, "times": times, "errors": errors})
        print(markdown_point(record["points"][-1], args.n), flush=True)
    return record


def _median(v: list[float]) -> float | None:
    return statistics.median(v) if v else None


def markdown_point(point: dict, n: int) -> str:
    times = point["times"]
    ref_t = _median(times.get("topk", {}).get("trainer", []))
    ref_s = _median(times.get("topk", {}).get("step", []))
    lines = [
        f"d_sae {point['d_sae']}, N {n}:",
        "",
        "| architecture | trainer tok/s | trainer ms | step ms | trainer share | trainer × topk | step × topk |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arch, t in times.items():
        if arch in point["errors"]:
            lines.append(f"| {arch} | failed: {point['errors'][arch]} | | | | | |")
            continue
        tr, st = _median(t["trainer"]), _median(t["step"])
        if tr is None or st is None:
            continue
        share = 1 - st / tr
        rt = f"{tr / ref_t:.2f}" if ref_t else "–"
        rs = f"{st / ref_s:.2f}" if ref_s else "–"
        lines.append(f"| {arch} | {n / tr:,.0f} | {tr * 1e3:.1f} | {st * 1e3:.1f} | {share:.0%} | {rt} | {rs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=4096, help="tokens per step")
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, nargs="+", default=[32768, 65536])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    p.add_argument("--out", type=Path, default=Path("reports/trainer-speed"))
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "topk" not in args.archs:
        args.archs = ["topk", *args.archs]  # the reference
    record = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trainer_speed.json").write_text(json.dumps(record, indent=1))
    md = [
        f"SAELens's training loop (SAETrainer.fit) per architecture; {record['device']}, torch {record['torch']}, "
        f"sae-lens {record['sae_lens']}, {record['threads']} threads, load average {record['load_average']}; "
        f"medians of {args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up, k {args.k}, "
        f"d_in {args.d_in}.",
        "",
    ]
    md += [markdown_point(pt, args.n) for pt in record["points"]]
    (args.out / "trainer_speed.md").write_text("\n".join(md))
    print(f"wrote {args.out / 'trainer_speed.md'}")
    return 1 if any(pt["errors"] for pt in record["points"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
