import numpy as np
import pytest
import torch

from neuralreg.geometry.coordinates import apply_affine, grid_points
from neuralreg.metrics import dice, jacobian_determinant, landmark_error, percent_folds


def test_dice_values():
    a = torch.tensor([[1, 1, 0, 2], [0, 0, 2, 2]])
    b = torch.tensor([[1, 0, 0, 2], [0, 0, 2, 0]])
    r = dice(a, b)
    assert r["per_label"] == {1: 2 / 3, 2: 0.8}
    assert abs(r["mean"] - (2 / 3 + 0.8) / 2) < 1e-12
    assert dice(a, a)["mean"] == 1.0


def test_jacobian_of_affine_map_in_world_units():
    aff = np.diag([0.7, 0.4, 0.4, 1.0])  # anisotropic grid
    m = np.array([[1.2, 0.1, 0.0], [0.0, 0.9, 0.2], [0.1, 0.0, 1.1]])
    x = apply_affine(aff, grid_points((6, 7, 8), dtype=torch.float64))
    phi = (x @ torch.tensor(m).T).reshape(6, 7, 8, 3)
    det = jacobian_determinant(phi, aff)
    torch.testing.assert_close(det, torch.full_like(det, float(np.linalg.det(m))))
    assert percent_folds(det) == 0.0


def test_folds_detected_and_orientation_independent():
    flip = np.diag([-1.0, 1.0, 1.0])  # an LPS-like grid: det(affine) < 0
    x = apply_affine(flip, grid_points((10, 10), dtype=torch.float64)).reshape(10, 10, 2)
    assert percent_folds(jacobian_determinant(x, flip)) == 0.0  # the identity map never folds
    folded = x.clone()
    folded[4:6, :, 0] = folded[4:6, :, 0].flip(0)  # two rows swapped
    assert percent_folds(jacobian_determinant(folded, flip)) > 0


def test_landmark_error():
    r = landmark_error(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [0.0, 0.0]]))
    assert r["mean"] == 2.5 and r["max"] == 5.0


def test_field_correction_is_the_distance_beyond_the_affine_part():
    from neuralreg.geometry.transforms import AffineTransform
    from neuralreg.metrics import field_correction

    shift = np.eye(4)
    shift[:3, 3] = (3.0, 0.0, 4.0)
    grid = ((6, 7, 8), np.diag([1.5, 1.0, 2.0, 1.0]))
    assert field_correction(AffineTransform(shift), AffineTransform(np.eye(4)), grid) == pytest.approx(5.0)
    assert field_correction(AffineTransform(shift), AffineTransform(shift), grid) == 0.0


@pytest.mark.parametrize("shape", [(19, 7, 6, 3), (5, 9, 2), (2, 4, 3, 3)])
def test_jacobian_determinant_by_slabs_is_the_whole_volume_s(shape, monkeypatch):
    """Slab by slab (with the slice before each slab) the same bits as the whole volume at once."""
    import neuralreg.metrics as metrics

    g = torch.Generator().manual_seed(0)
    d = shape[-1]
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape[:-1]], indexing="ij"), -1)
    phi = grid * 1.3 + torch.randn(shape, generator=g, dtype=torch.float64) * 0.2
    affine = np.diag([1.5] * d + [1.0])
    monkeypatch.setattr(metrics, "JACOBIAN_SLAB", 10**6)
    whole = metrics.jacobian_determinant(phi, affine)
    for slab in (1, 2, 8):  # 1: pieces of two slices, the least that has a difference
        monkeypatch.setattr(metrics, "JACOBIAN_SLAB", slab)
        assert torch.equal(metrics.jacobian_determinant(phi, affine), whole)
    assert whole.mean().item() == pytest.approx((1.3 / 1.5) ** d, rel=0.2)  # d(phi)/dx = 1.3 / 1.5 per axis
