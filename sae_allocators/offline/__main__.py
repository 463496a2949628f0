"""``python -m sae_allocators.offline prepare|info|check [--cache DIR]``.

* ``prepare``: fetch, convert and cache the assets (or verify and reuse them).
* ``info``: what the cache holds: parts, files, sizes, sources, token counts (no fetching).
* ``check``: load the model and measure it: ``run_with_cache`` time at a middle layer, peak
  memory, TransformerLens vs Hugging Face logits, loss on a plain English paragraph.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from .. import devices

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")

#: not in the corpus; used by ``check`` for the model's loss on ordinary English
PLAIN_PARAGRAPH = (
    "The history of the city goes back more than two thousand years. It was founded as a small trading "
    "post on the banks of the river, where merchants from the north exchanged furs and timber for grain "
    "and wine from the south. Over the centuries the settlement grew into a busy market town, and by the "
    "middle ages it had become one of the most important centres of commerce in the region. Today the old "
    "town is known for its narrow streets, its medieval churches and its lively open-air markets, which "
    "attract visitors from all over the world."
)


def _cmd_prepare(args: argparse.Namespace) -> int:
    from . import preparation

    start = time.perf_counter()
    prepared = preparation.prepare(args.cache, quiet=args.quiet, verify=not args.no_verify)
    print(f"prepared {prepared.cache_dir} in {time.perf_counter() - start:.1f} s")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from . import cache, preparation

    root = Path(args.cache).expanduser() if args.cache else preparation.default_cache_dir()
    print(f"cache: {root}")
    if not root.is_dir():
        print("  (empty: run `python -m sae_allocators.offline prepare`)")
        return 1
    status = 0
    for part in preparation.PARTS:
        verdict = cache.verify_part(root / part, hashes=args.verify)
        m = verdict.manifest or {}
        size = sum(f["bytes"] for f in m.get("files", {}).values())
        state = "ok" if verdict.ok else f"INVALID: {verdict.describe()}"
        built = (
            f", {preparation.format_bytes(size)}, built {m.get('built_at')} in {m.get('build_seconds')} s" if m else ""
        )
        print(f"{part}: {state}{built}")
        status |= not verdict.ok
        for rel, rec in m.get("files", {}).items():
            print(f"    {rel:28s} {preparation.format_bytes(rec['bytes']):>10s}  sha256 {rec['sha256'][:16]}")
        info = m.get("info", {})
        for src in info.get("sources", [info["source"]] if "source" in info else []):
            print(f"    from {src['registry']} {src['requirement']} ({src['licence']})")
        if "stats" in info:
            for name, s in sorted(info["stats"].items(), key=lambda kv: kv[0] == "total"):
                print(f"    {name:12s} {s['documents']:5d} documents {s['words']:>10,} words")
        if "tokens" in info:
            ordered = sorted(info["tokens"].items(), key=lambda kv: kv[0] == "total")
            print("    tokens: " + ", ".join(f"{k} {v:,}" for k, v in ordered))
        if "n_layers" in info:
            print(
                f"    {info['architecture']}: {info['n_layers']} layers, d_model {info['d_model']}, vocab {info['vocab_size']}, "
                f"{info['n_params'] / 1e6:.1f}M parameters, BOS {info['bos_token']!r} ({info['bos_token_id']})"
            )
    print(f"total on disk: {preparation.format_bytes(preparation.cache_size(root))}")
    return int(status)


def _peak_rss_mb() -> float:
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024


def _cmd_check(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from .model import load_model, tl_safe_dir
    from .preparation import load_prepared

    if args.threads:
        torch.set_num_threads(args.threads)
    prepared = load_prepared(args.cache)
    t0 = time.perf_counter()
    model = load_model(prepared, device=args.device)
    result: dict[str, object] = {
        "load_model_s": round(time.perf_counter() - t0, 2),
        "peak_rss_mb_after_load": round(_peak_rss_mb()),
    }

    layer = args.layer if args.layer is not None else model.cfg.n_layers // 2
    hook = f"blocks.{layer}.hook_resid_post"
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.cfg.d_vocab, (args.batch, args.seq), generator=gen).to(args.device)
    batch[:, 0] = model.tokenizer.bos_token_id
    times, cpu_times = [], []
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # first run warms up
            t, c = time.perf_counter(), time.process_time()
            _, act_cache = model.run_with_cache(batch, stop_at_layer=layer + 1, names_filter=hook)
            act_cache[hook].sum().item()  # wait for the device
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    result.update(
        {
            "run_with_cache": f"{args.batch}x{args.seq} tokens, stop_at_layer={layer + 1} ({hook})",
            "run_with_cache_s": [round(x, 3) for x in times[1:]],
            "run_with_cache_process_cpu_s": [round(x, 3) for x in cpu_times[1:]],
            "tokens_per_s": round(args.batch * args.seq / min(times[1:])),
            "peak_rss_mb_after_run_with_cache": round(_peak_rss_mb()),
            "torch_threads": torch.get_num_threads(),
            "load_average": [round(x, 1) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        }
    )

    hf = AutoModelForCausalLM.from_pretrained(
        str(tl_safe_dir(prepared.model_dir)), dtype=torch.float32, local_files_only=True
    )
    hf = hf.to(args.device).eval()
    tokens = model.to_tokens("The quick brown fox jumps over the lazy dog while the farmer watches from the porch.")
    with torch.no_grad():
        diff = (model(tokens) - hf(tokens).logits).abs().max().item()
        loss = model(model.to_tokens(PLAIN_PARAGRAPH), return_type="loss").item()
    result.update(
        {
            "tl_vs_hf_max_abs_logit_diff": diff,
            "plain_paragraph_loss": round(loss, 4),
            "plain_paragraph_perplexity": round(float(torch.tensor(loss).exp()), 2),
        }
    )
    print(json.dumps(result, indent=2))
    return 0 if diff < 1e-3 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sae_allocators.offline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="fetch, convert and cache the assets (or verify and reuse them)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.add_argument("--no-verify", action="store_true", help="check sizes only, not SHA-256, of cached files")
    p.set_defaults(func=_cmd_prepare)
    p = sub.add_parser("info", help="what the cache holds (no fetching)")
    p.add_argument("--verify", action="store_true", help="also verify SHA-256 checksums")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("check", help="load the model; compare with Hugging Face; time run_with_cache")
    p.add_argument("--device", default=devices.CPU)
    p.add_argument("--layer", type=int, default=None, help="hook layer (default: the middle one)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=_cmd_check)
    for p in sub.choices.values():
        p.add_argument(
            "--cache",
            default=None,
            help="cache folder (default: $SAE_ALLOCATORS_CACHE or <checkout>/.cache/offline-assets)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .sources import OfflineAssetError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except OfflineAssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
