"""The one resampling path: grid -> world -> transform -> voxel -> sample."""

import numpy as np
import torch
from scipy import ndimage

from neuralreg.geometry.coordinates import apply_affine, grid_points
from neuralreg.geometry.image import Image
from neuralreg.geometry.transforms import AffineTransform, DisplacementField, map_grid, resample
from neuralreg.testing import assert_close


def _oblique(spacing, angle_deg, origin):
    a = np.deg2rad(angle_deg)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def _smooth_image(shape, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, *[n // 4 for n in shape], generator=g)
    data = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0, 0]
    return Image(data, affine)


def test_resample_through_an_affine_matches_scipy():
    image = _smooth_image((20, 24, 28), _oblique((1.0, 1.2, 0.9), 12.0, (-10.0, 5.0, 3.0)))
    out_affine = _oblique((1.5, 1.5, 1.5), -5.0, (-8.0, 7.0, 6.0))
    move = np.eye(4)
    move[:3, 3] = (1.5, -2.0, 0.5)
    warped = resample(image, AffineTransform(move), ((12, 14, 16), out_affine))
    # scipy: out[o] = in[M o + t] with M, t the composition voxel(out) -> world -> move -> voxel(in)
    total = np.linalg.inv(image.affine) @ move @ out_affine
    ref = ndimage.affine_transform(
        image.data.numpy().astype(np.float64), total[:3, :3], total[:3, 3], output_shape=(12, 14, 16), order=1
    )
    src = apply_affine(total, grid_points((12, 14, 16), dtype=torch.float64)).reshape(12, 14, 16, 3)
    inside = ((src >= 0) & (src <= torch.tensor([19, 23, 27]))).all(-1)
    assert inside.float().mean() > 0.3
    assert_close(warped.data[inside], torch.from_numpy(ref)[inside], atol=1e-5)


def test_zero_displacement_is_the_identity_and_keeps_label_dtype():
    labels = Image(torch.randint(0, 5, (10, 12, 14)), _oblique((1.0, 1.0, 2.0), 7.0, (1.0, 2.0, 3.0)))
    zero = DisplacementField(torch.zeros(10, 12, 14, 3), labels.affine)
    warped = resample(labels, zero, (labels.shape, labels.affine), mode="nearest")
    assert warped.data.dtype == labels.data.dtype
    assert torch.equal(warped.data, labels.data)
    assert torch.equal(resample(labels, None, (labels.shape, labels.affine), "nearest").data, labels.data)


def test_map_grid_of_the_identity_is_the_grid_in_world_mm():
    affine = _oblique((0.8, 1.1, 1.3), 20.0, (5.0, -4.0, 2.0))
    world = map_grid(None, (5, 6, 7), affine, chunk=17, dtype=torch.float64)
    assert world.shape == (5, 6, 7, 3)
    assert_close(world.reshape(-1, 3), apply_affine(affine, grid_points((5, 6, 7), dtype=torch.float64)), atol=1e-12)
    move = np.eye(4)
    move[:3, 3] = (2.0, -1.0, 0.5)
    shifted = map_grid(AffineTransform(move), (5, 6, 7), affine)
    assert_close(shifted - world, torch.tensor([2.0, -1.0, 0.5]).expand(5, 6, 7, 3), atol=1e-5)
