"""One rank of tests/distributed/test_distributed.py (run as a script by that test: RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT and OUT set). World size 3: every check runs at R=3 on the world group and at R=2 on the
sub-group of ranks {0, 1}. Each rank writes OUT/rank<r>.json with its failures (empty list: passed)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

SPLITS = {2: [7, 5], 3: [5, 3, 4]}  # uneven token splits of a 12-token global batch
ARCHS = [
    "mutual_choice",
    "feature_choice",
    "batchtopk_zipf",
    "topk_zipf",
    "abstopk",
    "abstopk_zipf",
    "gradient_topk",
    "top_afa",
]
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    if not ok:
        failures.append(what)


# --- selection primitives against brute force on the concatenated batch -------------------------


def ref_budget(values: torch.Tensor, kk: int) -> set[int]:
    order = torch.argsort(values, descending=True, stable=True)
    pos = order[values[order] > 0]
    return set(pos[:kk].tolist())


def ref_columns(pre: torch.Tensor, caps: torch.Tensor) -> set[int]:
    n, f = pre.shape
    kept = set()
    for j in range(f):
        col = pre[:, j]
        order = torch.argsort(col, descending=True, stable=True)
        order = order[col[order] > 0][: int(caps[j])]
        kept.update((order * f + j).tolist())
    return kept


def primitives(group, r: int, R: int) -> None:
    from sae_allocators.distributed import select as S

    for seed, (sizes, f, k, ints) in enumerate(
        [
            ([6, 2, 9][:R], 16, 3.0, False),
            ([5, 5, 5][:R], 8, 2.5, True),
            ([0, 7, 4][:R], 12, 4.0, True),
            ([3, 9, 1][:R], 8, 7.5, False),
        ]
    ):
        g = torch.Generator().manual_seed(100 + seed)
        total = sum(sizes)
        pre = torch.randn(total, f, generator=g)
        if ints:  # many exact ties, zeros and negatives
            pre = torch.randint(-2, 3, (total, f), generator=g).float()
        off = sum(sizes[:r])
        local = pre[off : off + sizes[r]]
        kk = int(k * total)
        tau, kept, n_kept = S.global_budget_select(local.reshape(-1), kk, group)
        ref = ref_budget(pre.reshape(-1), kk)
        mine = {i for i in ref if off * f <= i < (off + sizes[r]) * f}
        check(
            {int(i) + off * f for i in kept} == mine,
            f"R={R} seed={seed}: global_budget_select kept differs from brute force",
        )
        check(n_kept == len(ref), f"R={R} seed={seed}: n_kept {n_kept} != {len(ref)}")
        if ref:
            check(
                float(tau) == float(pre.reshape(-1)[sorted(ref, key=lambda i: -pre.reshape(-1)[i])[-1]]),
                f"R={R} seed={seed}: tau",
            )
        caps = torch.randint(0, total + 2, (f,), generator=g)
        tau_c, kept_c = S.global_column_select(local, caps, group)
        ref_c = ref_columns(pre, caps)
        mine_c = {i for i in ref_c if off * f <= i < (off + sizes[r]) * f}
        check(
            {int(i) + off * f for i in kept_c} == mine_c,
            f"R={R} seed={seed}: global_column_select kept differs from brute force",
        )
        same_everywhere(torch.cat([tau.reshape(1).double(), tau_c.double()]), group, f"R={R} seed={seed}: tau")


def same_everywhere(v: torch.Tensor, group, what: str) -> None:
    lo = v.double().clone().nan_to_num(posinf=1e300, neginf=-1e300).reshape(-1)
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    check(torch.equal(lo, hi), f"{what} differs between ranks")


# --- one distributed training step == one single-process step ------------------------------------


def make_cfg(arch: str):
    from sae_lens import TrainingSAEConfig

    d = {"architecture": arch, "d_in": 8, "d_sae": 24, "k": 3, "aux_k": 4, "dtype": "float32"}
    from sae_allocators.architectures import kinds

    declared = kinds.declared_kinds()  # this project's architectures on the shared step, name -> rule kind
    if declared.get(arch) in kinds.BATCH_KINDS:
        d["k"] = 2.5
    if arch in declared:
        d.update(zipf_min_steps=0, density_window=2)
    if arch == "gradient_topk":
        d.update(beta=1.0)
    if arch == "top_afa":
        d.pop("k")
    return TrainingSAEConfig.from_dict(d)


def batches(arch: str, n_steps: int, total: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    width = 16 if arch == "gradient_topk" else 8
    out = [torch.randn(total, width, generator=g) for _ in range(n_steps)]
    for x in out:  # outlier-norm rows (BOS-like) on several ranks: the batch rules' guard ranks them
        x[::5] *= 30.0  # at the *global* median norm, so a rank's own median would change the selection
    return out


def trainer_for(sae):
    from sae_lens.training.sae_trainer import SAETrainer

    from sae_allocators.testing import runner_config

    cfg = runner_config(sae.cfg, steps=10, batch_tokens=12, dead_feature_window=0, lr=1e-3)
    return SAETrainer(cfg=cfg.to_sae_trainer_config(), sae=sae, data_provider=iter(()))


def build(arch: str):
    from sae_lens import TrainingSAE

    torch.manual_seed(1234)
    return TrainingSAE.from_dict(make_cfg(arch).to_dict())


def state(sae, trainer) -> dict[str, torch.Tensor]:
    out = {f"p.{k}": v.detach().clone() for k, v in sae.named_parameters()}
    # persistent buffers only: a non-persistent one is a process's own speed-up state (feature_choice's
    # selection estimate, which the global selection does not use), not part of the model
    saved = set(sae.state_dict())
    out.update({f"b.{k}": v.detach().clone().double() for k, v in sae.named_buffers() if k in saved})
    out["t.passes_since_fired"] = trainer.n_forward_passes_since_fired.clone()
    out["t.act_freq"] = trainer.act_freq_scores.clone()
    return out


def run_steps(sae, trainer, data, rows: slice | None):
    """Train on ``data`` (this rank's ``rows`` of each global batch); the codes and state after each step."""
    acts, states = [], []
    for x in data:
        xb = x if rows is None else x[rows]
        out = trainer._train_step(sae=sae, sae_in=xb)
        fa = out.feature_acts
        acts.append((fa.to_dense() if fa.is_sparse else fa).detach().clone())
        states.append(state(sae, trainer))
    return acts, states


def equivalence(group, r: int, R: int, arch: str) -> None:
    from sae_allocators.distributed import make_data_parallel, sync_trainer

    sizes = SPLITS[R]
    off = sum(sizes[:r])
    rows = slice(off, off + sizes[r])
    data = batches(arch, 3, sum(sizes))
    ref_sae = build(arch)
    ref_tr = trainer_for(ref_sae)
    ref_acts, ref_states = run_steps(ref_sae, ref_tr, data, None)

    torch.manual_seed(99 + r)  # different seeds per rank: make_data_parallel must copy rank 0's init
    sae = build(arch)
    if r != 0:
        with torch.no_grad():
            for p in sae.parameters():
                p.add_(torch.randn_like(p))
    dp = make_data_parallel(sae, group)
    tr = trainer_for(sae)
    sync_trainer(tr, group)
    acts, states = run_steps(sae, tr, data, rows)
    for step, (a, ra, st, ref_state) in enumerate(zip(acts, ref_acts, states, ref_states)):
        check(
            torch.equal(a != 0, ra[rows] != 0),
            f"{arch} R={R} rank {r} step {step}: selections differ ({int((a != 0).ne(ra[rows] != 0).sum())} entries)",
        )
        check(torch.allclose(a, ra[rows], atol=1e-5, rtol=1e-4), f"{arch} R={R} rank {r} step {step}: codes differ")
        for name, ref in ref_state.items():
            v = st[name]
            ok = v.shape == ref.shape and torch.allclose(v.double(), ref.double(), atol=2e-5, rtol=1e-4, equal_nan=True)
            diff = float((v.double() - ref.double()).abs().max()) if v.shape == ref.shape else "shape"
            check(
                ok, f"{arch} R={R} rank {r} step {step}: {name} differs from the single-process run (max diff {diff})"
            )
        # identical across ranks, bit for bit (every rank applied the same averaged gradient). This
        # holds on CUDA/NCCL too (all-reduce gives every rank the same values); the comparison with
        # the single-process run above needs its tolerance there as well: index_add_'s atomic adds
        # (docs/distributed.md, "On CUDA (NCCL), what bit for bit means")
        for name, v in st.items():
            same_everywhere(v, group, f"{arch} R={R} step {step}: {name}")
    dp.remove()


def bad_input(r: int, world: int, out: str) -> None:
    """Last checks (they leave the world group unusable): mismatched configs, then a rank that dies."""
    import time

    from sae_lens import TrainingSAE

    from sae_allocators.distributed import DistributedConfigError, all_reduce, make_data_parallel

    cfg = make_cfg("mutual_choice").to_dict()
    cfg["d_sae"] = 24 if r < 2 else 32
    try:
        make_data_parallel(TrainingSAE.from_dict(cfg), dist.group.WORLD)
        failures.append(f"rank {r}: mismatched configs were not detected")
    except DistributedConfigError as exc:
        check(
            "differs between ranks" in str(exc) and "[0, 1]" in str(exc) and "[2]" in str(exc),
            f"rank {r}: unclear mismatch error: {exc}",
        )
    # a rank that hangs: the others' collective fails after the group's timeout, with a clear error
    from sae_allocators.distributed.launch import explain_collective_failure

    short = dist.new_group(list(range(world)), timeout=timedelta(seconds=5))
    if r == world - 1:
        time.sleep(12)
    else:
        t0 = time.monotonic()
        try:
            all_reduce(torch.ones(2), "sum", short)
            failures.append(f"rank {r}: a collective with a hung rank returned")
        except Exception as exc:  # noqa: BLE001
            waited = time.monotonic() - t0
            check(waited < 11, f"rank {r}: a hung rank was detected only after {waited:.0f} s (timeout 5 s)")
            message = explain_collective_failure(exc, r, world)
            check(
                message is not None and "died or hung" in message, f"rank {r}: unexplained collective failure: {exc!r}"
            )
    if r == world - 1:  # this rank dies before the next collective
        write(out, r)
        os._exit(0)
    t0 = time.monotonic()
    try:
        all_reduce(torch.ones(4), "sum", dist.group.WORLD)
        failures.append(f"rank {r}: a collective with a dead rank returned")
    except Exception:  # noqa: BLE001  (gloo: connection closed / timeout)
        check(
            time.monotonic() - t0 < float(os.environ.get("DIST_TIMEOUT", "180")) + 30,
            f"rank {r}: dead rank detected only after {time.monotonic() - t0:.0f} s",
        )


def write(out: str, r: int) -> None:
    with open(os.path.join(out, f"rank{r}.json"), "w") as fh:
        json.dump(failures, fh)


def main() -> None:
    r, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(
        "gloo", rank=r, world_size=world, timeout=timedelta(seconds=int(os.environ.get("DIST_TIMEOUT", "180")))
    )
    torch.set_num_threads(1)
    import sae_allocators  # noqa: F401  (registers the architectures)

    pair = dist.new_group([0, 1])
    which = os.environ.get("WHICH", "primitives,equivalence,bad_input").split(",")
    archs = [a for a in os.environ.get("ARCHS", ",".join(ARCHS)).split(",") if a]
    for R, group in ((2, pair), (3, dist.group.WORLD)):
        if r >= R:
            continue
        try:
            if "primitives" in which:
                primitives(group, r, R)
            if "equivalence" in which:
                for arch in archs:
                    equivalence(group, r, R, arch)
        except Exception:  # noqa: BLE001
            failures.append(f"R={R} rank {r} raised:\n{traceback.format_exc()}")
            break
    if "bad_input" in which:
        try:
            bad_input(r, world, os.environ["OUT"])
        except Exception:  # noqa: BLE001
            failures.append(f"bad input checks, rank {r} raised:\n{traceback.format_exc()}")
        write(os.environ["OUT"], r)
        os._exit(0)  # the world group is broken on purpose: no destroy_process_group
    write(os.environ["OUT"], r)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
