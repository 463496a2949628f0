"""Issue 24's machinery: the large preset's sizes, the paired statistics of the claims, and resuming a
run from its per-run records (a tiny synthetic run, interrupted, with a damaged record, and rerun)."""

import json
import math
from pathlib import Path

import pytest

from sae_allocators.benchmark import check, report, stats
from sae_allocators.benchmark import claims as claims_mod

pytestmark = pytest.mark.saelens_independent  # the benchmark harness: run once in CI, at the newest SAELens


# --- the preset -------------------------------------------------------------------------------


def test_large_preset_meets_the_issue_minimums():
    from sae_allocators.benchmark import cli
    from sae_allocators.benchmark.estimate import estimate_seconds, lm_run_counts
    from sae_allocators.benchmark.settings import DEFAULT_OUT, PRESETS, large_settings

    st = large_settings(Path("r"))
    assert PRESETS["large"] is large_settings and st.preset == "large"
    d_in = 576  # SmolLM2-135M
    s = st.lm
    assert s.hook_layer == 6 and s.hook_point == "hook_resid_post"
    assert s.training_tokens >= 1_000_000
    assert (s.d_sae or s.expansion * d_in) >= 8 * d_in
    assert s.training_tokens // s.train_batch_size >= 300  # batch-level thresholds settle (docs/benchmark.md)
    assert tuple(st.lm_ks) == (16, 32, 64)
    assert st.lm_seeds >= 2 and st.lm_spread_seeds >= 3
    assert s.ce_eval_sequences * 128 >= 8192  # CE/KL on at least 8,192 tokens (context 128)
    assert s.eval_sequences * 128 >= 8192
    assert st.datasets == ("lm",) and st.keep_saes and DEFAULT_OUT["large"] == Path("reports") / "large"
    want = {
        "topk",
        "batchtopk",
        "mutual_choice",
        "feature_choice",
        "feature_choice[capacity=uniform]",
        "topk_zipf",
        "batchtopk_zipf",
        "abstopk",
        "top_afa",
    }
    assert want <= set(st.labels)
    counts = lm_run_counts(st)
    for lab in want - {"top_afa"}:
        assert counts[lab] == 2 + 3 + 2  # 2 seeds at k = 16 and 64, 3 at k = 32
    assert counts["top_afa"] == 2
    est = estimate_seconds(st)
    # 58 SAEs in the report, 51 trained: batchtopk_zipf's 7 are mutual_choice's (Settings.same_runs)
    assert sum(counts.values()) == 58 and st.same_runs == (("batchtopk_zipf", "mutual_choice"),)
    assert est["runs"] == 51 and "batchtopk_zipf" not in est["train_seconds_per_label"]
    assert math.isfinite(est["total"]) and est["total"] > 0
    # the SAELens baselines train on their sparse twins (tests/benchmark/test_sparse_baselines.py): a quarter
    # of SAELens's dense step
    assert st.sparse_baselines == ("topk", "abstopk", "batchtopk")
    per = est["train_seconds_per_label"]
    assert per["batchtopk"] < 2 * per["mutual_choice"]
    # SAELens's trainer's dense bookkeeping is charged to SAELens's own step only: this project's
    # architectures hand it sparse COO codes
    from sae_allocators.benchmark import estimate

    dense = large_settings(Path("r"))
    dense.sparse_baselines = ("topk", "abstopk")
    dense_per = estimate_seconds(dense)["train_seconds_per_label"]
    assert per["batchtopk"] < dense_per["batchtopk"] / 3
    saved = estimate.TRAINER_NS_PER_ELEMENT
    try:
        estimate.TRAINER_NS_PER_ELEMENT = 0.0
        free = estimate_seconds(dense)["train_seconds_per_label"]
    finally:
        estimate.TRAINER_NS_PER_ELEMENT = saved
    assert free["batchtopk"] < dense_per["batchtopk"]
    assert all(free[lab] == dense_per[lab] for lab in dense_per if lab != "batchtopk")
    assert cli.parser().parse_args(["--preset", "large"]).preset == "large"


