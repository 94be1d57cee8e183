"""Random point sampling in an image's voxel space (points, never whole volumes)."""

from __future__ import annotations

import torch


class VoxelSampler:
    """Uniform continuous points inside a grid, or around the voxels of a mask.

    Args:
        shape: grid shape (d,).
        mask: optional boolean tensor of ``shape``; points are drawn from its voxels,
            each jittered uniformly within its voxel.
        generator: torch.Generator for reproducible draws.
    """

    def __init__(
        self,
        shape,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ):
        self.shape = tuple(shape)
        self.generator = generator
        self.upper = torch.tensor([n - 1 for n in self.shape], dtype=torch.float32)
        self.mask_voxels = None
        if mask is not None:
            idx = torch.nonzero(mask.reshape(self.shape) > 0)
            if idx.shape[0] == 0:
                raise ValueError("the mask is empty")
            self.mask_voxels = idx.float()

    def sample(self, n: int) -> torch.Tensor:
        """(n, d) voxel-index points."""
        d = len(self.shape)
        if self.mask_voxels is None:
            return torch.rand(n, d, generator=self.generator) * self.upper
        pick = torch.randint(0, self.mask_voxels.shape[0], (n,), generator=self.generator)
        jitter = torch.rand(n, d, generator=self.generator) - 0.5
        return (self.mask_voxels[pick] + jitter).clamp(min=0).minimum(self.upper)

    def sample_windows(self, n_windows: int, points_per_window: int, window: float) -> torch.Tensor:
        """(n_windows * points_per_window, d) points, grouped by window (side ``window`` voxels)."""
        centers = self.sample(n_windows)
        offsets = (torch.rand(n_windows, points_per_window, len(self.shape), generator=self.generator) - 0.5) * window
        return (centers[:, None, :] + offsets).reshape(-1, len(self.shape))
