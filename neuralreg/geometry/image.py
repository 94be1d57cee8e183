"""``Image``: a 2D or 3D array with its voxel-to-world affine."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from neuralreg.geometry.interpolation import sample_image

GRID_TOLERANCE = 0.05  # voxels: two grids whose corners lie closer than this are the same grid


@dataclass
class Image:
    """A scalar image or label map on a grid.

    Attributes:
        data: (*spatial) tensor, d = 2 or 3 spatial axes in array order.
        affine: (d+1, d+1) float64 matrix, voxel index -> world mm (see ``neuralreg.geometry.coordinates``).
    """

    data: torch.Tensor
    affine: np.ndarray

    def __post_init__(self):
        if not torch.is_tensor(self.data):
            self.data = torch.as_tensor(np.asarray(self.data))
        self.affine = np.asarray(self.affine, dtype=np.float64)
        d = self.data.dim()
        if d not in (2, 3):
            raise ValueError(f"images must be 2D or 3D, got {d} dimensions")
        if self.affine.shape != (d + 1, d + 1):
            raise ValueError(f"a {d}D image needs a {d + 1}x{d + 1} affine, got {self.affine.shape}")
        if not np.isfinite(self.affine).all():
            raise ValueError("the image affine has NaN or Inf entries")
        if abs(np.linalg.det(self.affine[:d, :d])) < 1e-12:
            raise ValueError("the image affine is singular")

    @classmethod
    def from_array(cls, data, spacing=None, origin=None) -> Image:
        """An axis-aligned image with the given spacing (default 1 mm) and origin (default 0)."""
        data = torch.as_tensor(np.asarray(data)) if not torch.is_tensor(data) else data
        d = data.dim()
        aff = np.eye(d + 1)
        aff[:d, :d] = np.diag(np.ones(d) if spacing is None else np.asarray(spacing, dtype=np.float64))
        if origin is not None:
            aff[:d, d] = origin
        return cls(data, aff)

    @property
    def n_dims(self) -> int:
        return self.data.dim()

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def spacing(self) -> np.ndarray:
        d = self.n_dims
        return np.linalg.norm(self.affine[:d, :d], axis=0)

    def same_grid(self, other: Image) -> bool:
        """Whether this image lies on ``other``'s grid: the same shape, and every corner within
        ``GRID_TOLERANCE`` of ``other``'s voxel size of the same voxel on ``other``."""
        return self.shape == other.shape and self.grid_offset_mm(other) <= GRID_TOLERANCE * float(other.spacing.min())

    def grid_offset_mm(self, other: Image) -> float:
        """The largest distance (mm) between the world positions of this grid's corners and
        the same voxel indices on ``other``'s grid: 0 for the same grid."""
        d = self.n_dims
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in self.shape], indexing="ij")).reshape(d, -1)
        homog = np.vstack([corners, np.ones((1, corners.shape[1]))])
        return float(np.linalg.norm((self.affine @ homog - other.affine @ homog)[:d], axis=0).max())

    def to(self, device) -> Image:
        return Image(self.data.to(device), self.affine)

    def with_data(self, data: torch.Tensor) -> Image:
        return Image(data, self.affine)

    def sample(self, voxel_points: torch.Tensor, mode: str = "linear", padding: str = "zeros") -> torch.Tensor:
        """Values at voxel-index points (N, d); see ``interpolation.sample_image``."""
        return sample_image(self.data.float(), voxel_points, mode=mode, padding=padding)

    def downsample(self, factor: int) -> Image:
        """Box-average by an integer factor per axis (trailing voxels dropped), affine updated;
        float32 data at every factor (itself where that is already so): the engine samples its
        levels as float32, and a float64 level (as nibabel reads most files) was converted
        anew on each read, a whole-volume copy four times a step."""
        if factor == 1:
            return self if self.data.dtype == torch.float32 else self.with_data(self.data.float())
        d = self.n_dims
        f = [min(factor, n) for n in self.shape]
        pool = F.avg_pool3d if d == 3 else F.avg_pool2d
        data = pool(self.data.float()[None, None], kernel_size=f, stride=f)[0, 0]
        scale = np.eye(d + 1)
        scale[:d, :d] = np.diag(f)
        scale[:d, d] = (np.asarray(f) - 1) / 2.0
        return Image(data, self.affine @ scale)
