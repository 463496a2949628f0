"""The README's headline table of a report (issue 24: "the README links its headline table"), rendered
from its ``report.json`` so the two cannot drift apart (tests/benchmark/test_headline.py checks the
README's copy against docs/report-large).

    python -m sae_allocators.benchmark.headline docs/report-large   # prints the markdown table
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

#: the columns: the saved model's NMSE (and L0) at each k of the sweep, then three figures at the middle k
HEADER_AT_MIDDLE = ("CE loss recovered", "dead", "median token FVU")


def _pm(row: dict[str, Any], key: str, digits: int) -> str:
    a = row.get(key)
    if not a:
        return "–"
    return f"{a['mean']:.{digits}f} ± {a['std']:.{digits}f}"


def _middle_cells(row: dict[str, Any]) -> list[str]:
    dead = row.get("dead_fraction")
    return [
        _pm(row, "ce_loss_recovered", 3),
        f"{100 * dead['mean']:.1f} %" if dead else "–",
        _pm(row, "median_token_fvu", 3),
    ]


def headline_table(doc: dict[str, Any], dataset: str = "lm") -> str:
    """The markdown table: one row per label, in the order the command listed them (``Settings.labels``), else
    of first appearance; a label that
    chooses its own L0 (``k_target`` None, e.g. top_afa) gets its NMSE in the last k column and its L0 in
    its name."""
    rows = [r for r in doc["aggregates"] if r["dataset"] == dataset]
    ks = sorted({r["k_target"] for r in rows if r["k_target"] is not None})
    if not ks:
        raise ValueError(f"no fixed-L0 runs on {dataset!r} in this report")
    mid = ks[len(ks) // 2]
    ran = [r["label"] for r in doc["runs"] if r["dataset"] == dataset]
    asked = (doc.get("meta", {}).get("command_settings") or {}).get("labels") or []
    labels = [lab for lab in asked if lab in ran]  # the command's order (the large preset's labels)
    for lab in ran:
        if lab not in labels:
            labels.append(lab)
    by = {(r["label"], r["k_target"]): r for r in rows}
    head = ["architecture"] + [f"NMSE (saved model's L0) k={k:g}" if i == 0 else f"k={k:g}" for i, k in enumerate(ks)]
    head += [f"{h} k={mid:g}" for h in HEADER_AT_MIDDLE]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for lab in labels:
        own = by.get((lab, None))
        if own is not None:
            cells = [f"{lab} (own L0 {own['l0_mean']['mean']:.0f})"] + ["–"] * (len(ks) - 1)
            cells += [_pm(own, "nmse", 4)] + _middle_cells(own)
        else:
            cells = [lab]
            for k in ks:
                r = by.get((lab, k))
                cells.append(f"{_pm(r, 'nmse', 4)} (L0 {r['l0_mean']['mean']:.1f})" if r else "–")
            r = by.get((lab, mid))
            cells += _middle_cells(r) if r else ["–"] * len(HEADER_AT_MIDDLE)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m sae_allocators.benchmark.headline REPORT_FOLDER", file=sys.stderr)
        return 2
    print(headline_table(json.loads((Path(args[0]) / "report.json").read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
