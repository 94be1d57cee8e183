"""The global search: rotations and FFT translations, the physical orientation among the starts."""

import numpy as np
import pytest
from knee_poses import moved, tilt

from neuralreg.geometry.coordinates import grid_corners_world
from neuralreg.optim.search import centre_starts, global_search, prefer_small_rotation, rotation_matrix


def test_rotation_matrix_conventions():
    np.testing.assert_allclose(rotation_matrix([90.0]), [[0, -1], [1, 0]], atol=1e-12)
    r = rotation_matrix([10.0, -20.0, 30.0])
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)


def test_search_recovers_a_large_rigid_motion(phantom):
    """30 deg about one axis and 60 mm: the best candidate maps fixed points within a few mm of the truth."""
    truth = tilt(30.0, (0.0, 0.0, 1.0), (60.0, -45.0, 30.0))
    moving = moved(phantom["fixed"], truth)
    best = global_search(moving, phantom["fixed"])[0]
    corners = grid_corners_world(phantom["fixed"].shape, phantom["fixed"].affine) * 0.5
    # the search's map takes fixed points to where the moved image has them: truth @ x
    err = np.linalg.norm(
        (best.matrix[:3, :3] @ corners.T).T + best.matrix[:3, 3] - (corners @ truth[:3, :3].T + truth[:3, 3]), axis=1
    )
    assert err.max() < 8.0, err
    assert best.score > 0.8 and best.overlap > 0.9


def test_the_physical_orientation_is_always_a_candidate(phantom):
    """A 30 deg tilt: the search's best candidates are rotated, and the scanners' own orientation
    (no rotation, refined by half a step at most) is among the candidates too."""
    truth = tilt(30.0, (0.0, 0.0, 1.0), (20.0, -15.0, 10.0))
    candidates = global_search(moved(phantom["fixed"], truth), phantom["fixed"], keep=2)
    assert len(candidates) <= 3
    assert max(abs(a) for a in candidates[0].angles_deg) >= 20.0
    assert any(max(abs(a) for a in c.angles_deg) <= 10.0 for c in candidates)


def test_centre_starts_bring_the_fields_of_view_together():
    """Tissue to the edge of the field of view, the moving scan 37 mm away and padded with
    zeros on one side (its grid's centre 8 mm further): both centre starts map the fixed
    points within a voxel of the truth, at the scanners' orientation."""
    import torch

    from neuralreg.geometry.image import Image

    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(1, 1, 6, 6, 6, generator=g, dtype=torch.float64)
    tissue = torch.nn.functional.interpolate(coarse, size=(32, 32, 32), mode="trilinear")[0, 0] + 0.2
    fixed = Image(tissue.float(), np.diag([2.0, 2.0, 2.0, 1.0]))
    shift = np.array([30.0, -20.0, 10.0])
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = shift - [16.0, 0.0, 0.0]  # 8 voxels of padding before the data along axis 0
    moving = Image(torch.cat([torch.zeros(8, 32, 32), tissue.float()]), affine)
    starts = centre_starts(moving, fixed)
    assert [s.measure for s in starts] == ["centroid", "centre"]
    for start in starts:
        np.testing.assert_allclose(start.matrix[:3, :3], np.eye(3))
        assert np.abs(start.matrix[:3, 3] - shift).max() < 2.0, start.matrix[:3, 3]
        assert start.score > 0.95 and start.overlap > 0.9 and start.angles_deg == (0.0, 0.0, 0.0)


