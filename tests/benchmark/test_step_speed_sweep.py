"""benchmarks/step_speed.py --sweep (issue 22 part 4), smoke-run at tiny sizes.

Kept fast on purpose (one or two grid points of 64 tokens, d_in 16, a few methods, 2 rounds, no
memory subprocesses: a few seconds): it checks that the sweep runs every method at every point,
records a failing method instead of stopping, and writes a finite JSON record, the Markdown tables
and the plot. The times themselves are not checked (a shared machine).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPT = REPO / "benchmarks" / "step_speed.py"

# a benchmark-harness test: like test_benchmark.py, run once in CI, at the newest SAELens (tests/run.sh)
pytestmark = [
    pytest.mark.saelens_independent,
    pytest.mark.skipif(not SCRIPT.is_file(), reason="benchmarks/ is in the source checkout only"),
]


def _run(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick-sweep",
        "--no-memory",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "out"),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_quick_sweep_writes_finite_tables_json_and_plot(tmp_path):
    methods = ["topk", "mutual_choice", "top_afa", "no_such_method"]
    proc = _run(tmp_path, "--sweep-d-sae", "128", "256", "--archs", *methods)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    record = json.loads((out / "sweep.json").read_text())
    refs = ["floor"] + (["sparsify_topk"] if "sparsify_topk" in record["methods"] else [])
    assert record["methods"] == refs + methods
    assert record["device"].startswith("cpu")
    assert [(p["n"], p["d_in"], p["k"], p["d_sae"]) for p in record["points"]] == [(64, 16, 4, 128), (64, 16, 4, 256)]
    for point in record["points"]:
        for m in refs + methods[:-1]:
            row = point["methods"][m]
            assert row["error"] is None, (m, row["error"])
            assert len(row["times_s"]) == record["rounds"] == 2
            assert math.isfinite(row["median_s"]) and row["median_s"] > 0, m
        bad = point["methods"]["no_such_method"]  # a failing method is recorded, the others went on
        assert bad["median_s"] is None and "unknown arch" in bad["error"]
    md = (out / "sweep.md").read_text()
    assert "## Median step (ms)" in md and "## × SAELens topk" in md and "## Failures" in md
    assert ("## × sparsify TopK" in md) == ("sparsify_topk" in refs)
    rows = [line for line in md.splitlines() if line.startswith("| 64 | 16 | 4 |")]
    assert len(rows) == 2 * (3 if "sparsify_topk" in refs else 2)  # medians, × topk (, × sparsify)
    topk_col = 4 + record["methods"].index("topk")
    for line in rows[-2:]:  # the last table is × topk: topk's own column is 1.00
        assert line.strip("|").split("|")[topk_col].strip() == "1.00"
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_defaults_are_the_issue_grid_and_every_method(tmp_path):
    """The full grid and the method list of the issue (the script's constants; nothing is timed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = (
        "import runpy, json, sys\n"
        f"m = runpy.run_path({str(SCRIPT)!r}, run_name='step_speed')\n"
        "print(json.dumps([m['SWEEP_D_SAE'], m['SWEEP_N'], m['SWEEP_D_IN'], m['SWEEP_K'], m['SWEEP_ARCHS']]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    d_sae, n, d_in, k, archs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (d_sae, n, d_in, k) == ([32768, 65536, 131072], [2048, 4096], [512, 768], [32, 64])
    assert set(archs) == {
        "topk",
        "mutual_choice",
        "feature_choice",
        "feature_choice_uniform",
        "batchtopk_zipf",
        "topk_zipf",
        "abstopk_zipf",
        "top_afa",
        "gradient_topk",
    }


def test_trainer_speed_runs_saelens_training_loop_per_architecture(tmp_path):
    """benchmarks/trainer_speed.py (issue 22 part 3): SAELens's SAETrainer.fit per architecture and the bare
    step side by side; a smoke run at tiny sizes (times not checked)."""
    script = REPO / "benchmarks" / "trainer_speed.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "ts"
    cmd = [sys.executable, str(script), "--quick", "--archs", "gradient_topk", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads((out / "trainer_speed.json").read_text())
    (point,) = record["points"]
    assert point["errors"] == {} and set(point["times"]) == {"topk", "gradient_topk"}  # topk added as the reference
    for t in point["times"].values():
        assert len(t["trainer"]) == len(t["step"]) == 2 and all(
            math.isfinite(v) and v > 0 for v in t["trainer"] + t["step"]
        )
    md = (out / "trainer_speed.md").read_text()
    assert "| gradient_topk |" in md and "trainer × topk" in md


def test_breakdown_times_phases_and_counts_passes_over_n_by_f(tmp_path):
    """benchmarks/step_speed.py --breakdown (issue 22 part 2): per method the phase times from the
    profiler labels of the step, and the passes over N x F / F x d of one step. The counts do not
    depend on the machine: the sparse step's backward makes no pass over N x F (SAELens topk's does),
    and Mutual Choice's forward makes no more than sparsify's TopK (the encoder matmul and the selection)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "bd"
    cmd = [
        sys.executable, str(SCRIPT), "--breakdown", "--device", "cpu", "--n", "1024", "--d-in", "16",
        "--d-sae", "512", "--k", "4", "--rounds", "2", "--warmup", "1", "--out", str(out),
        "--archs", "topk", "mutual_choice", "feature_choice",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads((out / "breakdown.json").read_text())
    rows = record["rows"]
    assert {"topk", "mutual_choice", "feature_choice"} <= set(rows)
    for name in ("mutual_choice", "feature_choice"):
        row = rows[name]
        assert {"encode", "select", "decode", "backward", "clip_adam"} <= set(row["phases_ms"]), name
        assert all(math.isfinite(v) and v >= 0 for v in row["phases_ms"].values())
        fwd, bwd = row["passes"]["forward"], row["passes"]["backward"]
        assert fwd["ops"]["NF"].get("addmm") == 1, fwd  # the encoder matmul, once
        assert bwd["counts"]["NF"] == 0, bwd  # the sparse backward never touches N x F
        if name == "mutual_choice":  # the encoder matmul and the selection's bound (N x F above the 4 x 65,536
            # below which the selection takes a plain kthvalue; N above the densities' token sample)
            assert fwd["counts"]["NF"] <= 3, fwd
        assert "_sparse_coo_tensor_with_dims_and_tensors" not in fwd["ops"]["NF"]  # COO codes: not a pass
    assert rows["topk"]["passes"]["backward"]["counts"]["NF"] > 0  # SAELens's dense backward
    md = (out / "breakdown.md").read_text()
    assert "| mutual_choice |" in md and "N·F passes" in md
