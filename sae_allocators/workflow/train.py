"""``sae-allocators train``: SAELens's own training command line, with every plugin loaded first.

The options are SAELens's: on SAELens versions whose ``_parse_cfg_args`` takes its
``--architecture`` choices from the training registry, it is called as is; on older ones (6.38
hard-codes the choices) the same parser is rebuilt the same way -- simple_parsing over
``LanguageModelSAERunnerConfig`` with the chosen config class as its ``sae`` field -- with the
choices read from the registry. Nothing is copied by hand, so each architecture's fields
(``--k``, ...) appear as SAELens would show them.

Differences from ``python -m sae_lens.llm_sae_training_runner``: plugins are loaded first; the
output path is checked before training (an existing folder holding files an SAE output folder
does not is refused, since the save replaces it whole) and leftovers of interrupted saves to it
are cleaned up; the final output folder is written crash-consistently
(:func:`sae_allocators.io.atomic_dir`: a hidden sibling folder switched into place in one
``renameat2(RENAME_EXCHANGE)``); the saved thresholds of batch-level rules are calibrated on
held-out batches of the activation store first (:mod:`sae_allocators.calibration`;
``--calibrate False`` switches it off); and ``final_metrics.json`` (the last training step's losses, L0,
explained variance, dead features and the number of training tokens) is written next to it for
``sae-allocators push``'s model card.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import field as dc_field
from dataclasses import fields, make_dataclass
from pathlib import Path
from typing import Any, Sequence

from sae_allocators.sae_folder import SaeFolderError

HELP = "train an SAE with SAELens's training options (any registered architecture, ours included)"


def registered_training_architectures() -> dict[str, type]:
    from sae_allocators import host
    from sae_allocators import saelens_registry as reg

    host.load()
    return {name: cfg_cls for name, (_, cfg_cls) in reg.registry(reg.TRAINING).items()}


def saelens_parser_reads_registry() -> bool:
    """True when SAELens's ``_parse_cfg_args`` offers every registered architecture (subgroups)."""
    import sae_lens.llm_sae_training_runner as runner_mod

    return "subgroups" in vars(runner_mod)


def _parse_like_saelens_638(args: list[str]):
    """SAELens 6.38's two-stage ``_parse_cfg_args``, with ``--architecture`` choices from the registry."""
    from sae_lens import LanguageModelSAERunnerConfig
    from simple_parsing import ArgumentParser

    archs = registered_training_architectures()
    pre = ArgumentParser(exit_on_error=False, add_help=False)
    pre.add_argument("--architecture", type=str, choices=sorted(archs), default="standard")
    known, rest = pre.parse_known_args(args)
    cfg_cls = archs[known.architecture]
    base = [(f.name, f.type, f) for f in fields(LanguageModelSAERunnerConfig) if f.name != "sae"]
    base.append(("sae", cfg_cls, dc_field(default_factory=lambda: cfg_cls(d_in=512, d_sae=1024))))
    concrete = make_dataclass(f"{cfg_cls.__name__}RunnerConfig", base, bases=(LanguageModelSAERunnerConfig,))
    parser = ArgumentParser(exit_on_error=False, prog="sae-allocators train")
    # shown in --help (the choice itself was consumed above, as SAELens 6.38 does)
    parser.add_argument("--architecture", choices=sorted(archs), default=known.architecture, help="SAE architecture to use")
    parser.add_arguments(concrete, dest="cfg")
    return parser.parse_args(rest).cfg


def parse_args(args: Sequence[str]):
    """Build a ``LanguageModelSAERunnerConfig`` from SAELens-style command-line arguments."""
    registered_training_architectures()  # loads plugins into SAELens's registry first
    args = list(args)
    if saelens_parser_reads_registry():
        from sae_lens.llm_sae_training_runner import _parse_cfg_args

        saved, sys.argv[0] = sys.argv[0], "sae-allocators train"  # argparse's prog in usage lines
        try:
            return _parse_cfg_args(args)
        finally:
            sys.argv[0] = saved
    return _parse_like_saelens_638(args)


#: the option ``train`` handles itself before SAELens's parser (so SAELens's help does not list it)
LAUNCH_HELP = (
    "Option of sae-allocators train itself (SAELens's options follow):\n"
    "  --nproc-per-node N    train on N processes of this node (data parallel; batch rules select over the\n"
    "                        global batch): re-runs this command under torchrun. See docs/distributed.md"
)


def architectures_help() -> str:
    from sae_allocators import host

    lines = ["Architectures (--architecture NAME); `sae-allocators list --all` shows providers:"]
    for name, prov in sorted(host.providers().items()):
        if not prov.has_training:
            continue
        who = "SAELens" if prov.is_saelens else f"{prov.distribution}"
        desc = f": {prov.description}" if prov.description and not prov.is_saelens else ""
        lines.append(f"  {name:<18} ({who}){desc}")
    return "\n".join(lines)


# --- the runner: SAELens's, plus final metrics and an atomic final save ----------------------


