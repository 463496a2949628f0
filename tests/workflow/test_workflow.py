"""Train -> push -> load, end to end, for every architecture of this project.

Training goes through ``sae-allocators train``'s code path (SAELens's parser and runner); pushing
through the real ``huggingface_hub`` client against a local fake Hub (``tests/helpers/fake_hub.py``) in a
fresh interpreter with ``HF_ENDPOINT``; loading through ``SAE.from_pretrained`` in a fresh,
offline interpreter from a Hugging Face cache built out of the pushed bytes. One subprocess serves
all architectures per step, to keep the suite fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import sae_allocators  # noqa: E402,F401  (registers our architectures)
from helpers import FakeHub, cli_flags, training_kwargs  # noqa: E402

from sae_allocators.architectures import kinds  # noqa: E402
from sae_allocators.io import atomic_dir, atomic_write_text  # noqa: E402
from sae_allocators.sae_folder import SaeFolderError, check_sae_folder  # noqa: E402
from sae_allocators.names import OWN_ARCHITECTURES  # noqa: E402
from sae_allocators.testing import TINY_HOOK, run_fresh  # noqa: E402
from sae_allocators.workflow import push as push_mod  # noqa: E402
from sae_allocators.workflow import train as train_mod  # noqa: E402

ARCHS = sorted(OWN_ARCHITECTURES)
TOKEN = "hf_FAKEtokenNeverToBeSeen0123456789"


def tiny_flags(arch: str, out: Path, tokens: int = 640) -> list[str]:
    return [
        "--architecture", arch, "--d_in", "32", "--d_sae", "64", *cli_flags(arch),
        "--model_name", "tiny-random", "--hook_name", TINY_HOOK, "--dataset_path", "",
        "--is_dataset_tokenized", "True", "--streaming", "False", "--context_size", "16",
        "--training_tokens", str(tokens), "--train_batch_size_tokens", "64",
        "--store_batch_size_prompts", "4", "--n_batches_in_buffer", "8", "--device", "cpu",
        "--log_to_wandb", "False", "--dead_feature_window", "5", "--feature_sampling_window", "10",
        "--n_eval_batches", "1", "--eval_batch_size_prompts", "2",
        "--checkpoint_path", str(out.parent / "checkpoints"), "--output_path", str(out),
    ]  # fmt: skip


def fresh(code: str, **env: str):
    # the installed distribution, as in the test process (no PYTHONPATH to the checkout)
    return run_fresh(code, env=env)


def run_cli_script(jobs: list[list[str]]) -> str:
    """Code for a fresh interpreter: run ``cli.main`` on each argv, print JSON [rc, stdout, stderr]s."""
    return f"""
import contextlib, io, json
import sae_allocators
from sae_allocators import cli
results = []
for argv in {jobs!r}:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as exc:
            rc = exc.code
    results.append([rc, out.getvalue(), err.getvalue()])
print("RESULTS=" + json.dumps(results))
"""


def results_of(proc) -> list[list]:
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS=")]
    assert line, f"no results: rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(line[-1][len("RESULTS=") :])


# --- train ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Each architecture trained through ``sae-allocators train``'s main (tiny in-memory model)."""
    import torch
    from safetensors.torch import save_file

    from sae_allocators.testing import tiny_dataset, tiny_model

    root = tmp_path_factory.mktemp("trained")
    out = {}
    for arch in ARCHS:
        folder = root / arch / "output"
        captured = {}
        real_train = train_mod.train

        def keep(cfg, **kw):
            captured["runner"] = runner = real_train(cfg, **kw)
            return runner

        train_mod.train = keep
        try:
            rc = train_mod.main(tiny_flags(arch, folder), override_model=tiny_model(), override_dataset=tiny_dataset())
        finally:
            train_mod.train = real_train
        assert rc == 0
        sae = captured["runner"].sae_result
        sd = {k: v.detach().clone().contiguous() for k, v in sae.state_dict().items()}
        sae.process_state_dict_for_saving_inference(sd)  # SAELens's training -> inference conversion
        save_file({k: v.contiguous() for k, v in sd.items()}, str(root / arch / "trained_in_memory.safetensors"))
        out[arch] = folder
        assert torch.is_tensor(sd["W_enc"])
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_python_configs_resolve_our_names(arch):
    from sae_lens import LanguageModelSAERunnerConfig, TrainingSAEConfig
    from sae_lens.registry import get_sae_training_class

    from sae_allocators.testing import runner_config

    _, cfg_cls = get_sae_training_class(arch)
    cfg = TrainingSAEConfig.from_dict({"architecture": arch, "d_in": 32, "d_sae": 64, **training_kwargs(arch)})
    assert type(cfg) is cfg_cls
    runner_cfg = runner_config(cfg)  # LanguageModelSAERunnerConfig(sae=our config, ...)
    again = LanguageModelSAERunnerConfig.from_dict(runner_cfg.to_dict())
    assert type(again.sae) is cfg_cls and again.sae.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("arch", ARCHS)
