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
  :class:`UnknownConfigKeyWarning` names each dropped key and the nearest field. SAELens itself
  is not changed: the dropped keys are read from the ``from_dict`` call that is building the
  config.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import typing
import warnings
from typing import Any

#: keys ``from_dict`` receives that are not dataclass fields but are expected there
_NON_FIELD_KEYS = frozenset({"architecture", "metadata"})


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


#: SAELens functions that build a config from a saved cfg.json (plus keys their loaders add, such
#: as ``finetuning_scaling_factor``): what they drop is not a user's typo, so nothing is said
_SAELENS_LOADERS = frozenset(
    {
        "load_from_disk",
        "load_from_checkpoint",
        "from_pretrained",
        "from_pretrained_with_cfg_and_sparsity",
        "load_weights_from_checkpoint",
    }
)


def _in_sae_lens(frame: Any) -> bool:
    return str(frame.f_globals.get("__name__", "")).startswith("sae_lens")


def _from_dict_keys(max_depth: int = 12) -> dict[str, Any] | None:
    """The dict a SAELens ``from_dict`` on the call stack is building a config from, if any
    (None when that ``from_dict`` serves one of SAELens's loaders of saved SAEs)."""
    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            return None
        code = frame.f_code
        if code.co_name == "from_dict" and _in_sae_lens(frame) and code.co_argcount >= 2:
            data = frame.f_locals.get(code.co_varnames[1])
            caller = frame.f_back
            for _ in range(max_depth):
                if caller is None:
                    break
                if caller.f_code.co_name in _SAELENS_LOADERS and _in_sae_lens(caller):
                    return None
                caller = caller.f_back
            return data if isinstance(data, dict) else None
        frame = frame.f_back
    return None


def warn_unknown_keys(cfg: Any) -> list[str]:
    """If ``cfg`` is being built by SAELens's ``from_dict``, warn about every key it dropped."""
    data = _from_dict_keys()
    if not data:
        return []
    field_names = {f.name for f in dataclasses.fields(cfg)}
    unknown = [k for k in data if isinstance(k, str) and k not in field_names and k not in _NON_FIELD_KEYS]
    arch = type(cfg).architecture() if hasattr(type(cfg), "architecture") else type(cfg).__name__
    for key in unknown:
        near = nearest_field(key, field_names)
        fix = f"did you mean {near!r}?" if near else f"see {type(cfg).__name__}'s fields for the valid names."
        warnings.warn(
            f"{key!r} is not a field of the {arch!r} training config, so SAELens's from_dict ignores it: {fix}",
            UnknownConfigKeyWarning,
            stacklevel=2,
        )
    return unknown
