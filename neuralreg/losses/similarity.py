"""Similarity losses on sampled intensities (lower is better).

``warped`` and ``fixed`` are (N,) for the global measures and (P, K) for local NCC
(P windows of K points each).
"""

from __future__ import annotations

import torch

_EPS = 1e-5


def mse(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference."""
    return ((warped - fixed) ** 2).mean()


def _ncc(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    cov = (a * b).mean(dim)
    var = (a * a).mean(dim) * (b * b).mean(dim)
    return cov / torch.sqrt(var + _EPS**2)


def ncc(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """1 - global normalized cross-correlation over all points."""
    return 1.0 - _ncc(warped.reshape(-1), fixed.reshape(-1), 0)


def lncc(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """1 - mean local NCC over windows: inputs (P, K)."""
    return 1.0 - _ncc(warped, fixed, 1).mean()
