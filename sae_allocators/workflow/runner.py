"""SAELens's runner as ``sae-allocators train`` runs it: final metrics and an atomic final save.

:class:`WorkflowRunner` is SAELens's ``LanguageModelSAETrainingRunner`` plus

- the training architecture in the saved metadata (SAELens >= 6.4x records it; 6.38 does not);
- ``final_metrics.json`` beside the saved SAE: the last training step's losses, L0, explained
  variance, the dead features and the running budget shares (:func:`final_metrics`), which
  ``sae-allocators push`` puts on the model card;
- the final save written into a hidden sibling folder and switched into place whole
  (:func:`sae_allocators.io.atomic_dir`), calibration first (:class:`CalibratingRunnerMixin`).

SAELens builds its ``SAETrainer`` inside ``run()`` with no argument to choose its class: the runner
makes the trainer it is handed a :class:`RecordingTrainer` (a module-level ``SAETrainer`` subclass that
keeps each step's output for the final metrics; :func:`sae_allocators.mixin.mix_in`, 6 in the table
of :mod:`sae_allocators.patches`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from sae_lens import LanguageModelSAETrainingRunner
from sae_lens.training.sae_trainer import SAETrainer

from sae_allocators.mixin import mix_in
from sae_allocators.calibration import CalibratingRunnerMixin
from sae_allocators.io import atomic_dir, atomic_write_json
from sae_allocators.sae_folder import METRICS_FILENAME


class RecordingTrainer(SAETrainer):
    """SAELens's ``SAETrainer`` keeping the output of the last training step (mixed into the one
    SAELens's runner builds)."""

    last_output: Any = None

    def _train_step(self, sae: Any, sae_in: torch.Tensor) -> Any:  # (SAELens 6.38's fit has no step())
        out = super()._train_step(sae=sae, sae_in=sae_in)
        self.last_output = out
        return out


class WorkflowRunner(CalibratingRunnerMixin, LanguageModelSAETrainingRunner):
    """SAELens's runner with final metrics and an atomic final save (see the module docstring)."""

    final_metrics: dict[str, Any] | None = None

    def _set_sae_metadata(self) -> None:
        super()._set_sae_metadata()
        # SAELens >= 6.4x records this when saving; 6.38 does not (metadata takes any key)
        if self.sae.cfg.metadata.get("training_architecture") is None:
            self.sae.cfg.metadata.training_architecture = self.sae.cfg.architecture()

    def adopt_trainer(self, trainer: Any) -> Any:
        """The trainer SAELens built, with :class:`RecordingTrainer` mixed in (subclasses add theirs)."""
        return mix_in(trainer, RecordingTrainer)

    def run_trainer_with_interruption_handling(self, trainer: Any) -> Any:
        trainer = self.adopt_trainer(trainer)
        sae = super().run_trainer_with_interruption_handling(trainer)
        self.final_metrics = final_metrics(trainer, trainer.last_output)
        return sae

    def save_final_sae(self, sae: Any, output_path: str, log_feature_sparsity: Any = None) -> None:
        with atomic_dir(output_path) as tmp:
            super().save_final_sae(sae, str(tmp), log_feature_sparsity=log_feature_sparsity)
            if self.final_metrics is not None and self.calibration_result is not None:
                self.final_metrics["calibration"] = self.calibration_result.metadata()
            if self.final_metrics is not None:
                atomic_write_json(Path(tmp) / METRICS_FILENAME, self.final_metrics)


@torch.no_grad()
def final_metrics(trainer: Any, out: Any) -> dict[str, Any]:
    """What ``final_metrics.json`` holds: the last step's losses, L0 and explained variance (when a
    step ran), the trainer's dead features and token count, and the running budget shares."""
    metrics: dict[str, Any] = {}
    if out is not None:
        sae_in = out.sae_in.float()
        per_token = (out.sae_out.float() - sae_in).pow(2).sum(-1)
        total_var = (sae_in - sae_in.mean(0)).pow(2).sum(-1)
        l0 = out.feature_acts.bool().float().sum(-1)  # dense or sparse COO (the sparse step's)
        l0 = l0.to_dense() if l0.is_sparse else l0
        metrics["overall_loss"] = float(out.loss.detach())
        for name, value in out.losses.items():
            metrics[name] = float(value.detach()) if torch.is_tensor(value) else float(value)
        metrics["l0"] = float(l0.mean())
        metrics["explained_variance"] = float(1 - per_token.mean() / total_var.mean())
    metrics["dead_features"] = int(trainer.dead_neurons.sum())
    shares = trainer.sae.budget_share_summary() if hasattr(trainer.sae, "budget_share_summary") else None
    if shares:  # running averages over training (docs/mutual_choice.md, "Real token streams")
        metrics["budget_share_outlier_rows"] = shares["budget_share_outlier_rows"]
        metrics["budget_share_top1pct"] = shares["budget_share_top1pct"]
    return {
        "source": "last training step (sae-allocators train)",
        "training_tokens": int(trainer.n_training_samples),
        "training_steps": int(trainer.n_training_steps),
        "metrics": metrics,
    }
