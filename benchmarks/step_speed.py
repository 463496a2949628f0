"""Time full training steps of each architecture against SAELens's ``topk`` at identical shapes.

Two reference rows come first: ``floor`` -- the encoder matmul ``relu(x @ W_enc + b)`` alone,
which every SAE pays -- and, when EleutherAI's ``sparsify`` is importable (``pip install --no-deps
eai-sparsify einops simple-parsing natsort schedulefree accelerate``; a reference, not a
dependency), ``sparsify_topk``: sparsify 1.3's TopK training step (its fused encoder with sparse
backward, its ``embedding_bag`` decoder, FVU loss, gradient clipping, Adam) at the same shapes.
Every row is printed as a ratio to the floor, to SAELens ``topk`` and to sparsify.

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
    python benchmarks/step_speed.py --dense         # this project's architectures on the dense reference path
    python benchmarks/step_speed.py --d-sae 32768 --n 2048
    python benchmarks/step_speed.py --sweep --device cuda   # the wide-dictionary sweep (below)
    python benchmarks/step_speed.py --quick-sweep            # the same at tiny sizes (seconds)
    python benchmarks/step_speed.py --breakdown --d-sae 65536 --n 2048   # where each step's time goes

``--breakdown`` profiles each method's step (``torch.profiler``; the step's phases are labelled
``step.encode``, ``step.select``, ``step.values``, ``step.decode``, ``step.mse``, ``step.aux_loss``,
``step.after_step`` in this project's step, ``step.backward`` and ``step.clip_adam`` here) and
counts, in one step, the ATen ops that touch an ``[N, F]``-sized tensor (passes over N x F) or,
of the rest, an ``[F, d]``-sized one (passes over the weights), forward, backward and Adam apart;
it writes ``breakdown.md`` and ``breakdown.json`` into ``--out``.

``--sweep`` runs the timing above at every point of a grid -- d_sae in {32768, 65536, 131072},
N in {2048, 4096}, d_in in {512, 768}, k in {32, 64} (``--sweep-d-sae`` / ``--sweep-n`` /
``--sweep-d-in`` / ``--sweep-k`` change the lists) -- for the floor, sparsify's TopK step (when
importable), SAELens ``topk`` and each architecture of this project (``SWEEP_ARCHS``), all in one
process, round-robin as above, one point after the other. Peak memory: on CUDA measured in the same
process (``max_memory_allocated`` above the memory allocated before one more step of each method);
on the CPU in a fresh process per method and point (slow: ``--no-memory`` skips it). It writes
``sweep.json`` (every time of every round, peaks, errors, device and versions), ``sweep.md`` (medians
and ratios to sparsify and to SAELens ``topk``) and ``sweep.png`` (step time against d_sae per
method, log scales) into ``--out`` (default ``reports/step-speed-sweep``). A method that fails at a
point (e.g. out of memory) is recorded with its error; the sweep goes on.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

ARCHS = [
    "topk",
    "batchtopk",
    "mutual_choice",
    "feature_choice",
    "feature_choice_uniform",
    "topk_zipf",
    "batchtopk_zipf",
    "abstopk_zipf",
    "gradient_topk",
    "top_afa",
]
#: reference rows (not SAELens SAEs): the encoder-matmul floor and sparsify's TopK step
REFERENCES = ["floor", "sparsify_topk"]
#: the sweep's methods besides the references: SAELens topk and each architecture of this project
SWEEP_ARCHS = [
    "topk",
    "mutual_choice",
    "feature_choice",
    "feature_choice_uniform",
    "batchtopk_zipf",
    "topk_zipf",
    "abstopk_zipf",
    "top_afa",
    "gradient_topk",
]
SWEEP_D_SAE = [32768, 65536, 131072]
SWEEP_N = [2048, 4096]
SWEEP_D_IN = [512, 768]
SWEEP_K = [32, 64]
#: --quick-sweep: tiny sizes, for a smoke run of the whole sweep (seconds on a CPU)
QUICK_SWEEP = {"d_sae": [256, 512], "n": [64], "d_in": [16], "k": [4], "rounds": 2, "warmup": 1}


def build(arch: str, d_in: int, d_sae: int, k: int, device: str, aux_loss: str | None, sparse_step: bool = True):
    import sae_allocators  # noqa: F401
    from sae_allocators.architectures.abstopk_zipf import AbsTopKZipfTrainingSAE, AbsTopKZipfTrainingSAEConfig
    from sae_allocators.architectures.batchtopk_zipf import BatchTopKZipfTrainingSAE, BatchTopKZipfTrainingSAEConfig
    from sae_allocators.architectures.gradient_topk import GradientTopKTrainingSAE, GradientTopKTrainingSAEConfig
    from sae_allocators.architectures.top_afa import TopAFATrainingSAE, TopAFATrainingSAEConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from sae_allocators.architectures.feature_choice import FeatureChoiceTrainingSAE, FeatureChoiceTrainingSAEConfig
    from sae_allocators.architectures.mutual_choice import MutualChoiceTrainingSAE, MutualChoiceTrainingSAEConfig
    from sae_allocators.architectures.topk_zipf import TopKZipfTrainingSAE, TopKZipfTrainingSAEConfig

    common = dict(d_in=d_in, d_sae=d_sae, device=device)
    ours = {"sparse_step": sparse_step} if aux_loss is None else {"aux_loss": aux_loss, "sparse_step": sparse_step}
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
        return FeatureChoiceTrainingSAE(
            FeatureChoiceTrainingSAEConfig(k=float(k), capacity="uniform", **common, **ours)
        )
    if arch == "topk_zipf":
        return TopKZipfTrainingSAE(TopKZipfTrainingSAEConfig(k=k, **common, **ours))
    if arch == "batchtopk_zipf":
        return BatchTopKZipfTrainingSAE(BatchTopKZipfTrainingSAEConfig(k=float(k), **common, **ours))
    if arch == "abstopk_zipf":
        return AbsTopKZipfTrainingSAE(AbsTopKZipfTrainingSAEConfig(k=k, **common, **ours))
    if arch == "gradient_topk":  # trained on [x | g] rows (see data(): the step gets gradients)
        return GradientTopKTrainingSAE(GradientTopKTrainingSAEConfig(k=k, **common, **ours))
    if arch == "top_afa":
        return TopAFATrainingSAE(TopAFATrainingSAEConfig(k_max=2 * k, **common, **ours))
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
        self.update(self.backward(self.forward(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from sae_lens.saes.sae import TrainStepInput

        if getattr(self.sae.cfg, "architecture", lambda: "")() == "gradient_topk":
            x = torch.cat([x, gradient_rows(x)], dim=-1)  # [x | dL/dx], as its gradient store yields
        self.sae.train()
        out = self.sae.training_forward_pass(
            TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=self.dead, n_training_steps=self.n, is_logging_step=False
            )
        )
        return out.loss

    def backward(self, loss: torch.Tensor) -> None:
        with torch.profiler.record_function("step.backward"):
            loss.backward()

    def update(self, _: None = None) -> None:
        with torch.profiler.record_function("step.clip_adam"):
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad()
        self.n += 1


def gradient_rows(x: torch.Tensor) -> torch.Tensor:
    """Stand-in loss gradients for gradient_topk (fixed seed; only their shape matters for speed)."""
    g = torch.Generator().manual_seed(7)
    return (torch.randn(x.shape, generator=g) * 1e-3).to(device=x.device, dtype=x.dtype)


class Floor:
    """The encoder matmul alone, ``relu(x @ W_enc + b_enc)``: the floor every SAE's step pays."""

    def __init__(self, d_in: int, d_sae: int, device: str):
        g = torch.Generator().manual_seed(0)
        self.w = (torch.randn(d_in, d_sae, generator=g) * 0.02).to(device)
        self.b = torch.zeros(d_sae, device=device)

    def __call__(self, x: torch.Tensor) -> None:
        torch.relu(torch.addmm(self.b, x, self.w))


