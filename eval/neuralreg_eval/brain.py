"""Brain protocol on the IXI T1 heads of ``$NEURALREG_DATA/ixi_brains``: inter-subject pairs,
scored by the mean Dice over the automatic DLMUSE regions (labels are used only to score)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch

from neuralreg.geometry.image import Image
from neuralreg.geometry.transforms import map_grid, sample_world
from neuralreg.metrics import dice, inverse_consistency_error, jacobian_determinant, percent_folds


def image_files(data: Path) -> list[tuple[Path, Path]]:
    """(image, label map) of every subject, sorted by name."""
    pairs = []
    for img in sorted((Path(data) / "images").glob("*.nii.gz")):
        lab = Path(data) / "labels" / img.name.replace(".nii.gz", "_DLMUSE.nii.gz")
        if lab.exists():
            pairs.append((img, lab))
    return pairs


def prepare_pair(files, i: int, j: int, folder: Path) -> Path:
    """A pair folder in the benchmark's layout: subject j moving onto subject i (copies)."""
    folder.mkdir(parents=True, exist_ok=True)
    for (img, lab), role in ((files[i], "fixed"), (files[j], "moving")):
        for src, name in ((img, f"{role}.nii.gz"), (lab, f"{role}_labels.nii.gz")):
            if not (folder / name).exists():
                shutil.copyfile(src, folder / name)
    return folder


def score_maps(forward, inverse, moving_labels: Image, fixed_labels: Image, max_points: int = 200000) -> dict:
    """Mean Dice over the regions of the fixed label map, % negative Jacobian determinant of
    the forward map on the fixed grid, mean inverse-consistency error (mm, moving grid)."""
    shape, affine = fixed_labels.shape, fixed_labels.affine
    phi = map_grid(forward, shape, affine, chunk=int(np.prod(shape)), dtype=torch.float64)
    warped = sample_world(moving_labels, phi, "nearest").round().long()
    fixed = fixed_labels.data.round().long()
    regions = sorted(set(torch.unique(fixed).tolist()) - {0})
    out = {
        "dice": dice(warped, fixed, regions)["mean"],
        "percent_folds_forward": percent_folds(jacobian_determinant(phi, affine)),
        "inverse_consistency_error_mm": math.nan,
    }
    if inverse is not None:
        grid = (moving_labels.shape, moving_labels.affine)
        out["inverse_consistency_error_mm"] = inverse_consistency_error(
            inverse, forward, grid, max_points, dtype=torch.float64
        )
    return out


def scorer(forward, inverse, affine_only, pair_dir: Path) -> dict:
    """``benchmark.run_method``'s scorer for brain pairs (the affine stage is not scored)."""
    from neuralreg.io import read_labels

    moving_labels, fixed_labels = (read_labels(Path(pair_dir) / f"{k}_labels.nii.gz") for k in ("moving", "fixed"))
    return score_maps(forward, inverse, moving_labels, fixed_labels)
