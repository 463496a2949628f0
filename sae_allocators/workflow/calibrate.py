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
import json
import shutil
import sys
import tempfile
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
    )
    p.add_argument("sae_folder", help="saved SAE folder (cfg.json + sae_weights.safetensors)")
    p.add_argument("--calibration_tokens", type=int, default=None,
                   help="held-out tokens (default: 2%% of the training tokens in runner_cfg.json, >= 4 batches, <= 262144)")
    p.add_argument("--skip_tokens", type=int, default=0, help="draw and discard this many tokens first (e.g. the training tokens)")
    p.add_argument("--target_k", type=float, default=None, help="target mean L0 (default: the training k from runner_cfg.json or cfg.json)")
    p.add_argument("--feature_rule", choices=("scale", "shares"), default=None,
                   help="feature_choice: 'scale' (the saved thresholds times one factor; default) or 'shares' "
                   "(each feature at its training share, from sparsity.safetensors or feature_density)")
    p.add_argument("--output", default=None, help="write the calibrated SAE here instead of rewriting SAE_FOLDER")
    return p


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _load(folder: Path):
    """(sae, kind): a saved inference model, or a training checkpoint of our architectures."""
    from sae_lens import SAE
    from sae_lens.saes.sae import TrainingSAE

    from sae_allocators import host

    host.load()
    cfg = _read_json(folder / "cfg.json")
    if not cfg:
        raise ValueError(f"{folder} has no cfg.json: give the folder SAELens saved (the final output or a checkpoint).")
    if cfg.get("architecture") == "jumprelu":
        return SAE.load_from_disk(str(folder), device=devices.CPU), "inference"
    return TrainingSAE.load_from_disk(str(folder), device=devices.CPU), "training"


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
    return (torch.pow(10.0, log_sparsity) - 1e-10).clamp_min(0), f"{path.name} (SAELens's firing rates of the last feature-sampling window)"


def _save(sae: Any, folder: Path, output: Path | None) -> Path:
    """Write the calibrated weights and cfg.json: to ``output`` (a copy of the folder), or in place."""
    target = output or folder
    if output is not None and output.resolve() != folder.resolve():
        if output.exists():
            raise ValueError(f"--output {output} exists; choose a new folder.")
        shutil.copytree(folder, output)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        sae.save_model(tmp)  # the same files SAELens wrote (weights + cfg.json), then moved over
        for f in Path(tmp).iterdir():
            f.replace(target / f.name)
    return target


def main(argv: Sequence[str], *, override_model=None, override_dataset=None) -> int:
    """The ``calibrate`` subcommand (``override_*`` only for tests and notebooks)."""
    from sae_allocators import calibration
    from sae_allocators.workflow.train import parse_args

    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        _own_parser().print_help()
        return 0
    own, rest = _own_parser().parse_known_args(argv)
    folder = Path(own.sae_folder)
    try:
        sae, kind = _load(folder)
        arch = calibration.architecture_of(sae)
        if calibration.rule_of(arch) is None:
            raise ValueError(f"{folder} holds a {arch!r} SAE: only mutual_choice, batchtopk_zipf and feature_choice have thresholds to calibrate.")
        runner_cfg = _read_json(folder / "runner_cfg.json")
        k = own.target_k or getattr(sae.cfg, "k", None) or (runner_cfg.get("sae") or {}).get("k")
        if k is None:
            raise ValueError(f"{folder}: the training k is in neither cfg.json nor runner_cfg.json; give --target_k.")
        data_args = ["--architecture", arch, "--d_in", str(sae.cfg.d_in), "--d_sae", str(sae.cfg.d_sae), "--k", str(k), *rest]
        if override_model is None and "--model_name" not in rest:
            raise ValueError(
                "give the data options of `sae-allocators train` (--model_name, --hook_name, --dataset_path, "
                "--context_size, ...) for held-out tokens the SAE did not train on"
                + (f" (it trained on {runner_cfg.get('dataset_path')!r} of {runner_cfg.get('model_name')!r}: use another split, or --skip_tokens)" if runner_cfg else "")
                + "."
            )
        cfg = parse_args(data_args)
        n = own.calibration_tokens or calibration.default_tokens(int(runner_cfg.get("training_tokens") or 0), cfg.train_batch_size_tokens)
        shares = source = None
        method = own.feature_rule or getattr(sae.cfg, "calibration_rule", None) or "scale"
        if arch in calibration.PER_FEATURE_RULES and kind == "inference" and method == "shares":
            shares, source = _shares_from_folder(folder)
    except (ValueError, KeyError) as exc:
        print(f"sae-allocators calibrate: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # the data parser's own usage error
        return int(exc.code or 2)

    from sae_lens.load_model import load_model
    from sae_lens.training.activations_store import ActivationsStore

    model = override_model or load_model(cfg.model_class_name, cfg.model_name, device=cfg.device, model_from_pretrained_kwargs=cfg.model_from_pretrained_kwargs)
    store = ActivationsStore.from_config(model, cfg, override_dataset=override_dataset)
    sae.to(cfg.device)
    skipped = 0
    while skipped < own.skip_tokens:
        skipped += next(store).shape[0]
    batches = calibration.HeldOutBatches(store)
    result = calibration.calibrate(sae, batches, int(n), k=float(k), shares=shares, shares_source=source or "",
                                   method=method if arch in calibration.PER_FEATURE_RULES else None)
    meta = result.metadata()
    meta["held_out"] = not batches.wrapped
    meta["skipped_tokens"] = skipped
    meta["data"] = {"model_name": cfg.model_name, "hook_name": cfg.hook_name, "dataset_path": cfg.dataset_path}
    sae.cfg.metadata.calibration = meta
    out = _save(sae, folder, Path(own.output) if own.output else None)
    print(
        f"Calibrated {arch} ({result.rule} rule) on {result.tokens} tokens: L0 {result.l0_before:.4g} -> "
        f"{result.achieved_l0:.4g} (target {result.target_l0:g}); saved to {out}"
    )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    return main(args.argv)
