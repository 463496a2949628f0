"""Calibration: fit the saved JumpReLU thresholds on held-out activations after training.

A batch-level rule (``mutual_choice``, ``batchtopk_zipf``, ``feature_choice``) spends exactly its
budget on every training batch, but the saved model applies fixed thresholds one token at a time.
Running averages of past batches' thresholds (:mod:`sae_allocators.thresholds`) lag and drift;
calibration replaces them by the thresholds that reproduce the training allocation on ``N``
activations the SAE did not train on:

- **global rule** (``mutual_choice``, ``batchtopk_zipf``): ``K = floor(k N)``; theta is the
  midpoint of the ``K``-th and ``(K+1)``-th largest pre-activation of the pooled calibration set
  (0 if at most ``K`` are positive), so exactly ``K`` entries satisfy ``pre > theta``: mean L0 = k.
- **per-feature rule, ``scale``** (``feature_choice``'s default): the running per-feature thresholds
  of training keep their shape and are multiplied by one factor ``a``, the exact cut that makes
  ``K`` entries fire: entry ``(i, j)`` fires iff ``pre_ij / theta_j > a``, so ``a`` is the global
  rule applied to these ratios. At equal L0 it is the uncalibrated export itself (same NMSE).
- **per-feature rule, ``shares``** (``calibration_rule="shares"``): feature ``j`` gets the target count
  ``c_j = K * s_j / sum(s)`` (largest-remainder rounding, ``sum c_j = K``), where ``s_j`` is its
  share of the training allocation: the running firing density of the training selection
  (``feature_density``; the current capacities if the SAE never trained), or, for a saved
  ``jumprelu`` folder, SAELens's ``sparsity.safetensors``. theta_j is the midpoint of the
  ``c_j``-th and ``(c_j+1)``-th largest values of column ``j``. A feature with fewer positive
  values than ``c_j`` fires on all of them, and its shortfall goes to the other features in
  proportion to their shares (water-filling), so the total stays ``K`` while the data allow.
  **A feature that never fired in training** (``s_j = 0``) gets theta_j = its largest calibration
  pre-activation (0 if none is positive): it stays silent on the calibration set, as in training.

Both are exact quantiles computed in one streaming pass without holding ``[N, d_sae]``: only the
values that can still be among each group's top ``c + 1`` are kept (memory ~ ``1.25 k N``
values), with a per-group floor that rises as batches arrive.

Where it runs (at the end of training, and the runners' wiring) is :mod:`sae_allocators.calibration.runner`;
``sae-allocators calibrate SAE_FOLDER`` (:mod:`sae_allocators.workflow.calibrate`) runs it on a saved folder.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator

import torch

from sae_allocators.architectures import kinds
from sae_allocators.allocation.batch import budget
from sae_allocators.architectures._common import pre_activations

#: default calibration tokens: this fraction of the training tokens ...
DEFAULT_FRACTION = 0.02
#: ... but at least this many training batches ...
MIN_BATCHES = 4
#: ... and at most this many tokens (the L0 estimate's sampling error is ~0.2 % there)
MAX_TOKENS = 262_144
#: below this many expected firings per latent (k * N / d_sae) calibration warns that it is noisy
MIN_FIRINGS_PER_LATENT = 1
#: extra room kept per feature for the water-filling of feature_choice
MARGIN = 0.25


def global_rules() -> tuple[str, ...]:
    """Registered architectures whose class declares one batch threshold (``rule_kind`` =
    ``batch_global``: mutual_choice, batchtopk_zipf, a plugin's); calibrated by the quantile fit."""
    return kinds.architectures_of_kind(kinds.BATCH_GLOBAL)


def per_feature_rules() -> tuple[str, ...]:
    """Registered architectures whose class declares per-feature thresholds (``rule_kind`` =
    ``batch_per_feature``: feature_choice)."""
    return kinds.architectures_of_kind(kinds.BATCH_PER_FEATURE)


def calibrated_architectures() -> tuple[str, ...]:
    """Every architecture with thresholds to calibrate, for messages."""
    return global_rules() + per_feature_rules()


def default_tokens(training_tokens: int, batch_size: int) -> int:
    """Calibration tokens when none are given: 2 % of training, >= 4 batches, <= 262,144."""
    n = int(round(DEFAULT_FRACTION * training_tokens))
    return int(min(MAX_TOKENS, max(n, MIN_BATCHES * batch_size)))


@dataclass
class CalibrationResult:
    rule: str  # "global", "per_feature/scale" or "per_feature/shares"
    architecture: str
    tokens: int
    target_l0: float
    achieved_l0: float  # on the calibration set, with the calibrated thresholds
    l0_before: float  # on the calibration set, with the thresholds of training
    seconds: float
    never_fired_features: int = 0  # per-feature rule: s_j = 0
    short_features: int = 0  # per-feature rule: fewer positive values than their target
    shares: str = ""
    held_out: bool = True
    theta: torch.Tensor | None = field(default=None, repr=False)
    #: the thresholds before calibration (the running ones of training)
    theta_before: torch.Tensor | None = field(default=None, repr=False)

    def metadata(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("theta", "theta_before")}
        d["method"] = "sae_allocators.calibration (exact quantile on held-out activations)"
        return d


def rule_of(architecture: str) -> str | None:
    """``"global"``, ``"per_feature"`` or None (nothing to calibrate), from the ``rule_kind`` the
    architecture's registered training class declares."""
    kind = kinds.declared_kinds().get(architecture)
    return {kinds.BATCH_GLOBAL: "global", kinds.BATCH_PER_FEATURE: "per_feature"}.get(kind or "")


def architecture_of(sae: Any) -> str:
    """The training architecture: the SAE's own, or the one a saved ``jumprelu`` records."""
    arch = sae.cfg.architecture()
    if arch == "jumprelu":
        return str(sae.cfg.metadata.training_architecture or arch)
    return arch


# --- the streaming top-values collector --------------------------------------------------------


class _TopPerGroup:
    """Keeps, per group (feature, or one group for the pooled batch), the ``cap_g`` largest
    positive values seen so far plus every copy of a value tied with the ``cap_g``-th, in one pass
    over batches: a value below the group's current ``cap_g``-th largest can never enter, so it is
    dropped on arrival (only the largest dropped value per group is remembered, as the next
    value below the kept ones)."""

    def __init__(self, caps: torch.Tensor):
        self.caps = caps.long()
        self.groups = caps.numel()
        dev = caps.device
        self.floor = torch.zeros(self.groups, dtype=torch.float32, device=dev)
        self.dropped_max = torch.zeros(self.groups, dtype=torch.float32, device=dev)
        self.vals: list[torch.Tensor] = []
        self.grp: list[torch.Tensor] = []
        self.pending = 0
        self.limit = 2 * int(self.caps.sum()) + 65_536
        self.positive = torch.zeros(self.groups, dtype=torch.long, device=dev)

    def add(self, pre: torch.Tensor) -> None:
        """``pre``: ``[n, groups]`` (per feature) or any shape when there is one group."""
        pre = pre.detach().float()
        pre = pre.reshape(-1, 1) if self.groups == 1 else pre.reshape(-1, self.groups)
        positive = pre > 0
        self.positive += positive.sum(0)
        keep = positive & (pre >= self.floor)
        dropped = torch.where(keep, torch.zeros((), dtype=pre.dtype, device=pre.device), pre).amax(0).clamp_min(0)
        self.dropped_max = torch.maximum(self.dropped_max, dropped)
        idx = keep.nonzero()
        self.vals.append(pre[idx[:, 0], idx[:, 1]])
        self.grp.append(idx[:, 1])
        self.pending += idx.shape[0]
        if self.pending > self.limit:
            self._prune()

    def _prune(self) -> None:
        dev = self.floor.device
        v = torch.cat(self.vals) if self.vals else torch.zeros(0, device=dev)
        g = torch.cat(self.grp) if self.grp else torch.zeros(0, dtype=torch.long, device=dev)
        v, order = torch.sort(v, descending=True)
        g = g[order]
        if self.groups > 1:  # group-major, descending within each group
            g, order = torch.sort(g, stable=True)
            v = v[order]
        counts = torch.bincount(g, minlength=self.groups)
        starts = torch.cumsum(counts, 0) - counts
        full = counts >= self.caps
        boundary = _value_at(v, starts, counts, self.caps)  # the cap-th largest (0 if fewer)
        boundary = torch.where(full, boundary, torch.zeros_like(boundary))
        keep = v >= boundary[g]
        if v.numel():
            lost = torch.where(keep, torch.zeros((), dtype=v.dtype, device=dev), v)
            self.dropped_max = self.dropped_max.scatter_reduce(0, g, lost, "amax", include_self=True)
        self.vals, self.grp = [v[keep]], [g[keep]]
        self.pending = int(keep.sum())
        self.floor = torch.maximum(self.floor, boundary)

    def sorted_values(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values, starts, counts)``: per group, descending values at ``values[starts[g]:...]``."""
        self._prune()
        v, g = self.vals[0], self.grp[0]
        counts = torch.bincount(g, minlength=self.groups)
        return v, torch.cumsum(counts, 0) - counts, counts


def _value_at(v: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """The ``rank``-th largest (1-based) value per group; 0 where the group has fewer values."""
    ok = (rank >= 1) & (rank <= counts)
    idx = (starts + rank - 1).clamp(0, max(v.numel() - 1, 0))
    out = v[idx] if v.numel() else torch.zeros_like(starts, dtype=torch.float32)
    return torch.where(ok, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _cut(
    v: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, c: torch.Tensor, dropped_max: torch.Tensor
) -> torch.Tensor:
    """Per group, the threshold theta with ``#(values > theta)`` closest to ``c`` (values sorted
    descending per group; absent values count as 0). Without ties at the ``c``-th value this is
    the midpoint of the ``c``-th and ``(c+1)``-th largest (exactly ``c`` values above it); with
    ties (repeated activation rows) all copies are kept or none, whichever is nearer to ``c``."""
    groups = counts.numel()
    g = torch.repeat_interleave(torch.arange(groups, device=counts.device), counts)
    t = _value_at(v, starts, counts, c)
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    above = torch.bincount(g[v > t[g]], minlength=groups) if v.numel() else torch.zeros_like(counts)
    at_or_above = torch.bincount(g[v >= t[g]], minlength=groups) if v.numel() else torch.zeros_like(counts)
    below = torch.where(v < t[g], v, zero)
    next_down = dropped_max.to(v.dtype).clone().scatter_reduce(0, g, below, "amax", include_self=True)
    keep_ties = (at_or_above - c) < (c - above)
    theta = torch.where(keep_ties, (t + next_down) / 2, t)
    # c = 0: above the largest value; t = 0 (c beyond the positives): every positive fires
    theta = torch.where(c <= 0, _value_at(v, starts, counts, torch.ones_like(c)), theta)
    return torch.where((c > 0) & (c >= counts), zero, theta)


def _largest_remainder(weights: torch.Tensor, total: int) -> torch.Tensor:
    """Non-negative integers proportional to ``weights`` summing to ``total``."""
    w = weights.double().clamp_min(0)
    if total <= 0 or float(w.sum()) <= 0:
        return torch.zeros_like(w, dtype=torch.long)
    exact = w / w.sum() * total
    base = exact.floor().long()
    rest = total - int(base.sum())
    if rest > 0:
        frac = exact - base.double()
        top = torch.topk(frac, rest).indices
        base[top] += 1
    return base


def _water_fill(target: torch.Tensor, avail: torch.Tensor, room: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """Move the shortfall of features with ``avail < target`` to the others (by share, at most
    ``room`` each), so the total is kept while the data allow."""
    c = torch.minimum(target, avail)
    deficit = int(target.sum() - c.sum())
    # a round either places the whole deficit or fills some feature's room for good, and a short
    # feature never takes any: fewer rounds than features always suffice (16 did not, issue 17)
    for _ in range(c.numel()):
        if deficit <= 0:
            break
        limit = torch.minimum(avail, room)
        free = (limit - c).clamp_min(0)
        w = torch.where(free > 0, shares.double(), torch.zeros((), dtype=torch.double, device=shares.device))
        if float(w.sum()) <= 0:
            break
        extra = torch.minimum(_largest_remainder(w, deficit), free)
        c = c + extra
        deficit -= int(extra.sum())
    return c


# --- the calibration itself ------------------------------------------------------------------


def training_shares(sae: Any, n_tokens: int) -> tuple[torch.Tensor, str]:
    """Per-feature share of the training allocation of a feature_choice training SAE."""
    density = getattr(sae, "feature_density", None)
    steps = getattr(sae, "density_steps", None)
    if density is not None and steps is not None and int(steps) > 0:
        return density.detach().double(), "feature_density (running firing rate of the training selection)"
    if hasattr(sae, "current_capacities"):
        return sae.current_capacities(n_tokens).double(), "current capacities (the SAE has not trained)"
    raise ValueError("feature_choice calibration needs each feature's training share: none found")


def calibrate(
    sae: Any,
    batches: Iterable[torch.Tensor],
    n_tokens: int,
    *,
    k: float | None = None,
    shares: torch.Tensor | None = None,
    shares_source: str = "",
    method: str | None = None,
    apply: bool = True,
) -> CalibrationResult:
    """Fit the thresholds of ``sae`` on ``n_tokens`` activations from ``batches`` (raw activations,
    ``[..., d_in]``, as the saved model receives them); with ``apply``, write them into ``sae`` (a
    training SAE's tracker, or a ``jumprelu``'s ``threshold``) and record the result in its
    ``cfg.metadata.calibration``."""
    with torch.no_grad():
        t0 = time.perf_counter()
        arch, rule, k, method = _checked_arguments(sae, n_tokens, k, method)
        d_sae = int(sae.cfg.d_sae)
        if k * n_tokens < MIN_FIRINGS_PER_LATENT * d_sae:
            warnings.warn(
                f"calibration on {n_tokens} tokens gives each of the {d_sae} latents about {k * n_tokens / d_sae:.3g} firings "
                f"(k * N / d_sae), below {MIN_FIRINGS_PER_LATENT}: the thresholds will be noisy. Use at least "
                f"{math.ceil(MIN_FIRINGS_PER_LATENT * d_sae / k)} tokens.",
                stacklevel=2,
            )
        dev = sae.W_enc.device
        before_theta = current_thresholds(sae)
        intake = _Intake(sae, batches, n_tokens, before_theta, dev)
        entries = budget(k, n_tokens)
        if entries < 1:
            raise ValueError(
                f"calibration with k={k:g} on {n_tokens} tokens has a budget floor(k * N) = 0: "
                f"use at least {math.ceil(1 / k)} tokens."
            )
        never, short = 0, 0
        if rule == "global":
            theta, fired, source = _fit_global(intake, k, entries)
        elif method == "scale":
            theta, fired, source = _fit_scale(intake, k, entries, before_theta, d_sae)
        else:
            if shares is None:
                shares, shares_source = training_shares(sae, n_tokens)
            theta, fired, never, short = _fit_shares(intake, k, entries, shares, d_sae)
            source = shares_source
        seen = intake.seen
        if seen == 0:
            raise ValueError("calibration: the activation source gave no tokens; give it held-out activations.")
        if seen < n_tokens:
            # stacklevel 2: the caller (calibrate has no decorator: no_grad is a with-block inside)
            warnings.warn(
                f"calibration asked for {n_tokens} tokens but the source gave {seen}; calibrated on those.",
                stacklevel=2,
            )
        result = CalibrationResult(
            rule=rule if rule == "global" else f"{rule}/{method}",
            architecture=arch,
            tokens=seen,
            target_l0=float(k),
            achieved_l0=fired / max(seen, 1),
            l0_before=intake.before / max(seen, 1),
            seconds=time.perf_counter() - t0,
            never_fired_features=never,
            short_features=short,
            shares=source,
            theta=theta.detach(),
            theta_before=before_theta.detach().clone(),
        )
        if apply:
            apply_thresholds(sae, theta, result)
        return result


def _checked_arguments(sae: Any, n_tokens: Any, k: Any, method: str | None) -> tuple[str, str, float, str | None]:
    """``(architecture, rule, k, method)`` for :func:`calibrate`, with ``k`` and ``method``
    defaulted from the SAE's config; a ``ValueError`` naming the fix for anything that cannot be
    calibrated (checked before any activation is read)."""
    arch = architecture_of(sae)
    rule = rule_of(arch)
    if rule is None:
        raise ValueError(
            f"calibration is defined for {', '.join(calibrated_architectures())} (saved as jumprelu); "
            f"this SAE is {arch!r}, whose inference rule has no batch threshold to calibrate."
        )
    if k is None:
        k = getattr(sae.cfg, "k", None)
    if k is None:
        raise ValueError(
            f"calibrating a saved {arch} model needs its training k (pass k=..., or --k on the command line)."
        )
    if rule == "per_feature":
        method = method or getattr(sae.cfg, "calibration_rule", None) or "scale"
        if method not in ("scale", "shares"):
            raise ValueError(f"feature_choice calibration rule {method!r}: use 'scale' (default) or 'shares'.")
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"calibration tokens={n_tokens!r}: use a positive number of tokens.")
    d_sae = int(sae.cfg.d_sae)
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not math.isfinite(k) or not 0 < k <= d_sae:
        raise ValueError(
            f"calibration target k={k!r} is invalid: use the mean L0 to calibrate to, in (0, d_sae={d_sae}]."
        )
    for name, p in sae.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise ValueError(
                f"the SAE's {name!r} holds {int(torch.isnan(p).sum())} NaN and {int(torch.isinf(p).sum())} inf values: "
                "its thresholds cannot be calibrated (training diverged or the file is damaged). Train again in float32."
            )
    return arch, rule, k, method


class _Intake:
    """The calibration activations: at most ``n_tokens`` rows of ``batches`` (the last batch is
    cut), each checked, as pre-activations of ``sae``; counts the tokens (``seen``) and the
    entries the thresholds of training let fire (``before``)."""

    def __init__(
        self, sae: Any, batches: Iterable[torch.Tensor], n_tokens: int, before_theta: torch.Tensor, device: torch.device
    ):
        self.sae, self.batches, self.n_tokens, self.before_theta = sae, batches, n_tokens, before_theta
        self.device = device
        self.seen, self.before = 0, 0

    def pre_activations(self) -> Iterator[torch.Tensor]:
        sae, n_tokens = self.sae, self.n_tokens
        for x in self.batches:
            x = x.reshape(-1, x.shape[-1])[: n_tokens - self.seen].to(self.device)
            if x.shape[0] == 0:
                break
            if x.shape[-1] != sae.cfg.d_in:
                raise ValueError(
                    f"calibration batch of width {x.shape[-1]}, but the SAE has d_in={sae.cfg.d_in}: "
                    "give activations of the hook it was trained on."
                )
            if not bool(torch.isfinite(x).all()):
                raise ValueError(
                    f"calibration batch holds {int(torch.isnan(x).sum())} NaN and {int(torch.isinf(x).sum())} inf activations "
                    f"(after {self.seen} tokens): the thresholds would be meaningless. Give finite activations (check the model's dtype)."
                )
            self.seen += x.shape[0]
            pre = pre_activations(sae, x)
            self.before += int(((pre > self.before_theta.to(pre.dtype)) & (pre > 0)).sum())
            yield pre
            if self.seen >= n_tokens:
                break


def _fit_global(intake: _Intake, k: float, entries: int) -> tuple[torch.Tensor, int, str]:
    """The global rule: ``(theta, entries above it, source)``, theta 0-d."""
    dev = intake.device
    top = _TopPerGroup(torch.tensor([entries + 1], device=dev))
    for pre in intake.pre_activations():
        top.add(pre)
    entries = budget(k, intake.seen)  # = budget(k, n_tokens) unless the source ran dry
    v, starts, counts = top.sorted_values()
    theta = _cut(v, starts, counts, torch.tensor([entries], device=dev), top.dropped_max).reshape(())
    return theta, int((v > theta).sum()), ""


def _fit_scale(
    intake: _Intake, k: float, entries: int, before_theta: torch.Tensor, d_sae: int
) -> tuple[torch.Tensor, int, str]:
    """The per-feature rule ``scale``: ``(theta [d_sae], entries above it, source)``."""
    # theta_j = a * base_j with one factor a: entry (i, j) fires iff pre_ij / base_j > a, so a
    # is the global cut of the ratios (base_j = 0: fires on every positive value, ratio +inf)
    dev = intake.device
    base = before_theta.double().expand(d_sae)
    top = _TopPerGroup(torch.tensor([entries + 1], device=dev))
    finite_max = torch.zeros((), dtype=torch.float32, device=dev)
    for pre in intake.pre_activations():
        ratio = torch.where(
            base > 0, pre.double() / base.clamp_min(1e-300), torch.where(pre > 0, math.inf, -1.0)
        ).float()
        finite_max = torch.maximum(
            finite_max, torch.where(torch.isfinite(ratio), ratio, torch.zeros((), device=dev)).max()
        )
        top.add(ratio)
    entries = budget(k, intake.seen)
    v, starts, counts = top.sorted_values()
    a = _cut(v, starts, counts, torch.tensor([entries], device=dev), top.dropped_max).reshape(())
    a = torch.minimum(a, finite_max)  # more always-firing entries than K: silence the others
    theta = torch.where(base > 0, a.double() * base, torch.zeros((), dtype=torch.double, device=dev))
    return theta, int((v > a).sum()), f"running thresholds of training scaled by one factor a = {float(a):.6g}"


def _fit_shares(
    intake: _Intake, k: float, entries: int, shares: torch.Tensor, d_sae: int
) -> tuple[torch.Tensor, int, int, int]:
    """The per-feature rule ``shares``: ``(theta [d_sae], entries above it, never-fired features,
    short features)``."""
    dev = intake.device
    shares = shares.to(dev).double().clamp_min(0).reshape(-1)
    if shares.numel() != d_sae or float(shares.sum()) <= 0:
        raise ValueError(f"feature shares must be {d_sae} non-negative values with a positive sum.")
    # target counts are fixed once the number of tokens is known; the pass keeps room for water-filling
    target = _largest_remainder(shares, entries)
    caps = torch.where(target > 0, (target.double() * (1 + MARGIN)).ceil().long() + 1, torch.ones_like(target))
    top = _TopPerGroup(caps)
    for pre in intake.pre_activations():
        top.add(pre)
    if intake.seen < intake.n_tokens:  # fewer tokens than asked: retarget on what arrived
        entries = budget(k, intake.seen)
        target = _largest_remainder(shares, entries)
    v, starts, counts = top.sorted_values()
    avail = top.positive
    c = _water_fill(target, avail, caps - 1, shares)
    theta = _cut(v, starts, counts, c, top.dropped_max)
    never = int((shares == 0).sum())
    short = int((avail < target).sum())
    g = torch.repeat_interleave(torch.arange(d_sae, device=dev), counts)
    fired = int((v > theta[g]).sum()) if v.numel() else 0
    return theta, fired, never, short


def current_thresholds(sae: Any) -> torch.Tensor:
    """The thresholds the saved model would use now (0-d or [d_sae])."""
    if hasattr(sae, "inference_thresholds"):
        return sae.inference_thresholds().detach().float()
    if hasattr(sae, "threshold"):
        return sae.threshold.detach().float()
    raise ValueError(f"{type(sae).__name__} has no inference threshold to calibrate")


def apply_thresholds(sae: Any, theta: torch.Tensor, result: CalibrationResult) -> None:
    with torch.no_grad():
        tracker = getattr(sae, "threshold_tracker", None)
        if tracker is not None:
            tracker.set_calibrated(theta)
        elif hasattr(sae, "threshold"):
            from sae_allocators.thresholds import check_exportable

            check_exportable(theta, "calibrated threshold")
            sae.threshold.copy_(theta.to(sae.threshold.dtype).expand_as(sae.threshold))
        else:
            raise ValueError(f"{type(sae).__name__} has no threshold to write the calibration into")
        sae.cfg.metadata.calibration = result.metadata()
