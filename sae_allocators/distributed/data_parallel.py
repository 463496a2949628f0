"""Data parallelism for SAELens training SAEs: one SAE replica per rank, one global batch.

:func:`make_data_parallel` attaches a :class:`DataParallel` to a ``TrainingSAE``:

- it checks that every rank has the same SAE config (a hash, compared at start) and copies rank 0's
  parameters and buffers to every rank (so the replicas start identical even if seeds differ);
- it averages gradients after ``backward`` and before SAELens's ``clip_grad_norm_``: one all-reduce of all
  gradients flattened in a fixed order, run by the autograd engine at the end of the backward pass (the
  same mechanism as ``DistributedDataParallel``), weighted by each rank's token count, so that uneven
  splits give the gradient of the *global* token mean exactly;
- it marks the SAE so that this project's batch-level allocators (Mutual Choice, Feature Choice,
  batchtopk_zipf) select over the global batch and its running statistics (densities, demand, thresholds)
  are reduced, so every rank holds the same buffers (:func:`group_of`).

:func:`sync_trainer` does the same for SAELens's ``SAETrainer``'s own statistics (dead-feature counters,
firing frequencies, the activation-norm scaling factor).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from sae_allocators.distributed import comm

_ATTR = "_sae_allocators_data_parallel"


class DistributedConfigError(RuntimeError):
    """The ranks disagree about something that must be the same everywhere (config, world size)."""


def group_of(module: Any) -> Any:
    """The process group ``module`` trains data-parallel over, or ``None`` (single process)."""
    dp = getattr(module, _ATTR, None)
    return dp.group if dp is not None and comm.active(dp.group) else None


def data_parallel_of(module: Any) -> "DataParallel | None":
    return getattr(module, _ATTR, None)


def config_digest(cfg: Any) -> str:
    """A short hash of a config (``to_dict()`` if it has one), stable across processes."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
    text = json.dumps(d, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_same_everywhere(what: str, digest: str, group: Any, device: Any = None) -> None:
    """Raise :class:`DistributedConfigError` on every rank if ``digest`` differs between ranks."""
    if not comm.active(group):
        return
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.long, device=device)
    parts = comm.all_gather_variable(mine, group, sizes=[mine.numel()] * comm.world(group))
    digests = [bytes(p.tolist()).hex() for p in parts]
    if len(set(digests)) > 1:
        groups: dict[str, list[int]] = {}
        for r, d in enumerate(digests):
            groups.setdefault(d, []).append(r)
        detail = "; ".join(f"ranks {v} have {k}" for k, v in groups.items())
        raise DistributedConfigError(
            f"the {what} differs between ranks ({detail}): every rank must be started with the same "
            "options. Launch all ranks from one command line (sae-allocators train --nproc-per-node N ..., "
            "or torchrun with identical arguments on every node)."
        )


class DataParallel:
    """Gradient averaging and the global-batch marker for one SAE (see the module docstring)."""

    def __init__(self, sae: torch.nn.Module, group: Any):
        self.sae = sae
        self.group = group
        self.params = [p for _, p in sorted(sae.named_parameters(), key=lambda kv: kv[0]) if p.requires_grad]
        self.local_tokens = 0
        self._queued = False
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]
        self.comm_seconds = 0.0  # time spent in the gradient all-reduce (benchmarks/distributed.py)

    def _on_grad(self, _p: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._sync_grads)

    @torch.no_grad()
    def _sync_grads(self) -> None:
        """sum_r n_r g_r / sum_r n_r, in one all-reduce (the token counts ride along as the last element)."""
        import time

        self._queued = False
        if not comm.active(self.group):
            return
        t0 = time.perf_counter()
        flat = [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
            for p in self.params
        ]
        n = float(self.local_tokens) or 1.0  # no encode seen (no hook_sae_input): a plain mean
        dtype = torch.promote_types(
            flat[0].dtype, torch.float32
        )  # float32 sums, as DDP's (token counts exact below 2^24)
        buf = torch.cat([torch.cat(flat).to(dtype) * n, torch.tensor([n], dtype=dtype, device=flat[0].device)])
        buf = comm.all_reduce(buf, "sum", self.group)
        avg = buf[:-1] / buf[-1]
        offset = 0
        for p in self.params:
            g = avg[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        self.comm_seconds += time.perf_counter() - t0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if getattr(self.sae, _ATTR, None) is self:
            delattr(self.sae, _ATTR)


def _count_tokens(sae: Any, dp: DataParallel) -> None:
    """Record each step's local token count (the weight of this rank's gradient) with a forward hook
    on the SAE's ``hook_sae_input`` (every encode passes its ``[..., d_in]`` input through it; the
    training step's is the last before its backward). Without that hook point: a plain mean."""
    point = getattr(sae, "hook_sae_input", None)
    if not isinstance(point, torch.nn.Module):
        return

    def count(_module: Any, _args: Any, output: torch.Tensor) -> None:
        dp.local_tokens = output.shape[:-1].numel()

    dp._handles.append(point.register_forward_hook(count))


def make_data_parallel(sae: torch.nn.Module, group: Any = None) -> DataParallel:
    """Make ``sae`` (a SAELens ``TrainingSAE``) train data-parallel over ``group`` (default: the world).

    Call it on every rank after ``torch.distributed.init_process_group`` and before the first step.
    Checks the configs agree, broadcasts rank 0's parameters and buffers, installs the gradient
    averaging and marks the SAE for global allocation. Without an initialised process group (or with
    one rank) it installs nothing that communicates: the SAE trains exactly as in one process.
    """
    import torch.distributed as dist

    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    old = data_parallel_of(sae)
    if old is not None:
        old.remove()
    dev = next(iter(sae.parameters())).device
    if comm.active(group):
        check_same_everywhere("SAE config", config_digest(sae.cfg), group, dev)
        with torch.no_grad():
            for t in list(sae.parameters()) + list(sae.buffers()):
                comm.broadcast_(t.data, 0, group)
    dp = DataParallel(sae, group)
    setattr(sae, _ATTR, dp)
    _count_tokens(sae, dp)
    return dp


def sync_trainer(trainer: Any, group: Any = None) -> None:
    """Make a SAELens ``SAETrainer``'s own statistics global: after every step the dead-feature counters
    are the minimum over ranks (a feature fired if it fired anywhere) and the firing frequencies are
    summed; the activation-norm scaling factor is estimated on every rank's data and averaged."""
    import torch.distributed as dist

    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    if not comm.active(group):
        return
    from sae_allocators.distributed.trainer_stats import GlobalNormEstimate, GlobalTrainerStats
    from sae_allocators.mixin import mix_in

    mix_in(trainer, GlobalTrainerStats, dp_group=group)
    mix_in(trainer.activation_scaler, GlobalNormEstimate, dp_group=group, dp_device=trainer.act_freq_scores.device)
