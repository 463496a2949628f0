"""Config-time checks shared by every training config of this project (and by ``push``/``load``).

- :func:`check_field_types`: a value of the wrong type (``zipf_exponent="1"``, ``d_sae=64.0``,
  ``use_error_term="False"``) is a ``ValueError`` naming the field, before any code divides by it.
  Only plain annotations are checked (``int``, ``float``, ``bool``, ``str``, their ``| None``
  and ``Literal`` of strings), and a field whose own default breaks its annotation is skipped
  (the annotation is then looser than the code, as for a few SAELens fields).
- :func:`check_dimensions`: ``d_in`` / ``d_sae`` are positive integers (named as such, never
  blamed on ``k``).
- :func:`check_dtype`: ``dtype='float16'`` is refused for training (it trains to NaN weights);
  float32 or bfloat16, or ``--autocast`` for mixed precision.
- :func:`warn_unknown_keys`: SAELens's ``TrainingSAEConfig.from_dict`` drops keys that are not
  fields without a word (``"kk": 4`` is ignored); for this project's configs a
  :class:`UnknownConfigKeyWarning` names each dropped key and the nearest field.
- :class:`ConfigChecks`: the plain mixin every training config of this project has: the checks
  above in one method its ``__post_init__`` calls, and a ``from_dict`` that names unknown keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
import warnings
from typing import Any

#: keys ``from_dict`` receives that are not dataclass fields but are expected there: SAELens's own
#: (``to_dict`` writes ``architecture`` and ``metadata``), and those SAELens's loaders add to a saved
#: ``cfg.json`` before ``from_dict`` (``sae_lens.loading.pretrained_sae_loaders``: ``read_sae_components_from_disk``
#: sets ``finetuning_scaling_factor``; ``handle_pre_6_0_config`` the rest): not a user's typo, nothing said
_NON_FIELD_KEYS = frozenset(
    {
        "architecture",
        "metadata",
        "finetuning_scaling_factor",
        "prepend_bos",
        "dataset_trust_remote_code",
        "sae_lens_version",
        "sae_lens_training_version",
        "activation_fn",
        "activation_fn_kwargs",
        "neuronpedia_id",
    }
)


class UnknownConfigKeyWarning(UserWarning):
    """A config dict key that is not a field of the config class (SAELens ignores it)."""


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_CHECKS: dict[Any, tuple[str, Any]] = {
    float: ("a number", _is_number),
    int: ("an integer", _is_int),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _rule(annotation: Any) -> tuple[str, Any] | None:
    """``(what, accepts(value))`` for a plain annotation, or None when it is not checked."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation in _CHECKS:
        return _CHECKS[annotation]
    if origin is typing.Literal and args and all(isinstance(a, str) for a in args):
        return _CHECKS[str]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return None
        inner = _rule(rest[0])
        if inner is None:
            return None
        what, ok = inner
        optional = len(rest) < len(args)
        return (f"{what} or None" if optional else what, (lambda v, ok=ok: v is None or ok(v)) if optional else ok)
    return None


@functools.lru_cache(maxsize=None)
def _rules(cls: type) -> tuple[tuple[str, str, Any], ...]:
    """``(field, what, accepts)`` for each checkable field of the dataclass ``cls``."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation we cannot evaluate: check none
        return ()
    out = []
    for f in dataclasses.fields(cls):
        rule = _rule(hints.get(f.name))
        if rule is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.default is not dataclasses.MISSING and not rule[1](default):
            continue  # the annotation is looser than the code: do not second-guess it
        out.append((f.name, rule[0], rule[1]))
    return tuple(out)


def field_type_problems(cls: type, values: dict[str, Any]) -> list[str]:
    """One message per value in ``values`` whose type does not fit ``cls``'s field annotation."""
    problems = []
    for name, what, ok in _rules(cls):
        if name in values and not ok(values[name]):
            value = values[name]
            hint = ""
            if isinstance(value, str):
                hint = f" (write {value} without quotes)" if what.startswith(("a number", "an integer", "true")) else ""
            problems.append(f"{name}={value!r} is invalid: it must be {what}, not {type(value).__name__}{hint}.")
    return problems


