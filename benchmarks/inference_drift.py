"""How far the batch-free inference L0 drifts from the training L0, on held-out data.

Trains ``mutual_choice`` and ``feature_choice`` (uniform and Zipf capacities) through SAELens's
real runner on the tiny random model of ``sae_allocators.testing``, saves them (as SAELens
``jumprelu``), reloads the saved folders with plain SAELens, and prints the per-token L0 of the
saved model on tokens the training never saw, next to the training L0 (the batch rule spends
exactly k per token on average).

    python benchmarks/inference_drift.py                 # 200 steps, k=4, d_sae=128
    python benchmarks/inference_drift.py --steps 400 --threshold-lr 0.01
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--k", type=float, default=4.0)
    p.add_argument("--d-sae", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="SAE learning rate")
    p.add_argument("--threshold-lr", type=float, default=0.1)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")

    import torch
    from sae_lens import SAE

    import sae_allocators  # noqa: F401
    from sae_allocators.architectures.feature_choice import FeatureChoiceTrainingSAEConfig
    from sae_allocators.architectures.mutual_choice import MutualChoiceTrainingSAEConfig
    from sae_allocators.testing import TINY_D_MODEL, TINY_HOOK, tiny_dataset, tiny_model, train_tiny

    d = TINY_D_MODEL
    model = tiny_model(d_model=d)
    tokens = torch.tensor(tiny_dataset(n_rows=64, context_size=16, seed=123)["tokens"])
    _, cache = model.run_with_cache(tokens, names_filter=TINY_HOOK)
    held_out = cache[TINY_HOOK].reshape(-1, d).detach()

    configs = {
        "mutual_choice": MutualChoiceTrainingSAEConfig(d_in=d, d_sae=args.d_sae, k=args.k, topk_threshold_lr=args.threshold_lr),
        "feature_choice (zipf)": FeatureChoiceTrainingSAEConfig(d_in=d, d_sae=args.d_sae, k=args.k, threshold_lr=args.threshold_lr),
        "feature_choice (uniform)": FeatureChoiceTrainingSAEConfig(d_in=d, d_sae=args.d_sae, k=args.k, threshold_lr=args.threshold_lr, capacity="uniform"),
    }
    print(f"tiny model d_in={d}, d_sae={args.d_sae}, k={args.k}, {args.steps} steps of 64 tokens, SAE lr={args.lr}, threshold lr={args.threshold_lr}")
    print(f"held-out tokens: {held_out.shape[0]}")
    print(f"{'architecture':<28}{'training L0':>12}{'inference L0':>14}{'drift':>9}{'empty tokens':>14}")
    for name, cfg in configs.items():
        with tempfile.TemporaryDirectory() as out:
            sae = train_tiny(cfg, steps=args.steps, output_path=out, lr=args.lr)
            batch_l0 = float((sae.encode(held_out) != 0).sum(-1).float().mean())
            acts = SAE.load_from_disk(out).encode(held_out).detach()
        l0 = (acts != 0).sum(-1).float()
        print(f"{name:<28}{batch_l0:>12.2f}{float(l0.mean()):>14.2f}{(float(l0.mean()) - args.k) / args.k:>+9.1%}{float((l0 == 0).float().mean()):>14.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
