"""The summary figure: its moving-image slices equal the whole identity resampling's mid slices."""

import numpy as np
import pytest
import torch

from neuralreg import Image
from neuralreg.geometry.coordinates import apply_affine
from neuralreg.report.figures import _moving_slice, _slice_map, registration_figure
from neuralreg.result import Registration


def _oblique_pair():
    g = torch.Generator().manual_seed(0)
    moving = Image(torch.rand(9, 11, 13, generator=g), np.diag([1.2, 0.9, 1.1, 1.0]))
    rot = np.eye(4)
    c, s = np.cos(0.2), np.sin(0.2)
    rot[:2, :2] = [[c, -s], [s, c]]
    rot[:3, 3] = [0.7, -1.3, 0.4]
    fixed = Image(torch.rand(10, 8, 12, generator=g), rot @ np.diag([1.0, 1.3, 0.8, 1.0]))
    return moving, fixed


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_moving_slice_is_the_mid_slice_of_the_whole_resampling(axis):
    moving, fixed = _oblique_pair()
    whole = Registration.identity_warp(moving, fixed, mode="linear").data.float()
    expected = whole.select(axis, fixed.shape[axis] // 2).numpy()
    np.testing.assert_allclose(_moving_slice(moving, fixed, axis), expected, rtol=1e-5, atol=1e-6)


def _identity_world(fixed):
    vox = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in fixed.shape], indexing="ij"), -1)
    return vox, apply_affine(fixed.affine, vox.reshape(-1, 3)).reshape(vox.shape).float()


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_deformed_grid_slice_is_drawn_in_the_fixed_grids_voxels(axis):
    """The world map's mid slice, converted alone, is the voxel grid's mid slice (identity map, oblique grid)."""
    _, fixed = _oblique_pair()
    vox, world = _identity_world(fixed)
    expected = vox.select(axis, fixed.shape[axis] // 2).numpy()
    np.testing.assert_allclose(_slice_map(world, axis, fixed.affine), expected, atol=1e-5)


def test_deformed_grid_draws_every_few_rows_and_columns_of_the_map_as_one_collection():
    """The deformed-grid panel: one LineCollection holding every ``step``-th row and column
    of the map's in-plane coordinates, in order (rows first), nothing else drawn."""
    from matplotlib.collections import LineCollection
    from matplotlib.figure import Figure

    from neuralreg.report.figures import _deformed_grid

    g = torch.Generator().manual_seed(0)
    p0 = torch.rand(50, 30, generator=g, dtype=torch.float64).numpy() * 49
    p1 = torch.rand(50, 30, generator=g, dtype=torch.float64).numpy() * 29
    ax = Figure().subplots()
    _deformed_grid(ax, p0, p1, (50, 30), 1.0)
    assert len(ax.lines) == 0 and len(ax.collections) == 1
    (lines,) = ax.collections
    assert isinstance(lines, LineCollection)
    step = 30 // 24
    expected = [np.stack([p0[i], p1[i]], -1) for i in range(0, 50, step)]
    expected += [np.stack([p0[:, j], p1[:, j]], -1) for j in range(0, 30, step)]
    segments = lines.get_segments()
    assert len(segments) == len(expected)
    for got, want in zip(segments, expected, strict=True):
        np.testing.assert_allclose(got, want)


def test_figure_is_written_without_pyplot(tmp_path):
    moving, fixed = _oblique_pair()
    registration_figure(tmp_path / "f.png", fixed, moving, fixed, _identity_world(fixed)[1], torch.ones(fixed.shape))
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