def test_a_large_rotation_wins_only_by_a_clear_margin():
    """Losses within 20 % of the best: the start rotated at least 15 deg less wins; beyond, the best loss."""
    # (loss, rotation): the lowest loss is 60 deg away; a 10 deg start is 10 % worse
    assert prefer_small_rotation([0, 1], [-0.129, -0.116], [60.0, 10.0]) == 1
    assert prefer_small_rotation([0, 1], [-0.129, -0.090], [60.0, 10.0]) == 0  # 30 % worse: the loss decides
    assert prefer_small_rotation([0, 1], [-0.70, -0.69], [8.0, 0.0]) == 0  # 8 deg apart: the loss decides
    assert prefer_small_rotation([0, 1, 2], [1.0, 1.1, 1.15], [40.0, 20.0, 5.0]) == 1  # the best of those near
    assert prefer_small_rotation([2], [9.0, 9.0, 1.0], [0.0, 0.0, 30.0]) == 2  # only candidates listed count


def test_fft_mutual_information_equals_the_histogram_of_each_shift():
    """The joint histogram of every cyclic shift by FFT gives, at any shift, the normalized
    mutual information of the soft-binned voxels inside both masks counted directly."""
    import torch

    from neuralreg.optim.search import _MaskedMI, _soft_bins

    g = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand(12, 10, 8, generator=g), torch.rand(12, 10, 8, generator=g)
    fmask = (torch.rand(12, 10, 8, generator=g) > 0.3).float()
    mmask = (torch.rand(12, 10, 8, generator=g) > 0.2).float()
    score, n = _MaskedMI(fixed, fmask)(moving, mmask, min_overlap=0.0, overlap_power=0.0)
    wf, wm = _soft_bins(fixed, fmask), _soft_bins(moving, mmask)
    for shift in [(0, 0, 0), (3, -2, 1), (-5, 4, -3)]:
        shifted = torch.roll(wm, [-s for s in shift], dims=(1, 2, 3))  # moving at x + shift
        joint = torch.einsum("ixyz,jxyz->ij", wf.double(), shifted.double())
        p = joint / joint.sum()

        def h(q):
            q = q[q > 0]
            return float(-(q * q.log()).sum())

        want = (h(p.sum(1)) + h(p.sum(0))) / h(p) - 1.0
        idx = tuple(s % dim for s, dim in zip(shift, fixed.shape, strict=True))
        assert float(n[idx]) == pytest.approx(float(joint.sum()), rel=1e-4)
        assert float(score[idx]) == pytest.approx(want, rel=1e-3, abs=1e-5)


def test_mutual_information_search_holds_across_contrasts(phantom):
    """The moving image in another contrast (tissues change order: bright cartilage dark,
    bone brighter than anything): normalized mutual information finds the motion (15 deg,
    30 mm), and ``measures`` keeps the candidates of both measures, NCC's first."""
    import torch

    truth = tilt(15.0, (0.0, 0.0, 1.0), (30.0, -20.0, 10.0))
    fixed = phantom["fixed"]
    labels = phantom["fixed_labels"].data.long()
    remap = torch.tensor([0.15, 0.9, 0.1, 0.7, 0.35])  # per label: background, femur, cartilage, tibia, ...
    other = remap[labels.clamp(max=len(remap) - 1)] + 0.02 * torch.randn(
        labels.shape, generator=torch.Generator().manual_seed(1)
    )
    moving = moved(fixed.with_data(other.float()), truth)
    corners = grid_corners_world(fixed.shape, fixed.affine) * 0.5

    def error(result):
        return np.linalg.norm(
            (result.matrix[:3, :3] @ corners.T).T + result.matrix[:3, 3] - (corners @ truth[:3, :3].T + truth[:3, 3]),
            axis=1,
        ).max()

    mi = global_search(moving, fixed, measures=("mi",))
    assert mi[0].measure == "mi" and error(mi[0]) < 8.0
    both = global_search(moving, fixed, measures=("ncc", "mi"))
    assert [c.measure for c in both] == sorted((c.measure for c in both), key=("ncc", "mi").index)
    assert {c.measure for c in both} == {"ncc", "mi"}
    assert min(error(c) for c in both if c.measure == "mi") < 8.0
    with pytest.raises(ValueError, match="unknown search measure"):
        global_search(moving, fixed, measures=("mattes",))
