"""Throughput and peak memory of GradientActivationsStore against SAELens's plain ActivationsStore.

Same model, hook, tokens and batch for every mode; timings interleaved round by round in one process
(so machine load hits all modes alike); ratios are of medians. Modes:

- ``plain``: SAELens's store, ``run_with_cache(stop_at_layer=hook layer + 1)`` (its default).
- ``plain_full``: the same forward without ``stop_at_layer`` (a full forward, no gradient).
- ``gradient``: our store: full forward + backward to the hook, ``[x | g]`` rows.

Peak memory: each mode runs in its own subprocess; on CUDA ``max_memory_allocated``, on CPU the
peak resident set (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) above the RSS
after the model is loaded and warmed up.

The model is random (cost does not depend on the weights): by default GPT-2-small shaped
(12 layers, d_model 768, vocab 50257). ``--model smollm2`` loads the offline SmolLM2-135M cache
(``--cache-dir``) if it exists. Examples::

    python benchmarks/gradient_store.py                       # GPT-2-small shaped, hook blocks.6.hook_resid_pre
    python benchmarks/gradient_store.py --hook blocks.2.hook_resid_post --rounds 3
    python benchmarks/gradient_store.py --layers 4 --d-model 256 --vocab 4096 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
}.items():
    os.environ.setdefault(_k, _v)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("plain", "plain_full", "gradient")


def build_model(args):
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if args.model == "smollm2":
        from transformers import AutoTokenizer  # noqa: F401
        from transformer_lens import loading_from_pretrained as loading

        cfg = loading.get_pretrained_model_config(args.cache_dir, device=args.device, dtype=torch.float32)
        model = HookedTransformer(cfg)
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(args.cache_dir, dtype=torch.float32)
        model.load_and_process_state_dict(
            loading.get_pretrained_state_dict(args.cache_dir, cfg, hf),
            fold_ln=False,
            center_writing_weights=False,
            center_unembed=False,
            fold_value_biases=False,
        )
        return model
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=args.layers,
        d_model=args.d_model,
        n_ctx=args.ctx,
        d_head=64,
        n_heads=max(1, args.d_model // 64),
        d_mlp=4 * args.d_model,
        d_vocab=args.vocab,
        act_fn="gelu_new",
        normalization_type="LN",
        device=args.device,
        seed=0,
    )
    return HookedTransformer(cfg)


def build_store(mode, model, args):
    import datasets
    import torch
    from sae_lens.training.activations_store import ActivationsStore

    from sae_allocators.gradient import GradientActivationsStore

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, model.cfg.d_vocab, (4 * args.batch * (args.rounds + 2), args.ctx), generator=g)
    ds = datasets.Dataset.from_dict({"tokens": tokens.tolist()})
    cls = GradientActivationsStore if mode == "gradient" else ActivationsStore
    d_in = model.cfg.d_model
    store = cls(
        model=model,
        dataset=ds,
        streaming=False,
        hook_name=args.hook,
        hook_head_index=None,
        context_size=args.ctx,
        d_in=d_in,
        n_batches_in_buffer=4,
        total_training_tokens=10**9,
        store_batch_size_prompts=args.batch,
        train_batch_size_tokens=args.batch * args.ctx,
        prepend_bos=False,
        normalize_activations="none",
        device=torch.device(args.device),
        dtype="float32",
    )
    if mode == "plain_full":
        real = model.run_with_cache

        def full(*a, stop_at_layer=None, **kw):  # noqa: ARG001 - drop SAELens's early stop
            return real(*a, **kw)

        store.model = _Proxy(model, run_with_cache=full)
    return store


class _Proxy:
    """The model with one attribute replaced (so the plain store runs a full forward)."""

    def __init__(self, model, **attrs):
        self._model, self._attrs = model, attrs

    def __getattr__(self, name):
        return self._attrs[name] if name in self._attrs else getattr(self._model, name)


def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_modes(args) -> dict:
    import torch

    torch.set_num_threads(args.threads) if args.threads and not args.device.startswith("cuda") else None
    model = build_model(args)
    stores = {m: build_store(m, model, args) for m in MODES}
    for s in stores.values():  # warm-up
        s.get_raw_llm_batch()
    times = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for m in MODES:
            _sync(args.device)
            t0 = time.perf_counter()
            rows, _ = stores[m].get_raw_llm_batch()
            _sync(args.device)
            times[m].append(time.perf_counter() - t0)
    tokens = args.batch * args.ctx
    assert rows.shape == (tokens, 2 * model.cfg.d_model)
    assert all(p.grad is None for p in model.parameters())
    return {m: tokens / statistics.median(t) for m, t in times.items()} | {"_times": times}


def peak_memory(args, mode) -> float:
    """Peak extra memory (MiB) of ``mode`` for ``--rounds`` batches, in a fresh subprocess."""
    out = subprocess.run(
        [sys.executable, __file__, *sys.argv[1:], "--_memory-of", mode], capture_output=True, text=True, timeout=3600
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])  # kB
    raise KeyError(field)


def memory_child(args, mode) -> None:
    import gc

    import torch

    torch.set_num_threads(args.threads) if args.threads and not args.device.startswith("cuda") else None
    model = build_model(args)
    store = build_store(mode, model, args)
    store.get_raw_llm_batch()
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _vm("VmRSS:") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    for _ in range(max(2, args.rounds // 2)):
        store.get_raw_llm_batch()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _vm("VmHWM:") * 1024
    print(json.dumps({"peak_mib": (peak - base) / 2**20}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["random", "smollm2"], default="random")
    p.add_argument("--cache-dir", default="/work/main-cache-offline/smollm2-135m")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--batch", type=int, default=2, help="store_batch_size_prompts")
    p.add_argument("--hook", default="blocks.6.hook_resid_pre")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on CPU (0: torch's default); 1 is fastest on a loaded shared machine",
    )
    p.add_argument("--device", default="cuda" if _has_cuda() else "cpu")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--quick", action="store_true", help="2 rounds, no memory")
    p.add_argument("--_memory-of", dest="memory_of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.no_memory = 2, True
    if args.memory_of:
        memory_child(args, args.memory_of)
        return

    import torch

    if args.threads and not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    desc = (
        f"device={args.device}"
        + (
            f" ({torch.cuda.get_device_name()})"
            if args.device.startswith("cuda")
            else f" ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
        )
        + f"; model={args.model}"
        + (
            ""
            if args.model == "smollm2"
            else f" (random, {args.layers} layers, d_model {args.d_model}, vocab {args.vocab})"
        )
        + f"; hook={args.hook}; batch={args.batch}x{args.ctx} tokens; rounds={args.rounds}"
    )
    print(desc, flush=True)
    res = time_modes(args)
    for m in MODES:
        ts = ", ".join(f"{t:.3f}" for t in res["_times"][m])
        print(f"  {m:11s} {res[m]:10.1f} tokens/s   (s per batch: {ts})")
    per_tok = {m: 1 / res[m] for m in MODES}
    print(
        f"gradient / plain (stops at hook)  time per token: {per_tok['gradient'] / per_tok['plain']:.2f}x  (target <= 3.5x)"
    )
    print(f"gradient / plain_full (full fwd)  time per token: {per_tok['gradient'] / per_tok['plain_full']:.2f}x")
    print(f"plain_full / plain                time per token: {per_tok['plain_full'] / per_tok['plain']:.2f}x")
    if not args.no_memory:
        mem = {m: peak_memory(args, m) for m in MODES}
        what = "CUDA max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM)"
        print(f"peak extra memory over the loaded model ({what}):")
        for m in MODES:
            print(f"  {m:11s} {mem[m]:9.1f} MiB")
        if mem["plain"] > 0:
            print(f"gradient / plain peak memory: {mem['gradient'] / mem['plain']:.2f}x")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


if __name__ == "__main__":
    main()
