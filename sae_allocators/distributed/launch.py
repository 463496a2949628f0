"""Launch SAELens training on many processes: ``sae-allocators train --nproc-per-node N <SAELens options>``.

``--nproc-per-node N`` re-runs the same command line under ``torchrun`` (``torch.distributed.run
--standalone``), which starts N copies of :func:`main`; for several nodes, or your own launcher, run
the module directly on every node::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m sae_allocators.distributed.launch --architecture mutual_choice --k 32 ...

Each rank runs SAELens's runner and trainer (:class:`~sae_allocators.distributed.runner.DistributedRunner`) on its
own shard of the dataset (``datasets.distributed.split_dataset_by_node``). The options mean what they
mean in one process: ``train_batch_size_tokens`` is the *global* batch (each of R ranks takes
``1/R`` of it; it must divide), ``training_tokens`` the total over ranks, so the number of steps, the
schedules and the algorithm (global Mutual/Feature Choice, see :mod:`sae_allocators.distributed.select`)
are those of the one-process run. Rank 0 alone logs to wandb, writes checkpoints and the final output;
every rank writes its data position into ``<checkpoint>/ranks/<r>/`` so a resume with the same number of
ranks continues each shard where it stopped.

Backend: NCCL with one GPU per rank when the config's device is CUDA, gloo on CPU; override with
``SAE_ALLOCATORS_DIST_BACKEND`` (``nccl`` / ``gloo``). Collective timeout: ``SAE_ALLOCATORS_DIST_TIMEOUT``
seconds (default 600): a rank that hangs makes the others fail with an error after that long, never a
silent hang; a rank that dies makes torchrun stop the others.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from datetime import timedelta
from typing import Any, Sequence

from sae_allocators import devices

# the launcher's side (before torchrun), importable without the workflow; re-exported here
from sae_allocators.distributed.relaunch import (
    DISTRIBUTED_STATE,
    LaunchError,
    check_resume,
    choose_backend,
    env_int,
    relaunch,
    split_nproc,
    torchrun_command,
)

__all__ = [
    "DISTRIBUTED_STATE",
    "LaunchError",
    "check_resume",
    "choose_backend",
    "env_int",
    "relaunch",
    "split_nproc",
    "torchrun_command",
    "main",
]

# --- under torchrun: one rank ----------------------------------------------------------------------


def per_rank_config(cfg: Any, rank: int, world: int, device: str | None = None) -> Any:
    """This rank's copy of the runner config: ``1/world`` of the global batch and of the tokens; only
    rank 0 logs and writes the final output; non-zero ranks keep ``checkpoint_path`` for their data
    position only (see :class:`~sae_allocators.distributed.runner.DistributedRunner`)."""
    n = cfg.train_batch_size_tokens
    if n % world:
        raise LaunchError(
            f"train_batch_size_tokens={n} does not divide into {world} ranks: it is the global batch, "
            f"split evenly across ranks. Use a multiple of {world} (e.g. {n - n % world or world})."
        )
    steps = cfg.training_tokens // n
    changes: dict[str, Any] = {"train_batch_size_tokens": n // world, "training_tokens": steps * (n // world)}
    if device is not None:
        changes["device"] = device
    if rank != 0:
        changes["output_path"] = None
        changes["logger"] = dataclasses.replace(cfg.logger, log_to_wandb=False)
    # a shallow copy with fields set (dataclasses.replace would re-run __post_init__, which gives
    # SAELens's checkpoint_path a new random suffix)
    out = copy.copy(cfg)
    for key, value in changes.items():
        setattr(out, key, value)
    return out


def shard_dataset(cfg: Any, rank: int, world: int) -> Any:
    """This rank's shard of the configured dataset (loaded as SAELens's ActivationsStore loads it)."""
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    kw = {}
    if "dataset_trust_remote_code" in {f.name for f in dataclasses.fields(cfg)}:
        kw["trust_remote_code"] = cfg.dataset_trust_remote_code
    ds = load_dataset(cfg.dataset_path, split="train", streaming=cfg.streaming, **kw)
    return split_dataset_by_node(ds, rank=rank, world_size=world)


def explain_collective_failure(exc: BaseException, rank: int, world: int) -> str | None:
    """The error to show when a collective failed because another rank died or hung (else None)."""
    text = str(exc)
    if not (
        type(exc).__name__ == "DistBackendError"
        or any(w in text.lower() for w in ("timed out", "timeout", "connection", "closed by peer"))
    ):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return (
        f"sae-allocators train (rank {rank}/{world}): a collective failed ({type(exc).__name__}: {first}). "
        "Another rank died or hung (see its own error above); this rank stops and writes nothing. Fix that "
        "rank's problem and restart, or resume from the last checkpoint with the same --nproc-per-node "
        "(SAE_ALLOCATORS_DIST_TIMEOUT sets how long a rank waits for the others, default 600 s)."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """One rank: parse SAELens options, join the process group, train this rank's shard."""
    import torch
    import torch.distributed as dist

    from sae_allocators.distributed.data_parallel import DistributedConfigError, check_same_everywhere, config_digest
    from sae_allocators.sae_folder import SaeFolderError
    from sae_allocators.workflow import train as wf

    argv = list(sys.argv[1:] if argv is None else argv)
    rank, world = env_int("RANK"), env_int("WORLD_SIZE")
    local_rank, local_world = env_int("LOCAL_RANK", 0), env_int("LOCAL_WORLD_SIZE", world)
    if rank != 0:
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        cfg = wf.parse_args(argv)
        wf.check_before_training(cfg, world=world)  # device, resume checkpoint, output folder
        backend = choose_backend(
            cfg.device,
            os.environ.get("SAE_ALLOCATORS_DIST_BACKEND"),
            local_world,
            torch.cuda.device_count() if torch.cuda.is_available() else 0,
        )
        timeout = timedelta(seconds=env_int("SAE_ALLOCATORS_DIST_TIMEOUT", 600))
    except SystemExit as exc:
        return int(exc.code or 0)
    except (
        LaunchError,
        ValueError,
    ) as exc:  # the same on every rank (DeviceError, SaeFolderError, config checks): once
        if rank == 0:
            print(f"sae-allocators train (rank {rank}/{world}): error: {exc}", file=sys.stderr)
        return 2
    device = None
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = f"{devices.CUDA}:{local_rank}"
    dist.init_process_group(backend, timeout=timeout)
    try:
        group = dist.group.WORLD
        dev = torch.device(device) if device else torch.device(devices.CPU)
        # SAELens's default checkpoint_path has a random suffix: every rank takes rank 0's
        shared = [cfg.checkpoint_path]
        dist.broadcast_object_list(shared, src=0)
        cfg.checkpoint_path = shared[0]
        check_same_everywhere("training configuration (command-line options)", config_digest(cfg), group, dev)
        check_resume(cfg, world)
        local_cfg = per_rank_config(cfg, rank, world, device)
        dataset = shard_dataset(cfg, rank, world) if isinstance(cfg.dataset_path, str) and cfg.dataset_path else None
        from sae_allocators.distributed.runner import DistributedRunner

        runner = DistributedRunner(local_cfg, cfg, rank=rank, world=world, group=group, override_dataset=dataset)
        runner.sae_result = runner.run()
        if rank == 0 and cfg.output_path is not None:
            print(f"Trained {cfg.sae.architecture()} SAE on {world} ranks ({backend}); saved to {cfg.output_path}")
            if runner.final_metrics:
                print(
                    f"Final metrics ({runner.final_metrics['training_tokens']} tokens): "
                    + ", ".join(f"{k}={v:.4g}" for k, v in runner.final_metrics["metrics"].items())
                )
        dist.barrier()
    except (DistributedConfigError, LaunchError) as exc:
        # these checks give every rank the same answer: reported once, by rank 0 (the others exit quietly)
        if rank == 0:
            print(f"sae-allocators train (rank {rank}/{world}): error: {exc}", file=sys.stderr)
        return 2
    except SaeFolderError as exc:  # rank 0's final save refused (non-finite weights, ...): only rank 0 saves
        print(f"sae-allocators train (rank {rank}/{world}): error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        message = explain_collective_failure(exc, rank, world)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