def test_large_labels_plan_the_uniform_capacity_variant():
    import sae_allocators  # noqa: F401  registers the architectures
    from sae_allocators.benchmark import configs
    from sae_allocators.benchmark.settings import LARGE_LABELS

    plans = configs.select_labels(configs.plan_architectures(None), LARGE_LABELS)
    assert [p.label for p in plans] and {p.label for p in plans} == set(LARGE_LABELS)
    uni = next(p for p in plans if p.label == "feature_choice[capacity=uniform]")
    ctx = configs.Context(d_in=8, d_sae=32, ks=(2, 4))
    cfg = configs.build_training_config(uni, 4, ctx)
    assert cfg.capacity == "uniform" and cfg.k == 4
    big = configs.Context(d_in=576, d_sae=4608, ks=(16, 32, 64))
    for p in plans:  # every label builds its config at the preset's sizes
        for k in (16, 32, 64):
            cfg = configs.build_training_config(p, k, big)
            assert cfg.d_sae == 4608 and cfg.d_in == 576
    with pytest.raises(ValueError, match="not planned"):
        configs.select_labels(configs.plan_architectures(None), ["no_such_label"])


# --- statistics -------------------------------------------------------------------------------


def test_t_quantiles():
    assert stats.t_quantile_975(1) == pytest.approx(12.706)
    assert stats.t_quantile_975(2) == pytest.approx(4.303)
    assert stats.t_quantile_975(30) == pytest.approx(2.042)
    assert stats.t_quantile_975(500) == pytest.approx(1.96)
    with pytest.raises(ValueError):
        stats.t_quantile_975(0)


