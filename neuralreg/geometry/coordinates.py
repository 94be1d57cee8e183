"""Coordinate conventions, in one place.

- **Voxel index** ``i`` (d,), in array axis order: voxel centers at integers 0 .. n-1.
- **World** ``x`` (d,), in mm: ``x = A[:d, :d] @ i + A[:d, d]`` with the image's
  (d+1)x(d+1) affine A (NIfTI RAS+ for images read from NIfTI), which carries spacing,
  direction (oblique included) and origin.
- **Normalized** ``u`` in [0, 1]^d, the fields' domain: ``u = (x - origin) / scale + 0.5``,
  an *isotropic* map of the pair's world box (union of both images' voxel-center boxes
  enlarged by ``margin`` of the largest extent on every side) into the unit cube, so
  anisotropic voxels do not distort the encoding or any regularizer. A displacement of
  ``du`` normalized units is ``du * scale`` mm; Jacobians are the same in u and in mm.

A field Phi_AB maps points of the fixed image B's domain to the moving image A's
domain: the warped moving image is ``A(Phi_AB(x))`` for x on B's grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def grid_corners_world(shape, affine: np.ndarray) -> np.ndarray:
    """World coordinates (2^d, d) of the corner voxel centers of a grid."""
    d = len(shape)
    idx = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(d, -1)
    return (affine[:d, :d] @ idx + affine[:d, d : d + 1]).T


def grid_world_box(shape, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box (lo, hi), each (d,), of a grid's voxel centers."""
    pts = grid_corners_world(shape, affine)
    return pts.min(0), pts.max(0)


@dataclass
class NormalizedBox:
    """Isotropic affine map between world mm and the unit cube of the fields."""

    center: np.ndarray  # (d,) world mm
    scale: float  # mm per normalized unit

    @property
    def n_dims(self) -> int:
        return len(self.center)

    @classmethod
    def around(cls, grids, margin: float = 0.15) -> NormalizedBox:
        """The box around several (shape, affine) grids, with ``margin`` of the largest extent on each side."""
        pts = np.concatenate([grid_corners_world(s, a) for s, a in grids])
        lo, hi = pts.min(0), pts.max(0)
        extent = float(max((hi - lo).max(), 1e-6))
        return cls(center=(lo + hi) / 2, scale=extent * (1 + 2 * margin))

    def to_normalized(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(self.center, dtype=x.dtype, device=x.device)
        return (x - c) / self.scale + 0.5

    def to_world(self, u: torch.Tensor) -> torch.Tensor:
        c = torch.as_tensor(self.center, dtype=u.dtype, device=u.device)
        return (u - 0.5) * self.scale + c

    def voxel_to_normalized_matrix(self, affine: np.ndarray) -> np.ndarray:
        """(d+1)x(d+1) matrix taking voxel indices of an image with ``affine`` to u."""
        d = self.n_dims
        m = np.eye(d + 1)
        m[:d, :d] = np.eye(d) / self.scale
        m[:d, d] = -self.center / self.scale + 0.5
        return m @ affine

    def state(self) -> dict:
        return {"center": self.center.tolist(), "scale": self.scale}

    @classmethod
    def from_state(cls, s: dict) -> NormalizedBox:
        return cls(center=np.asarray(s["center"], dtype=np.float64), scale=float(s["scale"]))


def apply_affine(matrix: np.ndarray | torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    """Apply a (d+1)x(d+1) matrix to points (N, d)."""
    m = torch.as_tensor(matrix, dtype=pts.dtype, device=pts.device)
    d = pts.shape[-1]
    return pts @ m[:d, :d].T + m[:d, d]


class PointMap:
    """A (d+1)x(d+1) affine matrix kept on a device as the pair applied to points (N, d):
    ``pm(pts)`` = pts A^T + b in one ``addmm`` (``apply_affine`` converts, slices and
    transposes the matrix on every call: seven operations where a step makes several).

    Attributes:
        matrix: the (d+1, d+1) matrix (float64, numpy).
        linear_t: A^T (d, d); offset: b (d,); both float32 on the device.
    """

    def __init__(self, matrix: np.ndarray, device=None, dtype=torch.float32):
        self.matrix = np.asarray(matrix, dtype=np.float64)
        d = self.matrix.shape[0] - 1
        self.linear_t = torch.tensor(self.matrix[:d, :d].T, dtype=dtype, device=device)
        self.offset = torch.tensor(self.matrix[:d, d], dtype=dtype, device=device)

    def __call__(self, pts: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.offset, pts, self.linear_t)

    def inverse(self) -> PointMap:
        return PointMap(np.linalg.inv(self.matrix), self.offset.device, self.offset.dtype)


def grid_points(shape, device=None, dtype=torch.float32) -> torch.Tensor:
    """All voxel indices of a grid, (prod(shape), d), C order."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(shape))
