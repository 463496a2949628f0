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
import contextlib
import sys
from dataclasses import field as dc_field
from dataclasses import fields, make_dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

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
    parser.add_argument(
        "--architecture", choices=sorted(archs), default=known.architecture, help="SAE architecture to use"
    )
    parser.add_arguments(concrete, dest="cfg")
    return parser.parse_args(rest).cfg


@contextlib.contextmanager
def no_abbreviations() -> Iterator[None]:
    """While parsing: a long option is matched only when spelled in full. argparse otherwise takes
    a unique prefix for the option it starts (``--k 32`` became ``--k_max 32`` for top_afa, which
    has no ``k``); SAELens builds its parser itself, so ``allow_abbrev=False`` cannot be passed to it."""
    original = argparse.ArgumentParser._get_option_tuples

    def exact_only(self: argparse.ArgumentParser, option_string: str) -> list:
        if option_string.startswith("--"):
            return []
        return original(self, option_string)

    argparse.ArgumentParser._get_option_tuples = exact_only  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser._get_option_tuples = original  # type: ignore[method-assign]


def parse_args(args: Sequence[str]):
    """Build a ``LanguageModelSAERunnerConfig`` from SAELens-style command-line arguments
    (long options in full: no prefix abbreviations)."""
    registered_training_architectures()  # loads plugins into SAELens's registry first
    args = list(args)
    with no_abbreviations():
        if saelens_parser_reads_registry():
            from sae_lens.llm_sae_training_runner import _parse_cfg_args

            saved, sys.argv[0] = sys.argv[0], "sae-allocators train"  # argparse's prog in usage lines
            try:
                return _parse_cfg_args(args)
            finally:
                sys.argv[0] = saved
        return _parse_like_saelens_638(args)


def check_devices(cfg: Any) -> None:
    """The config's devices exist here (``DeviceError``, one line, before any model is loaded)."""
    from sae_allocators import devices

    for name in ("device", "llm_device"):
        value = getattr(cfg, name, None)
        if isinstance(value, str) and value:
            devices.resolve(value)


