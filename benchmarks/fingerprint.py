"""Byte fingerprint of what every architecture of this project saves, for a fixed seed.

Trains each architecture in ``sae_allocators.names.OWN_ARCHITECTURES`` for a few steps through
SAELens's real classes on the CPU (the random tiny model and random tokens of
:mod:`sae_allocators.testing`, seconds each), twice: through SAELens's own
``LanguageModelSAETrainingRunner`` and through this project's ``sae-allocators train`` runner
(calibration, atomic save, metrics). It prints the sha256 of every saved file and of every tensor
of the trained SAE's full ``state_dict`` (training buffers included), one line each, sorted.

A refactoring that claims "no behaviour change" runs it before and after and diffs the outputs::

    python benchmarks/fingerprint.py > before.txt   # on the old code (installed)
    python benchmarks/fingerprint.py > after.txt    # on the new code
    diff before.txt after.txt

Ignored: nothing in the weight files; in ``cfg.json`` / ``runner_cfg.json`` / metrics JSON the keys
listed in ``VOLATILE`` (paths of the temporary output folder, wall-clock timings), whose values
are replaced by ``"<volatile>"`` before hashing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

#: JSON keys whose values depend on the run's folder or clock, not on the code's results
VOLATILE = ("output_path", "checkpoint_path", "seconds", "wall_s", "time", "timestamp", "elapsed_s")


def _scrub(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ("<volatile>" if k in VOLATILE else _scrub(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    return obj


def _file_digest(path: Path) -> str:
    if path.suffix == ".json":
        data = _scrub(json.loads(path.read_text()))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensor_digest(t: Any) -> str:
    import torch

    t = t.detach().contiguous()
    head = f"{t.dtype}{tuple(t.shape)}".encode()
    return hashlib.sha256(head + t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _lines(prefix: str, folder: Path, sae: Any) -> list[str]:
    out = [f"{prefix}/{p.relative_to(folder)} {_file_digest(p)}" for p in sorted(folder.rglob("*")) if p.is_file()]
    out += [f"{prefix}/state_dict[{k}] {_tensor_digest(v)}" for k, v in sorted(sae.state_dict().items())]
    return out


def fingerprint(names: list[str], steps: int, work: Path) -> list[str]:
    import torch

    import sae_allocators  # noqa: F401  (registers the architectures)
    from sae_allocators import testing
    from sae_allocators.workflow.runner import WorkflowRunner
    from sae_lens.registry import get_sae_training_class

    kwargs = {"top_afa": {"k_max": 8}}
    lines: list[str] = []
    for name in names:
        _, cfg_cls = get_sae_training_class(name)
        for mode in ("plain", "workflow"):
            torch.manual_seed(0)
            sae_cfg = cfg_cls(d_in=testing.TINY_D_MODEL, d_sae=64, **kwargs.get(name, {"k": 4}))
            out = work / name / mode
            if mode == "plain":
                sae = testing.train_tiny(sae_cfg, steps=steps, output_path=out)
            else:
                cfg = testing.runner_config(sae_cfg, steps=steps, output_path=out)
                runner = WorkflowRunner(
                    cfg,
                    override_model=testing.tiny_model(d_model=sae_cfg.d_in),
                    override_dataset=testing.tiny_dataset(context_size=cfg.context_size),
                )
                sae = runner.run()
            lines += _lines(f"{name}/{mode}", out, sae)
    return lines


def main(argv: list[str] | None = None) -> int:
    from sae_allocators import names

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--architecture", action="append", help="only these (default: every one of OWN_ARCHITECTURES)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(sys.stderr):  # training's own messages (timings) go to stderr
            lines = fingerprint(args.architecture or sorted(names.OWN_ARCHITECTURES), args.steps, Path(tmp))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
