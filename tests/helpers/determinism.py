"""What "bit-identical" means on the device a test runs on (docs/sparse-step.md, "Bit-exact promises on CUDA").

On the CPU every operation of a training step is deterministic: a resumed run, or a second run of
the same steps, gives the same bits. On CUDA ``index_add_`` (the sparse step's ``b_enc`` and
decoder-norm gradients, top-AFA's loss) adds atomically, in another order on every run, so the same
steps agree to float tolerance only -- unless ``torch.use_deterministic_algorithms(True)`` is on
(with ``CUBLAS_WORKSPACE_CONFIG=:4096:8``). Tests that promise bit-exactness compare through
:func:`differing`, which switches to a tolerance exactly there.
"""

from __future__ import annotations

from typing import Mapping

import torch


def bit_exact_expected(device: torch.device | str) -> bool:
    """Whether two runs of the same steps on ``device`` must agree bit for bit."""
    if torch.device(device).type != "cuda":
        return True
    return torch.are_deterministic_algorithms_enabled()


def differing(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], rtol: float = 1e-5, atol: float = 1e-6
) -> list[str]:
    """Names of the tensors of ``a`` that differ from ``b``'s: bit for bit where
    :func:`bit_exact_expected`, else beyond ``rtol``/``atol`` (CUDA without deterministic algorithms)."""
    out = []
    for name, x in a.items():
        y = b[name]
        if bit_exact_expected(x.device):
            same = torch.equal(x, y)
        else:
            same = (
                x.shape == y.shape
                and x.dtype == y.dtype
                and torch.allclose(x.double(), y.double(), rtol=rtol, atol=atol, equal_nan=True)
            )
        if not same:
            out.append(name)
    return out
