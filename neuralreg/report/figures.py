"""Summary figure of a registration: fixed, moving, warped, checkerboard, deformed grid, Jacobian."""

from __future__ import annotations

import numpy as np
import torch

from neuralreg.geometry.coordinates import apply_affine
from neuralreg.geometry.image import Image
from neuralreg.geometry.transforms import resample


def _slice(volume: torch.Tensor, axis: int) -> np.ndarray:
    if volume.dim() == 2:
        return volume.numpy()
    return volume.select(axis, volume.shape[axis] // 2).numpy()


def _slice_map(map_world: torch.Tensor, axis: int, affine: np.ndarray) -> np.ndarray:
    """The map's mid slice across ``axis`` in the grid's voxel coordinates (only that plane converted)."""
    plane = map_world if map_world.dim() == 3 else map_world.select(axis, map_world.shape[axis] // 2)
    d = plane.shape[-1]
    vox = apply_affine(np.linalg.inv(affine), plane.reshape(-1, d).double())
    return vox.reshape(plane.shape).float().numpy()


def _moving_slice(moving: Image, fixed: Image, axis: int) -> np.ndarray:
    """The moving image on the fixed grid's mid slice across ``axis`` (identity map, linear):
    one plane resampled, not the whole volume."""
    if fixed.n_dims == 2:
        return resample(moving, None, (fixed.shape, fixed.affine)).data.float().numpy()
    mid = fixed.shape[axis] // 2
    shape = list(fixed.shape)
    shape[axis] = 1
    shift = np.eye(4)
    shift[axis, 3] = mid  # the plane's voxel index 0 is the fixed grid's index ``mid``
    plane = resample(moving, None, (tuple(shape), fixed.affine @ shift)).data.float()
    return plane.select(axis, 0).numpy()


def _deformed_grid(ax, p0: np.ndarray, p1: np.ndarray, shape, aspect: float) -> None:
    """Every few rows and columns of the map's in-plane coordinates (p0, p1: voxels of the
    fixed slice) drawn as lines on ``ax``, over the slice's extent ``shape``: one
    ``LineCollection`` (a ``Line2D`` per grid line was 645 artists and a third of the figure's time)."""
    from matplotlib.collections import LineCollection

    step = max(1, min(shape) // 24)
    rows = [np.stack([p0[i, :], p1[i, :]], -1) for i in range(0, p0.shape[0], step)]
    columns = [np.stack([p0[:, j], p1[:, j]], -1) for j in range(0, p0.shape[1], step)]
    ax.add_collection(LineCollection(rows + columns, colors="k", linewidths=0.5))
    ax.set_xlim(0, shape[0] - 1)
    ax.set_ylim(0, shape[1] - 1)
    ax.set_aspect(aspect)


def registration_figure(path, fixed: Image, moving: Image, warped: Image, map_fixed_world, jacobian):
    """Write a PNG of mid slices (one row per orientation in 3D).

    Args:
        fixed: fixed image; moving: the moving image on its own grid (shown on the fixed
            grid's slices without deformation); warped: moving image warped onto the fixed grid.
        map_fixed_world: (*shape, d) the forward map at the fixed grid's voxels, world mm
            (drawn in the fixed grid's voxel coordinates).
        jacobian: (*shape) Jacobian determinant on the fixed grid.
    """
    from matplotlib.figure import Figure  # no pyplot: no backend machinery, nothing global

    from neuralreg.files import atomic_write

    axes = [0] if fixed.n_dims == 2 else [0, 1, 2]
    titles = ["fixed", "moving", "warped moving", "checkerboard fixed/warped", "deformed grid", "Jacobian det"]
    fig = Figure(figsize=(18, 3.2 * len(axes)))
    grid = fig.subplots(len(axes), 6, squeeze=False)
    spacing = fixed.spacing
    for row, axis in enumerate(axes):
        shown = [k for k in range(fixed.n_dims) if k != axis] if fixed.n_dims == 3 else [0, 1]
        aspect = float(spacing[shown[1]] / spacing[shown[0]])  # physical proportions on screen
        f = _slice(fixed.data.float(), axis)
        m = _moving_slice(moving, fixed, axis)
        w = _slice(warped.data.float(), axis)
        vmax = float(np.percentile(f, 99.5)) or 1.0
        tiles = max(2, min(f.shape) // 12)
        yy, xx = np.meshgrid(np.arange(f.shape[0]) // tiles, np.arange(f.shape[1]) // tiles, indexing="ij")
        checker = np.where((yy + xx) % 2 == 0, f, w)
        for col, img in enumerate((f, m, w, checker)):
            grid[row, col].imshow(img.T, origin="lower", cmap="gray", vmin=0, vmax=vmax, aspect=aspect)
        phi = _slice_map(map_fixed_world, axis, fixed.affine)
        _deformed_grid(grid[row, 4], phi[..., shown[0]], phi[..., shown[1]], f.shape, aspect)
        jac = _slice(jacobian, axis)
        im = grid[row, 5].imshow(jac.T, origin="lower", cmap="RdBu_r", vmin=0, vmax=2, aspect=aspect)
        grid[row, 5].contour(jac.T, levels=[0], colors="k", linewidths=0.8)
        fig.colorbar(im, ax=grid[row, 5], fraction=0.046)
        for col in range(6):
            grid[row, col].set_axis_off()  # no tick machinery: it was a third of the figure's time
            if row == 0:
                grid[row, col].set_title(titles[col])
        if fixed.n_dims == 3:
            ax = grid[row, 0]
            ax.text(
                -0.06, 0.5, f"mid slice, axis {axis}", transform=ax.transAxes, rotation=90, va="center", ha="center"
            )
    # a fixed layout: tight_layout measured every tick and label of 18 axes (0.3 s)
    fig.subplots_adjust(
        left=0.02, right=0.965, bottom=0.02, top=0.95 if len(axes) > 1 else 0.9, wspace=0.08, hspace=0.08
    )
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png", pil_kwargs={"compress_level": 1})  # zlib's fastest
