"""What every protocol's scoring shares: the moving labels carried onto the fixed grid by a
method's forward map, and the maps' regularity (folds, inverse consistency)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from neuralreg.geometry.image import Image
from neuralreg.geometry.transforms import map_grid, sample_world
from neuralreg.metrics import inverse_consistency_error, jacobian_determinant, percent_folds


def forward_on_grid(forward, fixed_labels: Image) -> torch.Tensor:
    """World points (*fixed shape, d), float64, of ``forward`` at every fixed voxel."""
    shape = fixed_labels.shape
    return map_grid(forward, shape, fixed_labels.affine, chunk=int(np.prod(shape)), dtype=torch.float64)


def warp_labels_and_regularity(
    forward, inverse, moving_labels: Image, fixed_labels: Image, max_points: int = 200000, phi=None
) -> tuple[torch.Tensor, dict]:
    """Moving labels warped onto the fixed grid (nearest, (*fixed shape) long), and
    ``percent_folds_forward`` (% negative Jacobian determinant of ``forward`` on the fixed
    grid) and ``inverse_consistency_error_mm`` (mean, moving grid; NaN without ``inverse``).

    ``forward``/``inverse``: maps with ``map_points`` in world RAS mm (e.g. ``DisplacementField``);
    ``phi``: ``forward_on_grid(forward, fixed_labels)`` where the caller has it already.
    """
    affine = fixed_labels.affine
    phi = forward_on_grid(forward, fixed_labels) if phi is None else phi
    warped = sample_world(moving_labels, phi, "nearest").round().long()
    regularity = {
        "percent_folds_forward": percent_folds(jacobian_determinant(phi, affine)),
        "inverse_consistency_error_mm": math.nan,
    }
    if inverse is not None:
        grid = (moving_labels.shape, moving_labels.affine)
        regularity["inverse_consistency_error_mm"] = inverse_consistency_error(
            inverse, forward, grid, max_points, dtype=torch.float64
        )
    return warped, regularity


def read_pair_labels(pair_dir) -> tuple[Image, Image]:
    """(moving, fixed) label maps of a prepared pair folder."""
    from neuralreg.io import read_labels

    return tuple(read_labels(Path(pair_dir) / f"{k}_labels.nii.gz") for k in ("moving", "fixed"))
