"""Native (C++/CUDA) kernels: loading, status and the Python entry points.

The kernels live in ``cuda_kernels/``; when they cannot be built or loaded, the PyTorch
reference runs instead.
"""

from __future__ import annotations

import torch

_status = "unavailable (native extension not built in this version)"


def status() -> str:
    return _status


def hashgrid_available(device: torch.device | str = "cpu") -> bool:
    return False


def hashgrid_encode(x, table, layout, smoothstep):
    raise RuntimeError(status())
