"""The running threshold a batch-level rule saves for batch-free inference (one implementation).

``mutual_choice``, ``feature_choice`` and ``batchtopk_zipf`` select per batch, so their saved
SAELens ``jumprelu`` needs a threshold theta that the batch never gave explicitly. During
training each step reports its selection threshold ``tau`` (0-d: the batch's smallest kept
value; ``[d_sae]``: each feature's smallest kept value, ``+inf`` for a feature that kept nothing)
and :class:`ThresholdTracker` folds it into theta:

    theta_t = theta_{t-1} + w_t (tau_t - theta_{t-1}),   w_t = max(1 / t, rate)

(``t`` counts the updates, per element: a running mean for the first ``1/rate`` updates, then an
EMA). A non-finite ``tau`` entry is skipped, never averaged in, so theta cannot become NaN. With
``warm_start=False`` the weight is ``rate`` from the first update on, ``theta_0 = 0``: SAELens
BatchTopK's own rule (an EMA from 0), for the exact twin of SAELens's ``batchtopk``
(``batchtopk_zipf`` with ``threshold_rule="saelens"``).

The tracker's state lives in persistent buffers *of the SAE* under the names the architecture
gives (so checkpoints keep them and the state-dict keys stay flat). It also:

- folds the activation-norm scaling factor (theta is divided by it when the selection runs on
  decoder-norm-rescaled pre-activations: :meth:`fold`);
- takes calibrated values (:meth:`set_calibrated`, used by :mod:`sae_allocators.calibration`),
  flagged in a buffer until the next training update;
- produces the ``threshold`` training metric (:meth:`metric`) and refuses to export a
  non-finite threshold (:func:`check_exportable`).

The update runs outside ``torch.compile`` graphs (:func:`torch.compiler.disable`): SAELens's
``compile_sae=True`` compiles ``training_forward_pass``, and the tracker's in-place buffer
updates then run eagerly on the real ``tau`` of every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from sae_allocators.allocation.batch import budget
from sae_allocators.allocation.outliers import DEFAULT_GUARD_RATIO


def _compiler_disable(fn: Callable) -> Callable:
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def smallest_working_batch(k: float) -> int:
    """The fewest tokens N with ``floor(k * N) >= 1``."""
    n = max(1, math.ceil(1.0 / k))
    while budget(k, n) < 1:  # float rounding (e.g. k = 1/3)
        n += 1
    return n


def require_budget(k: float, n_tokens: int, architecture: str) -> None:
    """Raise when a batch of ``n_tokens`` gives the batch rule no entry at all (``floor(k N) = 0``)."""
    if budget(k, n_tokens) >= 1:
        return
    raise ValueError(
        f"{architecture}: k={k:g} with a batch of {n_tokens} token(s) gives a budget of "
        f"floor(k * N) = 0 entries, so the batch would keep nothing (L0 0) and the selection "
        f"threshold is undefined. Use a batch of at least {smallest_working_batch(k)} tokens "
        f"(train_batch_size_tokens) or a larger k."
    )


def tokens_in(sae_in: torch.Tensor) -> int:
    """Tokens in a batch: all leading dimensions of ``sae_in`` ([..., d_in])."""
    return sae_in.numel() // max(1, sae_in.shape[-1])


def check_exportable(theta: torch.Tensor, what: str) -> None:
    """Refuse to save a non-finite JumpReLU threshold (it would silently zero or keep features)."""
    bad = ~torch.isfinite(theta)
    if not bool(bad.any()):
        return
    idx = bad.reshape(-1).nonzero().reshape(-1)
    where = "" if theta.dim() == 0 else f" for {idx.numel()} feature(s), e.g. {idx[:5].tolist()}"
    raise ValueError(
        f"{what} is not finite ({theta.reshape(-1)[idx[:1]].tolist()[0]}){where}: saving it as the "
        "JumpReLU threshold would make the saved model fire on nothing or everything. Train on "
        "batches with a non-zero budget (floor(k * N) >= 1), or fit the threshold on held-out "
        "activations with `sae-allocators calibrate` before saving."
    )


class ThresholdTracker:
    """A warm-started running threshold in persistent buffers of ``owner`` (see module doc).

    Args:
        owner: the training SAE; buffers are registered on it (an existing buffer of that name,
            e.g. SAELens BatchTopK's ``topk_threshold``, is reused).
        value: buffer name of theta (double).
        steps: buffer name of the per-element update count (long).
        shape: ``()`` for a global threshold, ``(d_sae,)`` for per-feature ones.
        rate_field: the ``owner.cfg`` field holding the EMA rate.
        age: optional buffer name counting updates since each element last updated (long).
        calibrated: optional buffer name of a 0-d bool flag set by :meth:`set_calibrated`.
        warm_start: a running mean before the EMA (``w_t = max(1/t, rate)``); ``False``: the EMA
            from theta = 0 (``w_t = rate``), SAELens BatchTopK's rule.
    """

    def __init__(
        self,
        owner: torch.nn.Module,
        *,
        value: str,
        steps: str,
        shape: tuple[int, ...] = (),
        rate_field: str,
        age: str | None = None,
        calibrated: str | None = None,
        warm_start: bool = True,
    ):
        self.owner = owner
        self.warm_start = warm_start
        self.value_name, self.steps_name, self.age_name, self.calibrated_name = value, steps, age, calibrated
        self.rate_field = rate_field
        dev = owner.W_dec.device  # type: ignore[attr-defined]

        def ensure(name: str | None, dtype: torch.dtype, shp: tuple[int, ...]) -> None:
            if name is None:
                return
            current = getattr(owner, name, None)
            if isinstance(current, torch.Tensor) and tuple(current.shape) == shp:
                owner.register_buffer(name, current.to(dtype))
            else:
                owner.register_buffer(name, torch.zeros(shp, dtype=dtype, device=dev))

        ensure(value, torch.double, shape)
        ensure(steps, torch.long, shape)
        ensure(age, torch.long, shape)
        ensure(calibrated, torch.bool, ())

    # --- state ------------------------------------------------------------------------------

    @property
    def buffer_names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.value_name, self.steps_name, self.age_name, self.calibrated_name) if n)

    @property
    def value(self) -> torch.Tensor:
        return getattr(self.owner, self.value_name)

    @property
    def steps(self) -> torch.Tensor:
        return getattr(self.owner, self.steps_name)

    @property
    def age(self) -> torch.Tensor:
        assert self.age_name is not None, "this tracker keeps no age buffer"
        return getattr(self.owner, self.age_name)

    @property
    def is_calibrated(self) -> bool:
        return self.calibrated_name is not None and bool(getattr(self.owner, self.calibrated_name))

    @property
    def rate(self) -> float:
        return float(getattr(self.owner.cfg, self.rate_field))  # type: ignore[attr-defined]

    # --- training ---------------------------------------------------------------------------

    @_compiler_disable
    def update(self, tau: torch.Tensor) -> None:
        """Fold this step's selection threshold(s) in; non-finite entries are skipped."""
        self._update(tau)

    # (undecorated, with ``no_grad`` inside: mutmut does not mutate decorated functions, and this
    # one is the threshold estimate every batch-level SAE exports)
    def _update(self, tau: torch.Tensor) -> None:
        with torch.no_grad():
            value, steps = self.value, self.steps
            tau = tau.detach().to(device=value.device, dtype=value.dtype)
            if tau.shape != value.shape:
                tau = tau.expand_as(value)
            ok = torch.isfinite(tau)
            steps += ok.to(steps.dtype)
            zero = torch.zeros((), dtype=torch.double, device=value.device)
            if self.warm_start:
                w = torch.where(ok, (1.0 / steps.clamp_min(1).double()).clamp_min(self.rate), zero)
            else:  # SAELens BatchTopK: theta <- (1 - rate) theta + rate tau from theta_0 = 0
                w = torch.where(ok, zero + self.rate, zero)
            value.lerp_(torch.where(ok, tau, value), w.to(value.dtype))
            if self.age_name is not None:
                age = self.age
                age += 1
                age.masked_fill_(ok, 0)
            if self.calibrated_name is not None:
                getattr(self.owner, self.calibrated_name).fill_(False)

    def fold(self, scaling_factor: float) -> None:
        """The trainer folded the activation scaling factor ``s`` into the weights: with
        decoder-norm rescaled pre-activations they shrink by ``s``, and so does theta."""
        with torch.no_grad():
            if getattr(self.owner.cfg, "rescale_acts_by_decoder_norm", False):  # type: ignore[attr-defined]
                self.value.div_(scaling_factor)

    def set_calibrated(self, theta: torch.Tensor) -> None:
        """Replace theta by calibrated values (flagged until the next training update)."""
        with torch.no_grad():
            check_exportable(theta, f"calibrated threshold {self.value_name!r}")
            self.value.copy_(theta.to(self.value.dtype).expand_as(self.value))
            if self.calibrated_name is not None:
                getattr(self.owner, self.calibrated_name).fill_(True)

    def metric(self) -> Callable[[], float]:
        """Lazy ``threshold`` metric: theta (its mean over features for a per-feature tracker)."""
        theta = self.value.detach().clone()
        return lambda: float(theta.double().mean())

    def exported(self, like: torch.Tensor, what: str | None = None) -> torch.Tensor:
        """theta as the saved JumpReLU ``threshold`` (shape and dtype of ``like``), checked finite."""
        return export_threshold(self.value.detach(), like, what or f"threshold {self.value_name!r}")


#: exponent of the export correction's multiplicative step (:class:`ExportSteering`)
STEER_RATE = 0.1
#: rows of a batch the export correction counts on (a strided sample; chunks of 256 rows)
STEER_ROWS = 1024


class ExportSteering:
    """The correction that makes an *uncalibrated* saved model fire at the training L0.

    The running thresholds average the batches' selection thresholds, so they lag while the SAE
    still learns (pre-activations grow), and the batch-free rule ``pre > theta`` also fires on
    rows the training rule ranked down (outlier rows: :mod:`sae_allocators.allocation.outliers`).
    A mid-training checkpoint then fired at 6-9x its k on SmolLM2. This class keeps one scalar
    factor ``c`` (a persistent buffer of ``owner``, so checkpoints resume it) and, after every
    training step, measures the saved rule's L0 on that batch at ``c * theta`` and multiplies ``c``
    by ``1 + STEER_RATE * (L0 / k - 1)`` (the ratio clamped to [1/2, 2]): a controller whose fixed
    point is a mean L0 of k on training batches. The exported threshold is ``c * theta`` until
    calibration (:mod:`sae_allocators.calibration`) replaces it; the running thetas themselves
    (and so the training selection) are untouched.
    """

    def __init__(self, owner: torch.nn.Module, buffer: str = "threshold_export_scale"):
        self.owner, self.name = owner, buffer
        dev = owner.W_dec.device  # type: ignore[attr-defined]
        owner.register_buffer(buffer, torch.ones((), dtype=torch.float64, device=dev))

    @property
    def factor(self) -> torch.Tensor:
        return getattr(self.owner, self.name)

    def apply(self, theta: torch.Tensor) -> torch.Tensor:
        """``c * theta`` in ``theta``'s dtype."""
        return theta * self.factor.to(theta.dtype)

    @_compiler_disable
    def update(self, pre: torch.Tensor, thresholds: torch.Tensor, k: float, group: object = None) -> None:
        """One controller step on the batch's pre-activations ``pre`` ``[N, F]`` (the space of the
        thresholds) with the current *uncorrected* ``thresholds`` (0-d or ``[F]``)."""
        with torch.no_grad():
            pre = pre.detach()
            n = pre.shape[0]
            if n == 0 or k <= 0:
                return
            rows = pre[:: max(1, n // STEER_ROWS)]
            thr = self.apply(thresholds.detach().to(torch.float64)).to(pre.dtype)
            fired = torch.zeros((), dtype=torch.float64, device=pre.device)
            for chunk in rows.split(256):  # count_nonzero: the same count, 7x faster on CPU than a bool .sum()
                fired += torch.count_nonzero(chunk > thr)
            counts = torch.stack([fired, torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=pre.device)])
            if group is not None:
                from sae_allocators.distributed import all_reduce

                counts = all_reduce(counts, "sum", group)
            ratio = (counts[0] / counts[1].clamp_min(1) / k).clamp(0.5, 2.0)
            # arithmetic, not geometric: the fixed point is E[L0] = k (batches vary in L0)
            self.factor.mul_(1.0 + STEER_RATE * (ratio - 1.0))


def export_threshold(theta: torch.Tensor, like: torch.Tensor, what: str) -> torch.Tensor:
    """``theta`` as the saved JumpReLU ``threshold`` (shape and dtype of ``like``), checked finite
    (:func:`check_exportable`): the one export of every batch rule's threshold."""
    check_exportable(theta, what)
    return (torch.ones_like(like) * theta.to(like.dtype)).clone()


@dataclass
class CalibrationConfig:
    """Config fields of the batch-level rules: their saved thresholds are calibrated after
    training, and their ranking is guarded against outlier-norm rows.

    Attributes:
        outlier_norm_ratio: a token whose activation norm exceeds this many times the batch's
            median norm is an outlier row, and the rule ranks its affinities as if it had the
            median norm (:mod:`sae_allocators.allocation.outliers`; docs/mutual_choice.md,
            "Real token streams"). ``0`` turns the guard off (the paper's rule on every row).
        calibrate: fit the saved thresholds on held-out activations at the end of training
            (:mod:`sae_allocators.calibration`); ``False`` saves the running thresholds as they are.
        calibration_tokens: held-out tokens for it; ``None``: 2 percent of the training tokens, at least
            4 training batches, at most 262,144.
    """

    calibrate: bool = True
    calibration_tokens: Optional[int] = None
    outlier_norm_ratio: float = DEFAULT_GUARD_RATIO

    def __post_init__(self) -> None:
        r = self.outlier_norm_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or (r != 0 and r <= 1):
            raise ValueError(
                f"outlier_norm_ratio={r!r} is invalid: use a number above 1 (rows whose norm exceeds that many "
                f"times the batch median are ranked as if they had the median norm; default {DEFAULT_GUARD_RATIO:g}), or 0 to turn "
                "the outlier guard off."
            )
        if not isinstance(self.calibrate, bool):
            raise ValueError(f"calibrate={self.calibrate!r} is invalid: use True or False.")
        n = self.calibration_tokens
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(
                f"calibration_tokens={n!r} is invalid: use a positive number of tokens, or None for 2 % of the training tokens."
            )
        super_post = getattr(super(), "__post_init__", None)
        if super_post is not None:
            super_post()
