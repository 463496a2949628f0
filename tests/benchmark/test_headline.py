"""The README's headline table is the committed large report's (issue 24: "the README links its headline
table"): rendered from docs/report-large/report.json by sae_allocators.benchmark.headline, so a rerun of
the report that is committed without its table (or the reverse) fails here."""

import json
from pathlib import Path

import pytest

from sae_allocators.benchmark.headline import headline_table, main

pytestmark = pytest.mark.saelens_independent  # reads committed files: run once in CI, at the newest SAELens

ROOT = Path(__file__).resolve().parents[2]


def _readme_table() -> str:
    lines = (ROOT / "README.md").read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| architecture | NMSE (saved model's L0)"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return "\n".join(lines[start:end])


def test_readme_headline_table_is_the_committed_large_report():
    doc = json.loads((ROOT / "docs" / "report-large" / "report.json").read_text())
    assert _readme_table() == headline_table(doc)


def _doc(runs, aggregates, labels=None):
    return {"meta": {"command_settings": {"labels": labels}}, "runs": runs, "aggregates": aggregates}


def _agg(label, k, nmse, l0):
    a = lambda m, s=0.0: {"mean": m, "std": s}  # noqa: E731
    return {
        "dataset": "lm",
        "label": label,
        "k_target": k,
        "nmse": a(nmse, 0.001),
        "l0_mean": a(l0),
        "ce_loss_recovered": a(0.97, 0.002),
        "dead_fraction": a(0.025),
        "median_token_fvu": a(0.15),
    }


def test_headline_table_orders_labels_as_asked_and_puts_own_l0_last(capsys, tmp_path):
    aggs = [_agg("topk", k, 0.1 / k, k) for k in (16.0, 32.0)] + [_agg("mutual_choice", 32.0, 0.002, 33.04)]
    aggs.append(_agg("top_afa", None, 0.02, 786.4))
    runs = [{"dataset": "lm", "label": r["label"]} for r in aggs]
    table = headline_table(_doc(runs, aggs, labels=["mutual_choice", "topk", "top_afa"])).splitlines()
    assert table[0] == (
        "| architecture | NMSE (saved model's L0) k=16 | k=32 | CE loss recovered k=32 | dead k=32 | median token FVU k=32 |"
    )
    assert table[2] == "| mutual_choice | – | 0.0020 ± 0.0010 (L0 33.0) | 0.970 ± 0.002 | 2.5 % | 0.150 ± 0.000 |"
    assert table[3].startswith("| topk | 0.0063 ± 0.0010 (L0 16.0) | 0.0031 ± 0.0010 (L0 32.0) |")
    assert table[4] == "| top_afa (own L0 786) | – | 0.0200 ± 0.0010 | 0.970 ± 0.002 | 2.5 % | 0.150 ± 0.000 |"
    (tmp_path / "report.json").write_text(json.dumps(_doc(runs, aggs)))
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[2].startswith("| topk |")  # no labels asked: first appearance
    with pytest.raises(ValueError, match="no fixed-L0 runs"):
        headline_table(_doc([], []))
