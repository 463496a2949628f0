"""Paired differences over seeds at equal k, with a Student-t confidence interval (the report's claims).

Two architectures trained at the same k with the same seeds (the seed sets the initialisation and the
data order of both) give one difference per seed, ``a_s - b_s``. Their mean, with the two-sided 95 %
t-interval ``mean ± t(0.975, n - 1) · sd / sqrt(n)``, says whether ``a`` is lower, higher, or not
distinguishable from ``b`` in these runs. With 2 seeds ``t`` is 12.7: the interval is wide, and only a
difference that every seed shows by a similar margin comes out distinguishable. With 1 seed there is no
interval: the verdict is "not distinguishable" (one run cannot separate the difference from seed noise).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

#: two-sided 95 % Student-t quantiles t(0.975, df), df = 1..30 (standard tables)
T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)

LOWER, HIGHER, NOT_DISTINGUISHABLE = "lower", "higher", "not distinguishable"


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the 95 % two-sided quantile (the normal's 1.96 beyond the table)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return T975[df - 1] if df <= len(T975) else 1.96


def paired_difference(a: Mapping[Any, float], b: Mapping[Any, float]) -> dict[str, Any]:
    """``a - b`` paired by seed (the keys both have), mean and 95 % t-interval, and a verdict.

    Returns ``n`` (pairs), ``seeds``, ``diffs``, ``mean``, ``sd`` (sample, ``None`` for n < 2),
    ``half_width``, ``low``, ``high`` (``None`` for n < 2), ``verdict`` (``lower`` when the whole
    interval is below 0, ``higher`` when above, else ``not distinguishable``) and ``note``.
    """
    seeds = sorted(set(a) & set(b), key=lambda s: (str(type(s)), s))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    diffs_ok = [d for d in diffs if math.isfinite(d)]
    out: dict[str, Any] = {
        "n": len(diffs_ok),
        "seeds": [s for s, d in zip(seeds, diffs) if math.isfinite(d)],
        "diffs": diffs_ok,
    }
    n = len(diffs_ok)
    if n == 0:
        return {
            **out,
            "mean": None,
            "sd": None,
            "half_width": None,
            "low": None,
            "high": None,
            "verdict": NOT_DISTINGUISHABLE,
            "note": "no seed in common: no comparison",
        }
    mean = math.fsum(diffs_ok) / n
    if n == 1:
        return {
            **out,
            "mean": mean,
            "sd": None,
            "half_width": None,
            "low": None,
            "high": None,
            "verdict": NOT_DISTINGUISHABLE,
            "note": "1 seed: no interval",
        }
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs_ok) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict = LOWER if high < 0 else HIGHER if low > 0 else NOT_DISTINGUISHABLE
    note = f"{n} seeds, 95% t-interval" + (" (t = 12.7 with 2 seeds: the interval is wide)" if n == 2 else "")
    return {
        **out,
        "mean": mean,
        "sd": sd,
        "half_width": half,
        "low": low,
        "high": high,
        "verdict": verdict,
        "note": note,
    }


def describe(d: Mapping[str, Any], fmt: str = "{:+.4f}") -> str:
    """One line: ``mean [low, high] -> verdict (note)``."""
    if d.get("mean") is None:
        return f"paired difference: none ({d['note']})"
    if d.get("low") is None:
        return f"paired difference {fmt.format(d['mean'])}: {d['verdict']} ({d['note']})"
    return (
        f"paired difference {fmt.format(d['mean'])} [{fmt.format(d['low'])}, {fmt.format(d['high'])}]: "
        f"{d['verdict']} ({d['note']})"
    )


def tally(results: list[Mapping[str, Any]]) -> str:
    """``2 lower, 1 higher, 3 not distinguishable`` over a claim's paired comparisons."""
    counts = {v: sum(1 for r in results if r["verdict"] == v) for v in (LOWER, HIGHER, NOT_DISTINGUISHABLE)}
    return ", ".join(f"{n} {v}" for v, n in counts.items())
