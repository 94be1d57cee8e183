"""Real images with a known answer: a scan against a deformed copy of itself under another header.

The moving image is the fixed one pulled back through a smooth random deformation T
(``moving(x) = fixed(T(x))`` on the original grid), with its own noise, and then given a
header of its own: a rotation up to ``max_rotation_deg`` about a random axis through the
grid's centre and a world offset up to ``max_offset_mm`` per axis (what another session or
a broken header does). Real intensities, so what a method latches onto is real anatomy;
the right forward map (fixed -> moving world points) is known everywhere:
Phi(x) = R T^-1(x) + t.

Pairs are folders as the knee benchmark's (``moving.nii.gz``, ``fixed.nii.gz``, and
``*_labels.nii.gz`` where the scan has labels) plus ``truth.nii.gz``, the true forward
displacement on the fixed grid, and ``body.nii.gz``, where it is scored.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from neuralreg.geometry.coordinates import apply_affine, grid_points
from neuralreg.geometry.image import Image
from neuralreg.geometry.transforms import DisplacementField, map_grid
from neuralreg.metrics import dice
from neuralreg.phantoms import smooth_random_displacement
from neuralreg_eval.knee import _rotation

GROSS_FAILURE_ERROR_MM = 4.0


def _inverse_displacement(u: torch.Tensor, affine: np.ndarray, iterations: int = 30) -> torch.Tensor:
    """v with x + v(x) = T^-1(x) for T(x) = x + u(x) (fixed point v = -u(x + v)), on u's grid."""
    shape = u.shape[:-1]
    field = DisplacementField(u, affine)
    x = apply_affine(affine, grid_points(shape, dtype=torch.float64)).float()
    v = -u.reshape(-1, len(shape)).float()
    for _ in range(iterations):
        v = -(field.map_points(x + v) - (x + v))
    return v.reshape(u.shape)


def perturbed_pair(
    image: Image,
    labels: Image | None,
    seed: int,
    max_rotation_deg: float = 30.0,
    max_offset_mm: float = 50.0,
    amplitude_mm: float = 4.0,
    noise: float = 0.02,
    contrast: bool = False,
) -> dict:
    """One pair (see the module doc): ``fixed``, ``moving``, their labels (or None),
    ``truth`` (the forward displacement on the fixed grid, (*shape, 3) mm) and ``body``
    (bool, the fixed voxels above 10 % of its 99th percentile: where the truth is scored).

    ``contrast``: the moving image in another contrast, its intensities passed through
    ``remap_contrast`` (a random curve that is not monotonic: tissues swap order)."""
    rng = np.random.default_rng(seed)
    d = image.n_dims
    u = smooth_random_displacement(image.shape, image.affine, amplitude_mm, 4, seed + 7).float()
    x = apply_affine(image.affine, grid_points(image.shape, dtype=torch.float64)).float()
    pulled = x + u.reshape(-1, d)  # T(x)
    vox = apply_affine(np.linalg.inv(image.affine), pulled.double()).float()
    scale = float(torch.quantile(image.data.float().reshape(-1)[::97], 0.99))
    g = torch.Generator().manual_seed(seed)
    data = image.sample(vox, padding="border").reshape(image.shape)
    if contrast:
        data = remap_contrast(data, scale, np.random.default_rng(seed + 1000))  # the geometry as without
    data = data + noise * scale * torch.randn(image.shape, generator=g)
    moving_labels = None
    if labels is not None:
        moving_labels = labels.with_data(labels.sample(vox, mode="nearest").reshape(labels.shape).round())
    lo, hi = image.affine[:d, :d] @ np.zeros(d), image.affine[:d, :d] @ (np.asarray(image.shape) - 1.0)
    centre = image.affine[:d, d] + (lo + hi) / 2
    rot = _rotation(rng.normal(size=3), math.radians(rng.uniform(0, max_rotation_deg)))
    world = np.eye(d + 1)
    world[:d, :d] = rot
    world[:d, d] = centre - rot @ centre + rng.uniform(-max_offset_mm, max_offset_mm, d)
    v = _inverse_displacement(u, image.affine)  # T^-1(x) = x + v(x)
    truth = apply_affine(world, (x + v.reshape(-1, d)).double()).float() - x  # Phi(x) - x
    body = image.data.float() > 0.1 * scale
    return {
        "fixed": image,
        "moving": Image(data.clamp(min=0), world @ image.affine),
        "fixed_labels": labels,
        "moving_labels": None if moving_labels is None else Image(moving_labels.data, world @ image.affine),
        "truth": truth.reshape(*image.shape, d),
        "body": body,
    }


def remap_contrast(data: torch.Tensor, scale: float, rng: np.random.Generator, knots: int = 5) -> torch.Tensor:
    """Intensities through a random piecewise-linear curve: dark stays dark (air is dark in
    every MR contrast), the curve's value at each of ``knots`` evenly spaced intensities in
    (0, ``scale``] drawn from [0.15, 1] x ``scale`` (never all in increasing order), so that
    bright and mid-grey tissues change places at random (as fat and fluid do between fat-suppressed, T1 and T2
    weighting); an intensity correspondence no linear or monotonic map undoes."""
    xs = np.linspace(0.0, 1.0, knots + 1) * scale
    values = rng.uniform(0.15, 1.0, knots)
    if np.all(np.diff(values) >= 0):  # monotonic by chance: the brightest two swap
        values[-2:] = values[-2:][::-1].copy()
    ys = np.concatenate([[0.0], values]) * scale
    flat = np.interp(data.reshape(-1).numpy(), xs, ys, right=ys[-1])
    return torch.from_numpy(flat).to(data.dtype).reshape(data.shape)


def score_maps(forward, inverse, pair_dir) -> dict:
    """Mean and 95th-percentile error (mm) of a forward map against ``truth.nii.gz`` inside
    ``body.nii.gz``, the label Dice where the pair has labels, and the gross-failure flag
    (mean error above ``GROSS_FAILURE_ERROR_MM``)."""
    from neuralreg.io import read_displacement_field, read_image, read_labels

    pair_dir = Path(pair_dir)
    truth = read_displacement_field(pair_dir / "truth.nii.gz")
    body = read_image(pair_dir / "body.nii.gz").data > 0.5
    shape, affine = tuple(body.shape), truth.affine
    phi = map_grid(forward, shape, affine, chunk=int(np.prod(shape)), dtype=torch.float64)
    x = map_grid(None, shape, affine, chunk=int(np.prod(shape)), dtype=torch.float64)
    error = torch.linalg.norm(phi - (x + truth.data.double()), dim=-1)[body]
    out = {
        "error_mm": float(error.mean()),
        "error_p95_mm": float(torch.quantile(error[:: max(1, error.numel() // 200000)], 0.95)),
    }
    if (pair_dir / "fixed_labels.nii.gz").exists():
        from neuralreg.geometry.transforms import sample_world

        fixed_labels = read_labels(pair_dir / "fixed_labels.nii.gz")
        moving_labels = read_labels(pair_dir / "moving_labels.nii.gz")
        warped = sample_world(moving_labels, phi, "nearest").round().long()
        regions = sorted(set(torch.unique(fixed_labels.data.long()).tolist()) - {0})
        out["dice"] = dice(warped, fixed_labels.data.long(), regions)["mean"]
    out["gross_failure"] = bool(not out["error_mm"] <= GROSS_FAILURE_ERROR_MM)
    return out
