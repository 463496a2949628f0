"""What one benchmark command runs: the ``Settings`` and the presets (``default``, ``quick``, ``gpu``, ``large``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sae_allocators.benchmark.lm_source import LMScale
from sae_allocators.benchmark.synthetic_source import SyntheticScale


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
    lm_data: Any = None  # a callable returning lm_source.LMData (built lazily)
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
    #: a second, small language model (a callable returning lm_source.LMData, and its scale) on which
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
    #: large preset: ``topk``, ``abstopk``, ``batchtopk``), same label; the report says so
    sparse_baselines: tuple[str, ...] = ()
    #: ``(label, trained)`` pairs of labels that train bit-identically (the same rule, guard, threshold and
    #: auxiliary loss: tests/architectures/test_sparse_step.py): ``label``'s runs are not trained, their
    #: records are ``trained``'s at the same k and seed (marked ``same_run_as``); the report says so.
    #: The large preset: ``batchtopk_zipf`` is ``mutual_choice``.
    same_runs: tuple[tuple[str, str], ...] = ()


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
    same command resumes. ``topk``, ``abstopk`` and ``batchtopk`` train on their exact sparse twins
    (configs.SPARSE_TWINS: SAELens's step, a quarter of its CPU cost), and ``batchtopk_zipf``'s runs are
    ``mutual_choice``'s (``same_runs``: the two train bit-identically), so 51 of the 58 SAEs train. No
    synthetic data, no gradient_topk (its live store costs a full LM forward and backward per token: about
    1M x 10 ms = 3 h per SAE on the CPU), no second layer: the estimate (``estimate_seconds``,
    docs/benchmark.md) is 2.2 h without them; the committed run (docs/report-large) took 2.7 h from an empty cache."""
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
        sparse_baselines=("topk", "abstopk", "batchtopk"),
        same_runs=(("batchtopk_zipf", "mutual_choice"),),
        keep_saes=True,
        preset="large",
    )


PRESETS = {"default": default_settings, "quick": quick_settings, "gpu": gpu_settings, "large": large_settings}

#: report folder of a preset when no --out is given (a fixed one: rerunning the same command resumes)
DEFAULT_OUT = {"large": Path("reports") / "large"}


def untrained_same_runs(same_runs: tuple[tuple[str, str], ...], planned: Any) -> dict[str, str]:
    """``Settings.same_runs`` on the planned labels: each label that is not trained -> the label whose
    runs it takes. A pair counts only when both labels are planned (and differ): a label whose
    counterpart is not planned trains as usual. Used by the run (on jobs) and the estimate (on counts)."""
    planned = set(planned)
    return {lab: trained for lab, trained in same_runs if lab in planned and trained in planned and trained != lab}


def settings_dict(st: Settings) -> dict[str, Any]:
    """The settings as JSON-able values (the callables that load data left out; ``out`` as a string)."""
    d = {k: v for k, v in asdict(st).items() if k not in ("lm_data", "live_lm_data")}
    d["out"] = str(st.out)
    return d
