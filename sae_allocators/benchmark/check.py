"""``python -m sae_allocators.benchmark.check REPORT_DIR``: CI's sanity check of a report.

Exits non-zero (and says why) unless: report.md, report.json and every plot listed exist; at
least one run per dataset; no run failed; every numeric figure is finite; fractions lie in
[0, 1]; and L0 is within budget:

- fixed-L0 architectures: the training-time selection keeps at most k per token on average
  (``train_mode_l0_mean <= k`` up to ``TRAIN_L0_TOLERANCE``, 1%), and the saved inference
  model at most ``INFERENCE_L0_SLACK`` times k (batch-level rules are saved with a threshold);
- architectures that choose their own L0 (top-AFA): at most their ``k_max`` cap.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

INFERENCE_L0_SLACK = 2.0
#: relative slack on the training-time budget (Feature Choice's integer capacities can round up)
TRAIN_L0_TOLERANCE = 0.01
FRACTIONS = ("frac_empty_tokens", "dead_fraction", "underused_fraction", "explained_variance")


def _numbers(obj: Any, path: str = ""):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}" if path else str(k))


def problems(report_dir: Path) -> list[str]:
    report_dir = Path(report_dir)
    out: list[str] = []
    md, js = report_dir / "report.md", report_dir / "report.json"
    for f in (md, js):
        if not f.is_file():
            out.append(f"missing {f}")
    if out:
        return out
    try:
        doc = json.loads(js.read_text())
    except json.JSONDecodeError as exc:
        return [f"{js} is not valid JSON: {exc}"]
    runs = doc.get("runs", [])
    if not runs:
        out.append("no runs in report.json")
    for f in doc.get("meta", {}).get("failures", []):
        out.append(f"run failed: {f['run']}: {f['error']}")
    for src in doc.get("meta", {}).get("sources", []):
        if not any(r["dataset"] == src["kind"] for r in runs):
            out.append(f"no successful run on dataset {src['kind']!r}")
    for p in doc.get("plots", []):
        if not (report_dir / p).is_file() or (report_dir / p).stat().st_size == 0:
            out.append(f"plot {p} listed in report.json is missing or empty")
    for r in runs:
        tag = r.get("run", f"{r.get('dataset')}/{r.get('label')}")
        for name, value in _numbers({k: v for k, v in r.items() if k != "config_fields"}):
            if not math.isfinite(value):
                out.append(f"{tag}: {name} = {value} is not finite")
        for name in FRACTIONS:
            v = r.get(name)
            if (
                isinstance(v, (int, float))
                and math.isfinite(v)
                and not (-1e-9 <= v <= 1 + 1e-9)
                and name != "explained_variance"
            ):
                out.append(f"{tag}: {name} = {v} is outside [0, 1]")
            if name == "explained_variance" and isinstance(v, (int, float)) and v > 1 + 1e-9:
                out.append(f"{tag}: explained_variance = {v} > 1")
        k = r.get("k_target")
        l0, l0_train = r.get("l0_mean"), r.get("train_mode_l0_mean")
        if r.get("fixed_l0") and k is not None:
            if l0_train is not None and l0_train > k * (1 + TRAIN_L0_TOLERANCE) + 1e-6:
                out.append(f"{tag}: training-time L0 {l0_train:.3f} exceeds the budget k={k:g}")
            if l0 is not None and l0 > INFERENCE_L0_SLACK * k:
                out.append(f"{tag}: inference L0 {l0:.3f} exceeds {INFERENCE_L0_SLACK:g} x k={k:g}")
        else:
            cap = (r.get("config_fields") or {}).get("k_max")
            if cap is not None and l0 is not None and l0 > cap + 1e-6:
                out.append(f"{tag}: L0 {l0:.3f} exceeds its cap k_max={cap}")
        if l0 is not None and l0 <= 0:
            out.append(f"{tag}: L0 {l0} -- the SAE encodes nothing")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m sae_allocators.benchmark.check REPORT_DIR", file=sys.stderr)
        return 2
    found = problems(Path(argv[0]))
    if found:
        print(f"benchmark report {argv[0]}: {len(found)} problem(s)")
        for p in found:
            print(f"  - {p}")
        return 1
    doc = json.loads((Path(argv[0]) / "report.json").read_text())
    print(f"benchmark report {argv[0]}: OK ({len(doc['runs'])} runs, all figures finite, L0 within budget)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
