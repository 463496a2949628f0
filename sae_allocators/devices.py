"""The one place that turns a device name into a ``torch.device``.

Everything in the package that needs a device takes a ``device`` argument and resolves it here;
no other module spells a device name. ``"auto"`` is CUDA when torch sees a GPU, else the CPU.

    >>> resolve("cpu")
    device(type='cpu')
"""

from __future__ import annotations

import platform

import re
from typing import Any

#: accepted on the command line (``--device``): ``auto``, ``cpu``, ``cuda``, ``cuda:<index>``,
#: ``mps``; any other name torch knows works from Python
AUTO = "auto"
CPU = "cpu"
CUDA = "cuda"
#: the tests run their device-relevant cases on this device (``benchmarks/gpu_check.sh`` sets it)
TEST_DEVICE_ENV = "SAE_ALLOCATORS_TEST_DEVICE"

_CLI_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class DeviceError(ValueError):
    """A device that does not exist or is not available here."""


def resolve(device: Any = AUTO) -> "torch.device":  # noqa: F821
    """``"auto"`` / ``None`` -> CUDA if available else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:1"``,
    ``torch.device`` -> that device, checked to be usable here (index in range)."""
    import torch

    if device is None or (isinstance(device, str) and device.strip().lower() == AUTO):
        return torch.device(CUDA if torch.cuda.is_available() else CPU)
    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device).strip())
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(
            f"device {device!r} is not a device name torch knows ({exc}); use auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == CUDA:
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r}: torch {torch.__version__} sees no CUDA GPU here (a CPU-only build, or no "
                "driver). Use --device cpu, or --device auto to take a GPU only when there is one"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise DeviceError(f"device {device!r}: only {n} CUDA device(s) here (cuda:0 to cuda:{n - 1})")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"device {device!r}: MPS is not available here; use --device cpu")
    return dev


def is_cuda(device: Any) -> bool:
    """Whether ``device`` (a name or ``torch.device``; not resolved, so no GPU is needed) is a CUDA device."""
    import torch

    if device is None:
        return False
    return (device if isinstance(device, torch.device) else torch.device(str(device))).type == CUDA


def bf16_matmul_is_fast(device: Any) -> bool:
    """Whether a bfloat16 matmul with float32 accumulation is available and faster than float32 on
    ``device``: CUDA with bfloat16 support, or a CPU where oneDNN has bfloat16 kernels (2.5x
    float32's speed on the 2-core AVX512-BF16 CPU of docs/sparse-step.md). Other devices: False."""
    import torch

    dev = device if isinstance(device, torch.device) else torch.device(str(device))
    if dev.type == CUDA:
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if dev.type == CPU:
        try:
            if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
                return False
            if platform.machine().lower() in ("x86_64", "amd64"):
                # oneDNN also runs bfloat16 on AVX-512 without bfloat16 dot products, by conversion:
                # no faster than float32 there. Fast needs AVX512-BF16 or AMX.
                return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
            return True
        except (AttributeError, RuntimeError):  # a torch build without the queries
            return False
    return False


def cli_device(text: str) -> str:
    """argparse ``type=`` for ``--device``: checks the spelling (availability is checked when resolved)."""
    if not _CLI_PATTERN.match(text.strip().lower()):
        import argparse

        raise argparse.ArgumentTypeError(f"--device {text!r}: use auto, cpu, cuda or cuda:N (e.g. cuda:0)")
    return text.strip().lower()


def describe(device: Any) -> str:
    """A human name for the report: ``cuda:0 (NVIDIA H100 80GB HBM3, 79.1 GiB)`` or ``cpu``."""
    import torch

    dev = resolve(device)
    if dev.type == CUDA:
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        return f"cuda:{idx} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"
    return str(dev)


def synchronize(device: Any) -> None:
    """Wait for queued work on ``device`` (timings of GPU work need it; a no-op on the CPU)."""
    import torch

    dev = resolve(device)
    if dev.type == CUDA:
        torch.cuda.synchronize(dev)


def test_device() -> "torch.device":  # noqa: F821
    """The device the tests run their device-relevant cases on: ``$SAE_ALLOCATORS_TEST_DEVICE``,
    default the CPU."""
    import os

    return resolve(os.environ.get(TEST_DEVICE_ENV) or CPU)


test_device.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
