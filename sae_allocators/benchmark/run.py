"""Orchestration: plan, train every architecture at every k and seed, evaluate, write the report."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_allocators import names
from sae_allocators.benchmark import configs
from sae_allocators.benchmark.evaluation import evaluate_saved
from sae_allocators.benchmark.sources import LMScale, SyntheticScale, _log


@dataclass
class Settings:
    out: Path
    datasets: tuple[str, ...] = ("synthetic", "lm")
    seeds: int = 2
    synthetic_ks: tuple[float, ...] = (2, 4, 8)
    lm_ks: tuple[float, ...] = (16, 32, 64)
    synthetic: SyntheticScale = field(default_factory=SyntheticScale)
    lm: LMScale = field(default_factory=LMScale)
    lm_seeds: int | None = 1  # None: `seeds`
    #: on the language model, the middle k of the sweep gets this many seeds (the spread)
    lm_spread_seeds: int = 2
    archs: list[str] | None = None
    keep_saes: bool = False
    quick: bool = False
    lm_data: Any = None  # a callable returning sources.LMData (built lazily)
    #: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``: everything runs there
    device: str = "auto"
    #: the preset these settings came from (``default``, ``quick``, ``gpu``), for the report
    preset: str = "default"
    #: gradient_topk's beta on the LM; several: one run per beta, labelled gradient_topk[beta=B]
    gradient_betas: tuple[float, ...] = (1.0,)
    #: architectures trained from a live store on the LM (gradient_topk and its control) run at
    #: these k (None: every k of the sweep) and this many seeds (None: as the cached runs)
    lm_live_ks: tuple[float, ...] | None = (32,)
    lm_live_seeds: int | None = 1
    #: TF32 matrix multiplies on CUDA (torch.set_float32_matmul_precision("high")); off: full float32
    tf32: bool = False
    #: a second, small language model (a callable returning sources.LMData, and its scale) on which
    #: the live-store architectures train instead of the main LM (``--quick``: the tiny random LM,
    #: because a few steps of gradient_topk on SmolLM2 cost a minute and learn nothing)
    live_lm_data: Any = None
    live_lm: LMScale | None = None
    #: only these labels (None: every label of the planned architectures); a label of an optional
    #: variant (configs.OPTIONAL_VARIANTS, e.g. ``feature_choice[capacity=uniform]``) adds that variant
    labels: tuple[str, ...] | None = None
    #: what the command line said about the data that the settings above do not hold (model, dataset,
    #: context size, --tiny-lm, cache folder): part of the settings' fingerprint (resuming)
    data_args: dict[str, Any] = field(default_factory=dict)
    #: SAELens baselines trained by their exact twin on the sparse step (configs.SPARSE_TWINS; the
    #: large preset: ``topk``, ``abstopk``), same label; the report says so
    sparse_baselines: tuple[str, ...] = ()


def quick_settings(out: Path) -> Settings:
    from sae_allocators.benchmark import lm_data

    st = Settings(
        out=out,
        seeds=1,
        lm_spread_seeds=1,
        synthetic_ks=(4, 8),
        lm_ks=(32,),
        synthetic=SyntheticScale(training_samples=76_800, batch_size=256, eval_samples=8192),
        lm=LMScale(
            hook_layer=3,
            expansion=2,
            training_tokens=19_200,
            train_batch_size=64,
            eval_sequences=32,
            ce_eval_sequences=2,
            dead_feature_window=50,
        ),
        lm_live_ks=(32,),
        lm_live_seeds=1,
        quick=True,
        preset="quick",
        # the gradient path as a smoke test, on the tiny random LM (k = 32 of d_sae 128, 300 steps)
        live_lm=LMScale(
            hook_layer=1,
            expansion=4,
            training_tokens=19_200,
            train_batch_size=64,
            eval_sequences=16,
            ce_eval_sequences=4,
            dead_feature_window=50,
            live_training_tokens=19_200,
            live_train_batch_size=64,
            live_store_batch_size_prompts=8,
        ),
    )
    st.live_lm_data = lambda: lm_data.tiny_lm_data(context_size=32, n_rows=256, n_eval=16, device=st.device)
    return st


def default_settings(out: Path) -> Settings:
    return Settings(out=out)


def gpu_settings(out: Path) -> Settings:
    """``--preset gpu``: one 24-80 GB GPU; estimated 70-80 min on an H100 (arithmetic, untested until run on
    a GPU: docs/benchmark.md).

    On the LM: d_sae 16,384, k in {16, 32, 64}, 2 seeds, 20,480,000 training tokens per SAE (4,096 per
    step, 5,000 steps) -- the offline corpus's training split holds about 3.2M tokens, so SAELens reads
    the activation cache about 7 times per SAE; gradient_topk and topk[live] at every k and seed from
    the live stores, same token count. lr 5e-4: the CPU sweep's 2e-3 at d_sae 1,152 scaled by
    sqrt(1152 / 16384) (Gao et al.'s lr ~ 1/sqrt(d_sae)); not swept at this scale. Synthetic data at
    the default scale (already cheap). TF32 matrix multiplies."""
    return Settings(
        out=out,
        seeds=2,
        synthetic_ks=(2, 4, 8),
        lm_ks=(16, 32, 64),
        lm=LMScale(
            hook_layer=6,
            d_sae=16_384,
            training_tokens=20_480_000,
            train_batch_size=4096,
            eval_sequences=512,
            ce_eval_sequences=64,
            lr=5e-4,
            dead_feature_window=1000,
            store_batch_size_prompts=32,
            norm_estimate_batches=20,
            live_training_tokens=None,
            live_train_batch_size=None,
            live_store_batch_size_prompts=32,
        ),
        lm_seeds=2,
        lm_spread_seeds=2,
        lm_live_ks=None,
        lm_live_seeds=None,
        tf32=True,
        preset="gpu",
    )


#: the architectures of ``--preset large`` (issue 24): the baselines, the allocators, the Zipf variants
#: and top-AFA (its own L0, compared on the TopK frontier); gradient_topk does not fit (see large_settings)
LARGE_LABELS = (
    "topk",
    "batchtopk",
    "mutual_choice",
    "feature_choice",
    "feature_choice[capacity=uniform]",
    "topk_zipf",
    "batchtopk_zipf",
    "abstopk",
    "top_afa",
)


def large_settings(out: Path) -> Settings:
    """``--preset large``: evidence at scale on the real LM (issue 24), for 2 idle CPU cores.

    SmolLM2-135M at layer 6 only, d_sae 4,608 (8x d_in 576), k in {16, 32, 64}, 2 seeds at every k and 3
    at k = 32, 1,003,520 training tokens per SAE (490 steps of 2,048 tokens), the labels of
    LARGE_LABELS; CE loss recovered and KL on 64 held-out sequences (8,192 tokens), reconstruction and
    density figures on 256 (32,768 tokens). lr 2e-3: the CPU sweep's best at d_sae 1,152 and 128 tokens
    per step, kept because the two usual scalings cancel (lr ~ 1/sqrt(d_sae): x0.5; lr ~ sqrt(batch):
    x4 -- roughly, x2 for Adam at this size); not swept at this scale. The trained SAEs are kept
    (``<out>/saes``) and every run's record is saved as it finishes (``<out>/runs``): rerunning the
    same command resumes. ``topk`` and ``abstopk`` train on their exact sparse twins
    (configs.SPARSE_TWINS: SAELens's step, a quarter of its CPU cost). No synthetic data, no
    gradient_topk (its live store costs a full LM forward and backward per token: about 1M x 10 ms =
    3 h per SAE on the CPU), no second layer: the estimate (``estimate_seconds``, docs/benchmark.md)
    is already over the 3-hour limit (3.2 h) without them."""
    return Settings(
        out=out,
        datasets=("lm",),
        seeds=2,
        lm_ks=(16, 32, 64),
        lm=LMScale(
            hook_layer=6,
            d_sae=4608,
            training_tokens=1_003_520,
            train_batch_size=2048,
            eval_sequences=256,
            ce_eval_sequences=64,
            lr=2e-3,
            dead_feature_window=100,
            store_batch_size_prompts=16,
            norm_estimate_batches=10,
            calibration_tokens=16_384,
        ),
        lm_seeds=2,
        lm_spread_seeds=3,
        lm_live_ks=(),
        lm_live_seeds=0,
        labels=LARGE_LABELS,
        sparse_baselines=("topk", "abstopk"),
        keep_saes=True,
        preset="large",
    )


PRESETS = {"default": default_settings, "quick": quick_settings, "gpu": gpu_settings, "large": large_settings}

#: report folder of a preset when no --out is given (a fixed one: rerunning the same command resumes)
DEFAULT_OUT = {"large": Path("reports") / "large"}


def _build_sources(st: Settings, workdir: Path) -> list[Any]:
    from sae_allocators.benchmark.sources import LMSource, SyntheticSource

    sources = []
    for name in st.datasets:
        if name == "synthetic":
            sources.append((SyntheticSource(st.synthetic, device=st.device), st.synthetic_ks, st.seeds))
        elif name == "lm":
            t0 = time.perf_counter()
            data = st.lm_data()
            _log(f"[lm] model and corpus ready in {time.perf_counter() - t0:.1f} s")
            src = LMSource(data, st.lm, workdir, device=st.device)
            src.prep_seconds = time.perf_counter() - t0
            sources.append((src, st.lm_ks, st.lm_seeds or st.seeds))
            src.spread_seeds = st.lm_spread_seeds
            if st.live_lm_data is not None and st.live_lm is not None:
                live = LMSource(
                    st.live_lm_data(), st.live_lm, workdir, device=st.device, kind="lm-live", live_only=True
                )
                sources.append((live, st.lm_ks, st.lm_live_seeds or st.lm_seeds or st.seeds))
                live.spread_seeds = 0
        else:
            raise ValueError(f"--datasets: unknown dataset {name!r}; use synthetic and/or lm")
    return sources


def _with_betas(plans: list[configs.Plan], betas: tuple[float, ...]) -> list[configs.Plan]:
    """gradient_topk once per beta when several are asked for (labels gradient_topk[beta=B])."""
    if len(betas) <= 1:
        return plans
    out = []
    for p in plans:
        if p.name == "gradient_topk" and p.skip_reason is None:
            out.extend(
                configs.Plan(p.name, f"{p.name}[beta={b:g}]", p.provider, p.entry, {**p.extra, "beta": float(b)})
                for b in betas
            )
        else:
            out.append(p)
    return out


def _live_controls(todo: list[configs.Plan], all_plans: list[configs.Plan]) -> dict[str, configs.Plan]:
    """For each live-store architecture, its control trained from the plain live store (``topk[live]``)."""
    controls: dict[str, configs.Plan] = {}
    for p in todo:
        name = p.entry.lm_live_control if p.entry is not None and not p.entry.lm_from_cache else None
        if not name or name in controls:
            continue
        base = next((q for q in all_plans if q.name == name and q.label == name), None)
        if base is None or base.entry is None:
            from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

            if name not in SAE_TRAINING_CLASS_REGISTRY or name not in configs.KNOWN:
                continue
            base = configs.Plan(name, name, "sae-lens", configs.KNOWN[name])
        controls[name] = configs.Plan(base.name, f"{name}[live]", base.provider, base.entry, dict(base.extra))
    return controls


class ResumeError(ValueError):
    """The report folder holds runs of other settings (resuming would mix them)."""


#: in the report folder: the settings' fingerprint (settings.json) and one record per finished run (runs/)
SETTINGS_FILE = "settings.json"
RUNS_DIR = "runs"
#: settings that do not change what a run computes (left out of the fingerprint)
NOT_FINGERPRINTED = ("out", "keep_saes")


def fingerprinted_settings(st: Settings) -> dict[str, Any]:
    """The settings that decide what every run computes, as JSON values (``fingerprint``'s input)."""
    d = {k: v for k, v in _settings_dict(st).items() if k not in NOT_FINGERPRINTED}
    return json.loads(json.dumps(d, sort_keys=True, default=str))


def fingerprint(st: Settings) -> str:
    """A short hash of ``fingerprinted_settings``: records of one fingerprint may be mixed in a report."""
    blob = json.dumps(fingerprinted_settings(st), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def job_tag(job: tuple[Any, ...]) -> str:
    src, _, seed, k, p, _ = job
    return f"{src.kind}/{p.label}/k{k:g}/seed{seed}"


def record_path(out: Path, tag: str) -> Path:
    safe = tag.replace("/", "__").replace("[", "_").replace("]", "").replace("=", "-")
    return Path(out) / RUNS_DIR / f"{safe}.json"


def open_resume(out: Path, st: Settings) -> tuple[str, dict[str, dict[str, Any]]]:
    """The settings' fingerprint and the finished runs already in ``out`` (tag -> saved record).

    The first run into ``out`` writes ``settings.json``; a later one with other settings is refused
    (``ResumeError`` names the settings that differ) instead of mixing records; so is a record of
    another fingerprint. An unreadable record (a crash can leave none: records are written atomically)
    is ignored and its run trained again."""
    from sae_allocators import io

    out = Path(out)
    fp, now = fingerprint(st), fingerprinted_settings(st)
    sf = out / SETTINGS_FILE
    if sf.exists():
        old = json.loads(sf.read_text())
        if old.get("fingerprint") != fp:
            changed = _changed_keys(old.get("settings") or {}, now)
            raise ResumeError(
                f"{out} holds runs of other settings (fingerprint {old.get('fingerprint')}, now {fp}; "
                f"changed: {', '.join(changed) or 'unknown'}): resuming would mix them. Use another --out, "
                f"or the command that made it (its settings are in {sf})"
            )
    else:
        io.atomic_write_json(sf, {"fingerprint": fp, "settings": now, "invocations": []})
    done: dict[str, dict[str, Any]] = {}
    for f in sorted((out / RUNS_DIR).glob("*.json")) if (out / RUNS_DIR).is_dir() else []:
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            _log(f"[resume] ignoring unreadable record {f} ({exc}): its run trains again")
            continue
        if doc.get("fingerprint") != fp:
            raise ResumeError(f"{f} is a record of other settings (fingerprint {doc.get('fingerprint')}, now {fp})")
        done[doc["tag"]] = doc
    return fp, done


def _changed_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted names of the settings that differ between two fingerprinted settings dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _changed_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _note_invocation(
    out: Path, started: str, wall: float, trained: int, reused: int, finished: bool = True, key: str = ""
) -> list[dict[str, Any]]:
    """Record this command's wall time so far in settings.json (one entry per invocation, keyed by its
    ``key`` (or its start time), rewritten after every finished run: an invocation that is killed -- a long run across
    sessions -- still counts up to its last finished run); return every invocation so far."""
    from sae_allocators import io

    sf = Path(out) / SETTINGS_FILE
    doc = json.loads(sf.read_text())
    entry = {
        "invocation": key or started,
        "started_utc": started,
        "wall_seconds": wall,
        "runs_trained": trained,
        "runs_from_records": reused,
        "finished": finished,
        "commit": checkout_commit(),
    }
    invocations = [
        v for v in doc.get("invocations", []) if v.get("invocation", v.get("started_utc")) != (key or started)
    ]
    doc["invocations"] = invocations + [entry]
    io.atomic_write_json(sf, doc)
    return doc["invocations"]


@functools.cache
def checkout_commit() -> str | None:
    """The git commit of the directory the command runs in (``benchmarks/run.sh`` runs from the checkout), with
    ``+dirty`` when tracked files differ from it; None outside a git checkout."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


class Progress:
    """Runs done / total, time per run and the time left, logged after every run."""

    def __init__(self, tags: list[str], labels: list[str], done: set[str]):
        self.labels = dict(zip(tags, labels))
        self.total = len(tags)
        self.done = set(t for t in tags if t in done)
        self.reused = len(self.done)
        self.seconds: dict[str, list[float]] = {}

    def eta_seconds(self) -> float | None:
        """Remaining runs at the mean time in this command of their key (dataset/label; the mean of all runs where a
        label has not run yet); None before the first run."""
        every = [s for v in self.seconds.values() for s in v]
        if not every:
            return None
        mean_all = sum(every) / len(every)
        left = [lab for t, lab in self.labels.items() if t not in self.done]
        return sum(sum(self.seconds[lab]) / len(self.seconds[lab]) if lab in self.seconds else mean_all for lab in left)

    def finished(self, tag: str, seconds: float, once: float = 0.0) -> str:
        """Log line for a finished run that took ``seconds``, of which ``once`` went to one-time work
        (the activation cache, built during the first run that reads it): left out of the run's time,
        so the estimate of the time left is not inflated by it."""
        self.done.add(tag)
        run_seconds = max(seconds - once, 0.0)
        self.seconds.setdefault(self.labels[tag], []).append(run_seconds)
        trained = sum(len(v) for v in self.seconds.values())
        mean = sum(s for v in self.seconds.values() for s in v) / trained
        eta = self.eta_seconds() or 0.0
        left = self.total - len(self.done)
        return (
            f"[progress] {len(self.done)}/{self.total} runs done"
            + (f" ({self.reused} from earlier records)" if self.reused else "")
            + f"; this run {run_seconds:.0f} s"
            + (f" (+{once:.0f} s of one-time work: the activation cache)" if once >= 1 else "")
            + f", mean {mean:.0f} s per run trained now; "
            + (f"about {_duration(eta)} left for {left} run(s)" if left else "all runs done")
            + memory_note()
        )


def memory_note() -> str:
    """This process's resident memory, split into anonymous (its own tensors and objects) and file-backed
    (memory-mapped files such as the activation cache, which the OS can drop), from /proc on Linux; ""
    elsewhere. A long run logs it after every run, so a leak shows as RssAnon growing run after run."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("Rss")
        )
        gib = {k: int(v.split()[0]) / 2**20 for k, v in fields.items()}  # kB -> GiB
        return f"; memory {gib['RssAnon']:.1f} GiB anonymous + {gib['RssFile']:.1f} GiB file-backed"
    except (OSError, KeyError, ValueError, IndexError):
        return ""


def _one_time_seconds(sources: list[Any]) -> float:
    """Seconds the sources have spent on one-time work so far (building their activation caches)."""
    return float(sum(getattr(src, "cache_seconds", None) or 0.0 for src, _, _ in sources))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run(st: Settings) -> Path:
    from sae_allocators import devices
    from sae_allocators.benchmark import report

    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    key = f"{started}/{os.getpid()}/{time.perf_counter_ns()}"  # this invocation's entry in settings.json
    device = devices.resolve(st.device)
    st.device = str(device)
    if devices.is_cuda(device) and st.tf32:
        torch.set_float32_matmul_precision("high")
    env_start = _environment(device)
    out = Path(st.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = out / "saes"
    _log(f"[device] {env_start['device']}" + (" (TF32 matrix multiplies)" if env_start.get("tf32") else ""))
    fp, done = open_resume(out, st)
    plans, todo, controls = _plan(st)
    if st.preset == "large" and not any(st.data_args.get(k) for k in ("tiny_lm", "model")):
        est = estimate_seconds(st, labels=[p.label for p in todo])
        _log(
            f"[plan] estimated {_duration(est['total'])} on 2 idle CPU cores for SmolLM2-135M ({est['runs']} SAEs; "
            "from the measured step costs, docs/benchmark.md 'The large preset')"
        )
    sources = _build_sources(st, workdir)
    jobs = _jobs(st, sources, todo, controls)
    tags = [job_tag(j) for j in jobs]
    progress = Progress(tags, [f"{j[0].kind}/{j[4].label}" for j in jobs], set(done))  # time per dataset and label
    if progress.reused:
        _log(
            f"[resume] {progress.reused} of {len(jobs)} runs already done in {out / RUNS_DIR} (settings "
            f"fingerprint {fp}): skipping them"
        )
    by_tag: dict[str, dict[str, Any]] = {}
    curves: dict[str, Any] = {}
    failures: list[dict[str, str]] = []
    for i, (job, tag) in enumerate(zip(jobs, tags), 1):
        if tag in done:
            by_tag[tag] = done[tag]["record"]
            curves[tag] = done[tag]["curves"]
            continue
        t0, once0 = time.perf_counter(), _one_time_seconds(sources)
        got = _train_and_evaluate(f"{i}/{len(jobs)}", job, st, workdir, [], curves, failures, out=out, fp=fp)
        if got is not None:
            by_tag[tag] = got
            _log(progress.finished(tag, time.perf_counter() - t0, _one_time_seconds(sources) - once0))
            trained = len(progress.done) - progress.reused
            _note_invocation(out, started, time.perf_counter() - t_start, trained, progress.reused, False, key)
    records = [by_tag[t] for t in tags if t in by_tag]
    _add_step_ratios(records)
    meta = _meta(st, env_start, sources, plans, controls, failures, device, t_start)
    invocations = _note_invocation(
        out, started, meta["wall_seconds"], len(records) - progress.reused, progress.reused, True, key
    )
    meta["resume"] = {
        "settings_fingerprint": fp,
        "runs": len(jobs),
        "runs_from_earlier_records": progress.reused,
        "invocations": invocations,
        "wall_seconds_all_invocations": sum(v["wall_seconds"] for v in invocations),
    }
    report.write(out, meta, records, curves)
    if not st.keep_saes:
        shutil.rmtree(workdir, ignore_errors=True)
    _log(f"[done] report: {out / 'report.md'} ({time.perf_counter() - t_start:.0f} s)")
    return out


# --- run-time estimate (the large preset) ------------------------------------------------------

#: median full training step in ms (forward, losses, backward, clipping, Adam) at N=4096 tokens,
#: d_in=512, d_sae=8192, k=32 on the project's 2-core CPU (torch 2.13.0+cpu, 2 threads, everything
#: else stopped): docs/sparse-step.md "Speed (measured)". abstopk is SAELens's own dense step (6.53+):
#: assumed to cost topk's (not measured). Variants (aux loss, guard off, capacity) cost their base's.
STEP_MS_REF = {
    "topk": 1916,
    "batchtopk": 2767,
    "abstopk": 1916,
    "mutual_choice": 559,
    "feature_choice": 661,
    "feature_choice[capacity=uniform]": 555,
    "topk_zipf": 525,
    "batchtopk_zipf": 480,
    "abstopk_zipf": 621,
    "top_afa": 713,
    "gradient_topk": 1156,
}
STEP_REF_SHAPE = (4096, 512, 8192)  # N, d_in, d_sae
#: SmolLM2-135M forward to layer 6 on the same CPU: the default run's activation cache, about 70,000
#: tokens in 50 s (docs/benchmark.md "Run time (measured)")
FORWARD_TO_L6_TOKENS_PER_S = 1400.0
#: a full forward (30 blocks and the 49,152 x 576 unembedding) over one to layer 6 (7 blocks), in
#: multiply-adds per token: (30 x 3.98M + 28.3M) / (7 x 3.98M)
FULL_OVER_L6 = 5.3
#: the spliced forward starts from the cached activation at the hook (LMSource._run_from_hook): the 23
#: blocks after layer 6 and the unembedding, (23 x 3.98M + 28.3M) / (7 x 3.98M)
AFTER_L6_OVER_L6 = 4.3
#: top-AFA's L0 is its own (up to its cap, 1,024 on the LM): its decoder costs more than at k = 32
TOP_AFA_FACTOR = 2.0
#: SAELens's trainer's work around each step of a SAELens architecture (its dense feature_acts
#: bookkeeping of dead-latent counters and firing frequencies), in ns per step and per N x d_sae element:
#: measured in the large preset (N 2,048, d_sae 4,608: a SAE's train_seconds minus 490 times its bare
#: step, 2 cores) as 84 ms per step for batchtopk, i.e. about 9.2 ns per element. This project's
#: architectures hand the trainer sparse COO codes: within noise of zero (benchmarks/trainer_speed.py)
TRAINER_NS_PER_ELEMENT = 9.2
#: per SAE besides training and CE/KL: the step-time measurement, the calibration, the reconstruction,
#: density and stream evaluations, saving and reloading (measured in the large preset: about 18 s)
EVAL_OTHER_SECONDS = 18.0


def lm_run_counts(st: Settings, labels: list[str] | None = None) -> dict[str, int]:
    """SAEs per label on the LM from the activation cache (the rule of ``_jobs``): fixed-L0 labels at
    every k for ``lm_seeds`` seeds plus the spread seeds at the middle k; self-budgeting labels once
    per seed at the largest k."""
    ks = sorted(st.lm_ks)
    n = st.lm_seeds or st.seeds
    spread = st.lm_spread_seeds or 0
    k_mid = ks[len(ks) // 2]
    if labels is None:
        labels = list(st.labels) if st.labels is not None else list(STEP_MS_REF)
    counts = {}
    for lab in labels:
        if lab.startswith("gradient_topk"):
            continue  # from the live store: not estimated here
        fixed = not lab.startswith("top_afa")
        runs = 0
        for seed in range(max(n, spread)):
            for k in ks:
                if not (seed < n or (seed < spread and k == k_mid)):
                    continue
                if not fixed and k != ks[-1]:
                    continue
                runs += 1
        counts[lab] = runs
    return counts


def estimate_seconds(st: Settings, d_in: int = 576, labels: list[str] | None = None) -> dict[str, Any]:
    """The LM part's run time on 2 idle CPU cores, from measured step costs scaled by the step's
    multiply-adds (N x d_in x d_sae): training steps per label, the activation cache, CE/KL (the blocks
    after the hook over ``ce_eval_sequences`` per SAE; a clean and a zero-ablated full forward once), the
    other evaluations."""
    s = st.lm
    d_sae = s.d_sae or s.expansion * d_in
    n_ref, d_ref, f_ref = STEP_REF_SHAPE
    per_token_scale = (d_in * d_sae) / (d_ref * f_ref) / n_ref
    counts = lm_run_counts(st, labels)
    ctx = 128
    train: dict[str, float] = {}
    for lab, runs in counts.items():
        base = lab if lab in STEP_MS_REF else lab.split("[")[0]
        if lab in st.sparse_baselines:
            base = configs.SPARSE_TWINS[lab][0]  # trained by its sparse twin
        ms = STEP_MS_REF.get(base, STEP_MS_REF["topk"])
        factor = TOP_AFA_FACTOR if base == "top_afa" else 1.0
        steps = s.training_tokens / s.train_batch_size
        dense_codes = base.split("[")[0] not in names.OWN_ARCHITECTURES  # SAELens's own step: dense feature_acts
        trainer = steps * s.train_batch_size * d_sae * TRAINER_NS_PER_ELEMENT * 1e-9 if dense_codes else 0.0
        train[lab] = runs * (s.training_tokens * ms / 1e3 * per_token_scale * factor + trainer)
    runs = sum(counts.values())
    full_tps = FORWARD_TO_L6_TOKENS_PER_S / FULL_OVER_L6
    after_tps = FORWARD_TO_L6_TOKENS_PER_S / AFTER_L6_OVER_L6
    ce = runs * s.ce_eval_sequences * ctx / after_tps + 2 * s.ce_eval_sequences * ctx / full_tps  # + clean, zero
    cached = int((s.training_tokens + (s.norm_estimate_batches + 4) * s.train_batch_size + s.calibration_tokens) * 1.15)
    cache = cached / FORWARD_TO_L6_TOKENS_PER_S
    eval_x = s.eval_sequences * ctx / FORWARD_TO_L6_TOKENS_PER_S
    other = runs * EVAL_OTHER_SECONDS
    total = sum(train.values()) + ce + cache + eval_x + other
    return {
        "runs": runs,
        "runs_per_label": counts,
        "train_seconds_per_label": train,
        "ce_kl_seconds": ce,
        "activation_cache_seconds": cache,
        "eval_activations_seconds": eval_x,
        "other_eval_seconds": other,
        "total": total,
    }


def _plan(st: Settings) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Phase 1: which architectures (and beta variants) train, which are skipped and why, and the
    live-store controls they are paired with."""
    plans = _with_betas(configs.plan_architectures(st.archs), tuple(st.gradient_betas))
    if st.labels is not None:
        labels = [lab for lab in st.labels if not st.archs or lab.split("[")[0] in st.archs]  # --arch narrows
        plans = configs.select_labels(plans, labels)
    if st.sparse_baselines:
        plans = configs.on_sparse_step(plans, st.sparse_baselines)
    todo = [p for p in plans if p.skip_reason is None]
    controls = _live_controls(todo, configs.plan_architectures(None) if st.archs else plans)
    _log(f"[plan] {len(todo)} architecture(s) to train: {', '.join(p.label for p in todo)}")
    for p in plans:
        if p.skip_reason:
            _log(f"[plan] skipping {p.name} ({p.provider}): {p.skip_reason}")
    if not any(p.label == "topk" for p in todo):
        _log("[plan] note: topk is not in the run, so step-time ratios to topk are not reported")

    return plans, todo, controls


def _jobs(st: Settings, sources: list[Any], todo: list[Any], controls: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Phase 2: every ``(source, ks, seed, k, plan, "live" | "cache")`` run, in training order."""
    jobs = []
    for src, ks, n_seeds in sources:
        k_mid = sorted(ks)[len(ks) // 2]
        live_ks = tuple(ks) if st.lm_live_ks is None else tuple(k for k in ks if k in st.lm_live_ks)
        live_seeds = n_seeds if st.lm_live_seeds is None else st.lm_live_seeds
        spread = getattr(src, "spread_seeds", 0)
        is_lm = src.kind != "synthetic"
        trains_live = is_lm and not any(getattr(s, "live_only", False) for s, _, _ in sources if s is not src)
        for seed in range(max(n_seeds, spread, live_seeds if trains_live else 0)):
            for k in ks:
                paired: set[str] = set()
                for p in todo:
                    live = is_lm and p.entry is not None and not p.entry.lm_from_cache
                    if live:
                        if not trains_live or k not in live_ks or seed >= live_seeds:
                            continue
                    elif getattr(src, "live_only", False):
                        continue
                    elif not (seed < n_seeds or (seed < spread and k == k_mid)):
                        continue
                    if not p.fixed_l0 and k != max(ks):
                        continue  # chooses its own L0: trained once per seed
                    if not is_lm and p.extra.get("beta", st.gradient_betas[0]) != st.gradient_betas[0]:
                        continue  # no gradients off the LM: one beta is enough there
                    if not is_lm and "outlier_norm_ratio" in p.extra:
                        continue  # synthetic data has no outlier-norm rows: the guard-off run is the same run
                    control = controls.get(p.entry.lm_live_control or "") if live and p.entry else None
                    if control is not None and control.label not in paired:
                        paired.add(control.label)
                        jobs.append((src, ks, seed, k, control, "live"))
                    jobs.append((src, ks, seed, k, p, "live" if live else "cache"))
        if trains_live:
            for p in todo:
                if p.entry is not None and not p.entry.lm_from_cache:
                    _log(
                        f"[plan] {p.label} on {src.kind} ({src.data.name}): from its own live store at k in "
                        f"{{{', '.join(f'{k:g}' for k in live_ks) or 'none of the sweep'}}}, {live_seeds} seed(s), "
                        f"{src.live_tokens():,} tokens per SAE"
                    )
    return jobs


def _train_and_evaluate(
    i: str,
    job: tuple[Any, ...],
    st: Settings,
    workdir: Path,
    records: list[dict[str, Any]],
    curves: dict[str, Any],
    failures: list[dict[str, str]],
    out: Path | None = None,
    fp: str | None = None,
) -> dict[str, Any] | None:
    """Phase 3, one run (``i``: "3/40"): train, save, reload, evaluate; its record and curves (or
    its failure) are appended, and with ``out`` saved at once (atomically) as ``out/runs/<run>.json``
    with the settings' fingerprint ``fp``, so that a rerun skips it. Returns the record (None: failed)."""
    src, ks, seed, k, p, path = job
    ctx = configs.Context(
        d_in=src.d_in,
        d_sae=src.d_sae,
        ks=tuple(ks),
        has_lm_gradients=path == "live",
        gradient_beta=float(st.gradient_betas[0]),
    )
    tag = f"{src.kind}/{p.label}/k{k:g}/seed{seed}"
    _log(
        f"[{i}] {src.kind}: training {p.label} at k={k:g}, seed {seed} ({p.provider})"
        + (" from the live store" if path == "live" else "")
    )
    try:
        folder = workdir / tag.replace("[", "_").replace("]", "").replace("=", "-")
        if path == "live":
            cfg = configs.build_training_config(p, k, ctx, **src.sae_fields())
            result = src.train_live(cfg, seed, folder)
        else:
            cfg = configs.build_training_config(p, k, ctx, **src.sae_fields())
            result = src.train(cfg, seed, folder)
        figures, density, l0 = evaluate_saved(src, result)
    except Exception as exc:  # one broken architecture must not stop the benchmark...
        if type(exc).__name__ == "InterruptedException":
            # ...but a stop must: SAELens's runner turns SIGINT / SIGTERM into this exception (the class
            # moved between SAELens versions, hence the name). The finished runs' records are saved;
            # rerunning the command resumes from them.
            _log(f"[{i}] interrupted while training {tag} (SIGINT/SIGTERM): stopping; rerun the command to resume")
            raise KeyboardInterrupt(f"interrupted while training {tag}") from exc
        _log(f"[{i}] FAILED {tag}: {type(exc).__name__}: {exc}")
        failures.append({"run": tag, "error": f"{type(exc).__name__}: {exc}"})
        return None
    rec = {
        "dataset": src.kind,
        "architecture": p.name,
        "label": p.label,
        "provider": p.provider,
        "k_target": float(k) if p.fixed_l0 else None,
        "fixed_l0": p.fixed_l0,
        "batch_level": p.batch_level,
        "seed": seed,
        "run": tag,
        "config_fields": {key: v for key, v in p.config_fields(k, ctx).items()},
        "aux_loss": getattr(cfg, "aux_loss", None) or "SAELens's own",
        "auxk_counterpart": p.auxk_counterpart,
        "training_path": result.path_kind,
        "store": result.store,
        "training_tokens": result.tokens,
        "train_seconds_per_token": result.seconds / max(1, result.tokens),
        **figures,
    }
    if getattr(cfg, "beta", None) is not None and path == "live":
        rec["beta"] = float(cfg.beta)
    # as it reads back from JSON (a resumed run's report is then the same as an uninterrupted one's)
    rec = json.loads(json.dumps(rec, allow_nan=True))
    records.append(rec)
    curves[tag] = {"density": density.tolist(), "l0_hist": torch.bincount(l0).tolist()}
    if out is not None:
        from sae_allocators import io

        io.atomic_write_json(
            record_path(out, tag), {"fingerprint": fp, "tag": tag, "record": rec, "curves": curves[tag]}
        )
    _log(
        f"[{i}]   L0 {figures['l0_mean']:.2f}  NMSE {figures['nmse']:.4f}  "
        f"EV {figures['explained_variance']:.4f}  dead {figures['dead_fraction']:.3f}  "
        + (f"MCC {figures['mcc']:.3f}  " if "mcc" in figures else "")
        + (f"CE rec {figures['ce_loss_recovered']:.3f}  " if "ce_loss_recovered" in figures else "")
        + f"({figures['train_seconds']:.1f} s)"
    )
    return rec


def _meta(
    st: Settings,
    env_start: dict[str, Any],
    sources: list[Any],
    plans: list[Any],
    controls: dict[str, Any],
    failures: list[dict[str, str]],
    device: Any,
    t_start: float,
) -> dict[str, Any]:
    """Phase 4: what the report says about the run itself (settings, sources, plans, failures, machine)."""
    meta: dict[str, Any] = {
        "device": env_start["device"],
        "preset": st.preset,
        "command_settings": _settings_dict(st),
        "sources": [src.describe() for src, _, _ in sources],
        "seeds": {src.kind: n for src, _, n in sources},
        "spread_seeds_at_middle_k": {src.kind: getattr(src, "spread_seeds", 0) for src, _, _ in sources},
        "ks": {src.kind: list(ks) for src, ks, _ in sources},
        "plans": [
            {
                "name": p.name,
                "label": p.label,
                "provider": p.provider,
                "skip_reason": p.skip_reason,
                "note": p.entry.note if p.entry else "",
                "datasets": [src.kind for src, _, _ in sources],
            }
            for p in [*plans, *controls.values()]
        ],
        "failures": failures,
        "environment": env_start,
        "load_average_1min_at_end": _environment(device)["load_average_1min"],
        "wall_seconds": time.perf_counter() - t_start,
    }
    for src, _, _ in sources:
        if hasattr(src, "prep_seconds"):
            meta.setdefault("lm_prep_seconds", src.prep_seconds)
    return meta


def _add_step_ratios(records: list[dict[str, Any]]) -> None:
    base = {(r["dataset"], r["k_target"], r["seed"]): r["step_seconds"] for r in records if r["label"] == "topk"}
    topk_any = {}
    for r in records:
        if r["label"] == "topk":
            topk_any.setdefault((r["dataset"], r["seed"]), []).append(r["step_seconds"])
    for r in records:
        ref = base.get((r["dataset"], r["k_target"], r["seed"]))
        if ref is None and r["k_target"] is None and topk_any.get((r["dataset"], r["seed"])):
            ref = max(topk_any[(r["dataset"], r["seed"])])  # topk at the largest k of the sweep
        if ref:
            r["step_time_vs_topk"] = r["step_seconds"] / ref


def _settings_dict(st: Settings) -> dict[str, Any]:
    d = {k: v for k, v in asdict(st).items() if k not in ("lm_data", "live_lm_data")}
    d["out"] = str(st.out)
    return d


def _environment(device: Any = None) -> dict[str, Any]:
    import sae_lens

    from sae_allocators import devices
    import transformer_lens  # noqa: F401

    try:
        import importlib.metadata as md

        tl = md.version("transformer-lens")
    except Exception:
        tl = "?"
    import os

    return {
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sae_lens": sae_lens.__version__,
        "transformer_lens": tl,
        "device": devices.describe(device) if device is not None else None,
        "tf32": bool(
            device is not None and devices.is_cuda(device) and torch.get_float32_matmul_precision() != "highest"
        ),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "platform": platform.platform(),
    }


def load_records(report_dir: Path) -> dict[str, Any]:
    return json.loads((Path(report_dir) / "report.json").read_text())
