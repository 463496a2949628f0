"""Synthetic ground truth: ``sae_lens.synthetic.SyntheticModel`` with Zipfian firing (known features)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from sae_allocators import devices
from sae_allocators.benchmark.sources import TrainResult, _runner_kwargs, quiet_saelens


@dataclass
class SyntheticScale:
    num_features: int = 256
    hidden_dim: int = 48
    d_sae: int = 256
    zipf_exponent: float = 1.0
    max_prob: float = 0.3
    min_prob: float = 0.01
    training_samples: int = 307_200
    batch_size: int = 512
    eval_samples: int = 16_384
    #: the best of {1e-3, 3e-3, 1e-2, 2e-2, 4e-2} for TopK (the baseline) at k = 2, 4, 8 (docs/benchmark.md)
    lr: float = 1e-2
    dead_feature_window: int = 100
    #: held-out samples on which batch-level rules calibrate their saved thresholds (fresh draws)
    calibration_tokens: int = 16_384


class SyntheticSource:
    kind = "synthetic"

    def __init__(self, scale: SyntheticScale, model_seed: int = 1234, device: Any = devices.AUTO):
        from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig, ZipfianFiringProbabilityConfig

        self.scale = scale
        self.device = devices.resolve(device)
        self.cfg = SyntheticModelConfig(
            num_features=scale.num_features,
            hidden_dim=scale.hidden_dim,
            firing_probability=ZipfianFiringProbabilityConfig(
                exponent=scale.zipf_exponent, max_prob=scale.max_prob, min_prob=scale.min_prob
            ),
            seed=model_seed,
        )
        self.model = SyntheticModel(self.cfg, device=str(self.device))
        self.d_in = scale.hidden_dim
        self.d_sae = scale.d_sae
        self.train_batch_size = scale.batch_size
        with _seeded(10_000 + model_seed, self.device):
            feats = self.model.activation_generator.sample(scale.eval_samples)
            self._eval_feats = feats.to_dense() if feats.is_sparse else feats
            self._eval_x = self.model.feature_dict(self._eval_feats).detach()
        self.true_l0 = float((self._eval_feats != 0).sum(-1).double().mean())
        self.name = f"synthetic ({scale.num_features} Zipfian features in {scale.hidden_dim} dims)"

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "synthetic_model": self.cfg.to_dict(),
            "true_l0": self.true_l0,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "training_tokens": self.scale.training_samples,
            "train_batch_size": self.scale.batch_size,
            "eval_tokens": self.scale.eval_samples,
            "lr": self.scale.lr,
            "dead_feature_window_steps": self.scale.dead_feature_window,
        }

    def sae_fields(self) -> dict[str, Any]:
        return {"calibration_tokens": self.scale.calibration_tokens}

    def train(self, sae_cfg: Any, seed: int, out_dir: Path) -> TrainResult:
        from sae_lens import LoggingConfig
        from sae_lens.synthetic import SyntheticSAERunner, SyntheticSAERunnerConfig

        s = self.scale
        torch.manual_seed(seed)
        cfg = SyntheticSAERunnerConfig(
            **_runner_kwargs(
                SyntheticSAERunnerConfig,
                synthetic_model=self.cfg,
                sae=sae_cfg,
                training_samples=s.training_samples,
                batch_size=s.batch_size,
                lr=s.lr,
                device=str(self.device),
                checkpoint_path=None,
                output_path=str(out_dir),
                eval_samples=0,
                run_final_eval=False,
                dead_feature_window=s.dead_feature_window,
                feature_sampling_window=s.dead_feature_window,
                n_batches_for_norm_estimate=20,
                logger=LoggingConfig(log_to_wandb=False),
            )
        )
        runner = SyntheticSAERunner(cfg, override_synthetic_model=self.model)
        runner.calibration_batches = self.calibration_batches()
        torch.manual_seed(1_000_003 * (seed + 1))  # same data stream for every architecture
        t0 = time.perf_counter()
        with quiet_saelens():
            result = runner.run()
        seconds = time.perf_counter() - t0
        return TrainResult(
            result.sae,
            out_dir,
            seconds,
            s.training_samples // s.batch_size,
            s.training_samples,
            "synthetic",
            calibration=runner.calibration_result,
        )

    def eval_batches(self, batch_size: int = 4096) -> Iterator[torch.Tensor]:
        for i in range(0, self._eval_x.shape[0], batch_size):
            yield self._eval_x[i : i + batch_size]

    def calibration_batches(self) -> Iterator[torch.Tensor]:
        """Held-out samples for the end-of-training calibration: drawn once (seeded, disjoint
        from training and evaluation draws) and shared by every SAE, like the evaluation set."""
        if getattr(self, "_cal_x", None) is None:
            with _seeded(20_000 + self.cfg.seed):
                feats = self.model.activation_generator.sample(self.scale.calibration_tokens)
                feats = feats.to_dense() if feats.is_sparse else feats
                self._cal_x = self.model.feature_dict(feats).detach()
        bs = self.scale.batch_size
        return (self._cal_x[i : i + bs] for i in range(0, self._cal_x.shape[0], bs))

    def ground_truth(self) -> torch.Tensor:
        return self.model.feature_dict.feature_vectors.detach()


@contextlib.contextmanager
def _seeded(seed: int, device: Any = None):
    """Seed torch's generators (the CPU's and ``device``'s) inside, restore them after."""
    dev = devices.resolve(device or devices.CPU)
    forked = [dev.index if dev.index is not None else torch.cuda.current_device()] if devices.is_cuda(dev) else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        yield
