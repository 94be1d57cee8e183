"""Knee pair families that differ in what a method could latch onto.

Every family starts from two OAI-ZIB label maps on their scans' own oblique grids with
their table offsets (``knee.load_scan_labels``) and synthesizes the intensities; they
differ in what lies around the bones and how the two images were acquired:

- ``realistic`` (the hard benchmark): muscle, fat in layers, skin and air around the leg;
  each axis of the field of view cropped or padded by up to 15 %; rotations up to 20 deg.
- ``filled``: muscle and fat to the edge of the field of view (no air), with the
  subject's own layer period and muscle islands in the fat; fields of view cropped only,
  by up to 30 % per axis (bones cut); rotations up to 15 deg.
- ``contrast``: as ``filled``, cropped by up to 25 % or padded by up to 10 %, and each
  image with its own fat contrast, anywhere from suppressed (darker than muscle) to
  bright; the moving image in thick slices (blurred along axis 0).

In the ``filled`` and ``contrast`` families the only background is the zero padding where
a field of view ends, and the soft tissue of two subjects does not correspond (thickness,
layer period, islands, intensities are the subject's own), so a method that aligns the
outline or the fat texture fails; bone and cartilage are what correspond.

A *longitudinal* pair is one knee scanned twice: the same label map and the same
subject's tissue, each scan with its own pose, offset, field of view, bias field and noise.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from neuralreg.geometry.image import Image
from neuralreg.phantoms import _blur, smooth_random_displacement
from neuralreg_eval import knee

FAMILIES = ("realistic", "filled", "contrast")

# perturb_geometry's keywords per family (realistic: its defaults)
_GEOMETRY = {
    "realistic": {},
    "filled": {"max_rotation_deg": 15.0, "fov_range": (-0.30, 0.0)},
    "contrast": {"max_rotation_deg": 15.0, "fov_range": (-0.25, 0.10)},
}


def _smooth_noise(shape, cells: int, generator: torch.Generator) -> torch.Tensor:
    """Smooth Gaussian noise on ``shape``: a lattice of ~``cells`` voxels a cell, trilinear."""
    coarse = torch.randn(1, 1, *[max(2, n // cells) for n in shape], generator=generator)
    return F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]


def filled_tissue(labels: Image, tissue_seed: int, fat_range: tuple = (0.55, 0.75)) -> torch.Tensor:
    """Noise-free intensities of a knee whose soft tissue fills the grid and belongs to one subject.

    ``tissue_seed`` draws what belongs to the subject: muscle thickness, fat layer period
    and phase, muscle islands in the fat, tissue intensities (fat from ``fat_range``: a
    low range is a fat-suppressed contrast). Returns a float tensor of the labels' shape.
    """
    rng = np.random.default_rng(tissue_seed)
    g = torch.Generator().manual_seed(tissue_seed)
    lab = labels.data.long()
    bone = (lab == knee.FEMUR) | (lab == knee.TIBIA) | (lab == 5)
    dist = knee._distance_mm(bone, labels.spacing)
    muscle = rng.uniform(4.0, 16.0)
    lam, phase = rng.uniform(3.0, 9.0), rng.uniform(0, 2 * np.pi)
    smooth = _smooth_noise(lab.shape, 6, g)
    islands = _smooth_noise(lab.shape, 12, g) > rng.uniform(0.3, 1.0)
    fat_val = rng.uniform(*fat_range) + 0.08 * torch.sin(2 * np.pi * dist / lam + phase) + 0.05 * smooth
    muscle_val = rng.uniform(0.25, 0.4) + 0.04 * smooth
    img = torch.where((dist <= muscle) | islands, muscle_val, fat_val)
    table = {
        knee.FEMUR: rng.uniform(0.3, 0.55),
        knee.TIBIA: rng.uniform(0.3, 0.55),
        5: rng.uniform(0.3, 0.55),
        knee.FEMORAL_CARTILAGE: rng.uniform(0.75, 0.92),
        knee.TIBIAL_CARTILAGE: rng.uniform(0.72, 0.9),
        6: rng.uniform(0.72, 0.9),
    }
    for k in torch.unique(lab).tolist():
        if k != 0:
            img[lab == k] = float(table.get(k, rng.uniform(0.3, 0.6)))
    return img


def scan(tissue: Image, inside: torch.Tensor | None, noise_seed: int, slice_blur: float = 0.0) -> Image:
    """What one acquisition adds to the tissue: bias field, blur, thick slices along axis 0
    (``slice_blur`` voxels, 0: none), noise; 0 outside the field of view (``inside`` False,
    the zero padding of a resampled scan)."""
    noise = torch.Generator().manual_seed(noise_seed)
    bias = smooth_random_displacement(tissue.shape, tissue.affine, 1.0, 3, noise_seed + 101)[..., 0]
    img = _blur(tissue.data.float() * (1.0 + 0.2 * bias.float()), 0.6)
    if slice_blur > 0:
        img = _blur_axis0(img, slice_blur)
    img = (img + 0.03 * torch.randn(img.shape, generator=noise)).clamp(0, 1)
    if inside is not None:
        img = img * inside
    return tissue.with_data(img)


def _blur_axis0(img: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(np.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).reshape(1, 1, -1, 1, 1)
    out = F.pad(img[None, None], (0, 0, 0, 0, radius, radius), mode="replicate")
    return F.conv3d(out, k)[0, 0]


def family_pair(family: str, fixed_path, moving_path, seed: int = 0, shape=knee.OAI_SHAPE) -> dict:
    """A synthetic pair of ``family`` (see the module doc); longitudinal when both paths are one.

    Returns:
        dict with ``moving``, ``fixed`` (float Images), ``moving_labels``, ``fixed_labels``,
        ``flipped`` (the moving knee mirrored to match the fixed one) and ``longitudinal``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    longitudinal = str(fixed_path) == str(moving_path)
    if family == "realistic" and not longitudinal:
        return {**knee.realistic_pair(fixed_path, moving_path, seed, shape), "longitudinal": False}
    fixed_labels = knee.load_scan_labels(fixed_path, shape)
    moving_labels = knee.load_scan_labels(moving_path, shape)
    flipped = not longitudinal and knee.choose_flip(moving_labels, fixed_labels)
    if flipped:
        moving_labels = knee.flip_left_right(moving_labels)
    rng = np.random.default_rng(5000 + seed)
    out = {"flipped": flipped, "longitudinal": longitudinal}
    subject_seeds = (7 * seed + 101, 7 * seed + (101 if longitudinal else 202))
    for k, (name, lab) in enumerate((("fixed", fixed_labels), ("moving", moving_labels))):
        # the subject's tissue on the scan's grid, then this acquisition's pose and field of view
        if family == "realistic":
            tissue = knee.synthesize_knee_mr(lab, None, seed=subject_seeds[k]).data
        else:
            fat = (0.55, 0.75)
            if family == "contrast":
                fat = tuple(float(v) for v in np.sort(rng.uniform(0.08, 0.75, 2)))
                fat = (fat[0], max(fat[1], fat[0] + 0.05))
            tissue = filled_tissue(lab, subject_seeds[k], fat)
        state = copy.deepcopy(rng)
        new_lab, inside = knee.perturb_geometry(lab, rng, **_GEOMETRY[family])
        new_tissue, _ = knee.perturb_geometry(lab.with_data(tissue), state, **_GEOMETRY[family])
        blur = 1.5 if family == "contrast" and name == "moving" else 0.0
        out[name] = scan(new_tissue, inside, 7 * seed + 13 * k + 3, blur)
        out[f"{name}_labels"] = new_lab
    return out
