"""Maps of world points, and resampling an image through one: the one home of
"grid -> world -> map -> voxel -> sample".

A *transform* is anything with ``map_points(points_world (N, d)) -> (N, d)``, world mm,
from the space of the output grid into the space of the image sampled (for a
registration's forward map: fixed -> moving). Three kinds live here or implement it:

- ``AffineTransform``: a (d+1, d+1) world matrix;
- ``DisplacementField``: x + u(x), u on a grid (what ANTs, elastix and ``neuralreg`` write);
- ``neuralreg.Registration.transform(direction)``: the fitted neural fields.

``map_grid`` evaluates a transform at every voxel of a grid; ``sample_world`` reads an
image at world points; ``resample`` is the two together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from neuralreg.geometry.coordinates import apply_affine
from neuralreg.geometry.image import Image
from neuralreg.geometry.interpolation import sample_image


class AffineTransform:
    """A world (mm) affine x -> M x, with ``map_points``."""

    def __init__(self, matrix):
        self.matrix = np.asarray(matrix, dtype=np.float64)

    def map_points(self, points_world: torch.Tensor) -> torch.Tensor:
        return apply_affine(self.matrix, points_world.double()).float()


@dataclass
class DisplacementField:
    """A displacement field on a grid: ``data`` (*shape, d) in RAS mm, ``affine`` of the grid."""

    data: torch.Tensor
    affine: np.ndarray

    def map_points(self, points_world: torch.Tensor) -> torch.Tensor:
        """x + u(x) for world points (N, d), u linearly interpolated (border values outside the grid)."""
        vox = apply_affine(np.linalg.inv(self.affine), points_world.double()).float()
        u = sample_image(self.data.movedim(-1, 0).float(), vox, padding="border")
        return points_world.float() + u


def grid_voxels(shape, start: int, stop: int, dtype=torch.float32) -> torch.Tensor:
    """Voxel indices (stop - start, d) of the C-order flat range [start, stop) of a grid."""
    flat = torch.arange(start, stop)
    idx = []
    for n in reversed(shape):
        idx.append(flat % n)
        flat = flat // n
    return torch.stack(idx[::-1], 1).to(dtype)


@torch.no_grad()
def map_grid(transform, shape, affine, chunk: int = 65536, dtype=torch.float32) -> torch.Tensor:
    """World coordinates (*shape, d) of ``transform`` at every voxel of the grid (shape, affine).

    ``transform`` None is the identity. The voxels' world points are computed in ``dtype``
    (float32: what the fields take; float64: what the scoring of maps read from files uses),
    a ``chunk`` of voxels at a time.
    """
    n, d = int(np.prod(shape)), len(shape)
    out = torch.empty(n, d, dtype=torch.float64 if transform is None else torch.float32)
    for s in range(0, n, chunk):
        x = apply_affine(affine, grid_voxels(shape, s, min(s + chunk, n), dtype))
        out[s : s + chunk] = x if transform is None else transform.map_points(x)
    return out.reshape(*shape, d)


@torch.no_grad()
def sample_world(
    image: Image, points_world: torch.Tensor, mode: str = "linear", padding: str = "zeros", chunk: int = 262144
) -> torch.Tensor:
    """``image`` at world points (..., d) -> values (...); ``nearest`` on an integer image keeps its dtype."""
    shape = points_world.shape[:-1]
    vox = apply_affine(np.linalg.inv(image.affine), points_world.reshape(-1, image.n_dims).double()).float()
    values = torch.empty(vox.shape[0])
    for s in range(0, vox.shape[0], chunk):
        values[s : s + chunk] = image.sample(vox[s : s + chunk], mode=mode, padding=padding)
    values = values.reshape(shape)
    if mode == "nearest" and not image.data.is_floating_point():
        values = values.round().to(image.data.dtype)
    return values


def resample(image: Image, transform, grid, mode: str = "linear", padding: str = "zeros", dtype=torch.float32) -> Image:
    """``image`` read through ``transform`` at every voxel of ``grid`` = (shape, affine): an Image on it.

    ``transform`` None resamples by the identity (world coordinates).
    """
    shape, affine = grid
    return Image(sample_world(image, map_grid(transform, shape, affine, dtype=dtype), mode, padding), affine)


__all__ = ["AffineTransform", "DisplacementField", "grid_voxels", "map_grid", "resample", "sample_world"]
