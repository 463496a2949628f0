"""SAELens's runner on one rank of a data-parallel run (``sae-allocators train --nproc-per-node N``).

:class:`DistributedRunner` is the workflow's runner (:class:`~sae_allocators.workflow.runner.WorkflowRunner`)
with this rank's share of the config (:func:`~sae_allocators.distributed.launch.per_rank_config`), the
SAE made data-parallel (:func:`~sae_allocators.distributed.make_data_parallel`) and SAELens's trainer
made to keep global statistics (:func:`~sae_allocators.distributed.sync_trainer`). Checkpoints: rank 0
writes the model and trainer state as one process would (named by the tokens of all ranks); every rank
writes its data position into ``<checkpoint>/ranks/<r>/`` and resumes from it. Two objects SAELens
builds have no seam for that, so each becomes an instance of a module-level subclass of its class
(:func:`sae_allocators.mixin.mix_in`; 7 and 8 in the table of :mod:`sae_allocators.patches`): the
trainer a :class:`RankCheckpoints` and, on ranks other than 0, the activation store a
:class:`RankDataPosition`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae_allocators.mixin import mix_in
from sae_lens.training.activations_store import ActivationsStore
from sae_lens.training.sae_trainer import SAETrainer

from sae_allocators.distributed.relaunch import DISTRIBUTED_STATE
from sae_allocators.workflow.runner import WorkflowRunner

RANKS_DIR = "ranks"


def global_checkpoint_name(name: str, world: int) -> str:
    """SAELens names checkpoints by the trainer's (here: this rank's) token count; use the global count."""
    prefix, _, count = name.rpartition("_")
    if count.isdigit():
        return f"{prefix}_{int(count) * world}" if prefix else str(int(count) * world)
    return name


class RankDataPosition(ActivationsStore):
    """The activation store of a rank other than 0 (mixed in): it resumes its own data position."""

    rank_data_dir: str = ""

    def load_from_checkpoint(self, checkpoint_path: Any) -> Any:
        return super().load_from_checkpoint(Path(checkpoint_path) / self.rank_data_dir)


class RankCheckpoints(SAETrainer):
    """Each rank's ``SAETrainer`` (mixed in): checkpoint names count the tokens of all ranks; rank 0
    writes the model and trainer state, the other ranks only their data position (their runner's
    :meth:`DistributedRunner.save_checkpoint`)."""

    dist_rank: int = 0
    dist_world: int = 1
    dist_runner: Any = None

    def save_checkpoint(self, checkpoint_name: str, wandb_aliases: Any = None) -> Any:
        name = global_checkpoint_name(checkpoint_name, self.dist_world)
        if self.dist_rank == 0:
            return super().save_checkpoint(name, wandb_aliases=wandb_aliases)
        if self.cfg.checkpoint_path is not None:
            return self.dist_runner.save_checkpoint(Path(self.cfg.checkpoint_path) / name)
        return super().save_checkpoint(checkpoint_name, wandb_aliases=wandb_aliases)


class DistributedRunner(WorkflowRunner):
    """SAELens's runner (through the workflow's) on rank ``rank`` of ``world`` (see the module docstring)."""

    def __init__(self, cfg: Any, global_cfg: Any, *, rank: int, world: int, group: Any, **kw: Any):
        self.dist_rank, self.dist_world, self.dist_group = rank, world, group
        super().__init__(cfg, **kw)
        self.global_cfg = global_cfg
        if rank != 0:  # each rank resumes its own data position
            mix_in(self.activations_store, RankDataPosition, rank_data_dir=f"{RANKS_DIR}/{rank}")

    def adopt_trainer(self, trainer: Any) -> Any:
        trainer = super().adopt_trainer(trainer)
        return mix_in(trainer, RankCheckpoints, dist_rank=self.dist_rank, dist_world=self.dist_world, dist_runner=self)

    def run_trainer_with_interruption_handling(self, trainer: Any) -> Any:
        from sae_allocators.distributed.data_parallel import make_data_parallel, sync_trainer

        self.data_parallel = make_data_parallel(self.sae, self.dist_group)
        sync_trainer(trainer, self.dist_group)
        sae = super().run_trainer_with_interruption_handling(trainer)
        world = self.dist_world
        if self.final_metrics is not None:
            self.final_metrics["training_tokens"] = int(trainer.n_training_samples) * world
            self.final_metrics["source"] = (
                f"last training step on rank 0 of {world} (sae-allocators train --nproc-per-node {world})"
            )
            self.final_metrics["distributed"] = {
                "world_size": world,
                "tokens_per_rank_per_step": int(self.cfg.train_batch_size_tokens),
            }
        return sae

    def _as_global(self, fn: Any, *args: Any, **kw: Any) -> Any:
        """Run ``fn`` with ``self.cfg`` the global config, so runner_cfg.json records the command line's
        options (global batch, total tokens), not this rank's share."""
        local, self.cfg = self.cfg, self.global_cfg
        try:
            return fn(*args, **kw)
        finally:
            self.cfg = local

    def save_final_sae(self, sae: Any, output_path: str, log_feature_sparsity: Any = None) -> None:
        self._as_global(super().save_final_sae, sae, output_path, log_feature_sparsity=log_feature_sparsity)

    def save_checkpoint(self, checkpoint_path: Any) -> None:
        if checkpoint_path is None:
            return
        if self.dist_rank == 0:
            self._as_global(super().save_checkpoint, checkpoint_path)
            (Path(checkpoint_path) / DISTRIBUTED_STATE).write_text(json.dumps({"world_size": self.dist_world}))
        else:
            own = Path(checkpoint_path) / RANKS_DIR / str(self.dist_rank)
            own.mkdir(parents=True, exist_ok=True)
            self.activations_store.save_to_checkpoint(own)
