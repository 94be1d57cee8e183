"""The benchmark families beyond the hard one: filled, contrast, longitudinal, and real scans under other headers."""

import numpy as np
import pytest
import torch
from neuralreg_eval import families, headers

from neuralreg import Image
from neuralreg.geometry.transforms import DisplacementField
from neuralreg.phantoms import _blur, knee_phantom_pair

SHAPE = (40, 96, 96)


@pytest.fixture
def files(shared_data):
    return sorted((shared_data / "oai_zib_labels").glob("*_labels.nii.gz"))


def test_filled_knees_have_no_air_and_cut_fields_of_view(files):
    pair = families.family_pair("filled", files[0], files[1], seed=0, shape=SHAPE)
    for key in ("fixed", "moving"):
        img, lab = pair[key], pair[f"{key}_labels"]
        # soft tissue to the edge: nothing as dark as air anywhere in the field of view (crop only: no padding)
        assert float(img.data.min()) > 0.05
        assert tuple(img.shape) != SHAPE or key == "fixed"
        # the soft tissue (label 0) is mostly not air-dark
        assert float((img.data[lab.data == 0] < 0.1).float().mean()) < 0.01
    assert not pair["longitudinal"]


def test_contrast_family_gives_each_image_its_own_fat_contrast_and_thick_slices(files):
    pairs = [families.family_pair("contrast", files[0], files[1], seed=s, shape=SHAPE) for s in range(3)]

    def fat_minus_muscle(img, lab):  # soft tissue far from the bones is fat or a muscle island
        soft = img.data[(lab.data == 0) & (img.data > 0)]
        return float(soft.quantile(0.9) - soft.quantile(0.1))

    spreads = [fat_minus_muscle(p["moving"], p["moving_labels"]) for p in pairs]
    spreads += [fat_minus_muscle(p["fixed"], p["fixed_labels"]) for p in pairs]
    assert max(spreads) - min(spreads) > 0.1  # fat contrast varies between images
    moving = pairs[0]["moving"].data
    along = float((moving[1:] - moving[:-1]).abs().mean())
    across = float((moving[:, 1:] - moving[:, :-1]).abs().mean())
    assert along < across  # thick slices along axis 0: smoother across slices


def test_longitudinal_pairs_are_one_knee_in_two_scans(files):
    pair = families.family_pair("filled", files[2], files[2], seed=1, shape=SHAPE)
    assert pair["longitudinal"] and not pair["flipped"]
    fl, ml = pair["fixed_labels"], pair["moving_labels"]
    assert not np.allclose(fl.affine, ml.affine)  # own pose and field of view
    # the same tissue: femur intensity agrees between the scans (a different subject's would not)
    femur = [float(pair[k].data[pair[f"{k}_labels"].data == 1].mean()) for k in ("fixed", "moving")]
    assert abs(femur[0] - femur[1]) < 0.03


def test_unknown_family_is_refused(files):
    with pytest.raises(ValueError, match="unknown family 'air'"):
        families.family_pair("air", files[0], files[1])


def test_header_pair_truth_maps_fixed_points_onto_the_same_anatomy(tmp_path):
    """The known answer is right: the moving image read at Phi(x) equals the fixed one at x."""
    p = knee_phantom_pair(0, shape=(24, 40, 40))
    fixed = p["fixed"].with_data(_blur(p["fixed"].data, 1.5))  # smooth: two linear interpolations agree
    pair = headers.perturbed_pair(fixed, p["fixed_labels"], seed=3, noise=0.0, amplitude_mm=3.0)
    moving, truth = pair["moving"], pair["truth"]
    assert not np.allclose(moving.affine, fixed.affine)
    from neuralreg.geometry.coordinates import apply_affine, grid_points

    x = apply_affine(fixed.affine, grid_points(fixed.shape, dtype=torch.float64))
    phi = x + truth.reshape(-1, 3).double()
    vox = apply_affine(np.linalg.inv(moving.affine), phi).float()
    upper = torch.tensor(moving.shape) - 1
    inside = ((vox >= 1) & (vox <= upper - 1)).all(1) & pair["body"].reshape(-1)
    read = moving.sample(vox)[inside]
    want = fixed.data.reshape(-1)[inside]
    assert float((read - want).abs().mean()) < 0.01 * float(want.abs().mean())  # measured: 0.6 %
    # scored from files, the true map has no error and the identity map a gross one
    from neuralreg.io import write_displacement_field, write_image

    write_displacement_field(truth, fixed.affine, tmp_path / "truth.nii.gz")
    write_image(Image(pair["body"].float(), fixed.affine), tmp_path / "body.nii.gz")
    right = headers.score_maps(DisplacementField(truth, fixed.affine), None, tmp_path)
    assert right["error_mm"] < 0.05 and not right["gross_failure"]
    wrong = headers.score_maps(DisplacementField(torch.zeros_like(truth), fixed.affine), None, tmp_path)
    assert wrong["error_mm"] > headers.GROSS_FAILURE_ERROR_MM and wrong["gross_failure"]


def test_header_pair_in_another_contrast_keeps_the_truth_and_swaps_tissue_order():
    """``contrast=True`` changes the moving image's intensities only: the same map and
    header, and the order of tissue intensities is not kept (no monotonic
    map undoes it)."""
    p = knee_phantom_pair(0, shape=(24, 40, 40))
    same = headers.perturbed_pair(p["fixed"], p["fixed_labels"], seed=3, noise=0.0)
    other = headers.perturbed_pair(p["fixed"], p["fixed_labels"], seed=3, noise=0.0, contrast=True)
    assert torch.equal(same["truth"], other["truth"])
    assert np.array_equal(same["moving"].affine, other["moving"].affine)
    a, b = same["moving"].data.reshape(-1), other["moving"].data.reshape(-1)
    # over pairs of voxels, the remap reverses the order of some
    g = torch.Generator().manual_seed(0)
    i, j = torch.randint(0, a.numel(), (2, 20000), generator=g)
    apart = (a[i] - a[j]).abs() > 0.05 * float(a.max())
    swapped = ((a[i] - a[j]) * (b[i] - b[j]) < 0)[apart].float().mean()
    assert 0.0 < float(swapped) < 0.9  # some reversed: no monotonic map undoes it


def test_contrast_remap_is_piecewise_linear_through_its_knots():
    rng = np.random.default_rng(0)
    x = torch.linspace(0, 2.0, 201)
    y = headers.remap_contrast(x, 2.0, np.random.default_rng(0), knots=5)
    knots = np.concatenate([[0.0], rng.uniform(0.15, 1.0, 5)]) * 2.0
    assert torch.allclose(y[::40], torch.tensor(knots, dtype=y.dtype), atol=1e-5)
    assert float(y[0]) == 0.0