def check_field_types(cfg: Any) -> None:
    """Raise ``ValueError`` naming the first field of the dataclass instance ``cfg`` whose value
    has the wrong type."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    problems = field_type_problems(type(cfg), values)
    if problems:
        raise ValueError(problems[0])


def check_dimensions(cfg: Any) -> None:
    """``d_in`` and ``d_sae`` must be positive integers."""
    for name, example in (
        ("d_in", "the width of the hooked activation, e.g. 768"),
        ("d_sae", "the number of latents, e.g. 16384"),
    ):
        value = getattr(cfg, name, None)
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: use a positive integer ({example}).")


#: SAE dtypes a training config of this project refuses, with the reason (float16's range, 6.5e4,
#: and its 11-bit mantissa make the batch rules' thresholds and the decoder updates overflow or stall:
#: every architecture trained to NaN weights on the probe run; bfloat16 trains finitely)
REFUSED_TRAINING_DTYPES = {
    "float16": "float16 training diverges to NaN weights with these architectures (its range ends at 65504)",
    "half": "half (float16) training diverges to NaN weights with these architectures (its range ends at 65504)",
}


def check_dtype(cfg: Any) -> None:
    """Refuse a training dtype that is known to end in non-finite weights (float16), naming the fix."""
    dtype = getattr(cfg, "dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else None
    if name in REFUSED_TRAINING_DTYPES:
        raise ValueError(
            f"dtype={dtype!r} is refused: {REFUSED_TRAINING_DTYPES[name]}. Train in float32 (or bfloat16); "
            f"for mixed precision keep dtype='float32' and pass --autocast True."
        )


def check_calibration_budget(cfg: Any) -> None:
    """``calibration_tokens`` must give the calibration a budget ``floor(k * N) >= 1`` (checked at
    config time: after training it would be too late, and the trained SAE would not be saved)."""
    import math

    from sae_allocators.allocation.batch import budget

    n, k = getattr(cfg, "calibration_tokens", None), getattr(cfg, "k", None)
    if not getattr(cfg, "calibrate", False) or not _is_int(n) or n < 1 or not _is_number(k) or not 0 < k < math.inf:
        return
    if budget(k, n) < 1:
        raise ValueError(
            f"calibration_tokens={n} is invalid with k={k:g}: the calibration budget floor(k * calibration_tokens) "
            f"is 0. Use calibration_tokens >= {math.ceil(1 / k)} (or None for 2 % of the training tokens)."
        )


def nearest_field(name: str, names: list[str] | set[str]) -> str | None:
    match = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.6)
    return match[0] if match else None


def warn_unknown_keys(cls: type, data: dict[str, Any]) -> list[str]:
    """Warn (:class:`UnknownConfigKeyWarning`) about every key of ``data`` that the config class ``cls``
    has no field for (SAELens's ``from_dict`` drops it), naming the nearest field. Returns the keys."""
    field_names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in data if isinstance(k, str) and k not in field_names and k not in _NON_FIELD_KEYS]
    arch = cls.architecture() if hasattr(cls, "architecture") else cls.__name__
    for key in unknown:
        near = nearest_field(key, field_names)
        fix = f"did you mean {near!r}?" if near else f"see {cls.__name__}'s fields for the valid names."
        warnings.warn(
            f"{key!r} is not a field of the {arch!r} training config, so SAELens's from_dict ignores it: {fix}",
            UnknownConfigKeyWarning,
            stacklevel=3,
        )
    return unknown


class ConfigChecks:
    """The checks every training config of this project shares, as a plain mixin (put it before the
    SAELens config class in the bases; :class:`~sae_allocators.losses.AuxLossConfig` already is one).

    - :meth:`check_shared_fields`: field types, ``d_in`` / ``d_sae``, the training dtype and the
      calibration budget. A config's own ``__post_init__`` calls it on its first line, before its own
      checks compare values (a string ``d_sae`` is then named as such, never blamed on ``k``);
      :class:`~sae_allocators.losses.AuxLossConfig`'s ``__post_init__`` calls it too, for configs
      without their own. The checks are pure, so running twice costs nothing.
    - :meth:`from_dict`: names every key the dict has that is not a field (SAELens drops them).
      SAELens's base ``TrainingSAEConfig.from_dict`` builds the registered class directly, so for the
      classes of this mixin it is wrapped to hand the dict to their own ``from_dict``
      (:mod:`sae_allocators.patches`, item 6).
    """

    def check_shared_fields(self) -> None:
        check_field_types(self)
        check_dimensions(self)
        check_dtype(self)
        check_calibration_budget(self)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> Any:
        warn_unknown_keys(cls, config_dict)
        return super().from_dict(config_dict)  # type: ignore[misc]


def delegating_from_dict(original: Any) -> Any:
    """The wrap of SAELens's base ``TrainingSAEConfig.from_dict`` (patches item 6): when the dict's
    architecture is registered with a :class:`ConfigChecks` config that is not ``cls`` itself, that
    class's own ``from_dict`` builds it (SAELens's base would call the class with the known keys only,
    and the unknown ones would vanish unnamed); otherwise SAELens's ``from_dict``, unchanged."""

    @functools.wraps(original)
    def from_dict(cls: type, config_dict: dict[str, Any]) -> Any:
        arch = config_dict.get("architecture") if isinstance(config_dict, dict) else None
        if isinstance(arch, str):
            from sae_allocators import saelens_registry

            entry = saelens_registry.get(saelens_registry.TRAINING, arch)
            target = entry[1] if entry is not None else None
            if (
                isinstance(target, type)
                and target is not cls
                and issubclass(target, cls)
                and issubclass(target, ConfigChecks)
            ):
                return target.from_dict(config_dict)
        return original(cls, config_dict)

    return from_dict