class SparsifyTopK:
    """EleutherAI sparsify's TopK training step (``SparseCoder.forward``'s FVU loss on its fused
    encoder and eager ``embedding_bag`` decoder), clipping and Adam, at the same shapes."""

    def __init__(self, d_in: int, d_sae: int, k: int, device: str):
        from sparsify.fused_encoder import fused_encoder
        from sparsify.utils import eager_decode

        self.encode, self.decode, self.k = fused_encoder, eager_decode, k
        g = torch.Generator().manual_seed(0)
        self.w_enc = torch.nn.Parameter((torch.randn(d_sae, d_in, generator=g) * 0.02).to(device))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae, device=device))
        self.w_dec = torch.nn.Parameter(self.w_enc.detach().clone())
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in, device=device))
        self.params = [self.w_enc, self.b_enc, self.w_dec, self.b_dec]
        self.opt = torch.optim.Adam(self.params, lr=1e-4)

    def __call__(self, x: torch.Tensor) -> None:
        self.update(self.backward(self.forward(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.profiler.record_function("step.encode"):  # the fused encoder: matmul, top-k together
            top_acts, top_indices, _ = self.encode(x - self.b_dec, self.w_enc, self.b_enc, self.k, "topk")
        with torch.profiler.record_function("step.decode"):
            out = self.decode(top_indices, top_acts, self.w_dec.mT) + self.b_dec
        with torch.profiler.record_function("step.mse"):
            return (out - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()

    def backward(self, loss: torch.Tensor) -> None:
        with torch.profiler.record_function("step.backward"):
            loss.backward()

    def update(self, _: None = None) -> None:
        with torch.profiler.record_function("step.clip_adam"):
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad()


def sparsify_available() -> bool:
    try:
        import sparsify.fused_encoder  # noqa: F401
        import sparsify.utils  # noqa: F401
    except Exception:  # noqa: BLE001 -- any import failure means: no reference row
        return False
    return True


def make_stepper(name: str, args):
    if name == "floor":
        return Floor(args.d_in, args.d_sae, args.device)
    if name == "sparsify_topk":
        return SparsifyTopK(args.d_in, args.d_sae, args.k, args.device)
    return Stepper(
        build(name, args.d_in, args.d_sae, args.k, args.device, args.aux_loss, sparse_step=not args.dense),
        args.dead_frac,
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def data(n: int, d_in: int, device: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g).to(device)


def check_exact(args) -> dict[str, bool]:
    from sae_allocators.allocation.batch import batch_topk_reference, mutual_choice_select
    from sae_allocators.allocation.feature_choice import (
        capacities,
        feature_choice_reference,
        feature_choice_select,
        usage_rank,
    )

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


def time_all(
    args, failures: dict[str, str] | None = None, peaks: dict[str, float] | None = None
) -> dict[str, list[float]]:
    """Median-ready step times of every row of ``args.archs``, round-robin in this process.

    With ``failures`` (the sweep), a row whose build or step raises is dropped from the rounds and
    its error recorded there instead of stopping the run. With ``peaks`` (CUDA only), each row's
    peak memory of one more step is measured afterwards in this process (:func:`cuda_peak`).
    """
    archs = list(args.archs)

    def attempt(a: str, fn):
        if failures is None:
            return fn()
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 -- recorded; the other rows go on
            failures[a] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            archs.remove(a)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            return None

    steppers = {}
    for a in list(archs):
        st = attempt(a, lambda a=a: make_stepper(a, args))
        if st is not None:
            steppers[a] = st
    batches = [data(args.n, args.d_in, args.device, s) for s in range(4)]
    for _ in range(args.warmup):
        for a in list(archs):
            attempt(a, lambda a=a: steppers[a](batches[0]))
    sync(args.device)
    times: dict[str, list[float]] = {a: [] for a in args.archs}
    for r in range(args.rounds):
        order = list(archs) if r % 2 == 0 else list(reversed(archs))
        for a in order:
            x = batches[r % len(batches)]
            sync(args.device)
            t0 = time.perf_counter()
            if attempt(a, lambda a=a: steppers[a](x)) is None and a not in archs:
                continue
            sync(args.device)
            times[a].append(time.perf_counter() - t0)
    if peaks is not None and args.device.startswith("cuda"):
        for a in list(archs):
            peak = attempt(a, lambda a=a: cuda_peak(steppers[a], batches[0]))
            if peak is not None:
                peaks[a] = peak
    return times


def cuda_peak(st, x: torch.Tensor) -> float:
    """Peak CUDA memory of one step of ``st`` above the memory allocated before it (bytes)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    st(x)
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(args) -> None:
    st = make_stepper(args.archs[0], args)
    x = data(args.n, args.d_in, args.device, 0)
    if args.device.startswith("cuda"):
        st(x)
        print(json.dumps({"peak": cuda_peak(st, x)}))
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
        cmd = [
            sys.executable,
            __file__,
            "--_memory-child",
            "--archs",
            a,
            "--n",
            str(args.n),
            "--d-in",
            str(args.d_in),
            "--d-sae",
            str(args.d_sae),
            "--k",
            str(args.k),
            "--device",
            args.device,
            "--dead-frac",
            str(args.dead_frac),
        ]
        if args.aux_loss:
            cmd += ["--aux-loss", args.aux_loss]
        if args.dense:
            cmd += ["--dense"]
        res = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env={**os.environ, "WANDB_MODE": "disabled", "MALLOC_MMAP_THRESHOLD_": "131072"},
        )
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            out[a] = float("nan")
            continue
        out[a] = json.loads(res.stdout.strip().splitlines()[-1])["peak"]
    return out


# --- the sweep: the same timing at every point of a grid of shapes ---------------------------------


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu (torch threads={torch.get_num_threads()}, os.cpu_count={os.cpu_count()})"


def sweep_points(args) -> list[dict[str, int]]:
    """The grid, d_sae varying fastest (the plot's x-axis)."""
    return [
        {"d_in": d_in, "n": n, "k": k, "d_sae": d_sae}
        for d_in, n, k, d_sae in itertools.product(args.sweep_d_in, args.sweep_n, args.sweep_k, args.sweep_d_sae)
    ]


def run_sweep(args) -> dict:
    """Time every method at every point of the grid (:func:`time_all` per point); the record."""
    import sae_lens

    refs = ["floor"] + (["sparsify_topk"] if sparsify_available() else [])
    methods = refs + [a for a in args.archs if a not in refs]
    try:
        from importlib.metadata import version

        sparsify_version = version("eai-sparsify") if "sparsify_topk" in refs else None
    except Exception:  # noqa: BLE001 -- importable without metadata: unknown version
        sparsify_version = "unknown"
    record = {
        "device": device_description(args.device),
        "torch": torch.__version__,
        "sae_lens": sae_lens.__version__,
        "sparsify": sparsify_version,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "path": "dense reference (sparse_step=False)" if args.dense else "sparse training step (sparse_step=True)",
        "methods": methods,
        "memory": "none"
        if args.no_memory
        else (
            "cuda max_memory_allocated, in process"
            if args.device.startswith("cuda")
            else "peak RSS, a fresh process per method"
        ),
        "argv": sys.argv[1:],
        "points": [],
    }
    for point in sweep_points(args):
        pargs = copy.copy(args)
        pargs.n, pargs.d_in, pargs.d_sae, pargs.k = point["n"], point["d_in"], point["d_sae"], point["k"]
        pargs.archs = list(methods)
        failures: dict[str, str] = {}
        peaks: dict[str, float] = {}
        print(f"sweep point N={pargs.n} d_in={pargs.d_in} d_sae={pargs.d_sae} k={pargs.k}", flush=True)
        times = time_all(pargs, failures=failures, peaks=None if args.no_memory else peaks)
        if not args.no_memory and not args.device.startswith("cuda"):
            pargs.archs = [m for m in methods if m not in failures]
            peaks = {m: v for m, v in memory_all(pargs).items() if not math.isnan(v)}
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        rows = {}
        for m in methods:
            ok = m not in failures and len(times.get(m, [])) == args.rounds
            rows[m] = {
                "median_s": statistics.median(times[m]) if ok else None,
                "min_s": min(times[m]) if ok else None,
                "times_s": times.get(m, []),
                "peak_bytes": peaks.get(m),
                "error": failures.get(m),
            }
        record["points"].append({**point, "methods": rows})
    return record


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def sweep_markdown(record: dict) -> str:
    """The record as Markdown: medians, ratios to sparsify and to SAELens topk, peak memory."""
    methods = record["methods"]
    head = "| N | d_in | k | d_sae | " + " | ".join(methods) + " |"
    rule = "| --- " * (4 + len(methods)) + "|"

    def table(cell) -> list[str]:
        lines = [head, rule]
        for p in record["points"]:
            cells = [cell(p, m) for m in methods]
            lines.append(f"| {p['n']} | {p['d_in']} | {p['k']} | {p['d_sae']} | " + " | ".join(cells) + " |")
        return lines

    def med(p, m):
        return p["methods"][m]["median_s"]

    out = [
        "# Training-step sweep (benchmarks/step_speed.py --sweep)",
        "",
        f"Device: {record['device']}; torch {record['torch']}, sae-lens {record['sae_lens']}, "
        f"sparsify {record['sparsify'] or 'not importable (no reference column)'}; {record['rounds']} rounds after "
        f"{record['warmup']} warm-up step(s) per method; this project's architectures on the {record['path']}; "
        f"peak memory: {record['memory']}.",
        "",
        "A step: forward, losses, backward, gradient clipping, Adam (the floor: the encoder matmul only). "
        "Medians of rounds, every method round-robin in one process.",
        "",
        "## Median step (ms)",
        "",
        *table(lambda p, m: "—" if med(p, m) is None else f"{med(p, m) * 1e3:.1f}"),
    ]
    if "sparsify_topk" in methods:
        out += [
            "",
            "## × sparsify TopK (median / sparsify's median)",
            "",
            *table(lambda p, m: _ratio(med(p, m), med(p, "sparsify_topk"))),
        ]
    if "topk" in methods:
        out += [
            "",
            "## × SAELens topk (median / topk's median)",
            "",
            *table(lambda p, m: _ratio(med(p, m), med(p, "topk"))),
        ]
    if any(r["peak_bytes"] is not None for p in record["points"] for r in p["methods"].values()):

        def mem(p, m):
            v = p["methods"][m]["peak_bytes"]
            return "—" if v is None else f"{v / 2**20:.0f}"

        out += ["", "## Peak memory of a step (MiB)", "", *table(mem)]
        if "topk" in methods:

            def mem_ratio(p, m):
                return _ratio(p["methods"][m]["peak_bytes"], p["methods"]["topk"]["peak_bytes"])

            out += ["", "## Peak memory × SAELens topk", "", *table(mem_ratio)]
    errors = [(p, m, r["error"]) for p in record["points"] for m, r in p["methods"].items() if r["error"]]
    if errors:
        out += ["", "## Failures", ""]
        out += [f"- N={p['n']} d_in={p['d_in']} k={p['k']} d_sae={p['d_sae']}, {m}: {e}" for p, m, e in errors]
    return "\n".join(out) + "\n"


def sweep_plot(record: dict, path: Path) -> None:
    """Step time against d_sae per method (log-log), one panel per (N, d_in, k)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    combos = sorted({(p["n"], p["d_in"], p["k"]) for p in record["points"]})
    cols = min(4, len(combos))
    rows = -(-len(combos) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols + 2.4, 3.4 * rows + 0.6), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab20").colors
    for ax, (n, d_in, k) in zip(axes.flat, combos):
        pts = sorted(
            (p for p in record["points"] if (p["n"], p["d_in"], p["k"]) == (n, d_in, k)), key=lambda p: p["d_sae"]
        )
        for i, m in enumerate(record["methods"]):
            xs = [p["d_sae"] for p in pts if p["methods"][m]["median_s"] is not None]
            ys = [p["methods"][m]["median_s"] * 1e3 for p in pts if p["methods"][m]["median_s"] is not None]
            if xs:
                style = "--" if m in REFERENCES or m == "topk" else "-"  # references dashed
                ax.plot(xs, ys, style, marker="o", markersize=3, color=colors[(2 * i) % 20 + (2 * i) // 20], label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"N={n}, d_in={d_in}, k={k}", fontsize=9)
        ax.set_xlabel("d_sae")
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes.flat[len(combos) :]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("median step (ms)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle(f"Training step vs d_sae: {record['device']}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 2.2 / fig.get_figwidth(), 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: the step's phases as ``torch.profiler`` labels (``step.<name>``; sae_allocators.architectures._step.phase)
PHASES = ["encode", "select", "values", "decode", "mse", "aux_loss", "after_step", "backward", "clip_adam"]


#: ATen ops that read or write only the indexed entries of a large tensor: not passes over it
SPARSE_ACCESS = {
    "index_select",
    "gather",
    "index",
    "take",
    "embedding",
    "embedding_bag",
    "_embedding_bag",
    "_embedding_bag_forward_only",
    "index_add",
    "index_put",
    "_index_put_impl",
    "scatter",
    "scatter_add",
    "index_copy",
    "masked_select",
}


class PassCounter:
    """Counts, under a ``TorchDispatchMode``, the ATen ops of a step that make a pass over a dense
    tensor of N x F elements and, of the others, over one of F x d elements (the weights):
    an op touching such a tensor counts, except views and the indexed reads and writes of
    :data:`SPARSE_ACCESS` (they touch the kept entries only; counted apart, as ``sparse``).
    ``ops`` keeps the op names of each kind."""

    def __init__(self, nf: int, fd: int):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        counter = self
        self.nf, self.fd = nf, fd
        self.counts = {"NF": 0, "Fd": 0, "sparse": 0}
        self.ops: dict[str, dict[str, int]] = {"NF": {}, "Fd": {}, "sparse": {}}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not func.is_view:
                    sizes = [
                        t.numel()
                        for t in tree_leaves((args, kwargs, out))
                        if isinstance(t, torch.Tensor) and t.layout == torch.strided
                    ]
                    kind = "NF" if counter.nf in sizes else "Fd" if counter.fd in sizes else None
                    name = str(func.overloadpacket.__name__).rstrip("_")
                    if kind and name in SPARSE_ACCESS:
                        kind = "sparse"
                    if kind:
                        counter.counts[kind] += 1
                        counter.ops[kind][name] = counter.ops[kind].get(name, 0) + 1
                return out

        self.mode = Mode()


def count_passes(st, x: torch.Tensor, nf: int, fd: int) -> dict[str, dict]:
    """The passes over N x F and F x d of one step of ``st`` (forward, backward, clip + Adam apart)."""
    out = {}
    loss = None
    for part in ("forward", "backward", "update"):
        pc = PassCounter(nf, fd)
        with pc.mode:
            if part == "forward":
                loss = st.forward(x)
            elif part == "backward":
                st.backward(loss)
            else:
                st.update()
        out[part] = {"counts": pc.counts, "ops": pc.ops}
    return out


def run_breakdown(args) -> dict:
    """Per method: the median step time and the time of each phase (``torch.profiler``, inclusive
    times of the ``step.*`` labels, averaged over ``args.rounds`` profiled steps), and the passes
    over N x F and F x d of one step (:func:`count_passes`)."""
    from torch.profiler import ProfilerActivity, profile

    refs = ["sparsify_topk"] if sparsify_available() else []
    methods = refs + [a for a in args.archs if a not in refs and a != "floor"]
    batches = [data(args.n, args.d_in, args.device, s) for s in range(4)]
    cuda = args.device.startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows: dict[str, dict] = {}
    for m in methods:
        st = make_stepper(m, args)
        for i in range(args.warmup):
            st(batches[i % len(batches)])
        sync(args.device)
        walls = []
        with profile(activities=acts) as prof:
            for r in range(args.rounds):
                sync(args.device)
                t0 = time.perf_counter()
                st(batches[r % len(batches)])
                sync(args.device)
                walls.append(time.perf_counter() - t0)
        phases = {}
        for ev in prof.key_averages():
            if ev.key.startswith("step.") and ev.key[5:] in PHASES:
                us = ev.device_time_total if cuda else ev.cpu_time_total
                phases[ev.key[5:]] = us / 1e3 / args.rounds
        passes = count_passes(st, batches[0], args.n * args.d_sae, args.d_sae * args.d_in)
        rows[m] = {"median_ms": statistics.median(walls) * 1e3, "phases_ms": phases, "passes": passes}
        del st
    return {
        "device": device_description(args.device),
        "shape": {"n": args.n, "d_in": args.d_in, "d_sae": args.d_sae, "k": args.k, "dead_frac": args.dead_frac},
        "rounds": args.rounds,
        "rows": rows,
    }


def breakdown_markdown(record: dict) -> str:
    sh = record["shape"]
    head = ["method", "step (ms)"] + PHASES + ["other", "N·F passes (fwd/bwd)", "F·d passes (fwd/bwd/Adam)"]
    lines = [
        f"Step breakdown at N={sh['n']}, d_in={sh['d_in']}, d_sae={sh['d_sae']}, k={sh['k']} "
        f"(dead_frac {sh['dead_frac']}); {record['device']}; {record['rounds']} profiled steps per method. "
        "Phase columns: ms per step (profiler, inclusive); other = step - sum of phases.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for m, row in record["rows"].items():
        ph = row["phases_ms"]
        cells = [m, f"{row['median_ms']:.0f}"] + [f"{ph[p]:.0f}" if p in ph else "–" for p in PHASES]
        cells.append(f"{row['median_ms'] - sum(ph.values()):.0f}")
        pa = row["passes"]
        cells.append(f"{pa['forward']['counts']['NF']}/{pa['backward']['counts']['NF']}")
        cells.append(f"{pa['forward']['counts']['Fd']}/{pa['backward']['counts']['Fd']}/{pa['update']['counts']['Fd']}")
        lines.append("| " + " | ".join(cells) + " |")

    def ops(d: dict[str, int]) -> str:
        return ", ".join(f"{k}×{v}" if v > 1 else k for k, v in sorted(d.items())) or "–"

    for kind, title in (("NF", "over N·F"), ("Fd", "over F·d"), ("sparse", "indexed (kept entries only)")):
        lines += ["", f"Ops {title} per method (forward; backward; clip + Adam):", ""]
        for m, row in record["rows"].items():
            pa = row["passes"]
            lines.append(
                f"- {m}: {ops(pa['forward']['ops'][kind])}; {ops(pa['backward']['ops'][kind])}; "
                f"{ops(pa['update']['ops'][kind])}"
            )
    return "\n".join(lines) + "\n"


def breakdown_main(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = run_breakdown(args)
    (out / "breakdown.json").write_text(json.dumps(record, indent=1) + "\n")
    md = breakdown_markdown(record)
    (out / "breakdown.md").write_text(md)
    print(md)
    return 0


def sweep_main(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"sweep on {device_description(args.device)}; writing {out}/sweep.json, sweep.md, sweep.png", flush=True)
    record = run_sweep(args)
    (out / "sweep.json").write_text(json.dumps(record, indent=1) + "\n")
    md = sweep_markdown(record)
    (out / "sweep.md").write_text(md)
    sweep_plot(record, out / "sweep.png")
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="tokens per batch")
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed steps per architecture first (feature_choice's estimate adapts over the first few)",
    )
    p.add_argument(
        "--dead-frac", type=float, default=0.0, help="fraction of latents marked dead (exercises the aux loss)"
    )
    p.add_argument(
        "--aux-loss", default=None, help="aux_loss for this project's architectures (default: each config's default)"
    )
    p.add_argument("--archs", nargs="+", default=ARCHS)
    p.add_argument(
        "--dense",
        action="store_true",
        help="this project's architectures on the dense reference path (sparse_step=False)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="N=1024, d_in=128, d_sae=2048, k=16, 5 rounds")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-check", action="store_true")
    p.add_argument(
        "--sweep", action="store_true", help="time every method over the grid of --sweep-* shapes (writes --out)"
    )
    p.add_argument("--quick-sweep", action="store_true", help=f"--sweep at tiny sizes, for a smoke run: {QUICK_SWEEP}")
    p.add_argument("--sweep-d-sae", type=int, nargs="+", default=None, help=f"default {SWEEP_D_SAE}")
    p.add_argument("--sweep-n", type=int, nargs="+", default=None, help=f"default {SWEEP_N}")
    p.add_argument("--sweep-d-in", type=int, nargs="+", default=None, help=f"default {SWEEP_D_IN}")
    p.add_argument("--sweep-k", type=int, nargs="+", default=None, help=f"default {SWEEP_K}")
    p.add_argument("--out", default="reports/step-speed-sweep", help="the sweep's output folder")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="where the time goes: each method's step by phase (profiler) and its passes over N x F and F x d "
        "(writes --out/breakdown.md and .json)",
    )
    p.add_argument("--_memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.d_in, args.d_sae, args.k, args.rounds = 1024, 128, 2048, 16, 5
    full = {"d_sae": SWEEP_D_SAE, "n": SWEEP_N, "d_in": SWEEP_D_IN, "k": SWEEP_K}
    for field in full:  # lists not given: the full grid, or the tiny one of --quick-sweep
        if getattr(args, f"sweep_{field}") is None:
            setattr(args, f"sweep_{field}", list(QUICK_SWEEP[field] if args.quick_sweep else full[field]))
    if args.quick_sweep:
        args.sweep = True
        args.rounds, args.warmup = QUICK_SWEEP["rounds"], QUICK_SWEEP["warmup"]
    if args._memory_child:
        if args.threads:
            torch.set_num_threads(args.threads)
        memory_child(args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.breakdown:
        if args.archs == ARCHS:  # not given: the sweep's methods
            args.archs = list(SWEEP_ARCHS)
        return breakdown_main(args)
    if args.sweep:
        if args.archs == ARCHS:  # not given: the sweep's methods
            args.archs = list(SWEEP_ARCHS)
        return sweep_main(args)
    if "topk" not in args.archs:
        args.archs = ["topk", *args.archs]
    refs = ["floor"] + (["sparsify_topk"] if sparsify_available() else [])
    args.archs = refs + [a for a in args.archs if a not in refs]
    import sae_lens

    dev = args.device
    desc = (
        torch.cuda.get_device_name(0)
        if dev.startswith("cuda")
        else f"CPU, torch threads={torch.get_num_threads()}, os.cpu_count={os.cpu_count()}"
    )
    try:
        load = "load average %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = ""
    print(f"device: {dev} ({desc}); {load}")
    print(f"torch {torch.__version__}, sae-lens {sae_lens.__version__}")
    print(
        f"shapes: N={args.n} d_in={args.d_in} d_sae={args.d_sae} k={args.k}; dead_frac={args.dead_frac}; rounds={args.rounds}"
    )
    if not args.no_check:
        for name, ok in check_exact(args).items():
            print(f"exact selection: {name}: {ok}")
    if "sparsify_topk" not in args.archs:
        print("sparsify is not importable: no sparsify_topk reference row (see the module docstring)")
    times = time_all(args)
    mem = {} if args.no_memory else memory_all(args)
    med = {a: statistics.median(times[a]) for a in args.archs}
    ref = {r: med[r] for r in ("floor", "topk", "sparsify_topk") if r in med}
    head = f"{'step':<24}{'median (ms)':>12}{'min (ms)':>10}{'x floor':>9}{'x topk':>8}"
    head += f"{'x sparsify':>12}" if "sparsify_topk" in ref else ""
    head += f"{'peak mem (MiB)':>16}{'mem x topk':>12}" if mem else ""
    print(head)
    for a in args.archs:
        line = f"{a:<24}{med[a] * 1e3:>12.1f}{min(times[a]) * 1e3:>10.1f}{med[a] / ref['floor']:>9.2f}{med[a] / ref['topk']:>8.2f}"
        if "sparsify_topk" in ref:
            line += f"{med[a] / ref['sparsify_topk']:>12.2f}"
        if mem:
            line += f"{mem[a] / 2**20:>16.1f}{mem[a] / mem['topk']:>12.2f}"
        print(line)
    path = "dense reference path (sparse_step=False)" if args.dense else "sparse training step (sparse_step=True)"
    print(f"this project's architectures ran the {path}; ratios are medians of rounds in this process")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
