"""tiny-cuda-nn hash-grid backend (optional): ``tcnn.Encoding`` with our config, float32 output.

tcnn's own MLPs have no double backward, so the MLP stays in PyTorch.
"""

from __future__ import annotations

import torch

_tcnn = None
_error = None


def _load():
    global _tcnn, _error
    if _tcnn is None and _error is None:
        try:
            import tinycudann

            _tcnn = tinycudann
        except (ImportError, OSError, RuntimeError) as exc:  # no CUDA raises OSError
            _error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    return _tcnn


def is_available() -> bool:
    return _load() is not None and torch.cuda.is_available()


def status() -> str:
    if _load() is None:
        return f"unavailable (import tinycudann failed: {_error})"
    if not torch.cuda.is_available():
        return "unavailable (tinycudann installed but no CUDA device)"
    return "available (tinycudann)"


def encode(encoding, x: torch.Tensor) -> torch.Tensor:
    """Evaluate ``encoding`` (a HashGridEncoding) with tcnn; the table parameter stays ours.

    tcnn's grid parameters are the same level-major rows x features layout, flattened.
    Batches are padded to tcnn's batch granularity as its own wrapper does.
    """
    tcnn = _load()
    if encoding._tcnn is None:
        encoding._tcnn = tcnn.Encoding(encoding.n_dims, encoding.config.to_tcnn(), dtype=torch.float32)
        n_params = encoding._tcnn.params.numel()
        if n_params != encoding.table.numel():
            raise RuntimeError(f"tcnn expects {n_params} parameters, our layout has {encoding.table.numel()}")
    mod = encoding._tcnn
    n = x.shape[0]
    granularity = int(tcnn._C.batch_size_granularity())
    padded = (n + granularity - 1) // granularity * granularity
    xp = torch.nn.functional.pad(x.float().contiguous(), (0, 0, 0, padded - n))
    out = tcnn.modules._module_function.apply(
        mod.native_tcnn_module, xp, encoding.table.float().reshape(-1), mod.loss_scale
    )
    return out[:n, : encoding.n_output_dims].float()