def _runner_class():
    import torch
    from sae_lens import LanguageModelSAETrainingRunner

    from sae_allocators.calibration import CalibratingRunnerMixin
    from sae_allocators.io import atomic_dir, atomic_write_json
    from sae_allocators.sae_folder import METRICS_FILENAME

    class WorkflowRunner(CalibratingRunnerMixin, LanguageModelSAETrainingRunner):
        final_metrics: dict[str, Any] | None = None

        def _set_sae_metadata(self):
            super()._set_sae_metadata()
            # SAELens >= 6.4x records this when saving; 6.38 does not (metadata takes any key)
            if self.sae.cfg.metadata.get("training_architecture") is None:
                self.sae.cfg.metadata.training_architecture = self.sae.cfg.architecture()

        def run_trainer_with_interruption_handling(self, trainer):
            last: dict[str, Any] = {}
            forward = self.sae.training_forward_pass

            def recording_forward(*a, **kw):
                out = forward(*a, **kw)
                last["out"] = out
                return out

            self.sae.training_forward_pass = recording_forward  # instance attribute, removed below
            try:
                sae = super().run_trainer_with_interruption_handling(trainer)
            finally:
                del self.sae.training_forward_pass
            self.final_metrics = _metrics(trainer, last.get("out"), self.cfg)
            return sae

        def save_final_sae(self, sae, output_path, log_feature_sparsity=None):
            with atomic_dir(output_path) as tmp:
                super().save_final_sae(sae, str(tmp), log_feature_sparsity=log_feature_sparsity)
                if self.final_metrics is not None and self.calibration_result is not None:
                    self.final_metrics["calibration"] = self.calibration_result.metadata()
                if self.final_metrics is not None:
                    atomic_write_json(Path(tmp) / METRICS_FILENAME, self.final_metrics)

    @torch.no_grad()
    def _metrics(trainer, out, cfg) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if out is not None:
            sae_in = out.sae_in.float()
            per_token = (out.sae_out.float() - sae_in).pow(2).sum(-1)
            total_var = (sae_in - sae_in.mean(0)).pow(2).sum(-1)
            acts = out.feature_acts
            l0 = acts.bool().float().sum(-1)
            l0 = l0.to_dense() if l0.is_sparse else l0
            metrics["overall_loss"] = float(out.loss.detach())
            for name, value in out.losses.items():
                metrics[name] = float(value.detach()) if torch.is_tensor(value) else float(value)
            metrics["l0"] = float(l0.mean())
            metrics["explained_variance"] = float(1 - per_token.mean() / total_var.mean())
        metrics["dead_features"] = int(trainer.dead_neurons.sum())
        return {
            "source": "last training step (sae-allocators train)",
            "training_tokens": int(trainer.n_training_samples),
            "training_steps": int(trainer.n_training_steps),
            "metrics": metrics,
        }

    return WorkflowRunner


def train(cfg, *, override_model=None, override_dataset=None):
    """Train ``cfg`` (a ``LanguageModelSAERunnerConfig``) with SAELens's runner; return the runner."""
    if cfg.output_path is not None:
        from sae_allocators.io import recover_output_dir
        from sae_allocators.sae_folder import check_replaceable_output

        recover_output_dir(check_replaceable_output(cfg.output_path))  # fail before training, not after
    runner = _runner_class()(cfg, override_model=override_model, override_dataset=override_dataset)
    runner.sae_result = runner.run()
    return runner


def main(argv: Sequence[str], *, override_model=None, override_dataset=None) -> int:
    """The ``train`` subcommand (``override_*`` only for tests and notebooks)."""
    argv = list(argv)
    if any(a.startswith(("--nproc-per-node", "--nproc_per_node")) for a in argv):
        # data-parallel on N processes: the same options under torchrun (docs/distributed.md)
        from sae_allocators.distributed.relaunch import LaunchError, relaunch, split_nproc

        try:
            nproc, rest = split_nproc(argv)
        except LaunchError as exc:
            print(f"sae-allocators train: error: {exc}", file=sys.stderr)
            return 2
        return relaunch(nproc, rest)  # type: ignore[arg-type]
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(architectures_help() + "\n\n" + LAUNCH_HELP + "\n")
    try:
        cfg = parse_args(argv)
    except SystemExit as exc:  # --help, or simple_parsing's own usage error
        return int(exc.code or 0)
    except argparse.ArgumentError as exc:
        print(f"sae-allocators train: error: {exc}\n{architectures_help()}", file=sys.stderr)
        return 2
    except (ValueError, KeyError) as exc:  # config __post_init__ validation, unknown names
        print(f"sae-allocators train: error: {exc}", file=sys.stderr)
        return 2
    try:
        runner = train(cfg, override_model=override_model, override_dataset=override_dataset)
    except SaeFolderError as exc:  # the output path is not one a save may replace
        print(f"sae-allocators train: error: {exc}", file=sys.stderr)
        return 2
    if cfg.output_path is not None:
        arch = cfg.sae.architecture()
        print(f"Trained {arch} SAE (d_in={cfg.sae.d_in}, d_sae={cfg.sae.d_sae}); saved to {cfg.output_path}")
        if runner.final_metrics:
            m = runner.final_metrics["metrics"]
            shown = ", ".join(f"{k}={v:.4g}" for k, v in m.items())
            print(f"Final metrics ({runner.final_metrics['training_tokens']} tokens): {shown}")
        cal = runner.calibration_result
        if cal is not None:
            print(
                f"Saved model calibrated on {cal.tokens} held-out tokens: L0 {cal.achieved_l0:.4g} "
                f"(target {cal.target_l0:g}; {cal.l0_before:.4g} with the running thresholds)"
            )
        print(f"Next: sae-allocators push {cfg.output_path} --repo <org/name>")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    return main(args.argv)
