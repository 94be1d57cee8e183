"""End-to-end runs on the real data in $NEURALREG_DATA (skipped with a reason when it is absent)."""

import json

import nibabel as nib
import numpy as np
import pytest

from neuralreg.cli import main
from neuralreg.io import preprocess, read_image
from neuralreg.metrics import dice

FAST = ["--steps", "60", "--points", "4096", "--quiet"]


def test_ixi_pair_simpleitk_applies_our_field_with_the_same_dice(shared_data, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    images = sorted((shared_data / "ixi_brains" / "images").glob("*.nii.gz"))[:2]
    labels = [shared_data / "ixi_brains" / "labels" / p.name.replace(".nii.gz", "_DLMUSE.nii.gz") for p in images]
    out = tmp_path / "ixi"
    code = main(
        ["register", "--fixed", str(images[0]), "--moving", str(images[1]), "--out", str(out)]
        + ["--fixed-labels", str(labels[0]), "--moving-labels", str(labels[1])]
        + FAST
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dice_after"]["mean"] > report["dice_before"]["mean"]
    transform = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(out / "displacement_forward.nii.gz"), sitk.sitkVectorFloat64)
    )
    fixed_labels = sitk.ReadImage(str(labels[0]))
    warped = sitk.Resample(sitk.ReadImage(str(labels[1])), fixed_labels, transform, sitk.sitkNearestNeighbor, 0)
    theirs = sitk.GetArrayFromImage(warped).transpose(2, 1, 0)
    reference = np.asarray(nib.load(labels[0]).dataobj)
    ours = np.asarray(nib.load(out / "warped_labels.nii.gz").dataobj)
    dice_sitk = dice(theirs, reference)["mean"]
    dice_ours = dice(ours, reference)["mean"]
    assert abs(dice_sitk - dice_ours) < 0.005, (dice_sitk, dice_ours)
    assert abs(dice_ours - report["dice_after"]["mean"]) < 1e-9


def test_fair_knee_pair_end_to_end(shared_data, tmp_path):
    knee = shared_data / "fair_knee"
    out = tmp_path / "knee"
    code = main(
        ["register", "--fixed", str(knee / "knee_reference.nii.gz"), "--moving", str(knee / "knee_template.nii.gz")]
        + ["--out", str(out)]
        + FAST
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert np.isfinite(report["inverse_consistency_error_mm"])
    fixed = preprocess(read_image(knee / "knee_reference.nii.gz")).data
    moving = preprocess(read_image(knee / "knee_template.nii.gz")).data  # same grid as the fixed image
    warped = read_image(out / "warped.nii.gz").data
    assert _ncc(warped, fixed) > _ncc(moving, fixed) + 0.02
    for name in ("warped.nii.gz", "displacement_forward.nii.gz", "jacobian.nii.gz", "figure.png"):
        assert (out / name).stat().st_size > 0


def _ncc(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))
