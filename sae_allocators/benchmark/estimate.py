"""The large preset's run time on 2 idle CPU cores, from measured step costs (docs/benchmark.md 'The large
preset')."""

from __future__ import annotations

from typing import Any

from sae_allocators import names
from sae_allocators.benchmark import configs
from sae_allocators.benchmark.settings import Settings, untrained_same_runs


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
    other evaluations. ``runs`` counts the SAEs trained: the labels of ``Settings.same_runs`` are left out."""
    s = st.lm
    d_sae = s.d_sae or s.expansion * d_in
    n_ref, d_ref, f_ref = STEP_REF_SHAPE
    per_token_scale = (d_in * d_sae) / (d_ref * f_ref) / n_ref
    counts = lm_run_counts(st, labels)
    # Settings.same_runs: a label whose runs are another planned label's is not trained
    same = untrained_same_runs(st.same_runs, counts)
    counts = {lab: n for lab, n in counts.items() if lab not in same}
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
