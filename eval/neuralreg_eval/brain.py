"""Brain protocol on the IXI T1 heads of ``$NEURALREG_DATA/ixi_brains``: inter-subject pairs,
scored by the mean Dice over the automatic DLMUSE regions (labels are used only to score)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from neuralreg.geometry.image import Image
from neuralreg.metrics import dice
from neuralreg_eval.scoring import read_pair_labels, warp_labels_and_regularity


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
    warped, regularity = warp_labels_and_regularity(forward, inverse, moving_labels, fixed_labels, max_points)
    fixed = fixed_labels.data.round().long()
    regions = sorted(set(torch.unique(fixed).tolist()) - {0})
    return {"dice": dice(warped, fixed, regions)["mean"], **regularity}


def scorer(forward, inverse, affine_only, pair_dir: Path) -> dict:
    """``benchmark.run_method``'s scorer for brain pairs (the affine stage is not scored)."""
    return score_maps(forward, inverse, *read_pair_labels(pair_dir))
