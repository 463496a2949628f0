"""Calibration in SAELens's runners: the end-of-training step and the wraps that run it.

The fit itself (the rules, the exact streaming quantiles) is :mod:`sae_allocators.calibration.fit`.

Where it runs: at the end of training in every SAELens runner (``LanguageModelSAETrainingRunner``,
``SyntheticSAERunner``: their final save is wrapped when the plugins load, :func:`runner_wraps`
and :mod:`sae_allocators.patches`), on held-out
batches drawn from the same activation store after the last training batch, before the final
model is saved (:class:`CalibratingRunnerMixin` picks another source); and as
``sae-allocators calibrate SAE_FOLDER [data options]`` for a saved folder. The saved
``cfg.json`` records ``metadata.calibration`` (tokens, target L0, achieved L0, L0 before).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from sae_allocators.calibration.fit import CalibrationResult, architecture_of, calibrate, default_tokens, rule_of


# --- at the end of training, through SAELens's runners ---------------------------------------


def wants_calibration(sae: Any) -> bool:
    return rule_of(architecture_of(sae)) is not None and bool(getattr(sae.cfg, "calibrate", True))


def planned_tokens(sae: Any, training_tokens: int, batch_size: int) -> int:
    n = getattr(sae.cfg, "calibration_tokens", None)
    return int(n) if n else default_tokens(training_tokens, batch_size)


class HeldOutBatches:
    """Batches from an activation store / iterator, noting whether it started a new epoch (SAELens
    warns "All samples in the training dataset have been exhausted"): the batches are then no
    longer held out, which the calibration records."""

    def __init__(self, source: Any):
        self.source = iter(source)
        self.wrapped = False

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batch = next(self.source)
        for w in caught:
            if "exhausted" in str(w.message) or "new epoch" in str(w.message):
                self.wrapped = True
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return batch


def calibrate_after_training(
    sae: Any, source: Any, training_tokens: int, batch_size: int, log: Any = print
) -> CalibrationResult | None:
    """The end-of-training step: calibrate ``sae`` on the next batches of ``source`` (unless the
    SAE's config switches it off or its rule has no batch threshold)."""
    if not wants_calibration(sae):
        return None
    n = planned_tokens(sae, training_tokens, batch_size)
    batches = HeldOutBatches(source)
    was_training = sae.training
    sae.eval()
    try:
        result = calibrate(sae, batches, n)
    finally:
        sae.train(was_training)
    if batches.wrapped:
        result.held_out = False
        sae.cfg.metadata.calibration = result.metadata()
        warnings.warn(
            "calibration: the activation source started a new epoch, so some calibration tokens were "
            "also training tokens (recorded as held_out=false). Give the run more data than "
            "training_tokens + calibration_tokens for held-out calibration.",
            stacklevel=2,
        )
    log(
        f"Calibrated {result.architecture} thresholds on {result.tokens} held-out tokens ({result.seconds:.1f} s): "
        f"L0 {result.l0_before:.3g} -> {result.achieved_l0:.4g} (target k={result.target_l0:g})"
    )
    return result


class CalibratingRunnerMixin:
    """Mix into SAELens's ``LanguageModelSAETrainingRunner`` (or ``SyntheticSAERunner``) to choose
    the held-out batches the final calibration uses.

    Calibration itself runs in every SAELens runner once this package is loaded (the runners' final
    save is wrapped: :func:`runner_wraps`); this mixin only lets a subclass or a caller pick the source:
    :meth:`calibration_source` -- by default the runner's own activation store (the batches after
    the last training batch), for the synthetic runner fresh samples of its synthetic model -- or
    ``runner.calibration_batches = iterable``. ``cfg.sae.calibrate = False`` switches it off.
    """

    calibration_batches: Iterable[torch.Tensor] | None = None
    calibration_result: CalibrationResult | None = None

    def calibration_source(self) -> Iterable[torch.Tensor]:
        return default_calibration_source(self)


def default_calibration_source(runner: Any) -> Iterable[torch.Tensor]:
    """The held-out batches of a SAELens runner: ``runner.calibration_batches`` if set, else its
    activation store (the batches after the last training batch), else fresh samples of its
    synthetic model."""
    batches = getattr(runner, "calibration_batches", None)
    if batches is not None:
        return batches
    store = getattr(runner, "activations_store", None)
    if store is not None:
        return store
    model = getattr(runner, "synthetic_model", None)
    if model is not None:
        return _synthetic_batches(model, runner.cfg.batch_size)
    raise ValueError(
        f"{type(runner).__name__}: no held-out activation source for calibration; set "
        f"runner.calibration_batches = <iterable of [batch, d_in] tensors>, or cfg.sae.calibrate = False"
    )


def calibrate_runner_sae(runner: Any, sae: Any) -> CalibrationResult | None:
    """Calibrate ``sae`` (the trained SAE of ``runner``) before the runner's final save; sets and
    returns ``runner.calibration_result`` (``None`` when the SAE's rule has no batch threshold or
    ``cfg.sae.calibrate`` is False)."""
    runner.calibration_result = None
    if not wants_calibration(sae):
        return None
    cfg = runner.cfg
    training = int(getattr(cfg, "training_tokens", 0) or getattr(cfg, "training_samples", 0))
    batch = int(getattr(cfg, "train_batch_size_tokens", 0) or getattr(cfg, "batch_size", 1))
    source_of = getattr(runner, "calibration_source", None)
    source = source_of() if callable(source_of) else default_calibration_source(runner)
    runner.calibration_result = calibrate_after_training(sae, source, training, batch, log=_log)
    return runner.calibration_result


# --- the wrap that makes SAELens's own runners calibrate ---------------------------------------
#
# SAELens's runners have no hook between the end of training and the final save. The wraps below
# (installed by sae_allocators.patches) replace the one method each runner calls there --
# LanguageModelSAETrainingRunner.save_final_sae and SyntheticSAERunner._save_outputs (SAELens >=
# 6.35) -- so that a plain ``LanguageModelSAETrainingRunner(cfg).run()`` calibrates an SAE of ours
# before saving it. For an SAE whose rule has no batch threshold (every SAELens architecture,
# topk_zipf, ...) the wrapped method only calls the original.


def runner_wraps() -> list[tuple[type, str, Any]]:
    """``(class, method, wrapper factory)`` for :mod:`sae_allocators.patches` (4 and 5): the runners'
    final-save methods (calibration, atomic save) and the config-writing ones (redaction: no secret --
    a token in ``model_from_pretrained_kwargs`` -- reaches the files, :mod:`sae_allocators.redaction`)."""
    import functools

    from sae_lens import LanguageModelSAETrainingRunner

    out: list[tuple[type, str, Any]] = [
        (LanguageModelSAETrainingRunner, "save_final_sae", functools.partial(_calibrating_save, sae_position=0))
    ]
    try:
        from sae_lens.synthetic import SyntheticSAERunner  # SAELens >= 6.35
    except ImportError:
        SyntheticSAERunner = None
    if SyntheticSAERunner is not None and "_save_outputs" in SyntheticSAERunner.__dict__:
        out.append((SyntheticSAERunner, "_save_outputs", functools.partial(_calibrating_save, sae_position=1)))
    for name in ("run", "_set_sae_metadata", "save_checkpoint"):
        if name in LanguageModelSAETrainingRunner.__dict__:
            out.append((LanguageModelSAETrainingRunner, name, functools.partial(_redacting, name=name)))
    return out


class _RedactedRunnerCfg:
    """While saving: the runner config's ``model_from_pretrained_kwargs`` without secrets (what
    SAELens writes to runner_cfg.json); the real ones are put back afterwards."""

    def __init__(self, runner: Any):
        self.cfg = getattr(runner, "cfg", None)

    def __enter__(self) -> None:
        from sae_allocators.redaction import redact

        self.saved = getattr(self.cfg, "model_from_pretrained_kwargs", None)
        if isinstance(self.saved, dict):
            self.cfg.model_from_pretrained_kwargs = redact(self.saved)

    def __exit__(self, *exc: Any) -> None:
        if isinstance(self.saved, dict):
            self.cfg.model_from_pretrained_kwargs = self.saved


def _redacting(original: Any, name: str) -> Any:
    import functools

    from sae_allocators.redaction import redact, redact_json_files

    @functools.wraps(original)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        if name == "run":
            # the final save replaces the output folder whole: refuse one it may not replace now,
            # before training, not after (as `sae-allocators train` does)
            out = getattr(getattr(self, "cfg", None), "output_path", None)
            if out is not None:
                from sae_allocators.io import recover_output_dir
                from sae_allocators.sae_folder import check_replaceable_output

                recover_output_dir(check_replaceable_output(out))
            # the model was loaded in __init__ (the only use of the real kwargs): while training, the
            # config that wandb.init, metadata, checkpoints and the final save record has no secret
            with _RedactedRunnerCfg(self):
                return original(self, *args, **kwargs)
        if name == "_set_sae_metadata":
            result = original(self, *args, **kwargs)
            meta = self.sae.cfg.metadata
            kw = getattr(meta, "model_from_pretrained_kwargs", None)
            if isinstance(kw, dict):
                meta.model_from_pretrained_kwargs = redact(kw)
            return result
        # save_checkpoint(checkpoint_path): runner_cfg.json, and the trainer's cfg.json before it
        with _RedactedRunnerCfg(self):
            result = original(self, *args, **kwargs)
        path = kwargs.get("checkpoint_path", args[0] if args else None)
        if path is not None and Path(path).is_dir():
            redact_json_files(path)
        return result

    return wrapped


def _inside_atomic_save(path: Any) -> bool:
    """True when ``path`` is the temporary folder of an atomic save (``.NAME.<tag>.partial``)."""
    import re

    return bool(re.match(r"^\..+\.[^./]+\.partial$", Path(str(path)).name))


def finish_saved_folder(folder: Any) -> None:
    """The last steps before a saved folder is switched into place: secrets redacted, and the
    weights refused (``SaeFolderError``) unless every value is finite."""
    from sae_allocators.redaction import redact_json_files
    from sae_allocators.sae_folder import check_finite_weights

    redact_json_files(folder)
    check_finite_weights(
        folder,
        fix=", so it is not saved (an existing output folder is kept as it was); train again in float32, e.g. with a lower learning rate",
    )


def _calibrating_save(original: Any, sae_position: int) -> Any:
    import functools

    @functools.wraps(original)
    def save(self: Any, *args: Any, **kwargs: Any) -> Any:
        # save_final_sae(sae, output_path, ...) / _save_outputs(output_path, sae, ...)
        sae = kwargs["sae"] if "sae" in kwargs else args[sae_position]
        calibrate_runner_sae(self, sae)
        if sae_position != 0:
            return original(self, *args, **kwargs)
        # save_final_sae: written whole into a temporary sibling, checked, switched into place
        # (sae_allocators.io.atomic_dir), unless the caller already writes into one (`train`)
        args = list(args)
        out = kwargs["output_path"] if "output_path" in kwargs else (args[1] if len(args) > 1 else None)
        with _RedactedRunnerCfg(self):
            if out is None or _inside_atomic_save(out):
                result = original(self, *args, **kwargs)
                if out is not None:
                    finish_saved_folder(out)
                return result
            import os
            import uuid

            from sae_allocators.io import atomic_dir
            from sae_allocators.sae_folder import SaeFolderError, check_replaceable_output

            try:
                check_replaceable_output(out)
                target, refused = Path(out), None
            except SaeFolderError as exc:  # something appeared there during training: keep the SAE beside it
                target, refused = Path(out).parent / f"{Path(out).name}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}", exc
            with atomic_dir(target) as tmp:
                if "output_path" in kwargs:
                    kwargs["output_path"] = str(tmp)
                else:
                    args[1] = str(tmp)
                result = original(self, *args, **kwargs)
                finish_saved_folder(tmp)
            if refused is not None:
                raise SaeFolderError(f"{refused} The new output was kept in {target}.")
            return result

    return save


def _log(msg: str) -> None:
    import logging

    logging.getLogger("sae_allocators").info(msg)
    print(msg, flush=True)


def _synthetic_batches(model: Any, batch_size: int) -> Iterator[torch.Tensor]:
    while True:
        feats = model.activation_generator.sample(batch_size)
        feats = feats.to_dense() if feats.is_sparse else feats
        yield model.feature_dict(feats).detach()
