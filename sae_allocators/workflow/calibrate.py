"""``sae-allocators calibrate SAE_FOLDER [data options]``: fit a saved SAE's thresholds on held-out data.

``SAE_FOLDER`` is a final output folder (a ``jumprelu`` saved from ``mutual_choice``,
``batchtopk_zipf`` or ``feature_choice``) or a training checkpoint of one of them. The data
options are ``sae-allocators train``'s (SAELens's: ``--model_name``, ``--hook_name``,
``--dataset_path``, ``--context_size``, ``--train_batch_size_tokens``, ...); point them at
tokens the SAE did not train on (another split, or ``--skip_tokens`` past the training tokens).
The thresholds and ``metadata.calibration`` of the folder are rewritten in place (``--output``
writes a copy instead). See :mod:`sae_allocators.calibration` for the rule.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sae_allocators import devices

HELP = "fit a saved mutual_choice / feature_choice / batchtopk_zipf SAE's thresholds on held-out activations"


def _own_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sae-allocators calibrate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every other option is a data option of `sae-allocators train` (see its --help).",
        allow_abbrev=False,  # `--calib 0` is not --calibration_tokens, and `--k` is a data option
    )
    p.add_argument("sae_folder", help="saved SAE folder (cfg.json + sae_weights.safetensors)")
    p.add_argument(
        "--calibration_tokens",
        type=int,
        default=None,
        help="held-out tokens (default: 2%% of the training tokens in runner_cfg.json, >= 4 batches, <= 262144)",
    )
    p.add_argument(
        "--skip_tokens", type=int, default=0, help="draw and discard this many tokens first (e.g. the training tokens)"
    )
    p.add_argument(
        "--target_k",
        type=float,
        default=None,
        help="target mean L0 (default: the training k from runner_cfg.json or cfg.json)",
    )
    p.add_argument(
        "--feature_rule",
        choices=("scale", "shares"),
        default=None,
        help="feature_choice: 'scale' (the saved thresholds times one factor; default) or 'shares' "
        "(each feature at its training share, from sparsity.safetensors or feature_density)",
    )
    p.add_argument("--output", default=None, help="write the calibrated SAE here instead of rewriting SAE_FOLDER")
    return p


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): re-copy it from the training output.") from None
    return data if isinstance(data, dict) else {}


def _check_folder(folder: Path) -> str:
    """Check ``folder`` before anything is loaded; return its kind (``inference`` / ``training``)."""
    from sae_allocators.calibration import fit
    from sae_allocators.sae_folder import (
        CHECKPOINT_MARKER,
        SaeFolderError,
        check_finite_weights,
        check_loadable,
        read_safetensors_header,
    )

    if not folder.is_dir():
        raise ValueError(
            f"{folder}: no such folder; give the --output_path of `sae-allocators train` or one of its checkpoints."
        )
    cfg = _read_json(folder / "cfg.json")
    if not cfg:
        raise ValueError(f"{folder} has no cfg.json: give the folder SAELens saved (the final output or a checkpoint).")
    arch = cfg.get("architecture")
    checkpoint = (folder / CHECKPOINT_MARKER).exists()
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    training_arch = meta.get("training_architecture") if arch == "jumprelu" else arch
    names = ", ".join(fit.calibrated_architectures())
    if arch != "jumprelu" and not checkpoint:
        raise ValueError(
            f"{folder} holds a saved {arch!r} SAE: only {names} have thresholds to calibrate (their final folders are "
            f"saved as 'jumprelu'; their training checkpoints also work)."
        )
    if fit.rule_of(str(training_arch)) is None:
        raise ValueError(f"{folder} holds a {training_arch!r} SAE: only {names} have thresholds to calibrate.")
    try:
        if arch == "jumprelu":
            check_loadable(folder)  # shapes against cfg.json (d_sae), finite weights, thresholds >= 0
        else:
            header = read_safetensors_header(folder / "sae_weights.safetensors")
            d_in, d_sae = cfg.get("d_in"), cfg.get("d_sae")
            for name, want in (("W_enc", [d_in, d_sae]), ("W_dec", [d_sae, d_in])):
                got = (header.get(name) or {}).get("shape")
                if got is not None and got != want:
                    raise SaeFolderError(
                        f"{folder / 'sae_weights.safetensors'}: tensor {name!r} has shape {got}, but cfg.json (d_in={d_in}, "
                        f"d_sae={d_sae}) needs {want}: the weights and cfg.json do not belong together; "
                        "re-copy both from the same checkpoint."
                    )
            check_finite_weights(folder)
    except SaeFolderError as exc:
        raise ValueError(f"{exc} Nothing was calibrated.") from None
    return "inference" if arch == "jumprelu" else "training"


def _load(folder: Path, kind: str):
    """The saved inference model, or a training checkpoint of our architectures."""
    from sae_lens import SAE
    from sae_lens.saes.sae import TrainingSAE

    from sae_allocators import host

    host.load()
    try:
        if kind == "inference":
            return SAE.load_from_disk(str(folder), device=devices.CPU)
        return TrainingSAE.load_from_disk(str(folder), device=devices.CPU)
    except Exception as exc:  # noqa: BLE001 - SAELens's loader: one line, no traceback
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise ValueError(f"SAELens cannot load {folder}: {type(exc).__name__}: {first}") from None


def _shares_from_folder(folder: Path):
    import torch
    from safetensors.torch import load_file

    path = folder / "sparsity.safetensors"
    if not path.is_file():
        raise ValueError(
            f"calibrating a saved feature_choice model needs each feature's share of the training "
            f"allocation: {path} (written by SAELens at the end of training) is missing. Calibrate a "
            "training checkpoint instead (it keeps feature_density), or re-train with calibration on."
        )
    log_sparsity = load_file(str(path))["sparsity"].double()
    return (torch.pow(10.0, log_sparsity) - 1e-10).clamp_min(
        0
    ), f"{path.name} (SAELens's firing rates of the last feature-sampling window)"


def _check_output(folder: Path, output: Path | None) -> None:
    """``--output``: a new folder (checked before any work), not the SAE folder itself."""
    if output is None:
        return
    if output.exists() or output.is_symlink():
        if output.resolve() == folder.resolve():
            return  # the same folder: rewritten in place
        raise ValueError(
            f"--output {output} exists; choose a new folder (or leave --output out to rewrite {folder} in place)."
        )


def _save(sae: Any, folder: Path, output: Path | None) -> Path:
    """Write the calibrated weights and cfg.json: to ``output`` (a copy of the folder), or in place.

    Crash-consistent either way (:func:`sae_allocators.io.atomic_dir`): the folder's files and the
    new weights + cfg.json are written into a hidden sibling, checked (finite weights, no secrets)
    and switched into place whole, so a kill leaves the old folder or the new one, never a mix."""
    from sae_allocators.calibration.runner import finish_saved_folder
    from sae_allocators.io import atomic_dir
    from sae_allocators.sae_folder import SaeFolderError

    target = output if output is not None else folder
    in_place = output is None or (output.exists() and output.resolve() == folder.resolve())
    if in_place:
        target = folder.resolve() if folder.is_symlink() else folder
    names = frozenset(p.name for p in folder.iterdir())

    def same_files(path: str | Path) -> Path:
        # the folder being rewritten may hold what it held when calibration started (a checkpoint's
        # trainer state, ...), nothing else: a file that appeared meanwhile is not deleted
        path = Path(path)
        if path.exists() and path.is_dir():
            extra = sorted(p.name for p in path.iterdir() if p.name not in names)
            if extra:
                raise SaeFolderError(
                    f"{path} now holds {', '.join(extra)}, which appeared during calibration; it is not replaced."
                )
        return path

    with atomic_dir(target, check=same_files if in_place else None) as tmp:
        for f in folder.iterdir():
            if f.is_dir() and not f.is_symlink():
                shutil.copytree(f, tmp / f.name, symlinks=True)
            else:
                shutil.copy2(f, tmp / f.name, follow_symlinks=False)
        sae.save_model(str(tmp))  # the same files SAELens wrote (weights + cfg.json), replacing the copies
        finish_saved_folder(tmp)
    return target


def _positive(name: str, value: Any, fix: str) -> None:
    import math

    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} {value!r} is invalid: {fix}.")


@dataclass
class _Plan:
    """What ``calibrate`` will do, from its arguments and the folder alone (no model loaded yet)."""

    folder: Path
    output: Path | None
    sae: Any
    arch: str
    runner_cfg: dict[str, Any]
    k: float
    cfg: Any  # the data options, as SAELens's runner config
    tokens: int
    method: str
    shares: Any
    shares_source: str | None
    skip_tokens: int


def _plan(own: argparse.Namespace, rest: list[str], override_model: Any) -> _Plan:
    """Every argument checked before a model is loaded or a token drawn (``ValueError`` naming it)."""
    from sae_allocators.allocation.batch import budget
    from sae_allocators.calibration import fit
    from sae_allocators.workflow.train import parse_args

    folder = Path(own.sae_folder)
    output = Path(own.output) if own.output else None
    _positive(
        "--calibration_tokens",
        own.calibration_tokens,
        "use a positive number of tokens (or leave it out for the default)",
    )
    _positive("--target_k", own.target_k, "use the mean L0 to calibrate to, > 0 (or leave it out for the training k)")
    if own.skip_tokens < 0:
        raise ValueError(f"--skip_tokens {own.skip_tokens} is invalid: use 0 or more tokens.")
    _check_output(folder, output)
    kind = _check_folder(folder)
    sae = _load(folder, kind)
    arch = fit.architecture_of(sae)
    runner_cfg = _read_json(folder / "runner_cfg.json")
    k = (
        own.target_k
        if own.target_k is not None
        else (getattr(sae.cfg, "k", None) or (runner_cfg.get("sae") or {}).get("k"))
    )
    if k is None:
        raise ValueError(f"{folder}: the training k is in neither cfg.json nor runner_cfg.json; give --target_k.")
    if k > sae.cfg.d_sae:
        raise ValueError(
            f"--target_k {k:g} is invalid: the SAE has d_sae={sae.cfg.d_sae} latents, so at most {sae.cfg.d_sae} fire per token."
        )
    if override_model is None and "--model_name" not in rest:
        raise ValueError(
            "give the data options of `sae-allocators train` (--model_name, --hook_name, --dataset_path, "
            "--context_size, ...) for held-out tokens the SAE did not train on"
            + (
                f" (it trained on {runner_cfg.get('dataset_path')!r} of {runner_cfg.get('model_name')!r}: "
                "use another split, or --skip_tokens)"
                if runner_cfg
                else ""
            )
            + "."
        )
    dims = ["--architecture", arch, "--d_in", str(sae.cfg.d_in), "--d_sae", str(sae.cfg.d_sae), "--k", str(k)]
    cfg = parse_args([*dims, *rest])
    devices.resolve(cfg.device)  # a device that is not here: now, not after loading the model
    training_tokens = int(runner_cfg.get("training_tokens") or 0)
    n = own.calibration_tokens or fit.default_tokens(training_tokens, cfg.train_batch_size_tokens)
    if budget(float(k), n) < 1:
        raise ValueError(
            f"--calibration_tokens {n} with k={k:g} gives a budget floor(k * N) = 0: use at least {math.ceil(1 / float(k))} tokens."
        )
    shares = source = None
    method = own.feature_rule or getattr(sae.cfg, "calibration_rule", None) or "scale"
    if fit.rule_of(arch) == "per_feature" and kind == "inference" and method == "shares":
        shares, source = _shares_from_folder(folder)
    return _Plan(folder, output, sae, arch, runner_cfg, float(k), cfg, int(n), method, shares, source, own.skip_tokens)


def _trained_hook(plan: _Plan) -> str:
    return (plan.runner_cfg or {}).get("hook_name") or plan.sae.cfg.metadata.get("hook_name") or "see cfg.json metadata"


def _skip_and_first(plan: _Plan, batches: Any) -> tuple[Any, int]:
    """Draw and discard ``--skip_tokens`` tokens, then the first calibration batch, checked to have the
    SAE's width (``ValueError`` naming the hook it trained on). Returns the batch and the skipped tokens."""
    sae, cfg = plan.sae, plan.cfg
    skipped = 0
    while skipped < plan.skip_tokens:
        batch = next(batches)
        if batch.shape[-1] != sae.cfg.d_in:
            break  # reported below, with the hook's width
        skipped += batch.reshape(-1, batch.shape[-1]).shape[0]
    try:
        first = next(batches)
    except RuntimeError as exc:  # SAELens's store reshapes the hook's activations to d_in and fails
        text = str(exc).strip().splitlines()
        raise ValueError(
            f"the activations of --hook_name {cfg.hook_name} do not fit the SAE's d_in={sae.cfg.d_in} "
            f"({type(exc).__name__}: {text[0] if text else ''}): use the hook it was trained on "
            f"({_trained_hook(plan)})."
        ) from None
    if first.shape[-1] != sae.cfg.d_in:
        raise ValueError(
            f"--hook_name {cfg.hook_name} gives activations of width {first.shape[-1]}, but the SAE has d_in={sae.cfg.d_in}: "
            f"use the hook it was trained on ({_trained_hook(plan)})."
        )
    return first, skipped


