"""The global search: rotations and FFT translations, the physical orientation among the starts."""

import numpy as np
import pytest
from knee_poses import moved, tilt

from neuralreg.geometry.coordinates import grid_corners_world
from neuralreg.optim.search import global_search, prefer_small_rotation, rotation_matrix


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


def test_a_large_rotation_wins_only_by_a_clear_margin():
    """Losses within 20 % of the best: the start rotated at least 15 deg less wins; beyond, the best loss."""
    # (loss, rotation): the lowest loss is 60 deg away; a 10 deg start is 10 % worse
    assert prefer_small_rotation([0, 1], [-0.129, -0.116], [60.0, 10.0]) == 1
    assert prefer_small_rotation([0, 1], [-0.129, -0.090], [60.0, 10.0]) == 0  # 30 % worse: the loss decides
    assert prefer_small_rotation([0, 1], [-0.70, -0.69], [8.0, 0.0]) == 0  # 8 deg apart: the loss decides
    assert prefer_small_rotation([0, 1, 2], [1.0, 1.1, 1.15], [40.0, 20.0, 5.0]) == 1  # the best of those near
    assert prefer_small_rotation([2], [9.0, 9.0, 1.0], [0.0, 0.0, 30.0]) == 2  # only candidates listed count
