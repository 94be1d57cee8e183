"""Pure-PyTorch hash-grid encoding: the reference backend and ground truth in tests.

Differentiable to any order with plain autograd (inputs and tables): the GradICON
penalty differentiates the spatial gradient of the encoding.
"""

from __future__ import annotations

import itertools

import torch

from neuralreg.fields.hashgrid import PRIMES, LevelLayout

_MASK32 = 0xFFFFFFFF


class TorchHashGridIndexer:
    """Precomputed per-level constants for the vectorized reference evaluation."""

    def __init__(self, layout: LevelLayout, n_dims: int, device=None):
        self.layout = layout
        self.n_dims = n_dims
        self.n_levels = len(layout.scales)
        self.scales = torch.tensor(layout.scales, dtype=torch.float32, device=device)
        self.resolutions = torch.tensor(layout.resolutions, dtype=torch.int64, device=device)
        self.sizes = torch.tensor(layout.sizes, dtype=torch.int64, device=device)
        self.offsets = torch.tensor(layout.offsets, dtype=torch.int64, device=device)
        self.hashed = torch.tensor(layout.hashed, dtype=torch.bool, device=device)
        self.dense_levels = torch.nonzero(~self.hashed).flatten()
        self.hashed_levels = torch.nonzero(self.hashed).flatten()
        strides = torch.ones(self.n_levels, n_dims, dtype=torch.int64)
        for i in range(1, n_dims):
            strides[:, i] = strides[:, i - 1] * torch.tensor(layout.resolutions)
        self.strides = strides.to(device)
        self.primes = torch.tensor(PRIMES[:n_dims], dtype=torch.int64, device=device)
        corners = torch.tensor(list(itertools.product((0, 1), repeat=n_dims)), dtype=torch.int64)
        self.corners = corners.flip(-1).to(device)  # (2^d, d), first axis fastest

    def to(self, device):
        return TorchHashGridIndexer(self.layout, self.n_dims, device)

    def rows(self, pos_grid: torch.Tensor) -> torch.Tensor:
        """Table rows of the 2^d corners: pos_grid (N, L, d) int64 -> (N, L, 2^d) int64."""
        out = torch.empty(
            pos_grid.shape[0], self.n_levels, self.corners.shape[0], dtype=torch.int64, device=pos_grid.device
        )
        for hashed, levels in ((False, self.dense_levels), (True, self.hashed_levels)):
            if levels.numel() == 0:
                continue
            vert = (pos_grid[:, levels].unsqueeze(2) + self.corners) & _MASK32  # (N, l, C, d), tcnn's uint32
            if hashed:
                index = vert[..., 0] * int(self.primes[0])
                for i in range(1, self.n_dims):
                    index = index ^ ((vert[..., i] * int(self.primes[i])) & _MASK32)
            else:
                index = (vert * self.strides[levels][None, :, None, :]).sum(-1)
            index = torch.remainder(index, self.sizes[levels][None, :, None]) + self.offsets[levels][None, :, None]
            out[:, levels] = index
        return out


def hashgrid_encode_torch(
    x: torch.Tensor,
    table: torch.Tensor,
    indexer: TorchHashGridIndexer,
    smoothstep: bool,
) -> torch.Tensor:
    """Encode points.

    Args:
        x: (N, d) points in [0, 1]^d.
        table: (rows, F) concatenated level tables.
        indexer: layout constants for this encoding.
        smoothstep: smoothstep instead of linear interpolation weights.

    Returns:
        (N, L*F) features, level-major (as tcnn).
    """
    n, _d = x.shape
    scales = indexer.scales.to(x.dtype)
    pos = x.unsqueeze(1) * scales[None, :, None] + 0.5  # (N, L, d)
    pos_floor = torch.floor(pos.detach())
    frac = pos - pos_floor
    if smoothstep:
        frac = frac * frac * (3.0 - 2.0 * frac)
    rows = indexer.rows(pos_floor.to(torch.int64))  # (N, L, C)
    corners = indexer.corners.to(x.dtype)  # (C, d)
    # weight of corner c = prod_i (frac_i if c_i else 1 - frac_i)
    w = frac.unsqueeze(2) * corners + (1.0 - frac.unsqueeze(2)) * (1.0 - corners)  # (N, L, C, d)
    weights = w.prod(-1)  # (N, L, C)
    feats = torch.index_select(table, 0, rows.reshape(-1)).reshape(
        n, indexer.n_levels, corners.shape[0], table.shape[1]
    )
    out = (weights.unsqueeze(-1) * feats).sum(2)  # (N, L, F)
    return out.reshape(n, -1)