def test_paired_difference_known_inputs():
    # diffs 1, 2, 3: mean 2, sd 1, half-width 4.303 / sqrt(3) = 2.4843
    d = stats.paired_difference({0: 2.0, 1: 4.0, 2: 6.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert d["n"] == 3 and d["diffs"] == [1.0, 2.0, 3.0]
    assert d["mean"] == pytest.approx(2.0) and d["sd"] == pytest.approx(1.0)
    assert d["half_width"] == pytest.approx(4.303 / math.sqrt(3))
    assert d["low"] == pytest.approx(2 - 2.48434, abs=1e-4) and d["verdict"] == "not distinguishable"
    # consistently lower by about 1: -1.0, -1.1, -0.9 -> mean -1, sd 0.1, interval [-1.248, -0.752]
    d = stats.paired_difference({"0": 0.0, "1": 0.0, "2": 0.0}, {"0": 1.0, "1": 1.1, "2": 0.9})
    assert d["mean"] == pytest.approx(-1.0) and d["high"] == pytest.approx(-1 + 4.303 * 0.1 / math.sqrt(3))
    assert d["verdict"] == "lower"
    assert stats.paired_difference({0: 3.0, 1: 3.2}, {0: 1.0, 1: 1.0})["verdict"] == "higher"  # 2.1 ± 1.27
    # 2 seeds: t = 12.706, the interval is wide (said in the note)
    d = stats.paired_difference({0: 1.0, 1: 1.2}, {0: 0.0, 1: 0.0})
    assert d["half_width"] == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    assert d["verdict"] == "not distinguishable" and "wide" in d["note"]
    # pairs by seed: only the seeds both have
    d = stats.paired_difference({0: 1.0, 1: 2.0, 5: 9.0}, {1: 1.0, 0: 0.0, 7: 0.0})
    assert d["seeds"] == [0, 1] and d["diffs"] == [1.0, 1.0] and d["sd"] == 0.0 and d["verdict"] == "higher"
    one = stats.paired_difference({0: 1.0}, {0: 2.0})
    assert one["verdict"] == "not distinguishable" and one["low"] is None and "1 seed" in one["note"]
    none = stats.paired_difference({0: 1.0}, {1: 2.0})
    assert none["n"] == 0 and none["mean"] is None
    assert (
        "paired difference" in stats.describe(d) and stats.tally([d, one]) == "0 lower, 1 higher, 1 not distinguishable"
    )


def _rec(label, k, seed, nmse, **extra):
    r = {
        "dataset": "lm",
        "architecture": label.split("[")[0],
        "label": label,
        "provider": "x",
        "k_target": k,
        "fixed_l0": True,
        "batch_level": label != "topk",
        "seed": seed,
        "run": f"lm/{label}/k{k:g}/seed{seed}",
        "config_fields": {"k": k},
        "l0_mean": k,
        "l0_p50": k,
        "l0_p99": k + 1,
        "frac_empty_tokens": 0.0,
        "explained_variance": 1 - nmse,
        "nmse": nmse,
        "train_mode_nmse": nmse,
        "dead_fraction": 0.0,
        "underused_fraction": 0.0,
        "step_seconds": 0.01,
        "train_mode_l0_mean": k,
        "l0_drift": 0.0,
        "train_seconds": 1.0,
        "inference_architecture": "topk",
        "ce_loss_recovered": 0.9,
        "kl_div": 0.1,
    }
    r.update(extra)
    return r


def test_claims_carry_paired_differences_with_verdicts():
    recs = []
    for seed in range(3):
        for k, base in ((16, 0.2), (32, 0.15)):
            recs.append(_rec("topk", k, seed, base + 0.01 * seed))
            recs.append(_rec("mutual_choice", k, seed, base - 0.02 + 0.01 * seed + 0.001 * (seed % 2)))  # lower
            recs.append(_rec("feature_choice", k, seed, base + 0.01 * seed + 0.01 * (-1) ** seed))  # noise
    claims = {c["claim"]: c for c in claims_mod.check_claims(claims_mod.aggregate(recs))}
    fm = claims["Feature and Mutual Choice reconstruct better than TopK at equal L0"]
    by = {(p["label"], p["k"], p["metric"]): p for p in fm["paired"]}
    assert by[("mutual_choice", 16, "nmse")]["verdict"] == "lower"
    assert by[("mutual_choice", 32, "train_mode_nmse")]["verdict"] == "lower"
    assert by[("feature_choice", 16, "nmse")]["verdict"] == "not distinguishable"
    assert by[("mutual_choice", 16, "nmse")]["n"] == 3
    assert "4 lower, 0 higher, 4 not distinguishable" in fm["paired_status"]
    md = report._markdown({**_meta(), "_records": recs}, claims_mod.aggregate(recs), list(claims.values()), [])
    assert "Paired over seeds at equal k" in md and "paired difference -0.0" in md


def _meta():
    return {
        "command_settings": {"quick": False},
        "sources": [],
        "seeds": {"lm": 3},
        "ks": {"lm": [16, 32]},
        "plans": [],
        "failures": [],
        "environment": {
            "device": "cpu",
            "cpu_threads": 2,
            "platform": "test",
            "torch": "t",
            "sae_lens": "s",
            "transformer_lens": "t",
        },
        "wall_seconds": 1.0,
    }


def test_progress_reports_runs_done_and_time_left():
    from sae_allocators.benchmark.resume import Progress

    p = Progress(["a", "b", "c", "d"], ["topk", "topk", "mc", "mc"], done={"a"})
    assert p.eta_seconds() is None
    line = p.finished("b", 10.0)
    assert "2/4 runs done (1 from earlier records)" in line and "this run 10 s" in line
    assert "about 20 s left for 2 run(s)" in line  # mc not seen yet: the mean of all labels
    line = p.finished("c", 30.0)
    assert "3/4" in line and "about 30 s left for 1 run(s)" in line
    assert "all runs done" in p.finished("d", 30.0)
    # one-time work during a run (the activation cache) is left out of its time and of the estimate
    p = Progress(["a", "b", "c"], ["topk", "topk", "topk"], done=set())
    line = p.finished("a", 100.0, once=70.0)
    assert "this run 30 s (+70 s of one-time work: the activation cache)" in line
    assert "about 60 s left for 2 run(s)" in line


# --- resuming, end to end (tiny synthetic runs) -----------------------------------------------


def _tiny(out):
    from sae_allocators.benchmark.settings import Settings
    from sae_allocators.benchmark.synthetic_source import SyntheticScale

    return Settings(
        out=out,
        datasets=("synthetic",),
        seeds=1,
        synthetic_ks=(2, 4),
        synthetic=SyntheticScale(
            num_features=32,
            hidden_dim=16,
            d_sae=32,
            min_prob=0.02,
            training_samples=300 * 64,
            batch_size=64,
            eval_samples=1024,
            dead_feature_window=20,
        ),
        archs=["topk", "mutual_choice"],
        device="cpu",
    )


def _stable_md(out: Path) -> list[str]:
    """report.md without the lines that name this invocation (wall time, load, resumed runs)."""
    return [
        ln
        for ln in (out / "report.md").read_text().splitlines()
        if not ln.startswith(("Run on ", "Resumed: ", "The machine was shared"))
    ]


def test_interrupted_run_resumes_and_rerun_gives_the_same_report(tmp_path, monkeypatch):
    from sae_allocators.benchmark import resume
    from sae_allocators.benchmark import run as run_mod

    out = tmp_path / "report"
    trained: list[str] = []
    real = run_mod._train_and_evaluate

    def counting(i, job, *a, **kw):
        if stop_after is not None and len(trained) >= stop_after:
            raise KeyboardInterrupt  # the command is killed while this run trains
        trained.append(resume.job_tag(job))
        return real(i, job, *a, **kw)

    monkeypatch.setattr(run_mod, "_train_and_evaluate", counting)
    stop_after = 2
    with pytest.raises(KeyboardInterrupt):
        run_mod.run(_tiny(out))
    assert len(trained) == 2 and not (out / "report.json").exists()
    assert len(list((out / resume.RUNS_DIR).glob("*.json"))) == 2  # saved as each run finished
    first = list(trained)

    # the same command again: only the two runs left are trained
    stop_after, trained = None, []
    run_mod.run(_tiny(out))
    assert len(trained) == 2 and not set(trained) & set(first)
    doc = json.loads((out / "report.json").read_text())
    assert len(doc["runs"]) == 4 and doc["meta"]["resume"]["runs_from_earlier_records"] == 2
    assert check.problems(out) == []
    assert "Resumed: 2 of 4 runs" in (out / "report.md").read_text()

    # a damaged record (e.g. a copy cut short) is ignored and its run trained again
    damaged = resume.record_path(out, first[0])
    damaged.write_text(damaged.read_text()[:50])
    trained = []
    run_mod.run(_tiny(out))
    assert trained == [first[0]]
    doc2 = json.loads((out / "report.json").read_text())
    md2 = _stable_md(out)

    # nothing left to do: nothing is trained and the report is the same
    trained = []
    run_mod.run(_tiny(out))
    assert trained == []
    doc3 = json.loads((out / "report.json").read_text())
    for key in ("runs", "aggregates", "claims", "curves", "plots"):
        assert doc3[key] == doc2[key], key
    assert _stable_md(out) == md2
    inv = doc3["meta"]["resume"]["invocations"]
    assert len(inv) == 4  # the interrupted one counts up to its last finished run
    assert [v["finished"] for v in inv] == [False, True, True, True] and inv[0]["runs_trained"] == 2
    assert all("commit" in v for v in inv)  # the checkout's commit (None outside a git checkout)
    assert inv[0]["wall_seconds"] > 0 and len({v["invocation"] for v in inv}) == 4
    assert doc3["meta"]["resume"]["wall_seconds_all_invocations"] == pytest.approx(sum(v["wall_seconds"] for v in inv))
    assert "4 invocation(s) (1 interrupted: counted up to their last finished run)" in (out / "report.md").read_text()
    assert doc3["meta"]["resume"]["runs_from_earlier_records"] == 4

    # other settings into the same folder are refused, not mixed
    changed = _tiny(out)
    changed.synthetic.lr = 0.5
    with pytest.raises(resume.ResumeError, match=r"changed: synthetic\.lr"):
        run_mod.run(changed)
    assert trained == []


def test_fingerprint_ignores_out_and_keep_saes_only(tmp_path):
    from sae_allocators.benchmark.resume import fingerprint

    a, b = _tiny(tmp_path / "a"), _tiny(tmp_path / "b")
    b.keep_saes = True
    assert fingerprint(a) == fingerprint(b)
    b.seeds = 2
    assert fingerprint(a) != fingerprint(b)
    c = _tiny(tmp_path / "a")
    c.data_args = {"model": "gpt2"}
    assert fingerprint(a) != fingerprint(c)


def test_bench_preset_large_writes_to_a_fixed_folder(monkeypatch):
    """``sae-allocators bench --preset large`` without --out: reports/large (rerunning it resumes)."""
    import argparse

    from sae_allocators.benchmark import check as check_mod
    from sae_allocators.benchmark import cli

    seen = {}
    monkeypatch.setattr(cli, "main", lambda argv, prog="": seen.setdefault("argv", list(argv)) and 0)
    monkeypatch.setattr(check_mod, "main", lambda argv: seen.setdefault("checked", list(argv)) and 0)
    assert cli.cmd_bench(argparse.Namespace(argv=["--preset", "large"])) == 0
    assert seen["argv"][-2:] == ["--out", str(Path("reports") / "large")]
    assert seen["checked"] == [str(Path("reports") / "large")]


def test_cli_preset_large_settings(monkeypatch):
    """``python -m sae_allocators.benchmark --preset large``: the preset's settings, reports/large, the
    data options in the fingerprint; --datasets still overrides."""
    from sae_allocators.benchmark import cli
    from sae_allocators.benchmark import resume
    from sae_allocators.benchmark import run as run_mod

    seen = []
    monkeypatch.setattr(run_mod, "run", lambda st: seen.append(st))
    assert cli.main(["--preset", "large"]) == 0
    st = seen[-1]
    assert st.preset == "large" and st.out == Path("reports") / "large" and st.datasets == ("lm",)
    assert st.lm.d_sae == 4608 and st.data_args["context_size"] == 128 and st.data_args["tiny_lm"] is False
    assert cli.main(["--preset", "large", "--datasets", "synthetic,lm", "--out", "x"]) == 0
    assert seen[-1].datasets == ("synthetic", "lm") and seen[-1].out == Path("x")

    def refuse(st):
        raise resume.ResumeError("x holds runs of other settings")

    monkeypatch.setattr(run_mod, "run", refuse)
    with pytest.raises(SystemExit, match="--out: x holds runs of other settings"):
        cli.main(["--preset", "large", "--out", "x"])


def test_a_stop_signal_stops_the_whole_job_not_just_one_run(tmp_path, monkeypatch):
    """SAELens's runner turns SIGINT/SIGTERM into its InterruptedException: the job stops there (it used to
    be logged as one failed run and the job went on to the next), and a rerun resumes."""
    from sae_allocators.benchmark import resume
    from sae_allocators.benchmark import run as run_mod
    from sae_allocators.benchmark.synthetic_source import SyntheticSource

    class InterruptedException(Exception):  # SAELens's, by name (its module moved between versions)
        pass

    calls: list[int] = []
    real = SyntheticSource.train

    def train(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise InterruptedException()
        return real(self, *a, **kw)

    monkeypatch.setattr(SyntheticSource, "train", train)
    out = tmp_path / "report"
    with pytest.raises(KeyboardInterrupt, match="interrupted while training synthetic/"):
        run_mod.run(_tiny(out))
    assert len(calls) == 2  # nothing after the interrupted run
    assert len(list((out / resume.RUNS_DIR).glob("*.json"))) == 1
    inv = json.loads((out / resume.SETTINGS_FILE).read_text())["invocations"]
    assert len(inv) == 1 and inv[0]["finished"] is False and inv[0]["runs_trained"] == 1


def test_same_runs_take_the_trained_labels_records_and_the_report_says_so(tmp_path, monkeypatch):
    from sae_allocators.benchmark import resume
    from sae_allocators.benchmark import run as run_mod

    out = tmp_path / "report"
    trained: list[str] = []
    real = run_mod._train_and_evaluate

    def counting(i, job, *a, **kw):
        trained.append(resume.job_tag(job))
        return real(i, job, *a, **kw)

    monkeypatch.setattr(run_mod, "_train_and_evaluate", counting)
    st = _tiny(out)
    st.archs = ["topk", "mutual_choice", "batchtopk_zipf"]
    st.labels = ("topk", "mutual_choice", "batchtopk_zipf")
    st.same_runs = (("batchtopk_zipf", "mutual_choice"),)
    run_mod.run(st)
    assert sorted(trained) == sorted(f"synthetic/{lab}/k{k}/seed0" for lab in ("topk", "mutual_choice") for k in (2, 4))
    doc = json.loads((out / "report.json").read_text())
    runs = {r["run"]: r for r in doc["runs"]}
    assert len(runs) == 6 and doc["meta"]["resume"]["records_of_the_same_run"] == 2
    for k in (2, 4):
        copy, orig = runs[f"synthetic/batchtopk_zipf/k{k}/seed0"], runs[f"synthetic/mutual_choice/k{k}/seed0"]
        assert copy["same_run_as"] == "mutual_choice" and copy["architecture"] == "batchtopk_zipf"
        assert {key: v for key, v in copy.items() if key not in ("run", "label", "architecture", "same_run_as")} == {
            key: v for key, v in orig.items() if key not in ("run", "label", "architecture")
        }
    assert check.problems(out) == []
    assert "Trained once: the rows of `batchtopk_zipf` are `mutual_choice`'s runs" in (out / "report.md").read_text()
    # resuming: nothing left to train, the same records
    trained = []
    run_mod.run(st)
    assert trained == []
    assert json.loads((out / "report.json").read_text())["runs"] == doc["runs"]


def test_same_runs_apply_only_when_both_labels_are_planned():
    """One rule for the run (on jobs) and the estimate (on label counts): a label is not trained only when
    the label it copies is planned too; a pair of a label with itself is no pair."""
    from sae_allocators.benchmark.estimate import estimate_seconds
    from sae_allocators.benchmark.settings import large_settings, untrained_same_runs

    pairs = (("batchtopk_zipf", "mutual_choice"), ("topk", "topk"))
    assert untrained_same_runs(pairs, ["batchtopk_zipf", "mutual_choice", "topk"]) == {
        "batchtopk_zipf": "mutual_choice"
    }
    assert untrained_same_runs(pairs, {"batchtopk_zipf": 7, "topk": 7}) == {}  # mutual_choice not planned
    st = large_settings(Path("unused"))
    assert estimate_seconds(st)["runs"] == 51
    without = estimate_seconds(st, labels=["topk", "batchtopk_zipf"])
    assert without["runs_per_label"] == {"topk": 7, "batchtopk_zipf": 7}  # no mutual_choice: it trains


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_a_finished_run_leaves_no_mapping_of_the_activation_cache(tmp_path, monkeypatch):
    """Each run's SAELens store maps the cached activations; the benchmark frees them before the next run
    (reference cycles: without run.py's gc.collect() the mappings piled up, one per run of the large preset)."""
    from sae_allocators.benchmark import lm_data
    from sae_allocators.benchmark import run as run_mod
    from sae_allocators.benchmark.lm_source import LMScale
    from sae_allocators.benchmark.settings import Settings

    def cache_maps() -> int:
        return sum(1 for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(".arrow"))

    seen: list[int] = []
    real = run_mod._train_and_evaluate

    def counting(*a, **kw):
        seen.append(cache_maps())  # at the start of each run: what the earlier runs left mapped
        return real(*a, **kw)

    monkeypatch.setattr(run_mod, "_train_and_evaluate", counting)
    st = Settings(
        out=tmp_path / "report",
        datasets=("lm",),
        lm_ks=(4, 8),
        lm_seeds=1,
        lm_spread_seeds=1,
        lm=LMScale(
            hook_layer=1,
            expansion=2,
            training_tokens=40 * 64,
            train_batch_size=64,
            eval_sequences=8,
            ce_eval_sequences=2,
            dead_feature_window=20,
            store_batch_size_prompts=8,
            norm_estimate_batches=2,
        ),
        archs=["topk"],
        labels=("topk",),
        lm_data=lambda: lm_data.tiny_lm_data(context_size=16, n_rows=128, n_eval=8, device="cpu"),
        device="cpu",
    )
    run_mod.run(st)
    assert len(seen) == 2 and seen[1] == 0, seen  # the run at k = 8 starts with nothing of k = 4's mapped