def test_cli_parser_is_saelens_with_our_fields(arch):
    from sae_lens.registry import get_sae_training_class

    cfg = train_mod.parse_args(tiny_flags(arch, Path("/nonexistent/out")))
    assert type(cfg.sae) is get_sae_training_class(arch)[1]
    for key, value in training_kwargs(arch).items():
        assert getattr(cfg.sae, key) == value, key
    assert (cfg.sae.d_in, cfg.sae.d_sae, cfg.train_batch_size_tokens, cfg.context_size) == (32, 64, 64, 16)
    assert cfg.logger.log_to_wandb is False and cfg.hook_name == TINY_HOOK


def test_cli_help_lists_our_architectures(capsys):
    assert train_mod.main(["--help"]) == 0
    out = capsys.readouterr().out
    for arch in ARCHS:
        assert f"  {arch} " in out  # our list
        assert f",{arch}" in out or f"{{{arch}" in out  # SAELens's --architecture choices
    assert "--train_batch_size_tokens" in out and "--d_sae" in out  # SAELens's own options


def test_cli_unknown_architecture_is_one_clear_error(capsys):
    rc = train_mod.main(["--architecture", "no_such_arch", "--d_in", "8"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no_such_arch" in err and ARCHS[0] in err


@pytest.mark.parametrize("arch", ARCHS)
def test_train_writes_complete_output(trained, arch):
    folder = trained[arch]
    assert sorted(p.name for p in folder.iterdir()) == [
        "cfg.json",
        "final_metrics.json",
        "runner_cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
    ]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["metadata"]["training_architecture"] == arch  # recorded on SAELens 6.38 too
    assert cfg["metadata"]["hook_name"] == TINY_HOOK
    metrics = json.loads((folder / "final_metrics.json").read_text())
    assert metrics["training_tokens"] == 640 and metrics["training_steps"] == 10
    assert {"overall_loss", "l0", "explained_variance", "dead_features"} <= set(metrics["metrics"])
    # where the budget went (every architecture on the shared step logs it, i.e. all but abstopk,
    # which is SAELens's own class or its port; docs/mutual_choice.md)
    if arch != "abstopk":
        assert (
            0 <= metrics["metrics"]["budget_share_outlier_rows"] <= 1
            and 0 < metrics["metrics"]["budget_share_top1pct"] <= 1
        )
        assert cfg["metadata"]["budget_shares"]["budget_share_top1pct"] == pytest.approx(
            metrics["metrics"]["budget_share_top1pct"], abs=1e-6
        )
    batch_rule = arch in kinds.architectures_of_kind(*kinds.BATCH_KINDS)
    assert ("thresholds_calibrated" in cfg["metadata"]) is batch_rule
    info = check_sae_folder(folder)
    assert info.tensors["W_enc"]["shape"] == [32, 64]


def test_train_command_end_to_end_with_saelens_model_loading(tmp_path):
    """The real command line in a fresh interpreter: SAELens loads a local HF model and a parquet dataset."""
    arch = ARCHS[0]
    code = f"""
import sys
from sae_allocators.workflow.demo import make_assets
make_assets({str(tmp_path)!r})
from sae_allocators.cli import main
sys.exit(main(['train', '--architecture', {arch!r}, '--d_in', '32', '--d_sae', '64', *{cli_flags(arch)!r},
    '--model_class_name', 'AutoModelForCausalLM', '--model_name', 'tiny-gpt2', '--hook_name', 'transformer.h.0',
    '--dataset_path', 'tiny-text', '--is_dataset_tokenized', 'False', '--streaming', 'False',
    '--context_size', '16', '--training_tokens', '1024', '--train_batch_size_tokens', '64',
    '--store_batch_size_prompts', '4', '--n_batches_in_buffer', '8', '--device', 'cpu',
    '--log_to_wandb', 'False', '--checkpoint_path', 'checkpoints', '--output_path', 'out']))
"""
    cwd = os.getcwd()
    os.chdir(tmp_path)  # SAELens resolves the dataset and model relative to the working directory
    try:
        proc = fresh(code)
    finally:
        os.chdir(cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Training SAE" in proc.stderr  # SAELens's progress bar
    assert f"Trained {arch} SAE" in proc.stdout
    info = check_sae_folder(tmp_path / "out")
    assert info.training_architecture == arch and info.metadata["model_name"] == "tiny-gpt2"


# --- push -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pushed(trained, tmp_path_factory):
    """Push every architecture to the fake Hub: first push, push again, push --overwrite-card, forbidden."""
    home = tmp_path_factory.mktemp("hf_home")
    jobs = []
    for arch in ARCHS:
        folder = str(trained[arch])
        jobs += [
            ["push", folder, "--repo", f"org/{arch}", "--private"],
            ["push", folder, "--repo", f"org/{arch}", "--sae-id", "again"],
            ["push", folder, "--repo", f"org/{arch}", "--sae-id", "again", "--overwrite-card"],
        ]
    # promises with no other test: push --revision, and load's two Hub errors (the fake Hub is online here)
    extra = {
        "revision": [
            "push",
            str(trained[ARCHS[0]]),
            "--repo",
            "org/revision-test",
            "--sae-id",
            "rev",
            "--revision",
            "dev",
        ],
        "load_repo_not_found": ["load", "org/does-not-exist", "some_sae"],
        "load_repo_without_sae_id": ["load", "org/does-not-exist"],
    }
    jobs += list(extra.values())
    jobs.append(["push", str(trained[ARCHS[0]]), "--repo", "org/forbidden"])
    before = {a: {p.name: p.read_bytes() for p in trained[a].iterdir()} for a in ARCHS}
    with FakeHub(token=TOKEN, fail={r"org/forbidden/(commit|preupload)": 403}) as hub:
        proc = fresh(run_cli_script(jobs), HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HOME=str(home), HF_HUB_OFFLINE="0")
        results = results_of(proc)
    after = {a: {p.name: p.read_bytes() for p in trained[a].iterdir()} for a in ARCHS}
    assert before == after, "push modified the output folder"
    base = len(ARCHS) * 3
    extra_results = {name: results[base + i] for i, name in enumerate(extra)}
    return {"hub": hub, "results": results, "proc": proc, "home": home, "trained": trained, "extra": extra_results}


def _card(hub, arch):
    return hub.repos[f"org/{arch}"].files["README.md"].decode()


@pytest.mark.parametrize("arch", ARCHS)
def test_push_uploads_exactly_the_output_folder_and_card(pushed, arch):
    hub = pushed["hub"]
    i = ARCHS.index(arch) * 3
    rc, out, err = pushed["results"][i]
    assert rc == 0, err
    assert hub.unhandled == []
    repo = hub.repos[f"org/{arch}"]
    assert repo.private is True
    folder = pushed["trained"][arch]
    sae_id = TINY_HOOK  # default: the hook name
    expected = {
        f"{sae_id}/{n}": (folder / n).read_bytes()
        for n in ("cfg.json", "runner_cfg.json", "sae_weights.safetensors", "sparsity.safetensors")
    }
    expected.update({f"again/{n.split('/')[1]}": b for n, b in expected.items()})
    assert {p: b for p, b in repo.files.items() if p != "README.md"} == expected  # exact files, paths, bytes
    uploaded_cfg = json.loads(repo.files[f"{sae_id}/cfg.json"])
    inference_arch = uploaded_cfg["architecture"]
    assert uploaded_cfg["metadata"]["training_architecture"] == arch
    from sae_lens.registry import get_sae_class

    get_sae_class(inference_arch)  # the inference config, loadable as such
    assert [c["summary"] for c in repo.commits] == [
        f"Upload SAE {sae_id}",
        f"Model card for {sae_id}",
        "Upload SAE again",
        "Upload SAE again",
        "Model card for again",
    ]
    card = _card(hub, arch)
    assert card.startswith("---\nlibrary_name: saelens\ntags:\n")
    metrics = json.loads((folder / "final_metrics.json").read_text())
    assert f"| Training architecture | `{arch}` |" in card
    assert f"| Saved (inference) architecture | `{inference_arch}` |" in card
    assert f"| Hook | `{TINY_HOOK}` |" in card and "| Model | `tiny-random` |" in card
    assert "| Training tokens | 640 |" in card
    for name, value in metrics["metrics"].items():
        assert f"- {name}: {push_mod._fmt(value)}" in card
    assert ("| Budget on outlier-norm tokens |" in card) is (arch != "abstopk")
    assert ("| Thresholds |" in card) is (arch in kinds.architectures_of_kind(*kinds.BATCH_KINDS))
    assert f'SAE.from_pretrained("org/{arch}", "again")' in card  # the overwritten card describes the last push
    needs = push_mod.needs_this_project(inference_arch)
    assert ("pip install sae-allocators" in card) is needs
    assert ("pip install sae-lens" in card) is (not needs)
    assert hub.validated_cards and all(c.startswith("---") for c in hub.validated_cards)


@pytest.mark.parametrize("arch", ARCHS)
def test_push_keeps_existing_card_unless_overwrite(pushed, arch):
    i = ARCHS.index(arch) * 3
    (rc1, out1, _), (rc2, out2, _), (rc3, out3, _) = pushed["results"][i : i + 3]
    assert (rc1, rc2, rc3) == (0, 0, 0)
    assert "Wrote the model card" in out1
    assert "Kept the existing README.md (pass --overwrite-card to replace it)" in out2
    assert "Wrote the model card" in out3
    repo = pushed["hub"].repos[f"org/{arch}"]
    assert [c["summary"] for c in repo.commits].count(f"Model card for {TINY_HOOK}") == 1


def test_push_token_used_but_never_shown(pushed):
    hub, proc = pushed["hub"], pushed["proc"]
    writes = [r for r in hub.requests if r.method == "POST" and "/api/" in r.path and "validate-yaml" not in r.path]
    assert writes and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in writes)
    rc, out, err = pushed["results"][-1]  # org/forbidden answers 403
    assert rc == 1 and "403" in err and "write access" in err and "org/forbidden" in err
    texts = [proc.stdout, proc.stderr] + [x for r in pushed["results"] for x in r[1:]]
    assert not any(TOKEN in t for t in texts)
    for root in (pushed["home"], *[p.parent for p in pushed["trained"].values()]):
        for f in Path(root).rglob("*"):
            if f.is_file():
                assert TOKEN.encode() not in f.read_bytes(), f
    for repo in hub.repos.values():
        assert not any(TOKEN.encode() in b for b in repo.files.values())


def test_push_revision_commits_to_that_branch(pushed):
    rc, out, err = pushed["extra"]["revision"]
    assert rc == 0, err
    repo = pushed["hub"].repos["org/revision-test"]
    assert [c["revision"] for c in repo.commits] == ["dev", "dev"]  # the SAE files, then the card
    assert [c["summary"] for c in repo.commits] == ["Upload SAE rev", "Model card for rev"]
    main_commits = [
        r.path for r in pushed["hub"].requests if r.path.startswith("/api/models/org/revision-test/commit/main")
    ]
    assert main_commits == []


def test_load_names_a_missing_hub_repo(pushed):
    rc, out, err = pushed["extra"]["load_repo_not_found"]
    assert rc == 1 and "Traceback" not in err
    assert "'org/does-not-exist'" in err and "not found" in err


def test_load_of_a_repo_id_without_sae_id_says_to_give_one(pushed):
    rc, out, err = pushed["extra"]["load_repo_without_sae_id"]
    assert rc == 1 and "Traceback" not in err
    assert "Hub repo id" in err and "SAE_ID" in err


def test_push_without_token_says_how_to_log_in(trained, tmp_path, monkeypatch, capsys):
    from sae_allocators import cli

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    rc = cli.main(["push", str(trained[ARCHS[0]]), "--repo", "org/x"])
    err = capsys.readouterr().err
    assert rc == 1 and "No Hugging Face token found" in err and "HF_TOKEN" in err and "hf auth login" in err


# --- load -------------------------------------------------------------------------------------


def hf_cache_from(hub: FakeHub, home: Path) -> Path:
    """Place the pushed files in a Hugging Face cache layout (refs/main + snapshots/<sha>/...)."""
    for repo_id, repo in hub.repos.items():
        base = home / "hub" / f"models--{repo_id.replace('/', '--')}"
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / "main").write_text(repo.sha)
        for path, data in repo.files.items():
            target = base / "snapshots" / repo.sha / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return home


@pytest.fixture(scope="module")
def loaded(pushed, tmp_path_factory):
    home = hf_cache_from(pushed["hub"], tmp_path_factory.mktemp("cache_home"))
    trained = pushed["trained"]
    jobs = {
        a: [
            f"org/{a}",
            TINY_HOOK,
            str(trained[a] / "sae_weights.safetensors"),
            str(trained[a].parent / "trained_in_memory.safetensors"),
        ]
        for a in ARCHS
    }
    code = f"""
import json, torch
import sae_allocators
from safetensors.torch import load_file
from sae_lens import SAE
res = {{}}
for arch, (repo, sae_id, out_file, mem_file) in {jobs!r}.items():
    sae = SAE.from_pretrained(repo, sae_id)
    sd, saved, mem = sae.state_dict(), load_file(out_file), load_file(mem_file)
    res[arch] = dict(
        cls=type(sae).__name__,
        same_as_output=set(sd) == set(saved) and all(torch.equal(sd[k], saved[k]) for k in saved),
        same_as_trained=set(sd) == set(mem) and all(torch.equal(sd[k], mem[k]) for k in mem),
    )
print("LOADED=" + json.dumps(res))
""" + run_cli_script([["load", f"org/{a}", TINY_HOOK] for a in ARCHS] + [["load", "org/never-pushed", "x"]])
    proc = fresh(code, HF_HOME=str(home), HF_HUB_OFFLINE="1")
    line = [x for x in proc.stdout.splitlines() if x.startswith("LOADED=")]
    assert line, proc.stderr[-3000:]
    plain = run_fresh(  # plain SAELens: this project not importable at all
        f"""
import json
from sae_lens import SAE
res = {{}}
for arch in {ARCHS!r}:
    try:
        SAE.from_pretrained("org/" + arch, {TINY_HOOK!r}); res[arch] = "ok"
    except Exception as exc:
        res[arch] = f"{{type(exc).__name__}}: {{exc}}"
print("PLAIN=" + json.dumps(res))
""",
        env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": "", "SAE_ALLOCATORS_NO_AUTOLOAD": "1"},
    )
    plain_line = [x for x in plain.stdout.splitlines() if x.startswith("PLAIN=")]
    assert plain_line, plain.stderr[-3000:]
    return {
        "py": json.loads(line[-1][len("LOADED=") :]),
        "cli": results_of(proc),
        "plain": json.loads(plain_line[-1][len("PLAIN=") :]),
    }


@pytest.mark.parametrize("arch", ARCHS)
def test_from_pretrained_offline_gives_the_trained_weights(loaded, arch):
    r = loaded["py"][arch]
    assert r["same_as_output"], "weights loaded from the cache differ from the trained output"
    assert r["same_as_trained"], "weights differ from the SAE the runner returned (converted for inference)"


@pytest.mark.parametrize("arch", ARCHS)
def test_load_command_describes_the_sae(loaded, trained, arch):
    rc, out, err = loaded["cli"][ARCHS.index(arch)]
    assert rc == 0, err
    info = check_sae_folder(trained[arch])
    assert f"Loaded org/{arch} / {TINY_HOOK}" in out
    assert f"architecture:          {info.architecture} (" in out
    assert f"training architecture: {arch}" in out
    assert "W_enc        (32, 64)" in out and "W_dec        (64, 32)" in out
    plain_ok = loaded["plain"][arch] == "ok"
    assert (f"plain SAELens can load it: {'yes' if plain_ok else 'no'}") in out, loaded["plain"][arch]


def test_load_repo_not_cached_offline(loaded):
    rc, out, err = loaded["cli"][-1]
    assert (
        rc == 1 and "'org/never-pushed'" in err and "HF_HUB_OFFLINE=1" in err and "not in the Hugging Face cache" in err
    )
    assert "Traceback" not in err


# --- bad input --------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("empty", ["cfg.json is missing", "not an SAE output folder"]),
        ("no_weights", ["sae_weights.safetensors", "weights file not found"]),
        ("truncated_weights", ["sae_weights.safetensors", "corrupted"]),
        ("garbage_weights", ["sae_weights.safetensors", "corrupted"]),
        ("bad_json", ["cfg.json", "not valid JSON"]),
        ("unknown_arch", ["cfg.json", "'nobody_provides_this'", "Registered inference architectures"]),
        ("checkpoint", ["training checkpoint", "final output folder"]),
    ],
)
def test_bad_folders_give_one_clear_message(trained, tmp_path, capsys, damage, expected):
    from sae_allocators import cli

    folder = tmp_path / "sae"
    if damage == "empty":
        folder.mkdir()
    else:
        _copy(trained[ARCHS[0]], folder)
    weights, cfg = folder / "sae_weights.safetensors", folder / "cfg.json"
    if damage == "no_weights":
        weights.unlink()
    elif damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "garbage_weights":
        weights.write_bytes(b"\x00" * 8 + b"not safetensors at all")
    elif damage == "bad_json":
        cfg.write_text('{"architecture": "jumprelu",')
    elif damage == "unknown_arch":
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "architecture": "nobody_provides_this"}))
    elif damage == "checkpoint":
        (folder / "trainer_state.pt").write_bytes(b"")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for argv in (["push", str(folder), "--repo", "org/x"], ["load", str(folder)]):
        rc = cli.main(argv)
        err = capsys.readouterr().err
        assert rc == 1, argv
        assert err.count("error:") == 1 and "Traceback" not in err
        for piece in expected:
            assert piece in err, (argv, err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_bad_repo_and_sae_id(trained):
    with pytest.raises(SaeFolderError, match="'org/x/y' is not a Hub repo id"):
        push_mod.push(trained[ARCHS[0]], "org/x/y")
    with pytest.raises(SaeFolderError, match="not a valid path inside the repo"):
        push_mod.push(trained[ARCHS[0]], "org/x", "../up")


def test_atomic_writes_leave_nothing_half_written(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "cfg.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "sae_weights.safetensors").write_text("half")
            raise RuntimeError("crash mid-save")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (target / "cfg.json").read_text() == "old"
    with atomic_dir(target) as tmp:
        (tmp / "sae_weights.safetensors").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in target.iterdir()] == [
        "sae_weights.safetensors"
    ]
    atomic_write_text(tmp_path / "f.txt", "one")

    class Boom(str):
        def encode(self, *a):
            raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        atomic_write_text(tmp_path / "f.txt", Boom("two"))
    assert (tmp_path / "f.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt", "out"]


def test_interrupted_final_save_keeps_previous_output(trained, tmp_path, monkeypatch):
    """A crash while SAELens writes the final folder leaves the previous output intact."""
    from sae_lens import LanguageModelSAETrainingRunner

    from sae_allocators.testing import tiny_dataset, tiny_model

    out = _copy(trained[ARCHS[0]], tmp_path / "output")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(self, sae, output_path, log_feature_sparsity=None):
        Path(output_path, "cfg.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(LanguageModelSAETrainingRunner, "save_final_sae", crash)
    with pytest.raises(OSError, match="disk full"):
        train_mod.main(
            tiny_flags(ARCHS[0], out, tokens=128), override_model=tiny_model(), override_dataset=tiny_dataset()
        )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output"]


def test_card_for_a_folder_trained_without_our_command(trained, tmp_path):
    """No final_metrics.json, no training_architecture (SAELens 6.38's runner): the card says so."""
    folder = _copy(trained[ARCHS[0]], tmp_path / "plain")
    (folder / "final_metrics.json").unlink()
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["metadata"]["training_architecture"]
    cfg["metadata"]["l0"] = 3.5  # what SAELens >= 6.4x records
    (folder / "cfg.json").write_text(json.dumps(cfg))
    card = push_mod.model_card(check_sae_folder(folder), "org/x", "sid")
    assert "| Training architecture | not recorded |" in card
    assert "training architecture was not recorded" in card
    assert "Source: SAELens metadata in cfg.json." in card and "- l0: 3.5" in card
    assert "| Training tokens | 640 |" in card  # from runner_cfg.json