def _calibrate(plan: _Plan, override_model: Any, override_dataset: Any) -> tuple[Any, bool, Path]:
    """Load the model, draw the held-out tokens, fit, record ``metadata.calibration`` and save.
    Returns the fit's result, whether the tokens were held out, and the folder written."""
    import warnings

    from sae_lens.load_model import load_model
    from sae_lens.training.activations_store import ActivationsStore

    from sae_allocators.calibration import fit, runner

    sae, cfg, runner_cfg = plan.sae, plan.cfg, plan.runner_cfg
    # the same data as training (dataset, model and hook) is held out only past the training tokens
    same_data = bool(runner_cfg) and all(
        runner_cfg.get(key) == getattr(cfg, key) for key in ("dataset_path", "model_name", "hook_name")
    )
    training_tokens = int(runner_cfg.get("training_tokens") or 0)
    model = override_model or load_model(
        cfg.model_class_name,
        cfg.model_name,
        device=cfg.device,
        model_from_pretrained_kwargs=cfg.model_from_pretrained_kwargs,
    )
    store = ActivationsStore.from_config(model, cfg, override_dataset=override_dataset)
    sae.to(cfg.device)
    batches = runner.HeldOutBatches(store)  # notes a new epoch, while skipping too
    first, skipped = _skip_and_first(plan, batches)
    if batches.wrapped:
        warnings.warn(
            f"calibrate: --skip_tokens {plan.skip_tokens} reaches past the end of the data, so the calibration tokens "
            "wrap around into tokens already seen (recorded as held_out=false). Use fewer --skip_tokens, or another split.",
            stacklevel=1,
        )
    per_feature = fit.rule_of(plan.arch) == "per_feature"
    result = fit.calibrate(
        sae,
        itertools.chain([first], batches),
        plan.tokens,
        k=plan.k,
        shares=plan.shares,
        shares_source=plan.shares_source or "",
        method=plan.method if per_feature else None,
    )
    held_out = not batches.wrapped and not (same_data and skipped < training_tokens)
    if same_data and skipped < training_tokens and not batches.wrapped:
        warnings.warn(
            f"calibrate: the data options name the training data ({cfg.dataset_path!r}) and --skip_tokens {skipped} is below "
            f"its {training_tokens} training tokens, so the calibration tokens are training tokens (recorded as held_out=false). "
            f"Pass --skip_tokens {training_tokens} or another split for held-out calibration.",
            stacklevel=1,
        )
    meta = result.metadata()
    meta["held_out"] = held_out
    meta["skipped_tokens"] = skipped
    meta["data"] = {"model_name": cfg.model_name, "hook_name": cfg.hook_name, "dataset_path": cfg.dataset_path}
    sae.cfg.metadata.calibration = meta
    return result, held_out, _save(sae, plan.folder, plan.output)


def main(argv: Sequence[str], *, override_model=None, override_dataset=None) -> int:
    """The ``calibrate`` subcommand (``override_*`` only for tests and notebooks)."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        _own_parser().print_help()
        return 0
    try:
        own, rest = _own_parser().parse_known_args(argv)
    except SystemExit as exc:
        return int(exc.code or 2)
    try:
        plan = _plan(own, rest, override_model)
    except (ValueError, KeyError) as exc:
        print(f"sae-allocators calibrate: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # the data parser's own usage error
        return int(exc.code or 2)
    try:
        result, held_out, out = _calibrate(plan, override_model, override_dataset)
    except (ValueError, OSError) as exc:
        text = str(exc).strip().splitlines()
        print(f"sae-allocators calibrate: error: {text[0] if text else type(exc).__name__}", file=sys.stderr)
        return 2
    print(
        f"Calibrated {plan.arch} ({result.rule} rule) on {result.tokens} tokens: L0 {result.l0_before:.4g} -> "
        f"{result.achieved_l0:.4g} (target {result.target_l0:g}){'' if held_out else ' [not held out]'}; saved to {out}"
    )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    return main(args.argv)
