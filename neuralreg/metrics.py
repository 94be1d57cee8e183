"""Evaluation: Dice, Jacobian determinant and folds, inverse consistency, landmark error,
and the one schema of a registered pair's scores.

``SCORES``: the names and meanings of the scores of a registered pair. Wherever
``report.json``, the batch's ``summary.csv`` or the benchmark tables report one of them,
it has this name and meaning (each reports a subset and adds its own: Dice per label,
cartilage Dice, timings); ``field_correction_mm`` is in the benchmark's columns and in
``report.json``'s ``quality.measures``.
"""

from __future__ import annotations

import numpy as np
import torch

from neuralreg.geometry.coordinates import apply_affine, grid_points

SCORES = {
    "percent_folds_forward": "% of fixed-grid voxels where det J of Phi_AB < 0 (backward differences)",
    "percent_folds_inverse": "% of moving-grid voxels where det J of Phi_BA < 0",
    "inverse_consistency_error_mm": "mean |Phi_AB(Phi_BA(y)) - y| in mm over moving-grid voxels y",
    "field_correction_mm": "mean |Phi_AB(x) - A(x)| in mm over fixed-grid voxels x, A its affine part",
    "seconds": "wall seconds of the registration",
    "quality": "the self-check's verdict: good, check or failed",
}


def dice(labels_a, labels_b, labels=None) -> dict:
    """Dice per label and their mean.

    Args:
        labels_a, labels_b: integer label maps of equal shape (tensor or array).
        labels: labels to score; default every non-zero label present in either map.

    Returns:
        ``{"per_label": {label: dice}, "mean": mean dice}``; a label absent from both maps is skipped.
    """
    a = torch.as_tensor(np.asarray(labels_a) if not torch.is_tensor(labels_a) else labels_a)
    b = torch.as_tensor(np.asarray(labels_b) if not torch.is_tensor(labels_b) else labels_b)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.long(), b.long()
    if labels is None:
        present = set(torch.unique(a).tolist()) | set(torch.unique(b).tolist())
        labels = sorted(present - {0})
    per = {}
    for lab in labels:
        ma, mb = a == lab, b == lab
        denom = int(ma.sum() + mb.sum())
        if denom:
            per[int(lab)] = 2.0 * float((ma & mb).sum()) / denom
    return {
        "per_label": per,
        "mean": float(np.mean(list(per.values()))) if per else float("nan"),
    }


def jacobian_determinant(map_world: torch.Tensor, affine: np.ndarray) -> torch.Tensor:
    """det of the spatial Jacobian of a map sampled on a grid.

    Args:
        map_world: (*shape, d) world coordinates (mm) of the map at every voxel of a grid.
        affine: the grid's (d+1)x(d+1) voxel-to-world affine.

    Returns:
        (*shape) determinants of d(map)/d(world x), by backward differences on the voxel
        grid (as the GradICON paper counts folds); the first slice along each axis repeats
        its neighbour.
    """
    d = map_world.shape[-1]
    scale = float(np.linalg.det(affine[:d, :d]))
    n0 = map_world.shape[0]
    out = torch.empty(map_world.shape[:-1], dtype=torch.float64, device=map_world.device)
    # slab by slab along axis 0 (with the slice before each slab, for its differences): the
    # same operations on every voxel as on the whole volume, on arrays that stay in cache
    slab = max(2, JACOBIAN_SLAB)
    for start in range(0, n0, slab):
        stop, low = min(start + slab, n0), max(start - 1, 0)
        m = map_world[low:stop].double()
        cols = []
        for k in range(d):  # into a preallocated column: no concatenated copy of the volume
            n = m.shape[k]
            diff = torch.empty_like(m)
            torch.sub(m.narrow(k, 1, n - 1), m.narrow(k, 0, n - 1), out=diff.narrow(k, 1, n - 1))
            diff.narrow(k, 0, 1).copy_(diff.narrow(k, 1, 1))  # slab 0: the grid's first slice
            cols.append(diff)
        out[start:stop] = (det_of_columns(cols) / scale)[start - low :]
    return out


JACOBIAN_SLAB = 8  # slices along axis 0 per piece of ``jacobian_determinant``


def det_of_columns(cols) -> torch.Tensor:
    """det of the (*shape, d, d) matrices (d = 2 or 3) whose column k is ``cols[k]``
    (*shape, d), by cofactors: element-wise, no stacked copy and no batched LU as
    ``torch.linalg.det`` (the same value to float64 rounding, ~10 % faster on 2.9 million
    3x3 matrices), and differentiable twice. A stack ``jac`` (N, d, d) is
    ``det_of_columns(jac.unbind(-1))``."""
    if len(cols) == 2:
        (a, c), (b, d) = cols[0].unbind(-1), cols[1].unbind(-1)
        return a * d - b * c
    (a, d, g), (b, e, h), (c, f, i) = (col.unbind(-1) for col in cols)
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def percent_folds(det: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Percentage of voxels with a negative Jacobian determinant (first slices excluded)."""
    interior = det[(slice(1, None),) * det.dim()]
    if mask is not None:
        interior = interior[mask[(slice(1, None),) * det.dim()] > 0]
    return 100.0 * float((interior < 0).double().mean()) if interior.numel() else 0.0


def grid_points_world(grid, max_points: int = 200000, mask: torch.Tensor | None = None, dtype=torch.float32):
    """World points (N, d) of the voxels of ``grid`` = (shape, affine): those where ``mask``
    (the grid's shape) is non-zero, a fixed-seed random subset of ``max_points`` above that."""
    shape, affine = grid
    vox = grid_points(shape, dtype=dtype)
    if mask is not None:
        vox = vox[mask.reshape(-1) > 0]
    if vox.shape[0] > max_points:
        g = torch.Generator().manual_seed(0)
        vox = vox[torch.randperm(vox.shape[0], generator=g)[:max_points]]
    return apply_affine(affine, vox)


@torch.no_grad()
def inverse_consistency_error(
    there, back, grid, max_points: int = 200000, mask: torch.Tensor | None = None, dtype=torch.float32
) -> float:
    """Mean ||back(there(x)) - x|| in mm over the voxels x of ``grid`` = (shape, affine).

    ``there``, ``back``: transforms (``map_points``, world mm), e.g. Phi_BA and Phi_AB for
    x in the moving space. Points as ``grid_points_world`` (``mask``, ``max_points``, ``dtype``).
    """
    x = grid_points_world(grid, max_points, mask, dtype)
    return float(torch.linalg.norm(back.map_points(there.map_points(x)) - x, dim=1).mean())


@torch.no_grad()
def field_correction(transform, affine_part, grid, max_points: int = 200000, dtype=torch.float32) -> float:
    """Mean ||transform(x) - affine_part(x)|| in mm over the voxels x of ``grid``: how far the
    deformable part moves points beyond the global affine one. Knees of two subjects need a
    few mm; tens of mm mean the deformable part had to repair the global alignment."""
    x = grid_points_world(grid, max_points, None, dtype)
    return float(torch.linalg.norm(transform.map_points(x).double() - affine_part.map_points(x).double(), dim=1).mean())


def landmark_error(mapped_fixed_points: torch.Tensor, moving_points: torch.Tensor) -> dict:
    """Distances (mm) between fixed landmarks mapped into the moving image and their moving partners."""
    dist = torch.linalg.norm(torch.as_tensor(mapped_fixed_points) - torch.as_tensor(moving_points), dim=-1)
    return {
        "mean": float(dist.mean()),
        "max": float(dist.max()),
        "per_point": dist.tolist(),
    }
