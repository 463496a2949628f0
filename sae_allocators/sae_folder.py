"""What an SAE output folder is, and whether SAELens can load one (used by ``train``, ``push`` and ``load``).

Every message names the file or name at fault and what to do about it. Nothing here unpickles:
:func:`check_sae_folder` reads safetensors headers only; :func:`check_loadable` builds the SAE on
the meta device (no memory) and reads the weights one tensor at a time with ``safetensors``.
Writing a folder crash-consistently is :mod:`sae_allocators.io`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


CFG_FILENAME = "cfg.json"  # = sae_lens.constants.SAE_CFG_FILENAME
WEIGHTS_FILENAME = "sae_weights.safetensors"  # = SAE_WEIGHTS_FILENAME
SPARSITY_FILENAME = "sparsity.safetensors"
RUNNER_CFG_FILENAME = "runner_cfg.json"
METRICS_FILENAME = "final_metrics.json"  # written by `sae-allocators train`
CHECKPOINT_MARKER = "trainer_state.pt"  # SAELens checkpoints have it; final output folders don't

_MAX_HEADER = 100 * 1024 * 1024


class SaeFolderError(ValueError):
    """A folder, file or name that is not a usable SAE; the message says which and what to do."""


#: file names an output folder written by ``train`` may hold; an existing folder holding anything
#: else is not replaced (replacing it would delete the user's files)
OUTPUT_FILENAMES = frozenset({CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME, RUNNER_CFG_FILENAME, METRICS_FILENAME})


def check_replaceable_output(path: str | Path) -> Path:
    """Return the folder a save to ``path`` will replace (symlinks resolved), or raise
    :class:`SaeFolderError` when replacing it would delete something that is not an SAE output."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if not path.exists():
        return path
    if not path.is_dir():
        raise SaeFolderError(
            f"output path {path} exists and is a file, not a folder; choose another --output_path or remove it."
        )
    if (path / CHECKPOINT_MARKER).exists():
        raise SaeFolderError(
            f"output path {path} is a training checkpoint (it has {CHECKPOINT_MARKER}); saving there would replace it. "
            f"Choose another --output_path (checkpoints go to --checkpoint_path)."
        )
    foreign = sorted(p.name for p in path.iterdir() if p.name not in OUTPUT_FILENAMES)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise SaeFolderError(
            f"output path {path} exists and holds {shown}, which an SAE output folder does not; the save replaces "
            f"the whole folder, so it would delete them. Choose a new or empty --output_path, or move those files away."
        )
    return path


# --- checks ----------------------------------------------------------------------------------


