"""gradient_topk's exact bfloat16 screen on real data: SmolLM2-135M-Instruct's activations and
loss gradients at one hook (the offline assets), rows as SAELens's defaults give them (every
context starts with BOS, BOS separates documents, special tokens not excluded).

A ``gradient_topk`` SAE trains on the ``[x | dL/dx]`` rows of ``--batches`` LM batches (one
forward and backward of the model each, ``sae_allocators.gradient.forward_backward``, the
gradient store's computation). Before each training step the selection is computed twice on that
step's pre-activations: by the screen (``screened_topk_indices``) and by the float32 reference
(``screen=False``). Printed per step: whether the kept entries agree, the rows the screen sent to
the reference (``misfits``), the exact stage's width, the largest gradient norm over the batch
mean, and both selections' times; then the totals. Needs the prepared cache
(``python -m sae_allocators.offline prepare``)::

    python benchmarks/gradient_screen_lm.py                      # hook blocks.6.hook_resid_post, d_sae 16384, k 32
    python benchmarks/gradient_screen_lm.py --d-sae 65536 --batches 4
"""

from __future__ import annotations

import argparse
import time

import torch


def kept(pre: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``[N, F]`` mask of the selected entries with a positive code (what the step keeps)."""
    return torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, indices, pre.gather(-1, indices) > 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hook", default="blocks.6.hook_resid_post")
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--batches", type=int, default=8, help="LM batches (forward + backward each)")
    p.add_argument("--contexts", type=int, default=8, help="contexts per LM batch")
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--steps-per-batch", type=int, default=4, help="SAE steps on each batch's rows")
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args(argv)

    from sae_allocators import devices, offline
    from sae_allocators.allocation import gradient as G
    from sae_allocators.architectures.gradient_topk import GradientTopKTrainingSAE, GradientTopKTrainingSAEConfig
    from sae_allocators.architectures._common import pre_activations
    from sae_allocators.gradient import forward_backward
    from sae_lens.saes.sae import TrainStepInput

    assets = offline.prepare(verify=False, quiet=True)
    model = offline.load_model(assets, n_ctx=args.context_size)
    data = offline.tokenized_dataset(assets, model, context_size=args.context_size, seed=0)
    d_in = model.cfg.d_model
    torch.manual_seed(0)
    cfg = GradientTopKTrainingSAEConfig(d_in=d_in, d_sae=args.d_sae, k=args.k, beta=args.beta)
    sae = GradientTopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=args.lr)
    dead = torch.zeros(args.d_sae, dtype=torch.bool)
    print(
        f"{args.hook}, d_in {d_in}, d_sae {args.d_sae}, k {args.k}, beta {args.beta}, grad_normalization "
        f"{cfg.grad_normalization}; bf16 matmul fast here: {devices.bf16_matmul_is_fast(sae.W_dec.device)}"
    )
    print("step | agree | misfit rows | width | max |g|/mean | screen ms | reference ms")
    totals = {"rows": 0, "misfits": 0, "disagree_rows": 0, "screen_s": 0.0, "reference_s": 0.0}
    step = 0
    for b in range(args.batches):
        rows = data[b * args.contexts : (b + 1) * args.contexts]["tokens"]
        tokens = torch.tensor(rows)
        x, g, _ = forward_backward(model, tokens, args.hook)
        x, g = x.reshape(-1, d_in).detach(), g.reshape(-1, d_in).detach()
        for _ in range(args.steps_per_batch):
            with torch.no_grad():
                pre = pre_activations(sae, x)
                gn = G.normalize_grad(g, cfg.grad_normalization)
                stats: dict[str, int] = {}
                t0 = time.perf_counter()
                fast = G.screened_topk_indices(pre, gn, sae.W_dec, args.k, args.beta, unit_rows=True, stats=stats)
                t1 = time.perf_counter()
                ref, _ = G.gradient_topk_indices(
                    pre, g, sae.W_dec, args.k, args.beta, cfg.grad_normalization, screen=False, unit_rows=True
                )
                t2 = time.perf_counter()
                disagree = int((kept(pre, fast) != kept(pre, ref)).any(-1).sum())
                ratio = float(gn.norm(dim=-1).max())
            n = pre.shape[0]
            totals["rows"] += n
            totals["misfits"] += stats["misfits"]
            totals["disagree_rows"] += disagree
            totals["screen_s"] += t1 - t0
            totals["reference_s"] += t2 - t1
            print(
                f"{step} | {'yes' if disagree == 0 else f'no ({disagree} rows)'} | {stats['misfits']}/{n} | "
                f"{stats['width']} | {ratio:.1f} | {1e3 * (t1 - t0):.0f} | {1e3 * (t2 - t1):.0f}"
            )
            sae.train()
            out = sae.training_forward_pass(
                TrainStepInput(
                    sae_in=torch.cat([x, g], -1),
                    coefficients={},
                    dead_neuron_mask=dead,
                    n_training_steps=step,
                    is_logging_step=False,
                )
            )
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            step += 1
    print(
        f"total: {totals['rows']} rows over {step} steps; rows whose kept entries differ: {totals['disagree_rows']}; "
        f"rows sent to the reference: {totals['misfits']} ({100 * totals['misfits'] / totals['rows']:.2f} %); "
        f"selection time screen / reference: {totals['screen_s']:.2f} s / {totals['reference_s']:.2f} s"
    )
    return 0 if totals["disagree_rows"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
