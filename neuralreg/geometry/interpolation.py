"""Image sampling at arbitrary points (PyTorch reference of the fused warp).

Rule outside the image: the volume is extended by zeros, so within one voxel of the
border the interpolated value fades linearly to 0 (``padding="zeros"``), or by its
border values (``padding="border"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def voxel_to_grid_sample(points: torch.Tensor, shape) -> torch.Tensor:
    """Voxel indices (N, d) in array order -> grid_sample coordinates (N, d), reversed, in [-1, 1]."""
    sizes = torch.tensor([max(n - 1, 1) for n in shape], dtype=points.dtype, device=points.device)
    return (2.0 * points / sizes - 1.0).flip(-1)


def sample_image(
    image: torch.Tensor,
    points: torch.Tensor,
    mode: str = "linear",
    padding: str = "zeros",
) -> torch.Tensor:
    """Sample ``image`` at voxel-index points.

    Args:
        image: (*spatial) or (C, *spatial), 2D or 3D spatial, float.
        points: (N, d) voxel indices in array order (continuous), d = number of spatial dims.
        mode: ``"linear"`` (bi/trilinear, differentiable w.r.t. points) or ``"nearest"``.
        padding: ``"zeros"`` or ``"border"``.

    Returns:
        (N,) for a single-channel image, else (N, C).
    """
    if mode not in ("linear", "nearest"):
        raise ValueError(f"mode must be 'linear' or 'nearest', not {mode!r}")
    if padding not in ("zeros", "border"):
        raise ValueError(f"padding must be 'zeros' or 'border', not {padding!r}")
    d = points.shape[-1]
    single = image.dim() == d
    img = image.unsqueeze(0) if single else image
    shape = img.shape[1:]
    grid = voxel_to_grid_sample(points.to(img.dtype), shape)
    grid = grid.reshape((1,) + (1,) * (d - 1) + (points.shape[0], d))
    out = F.grid_sample(
        img.unsqueeze(0),
        grid,
        mode="bilinear" if mode == "linear" else "nearest",
        padding_mode=padding,
        align_corners=True,
    )
    out = out.reshape(img.shape[0], points.shape[0]).T
    return out[:, 0] if single else out
