"""tiny-cuda-nn HashGrid layout: per-level scale, resolution, table sizes and offsets.

Shared by every backend, so that all of them address the same parameters:

- ``scale_l = 2**(l * log2(per_level_scale)) * base_resolution - 1`` (float32, as tcnn);
- ``resolution_l = ceil(scale_l) + 1`` grid vertices per axis;
- ``size_l = min(next_multiple(resolution_l**d, 8), 2**log2_hashmap_size)``;
- a level is dense while ``resolution_l**d <= size_l`` (index = sum pos_i * res**i),
  hashed otherwise (XOR of ``pos_i * prime_i`` with 32-bit wraparound), both ``% size_l``;
- inputs in [0, 1]^d are placed at ``pos = scale_l * x + 0.5``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from neuralreg.config import HashGridConfig

PRIMES = (1, 2654435761, 805459861)


@dataclass(frozen=True)
class LevelLayout:
    """Per-level constants of a hash grid for a given input dimension."""

    scales: tuple  # float32 values, one per level
    resolutions: tuple
    sizes: tuple  # table rows per level
    offsets: tuple  # first row of each level in the concatenated table
    hashed: tuple  # True where the level uses the spatial hash
    n_params_rows: int

    def first(self, n: int) -> LevelLayout:
        """The ``n`` coarsest levels alone (their rows lead the table: ``table[:n_params_rows]``)."""
        n = max(1, min(n, len(self.scales)))
        rows = self.offsets[n - 1] + self.sizes[n - 1]
        return LevelLayout(
            self.scales[:n], self.resolutions[:n], self.sizes[:n], self.offsets[:n], self.hashed[:n], rows
        )


def level_layout(config: HashGridConfig, n_dims: int) -> LevelLayout:
    log2_pls = np.float32(math.log2(config.per_level_scale))
    scales, resolutions, sizes, offsets, hashed = [], [], [], [], []
    offset = 0
    max_params = np.iinfo(np.uint32).max // 2
    for level in range(config.n_levels):
        scale = np.float32(np.exp2(np.float32(level) * log2_pls) * np.float32(config.base_resolution) - np.float32(1.0))
        resolution = math.ceil(float(scale)) + 1
        dense = resolution**n_dims
        params = max_params if float(resolution) ** n_dims > max_params else dense
        params = (params + 7) // 8 * 8
        params = min(params, 1 << config.log2_hashmap_size)
        scales.append(float(scale))
        resolutions.append(resolution)
        sizes.append(params)
        offsets.append(offset)
        hashed.append(_uses_hash(resolution, params, n_dims))
        offset += params
    return LevelLayout(
        tuple(scales),
        tuple(resolutions),
        tuple(sizes),
        tuple(offsets),
        tuple(hashed),
        offset,
    )


def _uses_hash(resolution: int, hashmap_size: int, n_dims: int) -> bool:
    stride = 1
    for _ in range(n_dims):
        if stride > hashmap_size:
            break
        stride *= resolution
    return hashmap_size < stride


def grid_index(pos_grid: np.ndarray, resolution: int, hashmap_size: int, hashed: bool) -> np.ndarray:
    """tcnn's ``grid_index`` for integer vertex coordinates ``pos_grid`` (..., d), in numpy uint64."""
    pos = pos_grid.astype(np.uint64)
    if hashed:
        index = np.zeros(pos.shape[:-1], dtype=np.uint64)
        for i in range(pos.shape[-1]):
            index ^= (pos[..., i] * np.uint64(PRIMES[i])) & np.uint64(0xFFFFFFFF)
    else:
        index = np.zeros(pos.shape[:-1], dtype=np.uint64)
        stride = 1
        for i in range(pos.shape[-1]):
            index += pos[..., i] * np.uint64(stride)
            stride *= resolution
    return index % np.uint64(hashmap_size)
