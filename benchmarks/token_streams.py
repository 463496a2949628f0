"""Real token streams: where the batch budget goes with SAELens's default data options.

SmolLM2-135M (offline cache), layer 6, activations from SAELens's ActivationsStore with BOS prepended
and special tokens kept; d_sae 4608, k 16, 1,024-token batches, 100 steps (the case of
docs/mutual_choice.md, "Real token streams"). For each batch rule with the outlier guard on (default)
and off, prints the budget share of outlier rows (norm > 5x the batch median) and of the top 1 % of
tokens over the second half of training, per-position L0 of the training rule and of the saved
(uncalibrated) model on 16 held-out contexts, the saved model's mean L0, NMSE and the median per-token
FVU over ordinary tokens. TopK (SAELens) for reference.

    .venvs/test/bin/python benchmarks/token_streams.py [--steps 100] [--arch mutual_choice ...] [--ratio 4 --ratio 0]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--k", type=float, default=16)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--arch", action="append", default=None)
    ap.add_argument(
        "--ratio", action="append", type=float, default=None, help="outlier_norm_ratio values (0: guard off)"
    )
    ap.add_argument("--cache", default=None, help="offline cache (default: the project's)")
    args = ap.parse_args()
    import torch
    from sae_lens import SAE

    import sae_allocators  # noqa: F401
    from sae_allocators import offline
    from sae_allocators.benchmark import token_streams

    t0 = time.perf_counter()
    stream = token_streams.saelens_default_stream(offline.prepare(args.cache, verify=False, quiet=True))
    pos = stream.positions()
    print(
        f"# {len(stream.batches)} training batches of {stream.batches[0].shape[0]} tokens (SAELens defaults: BOS "
        f"prepended, special tokens kept) in {time.perf_counter() - t0:.0f} s; held-out: {pos.numel()} tokens, "
        f"{int((pos == 0).sum())} BOS, {int((pos == 1).sum())} document starts; torch threads {torch.get_num_threads()}"
    )
    archs = args.arch or ["mutual_choice", "feature_choice", "batchtopk_zipf", "topk"]
    ratios = args.ratio or [4.0, 0.0]
    cols = (
        "arch",
        "guard",
        "share_outlier",
        "share_top1%",
        "train_L0 bos/first/rest",
        "export_L0",
        "export bos/first/rest",
        "NMSE",
        "median_FVU",
        "s",
    )
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for name in archs:
        for ratio in ratios if name != "topk" else [None]:
            t = time.perf_counter()
            extra = {} if ratio is None else {"outlier_norm_ratio": ratio}
            sae, shares = token_streams.train(
                name, stream, steps=args.steps, d_sae=args.d_sae, k=args.k if name != "topk" else int(args.k), **extra
            )
            with tempfile.TemporaryDirectory() as tmp:
                sae.save_inference_model(tmp)
                saved = SAE.load_from_disk(tmp)
            f = token_streams.evaluate(sae, stream, saved)
            guard = "–" if ratio is None else ("off" if ratio == 0 else f"{ratio:g}")
            print(
                f"| {name} | {guard} | {shares['budget_share_outlier_rows']:.1%} | {shares['budget_share_top1pct']:.1%} | "
                f"{f['train_l0_bos']:.1f} / {f['train_l0_doc_first']:.1f} / {f['train_l0_rest']:.1f} | {f['export_l0']:.1f} | "
                f"{f['export_l0_bos']:.0f} / {f['export_l0_doc_first']:.1f} / {f['export_l0_rest']:.1f} | {f['nmse']:.3f} | "
                f"{f['median_token_fvu']:.3f} | {time.perf_counter() - t:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