def read_safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """Return ``{tensor name: {"dtype", "shape", "data_offsets"}}`` from a safetensors file's header.

    Raises :class:`SaeFolderError` naming the file when it is missing, truncated or not safetensors.
    """
    path = Path(path)
    fix = "re-copy it from the training output, or train again"
    if not path.is_file():
        raise SaeFolderError(f"{path}: file not found; {fix}.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SaeFolderError(f"{path} is corrupted: {size} bytes, too short for a safetensors file; {fix}.")
        (n,) = struct.unpack("<Q", raw)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise SaeFolderError(
                f"{path} is corrupted: not a valid safetensors header (length {n}, file size {size}); {fix}."
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SaeFolderError(
                f"{path} is corrupted: its safetensors header is not valid JSON ({exc}); {fix}."
            ) from None
    if not isinstance(header, dict):
        raise SaeFolderError(f"{path} is corrupted: its safetensors header is not a JSON object; {fix}.")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            ok = 0 <= start <= end <= data_len and isinstance(info["shape"], list)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise SaeFolderError(f"{path} is corrupted: tensor {name!r} lies outside the file (truncated?); {fix}.")
    return header


@dataclass
class SaeFolderInfo:
    path: Path
    cfg: dict[str, Any]
    architecture: str
    training_architecture: str | None
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {"dtype", "shape"}
    has_sparsity: bool = False

    @property
    def metadata(self) -> dict[str, Any]:
        return self.cfg.get("metadata") or {}


def read_json_file(path: Path, what: str, fix: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SaeFolderError(f"{path}: {what} not found; {fix}.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SaeFolderError(f"{path} is not valid JSON ({exc}); {fix}.") from None


def check_sae_folder(path: str | Path, *, check_architecture: bool = True) -> SaeFolderInfo:
    """Check that ``path`` is a final SAE output folder SAELens can load; describe it.

    Checks ``cfg.json`` (valid JSON object with ``architecture``, ``d_in``, ``d_sae``; the
    architecture registered in SAELens, after our plugins are loaded), ``sae_weights.safetensors``
    (present, a valid safetensors header) and, if present, ``sparsity.safetensors``.
    """
    path = Path(path)
    what_is_output = (
        "an SAE output folder is the --output_path of `sae-allocators train` (or of SAELens's runner) "
        f"and holds {CFG_FILENAME} and {WEIGHTS_FILENAME}"
    )
    if not path.exists():
        raise SaeFolderError(f"{path}: no such folder; {what_is_output}.")
    if not path.is_dir():
        raise SaeFolderError(f"{path} is a file, not a folder; {what_is_output}.")
    cfg_path = path / CFG_FILENAME
    if not cfg_path.is_file():
        raise SaeFolderError(f"{path} is not an SAE output folder: {CFG_FILENAME} is missing; {what_is_output}.")
    if (path / CHECKPOINT_MARKER).exists():
        raise SaeFolderError(
            f"{path} is a training checkpoint (it has {CHECKPOINT_MARKER}), whose {CFG_FILENAME} is the training "
            f"config; pass the final output folder (--output_path) instead, which holds the inference config."
        )
    cfg = read_json_file(cfg_path, "SAE config", "re-copy it from the training output, or train again")
    if not isinstance(cfg, dict):
        raise SaeFolderError(f"{cfg_path} must hold a JSON object (an SAE config), not {type(cfg).__name__}.")
    for key in ("architecture", "d_in", "d_sae"):
        if key not in cfg:
            raise SaeFolderError(f"{cfg_path} has no {key!r} entry, so it is not an SAE config; {what_is_output}.")
    arch = cfg["architecture"]
    if check_architecture:
        _check_registered(cfg_path, arch)
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    tensors = read_safetensors_header(path / WEIGHTS_FILENAME) if (path / WEIGHTS_FILENAME).exists() else None
    if tensors is None:
        raise SaeFolderError(
            f"{path / WEIGHTS_FILENAME}: weights file not found next to {CFG_FILENAME}; copy the whole output "
            f"folder (both files), or train again."
        )
    has_sparsity = (path / SPARSITY_FILENAME).exists()
    if has_sparsity:
        read_safetensors_header(path / SPARSITY_FILENAME)
    return SaeFolderInfo(
        path=path,
        cfg=cfg,
        architecture=arch,
        training_architecture=meta.get("training_architecture") if meta else None,
        tensors={k: {"dtype": v.get("dtype"), "shape": v.get("shape")} for k, v in tensors.items()},
        has_sparsity=has_sparsity,
    )


def _check_registered(cfg_path: Path, arch: Any) -> None:
    # the host's load() through plugin_state: the host installs the runner save seam, which checks
    # folders with this module, so this module does not import the host
    from sae_allocators import plugin_state
    from sae_allocators import saelens_registry as reg

    plugin_state.ensure_loaded()
    if not isinstance(arch, str):
        raise SaeFolderError(f"{cfg_path}: 'architecture' must be a string, got {arch!r}.")
    try:
        reg.registry(reg.INFERENCE)[arch]
    except KeyError as exc:  # UnknownArchitectureError explains who provides what
        raise SaeFolderError(f"{cfg_path} names architecture {arch!r}, which nothing provides. {exc}") from None


# --- what SAELens's loader will do, checked before it does it --------------------------------

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _training_only_names(info: SaeFolderInfo) -> set[str]:
    """Names of training-only buffers of the folder's (training) architecture, if we know them."""
    from sae_allocators import saelens_registry as reg

    names: set[str] = set()
    # only strings are architecture names: cfg.json's metadata may hold anything (a list is not even hashable)
    for arch in {a for a in (info.training_architecture, info.architecture) if isinstance(a, str)}:
        entry = reg.get(reg.TRAINING, arch)
        if entry is not None and hasattr(entry[0], "_all_training_only_buffers"):
            names |= set(entry[0]._all_training_only_buffers())
    return names


def _expected_state(info: SaeFolderInfo) -> tuple[Any, dict[str, tuple[list[int], Any]]]:
    """Build the SAE the way ``SAE.load_from_disk`` does (on the meta device); return it and
    ``{tensor name: (shape, dtype)}`` of its state dict. Config problems are SaeFolderErrors."""
    import torch
    from sae_lens import SAE
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting
    from sae_lens.util import str_to_dtype

    from sae_allocators import config_checks
    from sae_allocators import saelens_registry as reg

    cfg_path = info.path / CFG_FILENAME
    fix = "fix that entry in cfg.json (or re-copy it from the training output)"
    _, cfg_cls = reg.registry(reg.INFERENCE)[info.architecture]
    problems = config_checks.field_type_problems(cfg_cls, info.cfg)
    if problems:
        raise SaeFolderError(f"{cfg_path}: {problems[0]} SAELens would fail on it while loading; {fix}.")
    for key in ("d_in", "d_sae"):
        value = info.cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SaeFolderError(f"{cfg_path}: {key}={value!r} is invalid: it must be a positive integer; {fix}.")
    try:
        str_to_dtype(info.cfg.get("dtype", "float32"))
    except Exception:  # noqa: BLE001 - SAELens raises ValueError or KeyError depending on version
        raise SaeFolderError(
            f"{cfg_path}: dtype={info.cfg.get('dtype')!r} is not a torch dtype name (e.g. 'float32'); {fix}."
        ) from None
    try:
        cfg_dict = handle_config_defaulting(dict(info.cfg))
        sae_cfg = SAE.get_sae_config_class_for_architecture(cfg_dict["architecture"]).from_dict(cfg_dict)
        sae_cls = SAE.get_sae_class_for_architecture(sae_cfg.architecture())
        sae_cfg.device = "meta"
        sae = sae_cls(sae_cfg)
    except SaeFolderError:
        raise
    except Exception as exc:  # noqa: BLE001 - the config's own validation (a ValueError naming the field, ...)
        raise SaeFolderError(
            f"{cfg_path}: SAELens cannot build the {info.architecture!r} SAE from it: {type(exc).__name__}: {exc}"
        ) from None
    with torch.no_grad():
        expected = {k: (list(v.shape), v.dtype) for k, v in sae.state_dict().items()}
    return sae, expected


def check_loadable(path: str | Path, info: SaeFolderInfo | None = None, *, check_values: bool = True) -> SaeFolderInfo:
    """Check that SAELens will load ``path`` (``SAE.load_from_disk`` / ``from_pretrained``) into
    a usable SAE, without loading it: the config's field types, the tensors' names, shapes and
    dtypes against the SAE that config builds, and (``check_values``) that every weight is finite.

    Raises :class:`SaeFolderError` naming the file and tensor. Reads one tensor at a time.
    Thresholds must also be finite and >= 0 (:func:`check_thresholds`).
    """
    import torch

    info = info if info is not None else check_sae_folder(path)
    weights = info.path / WEIGHTS_FILENAME
    sae, expected = _expected_state(info)
    header = info.tensors
    # what SAELens's loader does to the file's tensors before load_state_dict, on meta tensors
    meta = {name: torch.empty(t["shape"], device="meta") for name, t in header.items()}
    try:
        sae.process_state_dict_for_loading(meta)
    except Exception:  # noqa: BLE001 - a conversion that needs real values: compare the raw names
        meta = {name: torch.empty(t["shape"], device="meta") for name, t in header.items()}
    missing = sorted(set(expected) - set(meta))
    extra = sorted(set(meta) - set(expected))
    if extra:
        if set(extra) & _training_only_names(info):
            raise SaeFolderError(
                f"{weights} holds training-only tensors ({', '.join(extra)}): these are a training checkpoint's "
                f"weights, which SAELens saves with the training model's buffers. Pass the final output folder "
                f"(--output_path of `sae-allocators train`) instead, which holds the inference model."
            )
        raise SaeFolderError(
            f"{weights} holds tensor(s) {', '.join(map(repr, extra))} that a {info.architecture!r} SAE does not have "
            f"(it has {', '.join(sorted(expected))}); SAELens would refuse to load it. The weights and {CFG_FILENAME} do "
            f"not belong together: re-copy both from the same training output."
        )
    if missing:
        raise SaeFolderError(
            f"{weights} lacks tensor(s) {', '.join(map(repr, missing))} that a {info.architecture!r} SAE needs; "
            f"SAELens would refuse to load it. Re-copy the weights from the training output, or train again."
        )
    for name, t in header.items():
        if name in expected and t.get("dtype") not in _FLOAT_DTYPES:
            raise SaeFolderError(
                f"{weights}: tensor {name!r} has dtype {t.get('dtype')}, but SAE weights are floating point "
                f"(F32, F16, BF16, ...); the file was not written by SAELens. Re-copy it from the training output, or train again."
            )
    for name, (shape, _) in expected.items():
        got = list(meta[name].shape)
        if got != shape:
            raise SaeFolderError(
                f"{weights}: tensor {name!r} has shape {got}, but {CFG_FILENAME} (d_in={info.cfg['d_in']}, "
                f"d_sae={info.cfg['d_sae']}) needs {shape}; SAELens would refuse to load it. The weights and "
                f"{CFG_FILENAME} do not belong together (transposed, or from another SAE): re-copy both from the same training output."
            )
    if info.has_sparsity:
        sparsity = read_safetensors_header(info.path / SPARSITY_FILENAME)
        for name, t in sparsity.items():
            if t.get("shape") not in ([info.cfg["d_sae"]], [1, info.cfg["d_sae"]]):
                raise SaeFolderError(
                    f"{info.path / SPARSITY_FILENAME}: tensor {name!r} has shape {t.get('shape')}, but d_sae={info.cfg['d_sae']}; "
                    f"re-copy it from the training output, or delete it (it is optional)."
                )
    if check_values:
        check_finite_weights(info.path)
        check_thresholds(info.path)
    return info


def check_finite_weights(folder: str | Path, fix: str = ": train again (e.g. with a lower learning rate)") -> None:
    """Raise :class:`SaeFolderError` naming the tensor when a weight of ``folder`` is NaN or inf."""
    import torch
    from safetensors import safe_open

    from sae_allocators import devices  # here, not at import: io.py (and this module) load without torch

    weights = Path(folder) / WEIGHTS_FILENAME
    if not weights.is_file():
        return
    with safe_open(str(weights), framework="pt", device=devices.CPU) as f:  # type: ignore[no-untyped-call]
        for name in f.keys():  # noqa: SIM118
            t = f.get_tensor(name)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
                raise SaeFolderError(
                    f"{weights}: tensor {name!r} holds {n_nan} NaN and {n_inf} inf values, so the SAE would output "
                    f"NaN. Training diverged or the file was damaged{fix}."
                )


#: tensors that are thresholds (JumpReLU ``threshold``; our training checkpoints' tracker buffers)
THRESHOLD_TENSORS = ("threshold",)


def check_thresholds(folder: str | Path) -> None:
    """Raise :class:`SaeFolderError` when a threshold tensor of ``folder`` is negative (or not finite):
    a JumpReLU threshold below 0 lets negative pre-activations fire, which no training writes."""
    import torch
    from safetensors import safe_open

    from sae_allocators import devices

    weights = Path(folder) / WEIGHTS_FILENAME
    if not weights.is_file():
        return
    with safe_open(str(weights), framework="pt", device=devices.CPU) as f:  # type: ignore[no-untyped-call]
        for name in f.keys():  # noqa: SIM118
            if name.rsplit(".", 1)[-1] not in THRESHOLD_TENSORS:
                continue
            t = f.get_tensor(name).float()
            bad = ~torch.isfinite(t) | (t < 0)
            if bool(bad.any()):
                first = int(bad.nonzero()[0, 0]) if t.dim() else 0
                value = float(t.reshape(-1)[first])
                raise SaeFolderError(
                    f"{weights}: tensor {name!r} holds {int(bad.sum())} threshold(s) that are negative or not finite "
                    f"(e.g. index {first}: {value:g}); a threshold must be finite and >= 0 (a negative one lets "
                    f"negative pre-activations fire). The file was damaged or edited: re-copy it from the training "
                    f"output, or run `sae-allocators calibrate` on the training checkpoint to fit new thresholds."
                )
