"""Data-parallel training (docs/distributed.md): spawned gloo processes on CPU.

One spawn of 3 processes runs every check at R=3 (world) and R=2 (ranks {0, 1}), with uneven token
splits: the global selection primitives against brute force (ties included), and, for every
architecture of this project, three SAELens trainer steps split across ranks against the same steps
in one process (selections, codes, parameters, buffers, trainer statistics), plus identical state on
every rank. The workers are killed if they run past the timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Runs once in CI, at the newest SAELens (tests/run.sh): collectives and global selection; the SAELens
# trainer part is the same calls at every version.
pytestmark = pytest.mark.saelens_independent

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, tmp_path: Path, timeout: float = 240, **env: str) -> list[list[str]]:
    """Run tests/distributed/worker.py on ``world`` ranks; return every rank's failures."""
    base = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(world),
        "OUT": str(tmp_path),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "worker.py")],
            env={**base, "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            logs.append(out)
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed workers still running after {timeout} s (a hang): killed")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    results = []
    for r in range(world):
        f = tmp_path / f"rank{r}.json"
        assert f.exists(), f"rank {r} wrote no result (exit {procs[r].returncode}):\n{logs[r][-3000:]}"
        results.append(json.loads(f.read_text()))
    return results


def test_distributed_step_equals_single_process_step(tmp_path):
    results = spawn(3, tmp_path)
    failures = [f for rank in results for f in rank]
    assert not failures, "\n".join(failures[:40])


def test_collectives_are_no_ops_without_a_process_group():
    from sae_allocators.distributed import all_gather_variable, all_reduce, rank, world
    from sae_allocators.distributed import select as S

    t = torch.arange(5.0)
    assert all_reduce(t, "sum", None) is t
    assert all_gather_variable(t, None)[0] is t
    assert (rank(None), world(None)) == (0, 1)
    # with group=None the global selection is the single-process rule (exact budget, ties to the lowest index)
    v = torch.tensor([3.0, 1.0, 3.0, -1.0, 3.0, 0.0])
    tau, kept, n = S.global_budget_select(v, 2, None)
    assert (float(tau), kept.tolist(), n) == (3.0, [0, 2], 2)
    tau, kept, n = S.global_budget_select(v, 10, None)  # budget above the positives: all positives
    assert kept.tolist() == [0, 1, 2, 4] and n == 4


def test_make_data_parallel_without_process_group_changes_nothing():
    from sae_lens import TrainingSAE, TrainingSAEConfig

    from sae_allocators.distributed import group_of, make_data_parallel

    torch.manual_seed(0)
    sae = TrainingSAE.from_dict(
        TrainingSAEConfig.from_dict({"architecture": "mutual_choice", "d_in": 8, "d_sae": 16, "k": 2.0}).to_dict()
    )
    dp = make_data_parallel(sae)
    assert group_of(sae) is None
    x = torch.randn(6, 8)
    sae.encode(x).sum().backward()
    assert all(p.grad is not None for p in sae.parameters() if p.requires_grad)
    dp.remove()


def test_cli_nproc_per_node_2_trains_and_the_output_loads_with_plain_saelens(tmp_path):
    from sae_lens import SAE
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE

    from sae_allocators.workflow.demo import make_assets

    make_assets(tmp_path)
    cmd = [sys.executable, "-m", "sae_allocators.cli", "train", "--nproc-per-node", "2",
           "--architecture", "mutual_choice", "--k", "4", "--d_in", "32", "--d_sae", "64",
           "--model_class_name", "AutoModelForCausalLM", "--model_name", "tiny-gpt2", "--hook_name", "transformer.h.0",
           "--dataset_path", "tiny-text", "--is_dataset_tokenized", "False", "--streaming", "False", "--context_size", "16",
           "--training_tokens", "512", "--train_batch_size_tokens", "64", "--store_batch_size_prompts", "4", "--n_batches_in_buffer", "4",
           "--device", "cpu", "--log_to_wandb", "False", "--output_path", "out"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAE_ALLOCATORS_DIST_TIMEOUT": "120"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "saved to out" in proc.stdout and "on 2 ranks (gloo)" in proc.stdout
    sae = SAE.load_from_disk(str(tmp_path / "out"), device="cpu")
    assert type(sae) is JumpReLUSAE and sae.cfg.metadata.training_architecture == "mutual_choice"
    assert torch.isfinite(sae.W_dec).all() and float(sae.threshold.detach().min()) > 0
    runner_cfg = json.loads((tmp_path / "out" / "runner_cfg.json").read_text())
    assert (runner_cfg["train_batch_size_tokens"], runner_cfg["training_tokens"]) == (64, 512)  # the global options
    metrics = json.loads((tmp_path / "out" / "final_metrics.json").read_text())
    assert metrics["training_tokens"] == 512 and metrics["distributed"]["world_size"] == 2


def test_launch_errors_name_the_problem_and_the_fix(tmp_path):
    import dataclasses

    from sae_allocators.distributed.launch import (
        LaunchError,
        check_resume,
        choose_backend,
        per_rank_config,
        split_nproc,
    )

    assert split_nproc(["--k", "4", "--nproc-per-node", "3", "--d_in", "8"]) == (3, ["--k", "4", "--d_in", "8"])
    assert split_nproc(["--nproc-per-node=2"]) == (2, [])
    assert split_nproc(["--k", "4"]) == (None, ["--k", "4"])
    with pytest.raises(LaunchError, match="whole number"):
        split_nproc(["--nproc-per-node", "two"])
    with pytest.raises(LaunchError, match="one GPU per rank: 4 ranks on this node but 2 GPU"):
        choose_backend("cuda", "auto", 4, 2)
    with pytest.raises(LaunchError, match="needs CUDA"):
        choose_backend("cpu", "nccl", 2, 0)
    assert choose_backend("cpu", None, 2, 0) == "gloo" and choose_backend("cuda:0", None, 2, 2) == "nccl"

    @dataclasses.dataclass
    class Logger:
        log_to_wandb: bool = True

    @dataclasses.dataclass
    class Cfg:
        train_batch_size_tokens: int = 96
        training_tokens: int = 960
        output_path: str | None = "out"
        checkpoint_path: str | None = "ck"
        device: str = "cpu"
        logger: Logger = dataclasses.field(default_factory=Logger)
        resume_from_checkpoint: str | None = None

    c1 = per_rank_config(Cfg(), 1, 3)
    assert (
        c1.train_batch_size_tokens,
        c1.training_tokens,
        c1.output_path,
        c1.logger.log_to_wandb,
        c1.checkpoint_path,
    ) == (32, 320, None, False, "ck")
    c0 = per_rank_config(Cfg(), 0, 3)
    assert (c0.output_path, c0.logger.log_to_wandb) == ("out", True)
    with pytest.raises(LaunchError, match="does not divide into 5 ranks"):
        per_rank_config(Cfg(), 0, 5)
    ck = tmp_path / "ck"
    ck.mkdir()
    with pytest.raises(LaunchError, match="not written by a distributed run"):
        check_resume(Cfg(resume_from_checkpoint=str(ck)), 2)
    (ck / "distributed.json").write_text('{"world_size": 3}')
    with pytest.raises(LaunchError, match="Resume with --nproc-per-node 3"):
        check_resume(Cfg(resume_from_checkpoint=str(ck)), 2)
    check_resume(Cfg(resume_from_checkpoint=str(ck)), 3)