def check_resume_checkpoint(cfg: Any, world: int = 1) -> None:
    """``--resume_from_checkpoint``: a complete SAELens checkpoint of this architecture and size
    (``SaeFolderError`` naming what the folder is and what to pass instead), checked before training."""
    import json

    from sae_allocators.sae_folder import CFG_FILENAME, CHECKPOINT_MARKER, WEIGHTS_FILENAME, read_safetensors_header

    path = getattr(cfg, "resume_from_checkpoint", None)
    if path is None:
        return
    folder = Path(path)
    fix = (
        "pass a checkpoint folder under --checkpoint_path (one holding trainer_state.pt), "
        "or leave --resume_from_checkpoint out to start afresh"
    )
    if not folder.is_dir():
        raise SaeFolderError(f"--resume_from_checkpoint {path}: no such folder; {fix}.")
    if not (folder / CHECKPOINT_MARKER).is_file():
        what = (
            "a final output folder (an inference model, which cannot resume training)"
            if (folder / CFG_FILENAME).is_file()
            else "not a SAELens checkpoint"
        )
        raise SaeFolderError(f"--resume_from_checkpoint {path} is {what}: it has no {CHECKPOINT_MARKER}; {fix}.")
    try:
        from sae_lens.constants import ACTIVATIONS_STORE_STATE_FILENAME as store_state
    except ImportError:  # an older SAELens: the data position's file name is not known here
        store_state = None
    needed = [CFG_FILENAME, WEIGHTS_FILENAME] + ([store_state] if store_state else [])
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        raise SaeFolderError(
            f"--resume_from_checkpoint {path} is half-written: {', '.join(missing)} missing (the run was killed while saving it); "
            f"resume from an earlier checkpoint."
        )
    try:
        saved = json.loads((folder / CFG_FILENAME).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SaeFolderError(
            f"--resume_from_checkpoint {path}: {CFG_FILENAME} is not valid JSON ({exc}); resume from an earlier checkpoint."
        ) from None
    header = read_safetensors_header(folder / WEIGHTS_FILENAME)  # truncated weights: named here
    sae = cfg.sae
    want = {"architecture": sae.architecture(), "d_in": sae.d_in, "d_sae": sae.d_sae}
    got = {"architecture": saved.get("architecture"), "d_in": saved.get("d_in"), "d_sae": saved.get("d_sae")}
    if want != got:
        diff = ", ".join(f"{k}={got[k]!r} (this run: {want[k]!r})" for k in want if want[k] != got[k])
        raise SaeFolderError(
            f"--resume_from_checkpoint {path} is a checkpoint of another SAE: {diff}. Resume with the options it was "
            f"trained with (see its runner_cfg.json), or start a new run without --resume_from_checkpoint."
        )
    w = (header.get("W_enc") or {}).get("shape")
    if w is not None and w != [sae.d_in, sae.d_sae]:
        raise SaeFolderError(
            f"--resume_from_checkpoint {path}: {WEIGHTS_FILENAME} holds W_enc of shape {w}, but d_in={sae.d_in}, d_sae={sae.d_sae} need "
            f"{[sae.d_in, sae.d_sae]}: the checkpoint is damaged; resume from an earlier one."
        )
    dist_state = folder / "distributed.json"
    if dist_state.is_file() and world == 1:
        try:
            ranks = int(json.loads(dist_state.read_text())["world_size"])
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            ranks = None
        if ranks and ranks > 1:
            raise SaeFolderError(
                f"--resume_from_checkpoint {path} was written by a {ranks}-rank run (each rank holds its own data position): "
                f"resume it with --nproc-per-node {ranks}."
            )


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


def check_before_training(cfg: Any, world: int = 1) -> None:
    """Everything that can be refused before a model is loaded: the devices, the resume checkpoint,
    and the output folder (``DeviceError`` / ``SaeFolderError``, one line each)."""
    check_devices(cfg)
    check_resume_checkpoint(cfg, world)
    if cfg.output_path is not None:
        from sae_allocators.sae_folder import check_replaceable_output

        check_replaceable_output(cfg.output_path)


def preflight_distributed(cfg: Any, nproc: int) -> None:
    """The checks of every rank, run once before ``torchrun`` starts them (``LaunchError`` and the
    errors of :func:`check_before_training`): so a bad option is one line, not one per rank."""
    import os

    import torch

    from sae_allocators.distributed.relaunch import LaunchError, check_resume, choose_backend, env_int

    check_before_training(cfg, world=nproc)
    env_int("SAE_ALLOCATORS_DIST_TIMEOUT", 600)  # a value that is not a number: here, not on every rank
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    choose_backend(cfg.device, os.environ.get("SAE_ALLOCATORS_DIST_BACKEND"), nproc, gpus)
    n = cfg.train_batch_size_tokens
    if n % nproc:
        raise LaunchError(
            f"train_batch_size_tokens={n} does not divide into {nproc} ranks: it is the global batch, "
            f"split evenly across ranks. Use a multiple of {nproc} (e.g. {n - n % nproc or nproc})."
        )
    check_resume(cfg, nproc)


def train(cfg, *, override_model=None, override_dataset=None):
    """Train ``cfg`` (a ``LanguageModelSAERunnerConfig``) with SAELens's runner; return the runner."""
    check_before_training(cfg)
    if cfg.output_path is not None:
        from sae_allocators.io import recover_output_dir
        from sae_allocators.sae_folder import check_replaceable_output

        recover_output_dir(check_replaceable_output(cfg.output_path))  # fail before training, not after
    from sae_allocators.workflow.runner import WorkflowRunner

    runner = WorkflowRunner(cfg, override_model=override_model, override_dataset=override_dataset)
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
            if nproc is None:
                raise LaunchError("--nproc-per-node needs a number of processes (e.g. --nproc-per-node 2)")
            if not any(a in ("-h", "--help") for a in rest):
                # the ranks' own checks, once, here: a bad option is one error line, not one per rank
                preflight_distributed(parse_args(rest), nproc)
        except SystemExit as exc:  # simple_parsing's usage error (printed once)
            return int(exc.code or 0)
        except (
            LaunchError,
            argparse.ArgumentError,
            ValueError,
            KeyError,
        ) as exc:  # DeviceError, SaeFolderError, config checks
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
    from sae_allocators.devices import DeviceError

    try:
        runner = train(cfg, override_model=override_model, override_dataset=override_dataset)
    except (
        SaeFolderError,
        DeviceError,
    ) as exc:  # output path, resume checkpoint, device; non-finite weights at the save
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
